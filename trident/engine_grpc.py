"""The engine model over Triton's own gRPC endpoint: the ``llm`` model's
:class:`trident.llm_io.EngineClient`.

Why not BLS (a decoupled ``InferenceRequest.exec`` inside the stub): the Python backend's stub
(python_backend r24.10, and its main branch as of 2026-12) has a lock-order cycle between
``InferenceRequest.exec(decoupled=True)`` (holds the GIL, waits for the response-iterator map's
mutex), its BLS response thread (holds that mutex, waits for one iterator's mutex) and
``ResponseIterator.Next`` (woken holding the iterator's mutex, waits for the GIL). It hung the
whole ``llm`` model under load about once in 11 disconnect storms here (docs/architecture.md),
and no Python code can order those C++ locks. A gRPC stream per engine request involves none
of them: the stub's threads only block in grpcio, which releases the GIL.

One ``ModelStreamInfer`` call per engine request (Triton cancels a request when its call is
cancelled), one channel shared by every worker thread (HTTP/2 streams on one connection).
The engine's ``stop`` request (TensorRT-LLM's way to end a request by id, which trident's CPU
engine shares) is one more short call.
"""
from __future__ import annotations

import logging
import os
import struct
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grpc
import grpc.experimental
import numpy as np
from tritonclient.grpc import service_pb2

from .contract import ENGINE_GRPC_ENV
from .engine_tensors import ENGINE_OUTPUTS, OUTPUT_IDS, SEQUENCE_LENGTH, read_response, stop_inputs
from .error_tags import SERVER_ERROR, UNAVAILABLE, tag_error
from .llm_io import EngineChunk
from .triton_wire import STREAM_METHOD, infer_request, is_final, output_arrays

log = logging.getLogger("trident.llm")

DEFAULT_URL = "127.0.0.1:8001"  # tritonserver's default --grpc-port, on every address
STOP_TIMEOUT = 30.0  # seconds a stop request may take before it is given up (and logged)


def engine_url(environ: Mapping[str, str] = os.environ) -> str:
    """Where ``llm`` reaches the engine model: :data:`trident.contract.ENGINE_GRPC_ENV`, else
    :data:`DEFAULT_URL`."""
    return environ.get(ENGINE_GRPC_ENV) or DEFAULT_URL


def plain_token_ids(response: Any) -> list[int] | None:
    """The new token ids of a response that carries ``output_ids`` (INT32) and at most
    ``sequence_length`` besides (what llm asks for without log-probabilities or choices), read
    without numpy; None for any other response (:func:`read_response` reads it). Once per token
    at GPU rates: 2.2 us against 7.6 through the arrays and read_response (timeit)."""
    outputs, raws = response.outputs, response.raw_output_contents
    if not outputs or len(outputs) != len(raws):
        return None
    ids = None
    for tensor, raw in zip(outputs, raws):
        if tensor.name == OUTPUT_IDS and tensor.datatype == "INT32" and len(raw) % 4 == 0:
            ids = raw
        elif tensor.name != SEQUENCE_LENGTH:
            return None
    return None if ids is None else list(struct.unpack(f"<{len(ids) // 4}i", ids))


class GrpcEngine:
    """trident.llm_io.EngineClient: the engine model, streamed over Triton's gRPC endpoint."""

    def __init__(self, model_name: str, url: str, *, stop_timeout: float = STOP_TIMEOUT) -> None:
        self.model_name = model_name
        self.url = url
        self.stop_timeout = stop_timeout
        # No message size limit: a request's embedding_bias is a vocabulary-wide float row.
        # SingleThreadedUnaryStream: the thread that reads a call waits in gRPC core for that
        # call's next message itself, instead of being woken through a condition variable by
        # grpcio's channel thread for every message (two thread wake-ups and GIL hand-offs a
        # message; context switches were about a third of the stub's CPU under load, perf).
        self._channel = grpc.insecure_channel(url, options=[
            ("grpc.max_send_message_length", -1),
            ("grpc.max_receive_message_length", -1),
            (grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1),
        ])
        # ModelStreamInfer is bidirectional, but every call here sends one request and closes its
        # side: invoked as server-streaming (the same bytes on the wire), grpcio sends both in one
        # batch instead of starting a thread per call to consume a request iterator.
        self._call = self._channel.unary_stream(
            STREAM_METHOD,
            request_serializer=service_pb2.ModelInferRequest.SerializeToString,
            response_deserializer=service_pb2.ModelStreamInferResponse.FromString,
        )

    def close(self) -> None:
        self._channel.close()

    def stream(self, tensors: dict[str, np.ndarray], engine_id: str, outputs: Sequence[str] = ENGINE_OUTPUTS
               ) -> Iterator[EngineChunk]:
        request = infer_request(self.model_name, tensors, request_id=engine_id, outputs=outputs)
        # Sending one request and closing our side ends nothing: Triton answers until its final
        # response, then ends the call.
        call = self._call(request)
        finished = False
        try:
            for response in call:
                if finished:
                    continue  # nothing follows the final response but the call's end
                infer = response.infer_response
                # Set before the chunk is handed over: the caller may stop reading at any chunk.
                finished = is_final(infer)  # an error response is final too (the engine's errors are)
                if response.error_message:
                    yield EngineChunk(error=response.error_message)
                    continue
                ids = plain_token_ids(infer)
                if ids is not None:  # the common response: new token ids only
                    yield EngineChunk(token_ids=ids, final=finished)
                    continue
                arrays = output_arrays(infer)
                if arrays:
                    yield EngineChunk.of(read_response(arrays.get), final=finished)
        except grpc.RpcError as exc:
            if not finished:
                yield EngineChunk(error=self._failure(exc, engine_id))
        finally:
            if not finished:
                # The caller left early (or an error): Triton cancels the engine request.
                call.cancel()
            else:
                # Never cancel after the final response, not even by dropping the call (grpcio
                # cancels a call it collects unfinished): Triton 2.51 then kept the engine
                # model's request counted as in flight, and the model could not unload at
                # shutdown. Triton ends the call right after the final response.
                try:
                    for _ in call:
                        pass
                except grpc.RpcError:
                    pass

    def stop(self, engine_id: str) -> None:
        request = infer_request(self.model_name, stop_inputs(), request_id=engine_id, outputs=(OUTPUT_IDS,))
        # Read to the call's end (Triton ends it after the final response): see ``stream``.
        for response in self._call(request, timeout=self.stop_timeout):
            if response.error_message:
                log.info("llm: the engine refused the stop of %s: %s", engine_id, response.error_message)

    def _failure(self, exc: Any, engine_id: str) -> str:
        code = exc.code() if hasattr(exc, "code") else None
        details = exc.details() if hasattr(exc, "details") else str(exc)
        log.warning("llm: engine stream %s failed over gRPC (%s): %s", engine_id, code, details)
        # UNAVAILABLE (Triton shutting down, not listening yet): the gateway's 503, retried later.
        kind = UNAVAILABLE if code == grpc.StatusCode.UNAVAILABLE else SERVER_ERROR
        return tag_error(kind, "the engine stream failed" if kind == SERVER_ERROR else "the engine is not available")
