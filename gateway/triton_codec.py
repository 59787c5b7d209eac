"""Tensors of the Triton model "llm" on the wire: protobuf encoding and parsing.

The mapping itself (names, dtypes, defaults) is trident.contract's ``llm_inputs``, which the
"llm" model reads back with ``read_llm_inputs``. No network here: this module turns a
:class:`trident.contract.TextRequest` into a ``ModelInferRequest``
and a ``ModelStreamInferResponse`` back into gateway events, so both are tested without
a server. Wire format (KServe v2 / Triton gRPC): every tensor has a leading batch dimension 1
and travels in ``raw_input_contents`` / ``raw_output_contents`` as little-endian bytes; BYTES
tensors are elements each prefixed with their 4-byte little-endian length.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
from tritonclient.grpc import service_pb2

from trident.contract import ADMISSION_PARAMETER, INVALID_REQUEST, SERVER_ERROR, llm_inputs, parse_error

from .backend import Finished
from .errors import ApiError, ClientError, internal_error, unavailable

__all__ = ["build_infer_request", "llm_inputs", "parse_stream_response", "serialize", "tagged_error"]

_DATATYPES: dict[np.dtype, str] = {
    np.dtype(np.bool_): "BOOL",
    np.dtype(np.int32): "INT32",
    np.dtype(np.int64): "INT64",
    np.dtype(np.uint64): "UINT64",
    np.dtype(np.float32): "FP32",
    np.dtype(np.float64): "FP64",
    np.dtype(np.object_): "BYTES",
}

FINAL_FLAG = "triton_final_response"
EMPTY_FINAL = "triton_enable_empty_final_response"


def serialize(array: np.ndarray) -> tuple[str, bytes]:
    """Triton datatype and raw little-endian contents of ``array``."""
    datatype = _DATATYPES.get(array.dtype)
    if datatype is None:
        raise TypeError(f"no Triton datatype for numpy dtype {array.dtype}")
    if datatype == "BYTES":
        items = [item if isinstance(item, bytes) else str(item).encode("utf-8") for item in array.flat]
        return datatype, b"".join(struct.pack("<I", len(item)) + item for item in items)
    return datatype, np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def build_infer_request(
    model_name: str, inputs: dict[str, np.ndarray], *, request_id: str = "", admission: bool = False
) -> service_pb2.ModelInferRequest:
    """A ``ModelInferRequest`` that asks for the empty final response, so the final flag arrives,
    and with ``admission`` for the "llm" model's admission response (trident.contract)."""
    request = service_pb2.ModelInferRequest(model_name=model_name, id=request_id)
    request.parameters[EMPTY_FINAL].bool_param = True
    if admission:
        request.parameters[ADMISSION_PARAMETER].bool_param = True
    for name, array in inputs.items():
        datatype, raw = serialize(array)
        tensor = request.inputs.add()
        tensor.name = name
        tensor.datatype = datatype
        tensor.shape.extend(array.shape)
        request.raw_input_contents.append(raw)
    return request


@dataclass(frozen=True, slots=True)
class StreamResponse:
    """One parsed ``ModelStreamInferResponse`` of "llm"."""

    text: str  # "" when the response holds no text_output
    finished: Finished | None  # set on the response that carries finish_reason and the counts
    final: bool  # the triton_final_response flag
    admitted: bool = False  # the admission response (non-final, no text)
    server: str | None = None  # which Triton took the request (on the admission)


_SCALAR_FORMATS = {"INT32": "<i", "INT64": "<q", "UINT64": "<Q"}


def _first_element(datatype: str, raw: bytes) -> bytes | int:
    """The first element of a raw output tensor, without numpy (this runs once per token)."""
    try:
        if datatype == "BYTES":
            (length,) = struct.unpack_from("<I", raw, 0)
            return raw[4:4 + length]
        fmt = _SCALAR_FORMATS.get(datatype)
        if fmt is None:
            raise ValueError(f"unexpected output datatype {datatype}")
        return struct.unpack_from(fmt, raw, 0)[0]
    except struct.error as exc:
        raise ValueError(f"truncated {datatype} output: {exc}") from None


def parse_stream_response(
    response: service_pb2.ModelStreamInferResponse, *, request_id: str, retry_after: int
) -> StreamResponse:
    """Events of one stream response; an ``error_message`` is raised as the mapped ApiError.

    Raises ValueError for a response that does not follow the "llm" interface.
    """
    if response.error_message:
        raise model_error(response.error_message, request_id=request_id, retry_after=retry_after)
    infer = response.infer_response
    final = FINAL_FLAG in infer.parameters and infer.parameters[FINAL_FLAG].bool_param
    if len(infer.raw_output_contents) != len(infer.outputs):
        raise ValueError("Triton response without raw_output_contents for every output")
    values: dict[str, bytes | int] = {}
    for tensor, raw in zip(infer.outputs, infer.raw_output_contents, strict=True):
        if raw:  # an empty tensor holds no element
            values[tensor.name] = _first_element(tensor.datatype, raw)
    finished = None
    if "finish_reason" in values:
        if "prompt_tokens" not in values or "completion_tokens" not in values:
            raise ValueError("Triton response with finish_reason but without token counts")
        finished = Finished(
            finish_reason=bytes(values["finish_reason"]).decode("utf-8"),
            prompt_tokens=int(values["prompt_tokens"]),
            completion_tokens=int(values["completion_tokens"]),
        )
    text = values.get("text_output", b"")
    return StreamResponse(
        text=text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text),
        finished=finished,
        final=bool(final),
        admitted=not final and "text_output" not in values and finished is None,
        server=bytes(values["server"]).decode("utf-8", "replace") if "server" in values else None,
    )


_NOT_LOADED = ("Request for unknown model", "is not ready", "has no available versions")


def tagged_error(message: str, *, retry_after: int) -> ApiError | None:
    """The error a tagged model message stands for (trident.contract.parse_error), or None when
    it has no tag, or only the generic server-error one."""
    tagged = parse_error(message)
    if tagged is None or tagged.kind == SERVER_ERROR:
        return None
    if tagged.kind == INVALID_REQUEST:
        return ClientError(tagged.message, param=tagged.param)
    return unavailable(tagged.message, retry_after)


def model_error(message: str, *, request_id: str, retry_after: int) -> ApiError:
    """Map a Triton/model error message: tags to 400/503, a model not loaded to 503, else 500."""
    error = tagged_error(message, retry_after=retry_after)
    if error is not None:
        return error
    if any(marker in message for marker in _NOT_LOADED):
        error = unavailable("The model is not loaded on the inference server; try again later", retry_after)
    else:
        error = internal_error(request_id)
    error.detail = message
    return error
