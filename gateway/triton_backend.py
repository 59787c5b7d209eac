"""The Triton gRPC implementation of :class:`gateway.backend.Backend`.

As measured in shared/ARCHITECTURE.md: one gRPC channel and one ``GRPCInferenceServiceStub``
per worker process, created lazily on first use (after ``gateway.worker`` ran
``grpc.experimental.gevent.init_gevent()``, and re-created after a fork), one
``ModelStreamInfer`` call per HTTP request with a one-item request iterator, the request
parameter ``triton_enable_empty_final_response`` so the final flag arrives, and
``call.cancel()`` on close. Calls never wait for a connection (``wait_for_ready=False``): Triton
down is a fast 503, not a hang. tritonclient's ``InferenceServerClient`` is deliberately not
used: it holds one stream at a time, and one request's ``stop_stream`` cancels another's.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from trident.contract import ModelLimits, TextRequest, llm_inputs

from .backend import ADMITTED, Event, Finished, TextDelta
from .errors import ApiError, internal_error, timeout_error, unavailable
from .triton_codec import build_infer_request, parse_stream_response, tagged_error

log = logging.getLogger("trident.gateway.triton")

_UNAVAILABLE_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)


class TritonGeneration:
    """One ``ModelStreamInfer`` call, read as gateway events (see ``backend.Generation``)."""

    def __init__(self, call: Any, *, request_id: str, retry_after: int, timeout: float) -> None:
        self._call = call
        self._request_id = request_id
        self._log_extra = {"request_id": request_id}  # iterated outside the request context
        self._retry_after = retry_after
        self._timeout = timeout
        self._closed = False

    def __iter__(self) -> Iterator[Event]:
        finished: Finished | None = None
        try:
            for response in self._call:
                parsed = parse_stream_response(
                    response, request_id=self._request_id, retry_after=self._retry_after
                )
                if parsed.admitted:
                    yield ADMITTED
                    continue
                if parsed.text:
                    yield TextDelta(parsed.text)
                if parsed.finished is not None:
                    finished = parsed.finished
                if parsed.final:
                    # Let the server end the call itself (it does right after the final
                    # response, the request side being closed): cancelling a call whose
                    # request already completed left Triton holding the "llm" model at unload.
                    self._drain()
                    break
        except grpc.RpcError as err:
            if self._closed:
                return
            raise self._rpc_error(err) from None
        except ApiError as err:
            if err.detail:
                log.error("model error: %s", err.detail, extra=self._log_extra)
            raise
        except ValueError as err:  # a response that does not follow the "llm" interface
            log.error("bad response from Triton: %s", err, extra=self._log_extra)
            raise internal_error(self._request_id) from None
        if self._closed:
            return
        if finished is None:
            log.error("Triton stream ended without finish_reason", extra=self._log_extra)
            raise internal_error(self._request_id)
        yield finished

    def _drain(self) -> None:
        for _ in self._call:
            pass

    def close(self) -> None:
        self._closed = True
        self._call.cancel()  # a no-op once the call has ended

    def _rpc_error(self, err: grpc.RpcError) -> ApiError:
        code, details = err.code(), err.details() or ""
        tagged = tagged_error(details, retry_after=self._retry_after)
        if tagged is not None:
            return tagged
        log.warning("Triton gRPC error: %s %s", code, details, extra=self._log_extra)
        if code in _UNAVAILABLE_CODES or code == grpc.StatusCode.CANCELLED:
            return unavailable("The inference server is unavailable; try again later", self._retry_after)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            # REQUEST_TIMEOUT is the gRPC deadline of the whole generation, queueing included;
            # gRPC cancels the call on the server, so the engine frees the slot. Before the first
            # event this is an HTTP 504, later an error event with the same object.
            return timeout_error(self._timeout, self._request_id)
        return internal_error(self._request_id)


class TritonBackend:
    """Generations on a Triton server over gRPC (see the module docstring).

    ``models`` maps each public model name to the Triton model serving it, e.g.
    ``{"smollm2-135m-instruct": "llm"}``.
    """

    def __init__(
        self,
        *,
        url: str,
        models: Mapping[str, str],
        request_timeout: float = 600.0,
        ready_timeout: float = 2.0,
        connect_timeout: float = 5.0,
        retry_after: int = 5,
    ) -> None:
        self.url = url
        self.models = dict(models)
        self.request_timeout = request_timeout
        self.ready_timeout = ready_timeout
        self.connect_timeout = connect_timeout
        self.retry_after = retry_after
        self._pid: int | None = None
        self._channel: grpc.Channel | None = None
        self._stub: service_pb2_grpc.GRPCInferenceServiceStub | None = None
        self._limits: dict[str, ModelLimits] = {}

    def _channel_options(self) -> list[tuple[str, int]]:
        return [
            ("grpc.max_send_message_length", -1),
            ("grpc.max_receive_message_length", -1),
            # gRPC core takes this as the minimum connect timeout (default 20 s).
            ("grpc.min_reconnect_backoff_ms", int(self.connect_timeout * 1000)),
            # Reconnect soon after Triton comes back (the default backoff grows to 120 s,
            # during which every call would fail fast with UNAVAILABLE).
            ("grpc.initial_reconnect_backoff_ms", 500),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]

    @property
    def stub(self) -> service_pb2_grpc.GRPCInferenceServiceStub:
        """This process's stub, created on first use (never before init_gevent, never shared
        across a fork). No lock: under gevent nothing yields here; under threads a race at
        worst makes one extra channel, which is closed."""
        pid = os.getpid()
        if self._stub is None or self._pid != pid:
            channel = grpc.insecure_channel(self.url, options=self._channel_options())
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            if self._stub is not None and self._pid == pid:  # another thread won the race
                channel.close()
            else:
                self._channel, self._stub, self._pid = channel, stub, pid
        assert self._stub is not None
        return self._stub

    def generate(self, params: TextRequest, *, request_id: str) -> TritonGeneration:
        triton_model = self.models[params.model]
        request = build_infer_request(triton_model, llm_inputs(params), request_id=request_id, admission=True)
        call = self.stub.ModelStreamInfer(
            iter((request,)), timeout=self.request_timeout, wait_for_ready=False
        )
        return TritonGeneration(
            call, request_id=request_id, retry_after=self.retry_after, timeout=self.request_timeout
        )

    def check_ready(self) -> None:
        stub, timeout = self.stub, self.ready_timeout
        try:
            if not stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=timeout, wait_for_ready=False).live:
                raise unavailable("The inference server is not live", self.retry_after)
            if not stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=timeout, wait_for_ready=False).ready:
                raise unavailable("The inference server is not ready", self.retry_after)
            for public, triton_model in self.models.items():
                request = service_pb2.ModelReadyRequest(name=triton_model)
                if not stub.ModelReady(request, timeout=timeout, wait_for_ready=False).ready:
                    raise unavailable(f"The model '{public}' is not ready", self.retry_after)
                self._limits[triton_model] = self._read_limits(triton_model)  # kept fresh by probes
        except grpc.RpcError as err:
            log.warning("Triton readiness check failed: %s %s", err.code(), err.details())
            raise unavailable("The inference server is unreachable", self.retry_after) from None

    def limits(self, model: str) -> ModelLimits:
        """The Triton model's limits from its config parameters (the repository build wrote them):
        asked once per worker process, refreshed by every readiness check."""
        if model not in self._limits:
            try:
                self._limits[model] = self._read_limits(model)
            except grpc.RpcError as err:
                log.warning("reading the limits of %s failed: %s %s", model, err.code(), err.details())
                raise unavailable("The inference server is unreachable", self.retry_after) from None
        return self._limits[model]

    def _read_limits(self, model: str) -> ModelLimits:
        response = self.stub.ModelConfig(service_pb2.ModelConfigRequest(name=model), timeout=self.ready_timeout,
                                         wait_for_ready=False)
        params = {k: v.string_value for k, v in response.config.parameters.items()}
        return ModelLimits.from_parameters(params)

    def close(self) -> None:
        if self._channel is not None and self._pid == os.getpid():
            self._channel.close()
        self._channel = self._stub = self._pid = None
