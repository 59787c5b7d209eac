"""Tensors on Triton's gRPC wire (KServe v2): numpy arrays to ``ModelInferRequest`` and a
``ModelInferResponse``'s outputs back to numpy. Used by the gateway (to ``llm``) and by ``llm``
(to the engine model, trident.engine_grpc).

Every tensor travels in ``raw_input_contents`` / ``raw_output_contents`` as little-endian bytes;
a BYTES tensor's elements are each prefixed with their 4-byte little-endian length.
"""
from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping

import numpy as np
from tritonclient.grpc import service_pb2

#: Response parameter that marks a stream's last response (Triton sets it when the request asks
#: for it with :data:`EMPTY_FINAL`).
FINAL_FLAG = "triton_final_response"
#: Request parameter: send the final flag, in an empty response when the model's last one had
#: outputs already.
EMPTY_FINAL = "triton_enable_empty_final_response"
#: The streaming method: one request and its responses per call (see :func:`infer_request`).
STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"

DATATYPES: dict[np.dtype, str] = {
    np.dtype(np.bool_): "BOOL",
    np.dtype(np.int32): "INT32",
    np.dtype(np.int64): "INT64",
    np.dtype(np.uint64): "UINT64",
    np.dtype(np.float32): "FP32",
    np.dtype(np.float64): "FP64",
    np.dtype(np.object_): "BYTES",
}
_NUMPY_OF = {name: dtype.newbyteorder("<") for dtype, name in DATATYPES.items() if name != "BYTES"}


def serialize(array: np.ndarray) -> tuple[str, bytes]:
    """Triton datatype and raw little-endian contents of ``array``."""
    datatype = DATATYPES.get(array.dtype)
    if datatype is None:
        raise TypeError(f"no Triton datatype for numpy dtype {array.dtype}")
    if datatype == "BYTES":
        items = [item if isinstance(item, bytes) else str(item).encode("utf-8") for item in array.flat]
        return datatype, b"".join(struct.pack("<I", len(item)) + item for item in items)
    return datatype, np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def deserialize(datatype: str, shape: Iterable[int], raw: bytes) -> np.ndarray:
    """The numpy array of one raw tensor (BYTES as an object array of ``bytes``)."""
    shape = tuple(int(d) for d in shape)
    if datatype == "BYTES":
        items, offset = [], 0
        while offset < len(raw):
            (length,) = struct.unpack_from("<I", raw, offset)
            items.append(raw[offset + 4:offset + 4 + length])
            offset += 4 + length
        out = np.empty(len(items), dtype=np.object_)
        out[:] = items
        return out.reshape(shape)
    dtype = _NUMPY_OF.get(datatype)
    if dtype is None:
        raise ValueError(f"unsupported Triton datatype {datatype}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def infer_request(model_name: str, inputs: Mapping[str, np.ndarray], *, request_id: str = "",
                  outputs: Iterable[str] = (), bool_parameters: Iterable[str] = ()
                  ) -> service_pb2.ModelInferRequest:
    """A ``ModelInferRequest`` that asks for the final flag (:data:`EMPTY_FINAL`), for
    ``outputs`` only when given (all of the model's otherwise), with each of
    ``bool_parameters`` set to true."""
    request = service_pb2.ModelInferRequest(model_name=model_name, id=request_id)
    request.parameters[EMPTY_FINAL].bool_param = True
    for name in bool_parameters:
        request.parameters[name].bool_param = True
    for name, array in inputs.items():
        datatype, raw = serialize(array)
        tensor = request.inputs.add()
        tensor.name = name
        tensor.datatype = datatype
        tensor.shape.extend(array.shape)
        request.raw_input_contents.append(raw)
    for name in outputs:
        request.outputs.add().name = name
    return request


def is_final(response: service_pb2.ModelInferResponse) -> bool:
    flag = response.parameters.get(FINAL_FLAG)
    return flag is not None and flag.bool_param


def output_arrays(response: service_pb2.ModelInferResponse) -> dict[str, np.ndarray]:
    """Every output of a response as a numpy array, by name."""
    outputs, raws = response.outputs, response.raw_output_contents
    if len(raws) != len(outputs):
        raise ValueError("Triton response without raw_output_contents for every output")
    return {tensor.name: deserialize(tensor.datatype, tensor.shape, raw) for tensor, raw in zip(outputs, raws)}
