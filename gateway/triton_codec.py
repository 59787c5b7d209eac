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
from typing import Any

import numpy as np
from tritonclient.grpc import service_pb2

from trident.contract import (
    ADMISSION_PARAMETER,
    CANCEL_PARAMETER,
    CANCEL_TOKEN_PARAMETER,
    INVALID_REQUEST,
    PROMPT_TOKEN_OUTPUTS,
    SERVER_ERROR,
    TOKEN_OUTPUTS,
    control_inputs,
    llm_inputs,
    parse_error,
)
from trident.triton_wire import FINAL_FLAG, infer_request, serialize

from .backend import ChoiceEnd, PromptLogprobs, TokenLogprobs
from .errors import ApiError, ClientError, internal_error, unavailable

__all__ = ["build_infer_request", "llm_inputs", "parse_stream_response", "serialize", "tagged_error"]


def build_infer_request(
    model_name: str, inputs: dict[str, np.ndarray], *, request_id: str = "", admission: bool = False,
    cancel_token: str | None = None,
) -> service_pb2.ModelInferRequest:
    """A ``ModelInferRequest`` that asks for the empty final response, so the final flag arrives,
    with ``admission`` for the "llm" model's admission response, and with ``cancel_token`` so
    that :func:`build_cancel_request` can end it (trident.contract)."""
    request = infer_request(model_name, inputs, request_id=request_id,
                            bool_parameters=(ADMISSION_PARAMETER,) if admission else ())
    if cancel_token:
        request.parameters[CANCEL_TOKEN_PARAMETER].string_param = cancel_token
    return request


def build_cancel_request(model_name: str, cancel_token: str) -> service_pb2.ModelInferRequest:
    """The "llm" request that ends the request carrying ``cancel_token`` (trident.contract
    CANCEL_PARAMETER), with the inputs Triton requires (ignored by the model)."""
    request = infer_request(model_name, control_inputs())
    request.parameters[CANCEL_PARAMETER].string_param = cancel_token
    return request


@dataclass(frozen=True, slots=True)
class StreamResponse:
    """One parsed ``ModelStreamInferResponse`` of "llm"."""

    text: str  # "" when the response holds no text_output
    finished: ChoiceEnd | None  # on a choice's last response: its finish_reason and counts
    final: bool  # the triton_final_response flag
    admitted: bool = False  # the admission response (non-final, no text)
    server: str | None = None  # which Triton took the request (on the admission)
    index: int = 0  # the choice (sequence_index)
    logprobs: TokenLogprobs | None = None  # the tokens of ``text``, when asked for
    prompt_tokens: int = 0  # with ``finished``
    cached_tokens: int | None = None  # with ``finished``, when the engine reports it
    prompt_token_ids: tuple[int, ...] | None = None  # on the admission, when asked for
    prompt_logprobs: PromptLogprobs | None = None  # on a response of its own before the text, when asked for
    output_tokens: int | None = None  # NVIDIA's num_output_tokens, when asked for (return_num_output_tokens)


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
    flag = infer.parameters.get(FINAL_FLAG)
    final = flag is not None and flag.bool_param
    outputs, raws = infer.outputs, infer.raw_output_contents
    if len(raws) != len(outputs):
        raise ValueError("Triton response without raw_output_contents for every output")
    if len(outputs) == 1:  # the common response, once per token or group: text only
        tensor, raw = outputs[0], raws[0]
        if tensor.name == "text_output" and tensor.datatype == "BYTES" and raw:
            text = _first_element("BYTES", raw)
            return StreamResponse(text=text.decode("utf-8", errors="replace"), finished=None, final=bool(final))
    values: dict[str, bytes | int] = {}
    arrays: dict[str, tuple[Any, list[int], bytes]] = {}
    for tensor, raw in zip(outputs, raws, strict=True):
        if tensor.name in _ARRAY_OUTPUTS:  # logprobs: whole tensors, only when asked for
            arrays[tensor.name] = (tensor.datatype, list(tensor.shape), raw)
        elif raw:  # an empty tensor holds no element
            values[tensor.name] = _first_element(tensor.datatype, raw)
    index = int(values.get("sequence_index", 0))
    finished = None
    if "finish_reason" in values:
        if "prompt_tokens" not in values or "completion_tokens" not in values:
            raise ValueError("Triton response with finish_reason but without token counts")
        cum = arrays.get("cum_log_probs")
        finished = ChoiceEnd(
            index=index,
            finish_reason=bytes(values["finish_reason"]).decode("utf-8"),
            completion_tokens=int(values["completion_tokens"]),
            cum_logprob=float(_array(*cum)[0]) if cum is not None and cum[2] else None,
            stop=bytes(values["stop_sequence"]).decode("utf-8", "replace") if "stop_sequence" in values
            else int(values["stop_token_id"]) if "stop_token_id" in values else None,
        )
    text = values.get("text_output", b"")
    return StreamResponse(
        text=text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text),
        finished=finished,
        final=bool(final),
        admitted=not final and "text_output" not in values and finished is None and "prompt_log_probs" not in arrays,
        server=bytes(values["server"]).decode("utf-8", "replace") if "server" in values else None,
        index=index,
        logprobs=_token_logprobs(arrays) if "output_log_probs" in arrays else None,
        prompt_logprobs=_prompt_logprobs(arrays) if "prompt_log_probs" in arrays else None,
        prompt_token_ids=tuple(int(i) for i in _array(*arrays["prompt_token_ids"])) if "prompt_token_ids" in arrays
        else None,
        output_tokens=int(values["num_output_tokens"]) if "num_output_tokens" in values else None,
        prompt_tokens=int(values.get("prompt_tokens", 0)),
        cached_tokens=int(values["cached_tokens"]) if "cached_tokens" in values else None,
    )


_ARRAY_OUTPUTS = frozenset((*TOKEN_OUTPUTS, *PROMPT_TOKEN_OUTPUTS, "cum_log_probs", "prompt_log_prob_ranks"))
_NUMPY = {"INT32": "<i4", "FP32": "<f4"}


def _array(datatype: str, shape: list[int], raw: bytes) -> list[Any]:
    """A whole output tensor, flattened: strings for BYTES, numbers otherwise."""
    if datatype == "BYTES":
        out, offset = [], 0
        while offset < len(raw):
            (length,) = struct.unpack_from("<I", raw, offset)
            out.append(raw[offset + 4:offset + 4 + length].decode("utf-8", "replace"))
            offset += 4 + length
        return out
    if datatype not in _NUMPY:
        raise ValueError(f"unexpected output datatype {datatype}")
    return np.frombuffer(raw, dtype=_NUMPY[datatype]).tolist()


def _token_logprobs(arrays: dict[str, tuple[Any, list[int], bytes]],
                    names: tuple[str, ...] = TOKEN_OUTPUTS) -> TokenLogprobs:
    """The tokens in the outputs ``names`` (texts, ids, log-probabilities and the alternatives':
    texts, log-probabilities, ids)."""
    texts_name, ids_name, logprobs_name, top_texts_name, top_name, top_ids_name = names
    logprobs = _array(*arrays[logprobs_name])
    n = len(logprobs)
    texts = _array(*arrays[texts_name]) if texts_name in arrays else [""] * n
    ids = _array(*arrays[ids_name]) if ids_name in arrays else [0] * n
    if len(texts) != n or len(ids) != n:
        raise ValueError("Triton response with token texts, ids and logprobs of different lengths")
    top = top_ids = None
    if top_name in arrays and top_texts_name in arrays:
        values, alternatives = _array(*arrays[top_name]), _array(*arrays[top_texts_name])
        k = arrays[top_name][1][-1] if n else 0
        alternative_ids = _array(*arrays[top_ids_name]) if top_ids_name in arrays else None
        if len(values) != n * k or len(alternatives) != n * k or (
                alternative_ids is not None and len(alternative_ids) != n * k):
            raise ValueError("Triton response with top log-probabilities of the wrong shape")
        rows = [[j for j in range(i * k, i * k + k) if values[j] != float("-inf")] for i in range(n)]
        top = tuple(tuple((alternatives[j], values[j]) for j in row) for row in rows)
        if alternative_ids is not None:
            top_ids = tuple(tuple(int(alternative_ids[j]) for j in row) for row in rows)
    return TokenLogprobs(tuple(texts), tuple(int(i) for i in ids), tuple(logprobs), top, top_ids)


def _prompt_logprobs(arrays: dict[str, tuple[Any, list[int], bytes]]) -> PromptLogprobs:
    tokens = _token_logprobs(arrays, PROMPT_TOKEN_OUTPUTS)
    ranks = _array(*arrays["prompt_log_prob_ranks"]) if "prompt_log_prob_ranks" in arrays else [0] * len(tokens.tokens)
    if len(ranks) != len(tokens.tokens):
        raise ValueError("Triton response with prompt log-probabilities and ranks of different lengths")
    return PromptLogprobs(tokens, tuple(int(r) for r in ranks))


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
