"""The Triton gRPC implementation of :class:`gateway.backend.Backend`.

One channel per worker process, on the relay loop (gateway.triton_relay), created lazily on
first use and again after a fork; one bidirectional ``ModelStreamInfer`` call per HTTP request,
with the request parameters ``triton_enable_empty_final_response`` (so the final flag arrives),
the ``llm`` model's admission and a cancel token (trident.contract). A client that leaves, or a
generation past ``request_timeout``, is ended by a cancel request naming that token on the same
call (gateway.triton_relay), not by cancelling the call. Calls never wait for a connection
(``wait_for_ready=False``): every Triton down is a fast 503, not a hang. tritonclient's
``InferenceServerClient`` is deliberately not used: it holds one stream at a time, and one
request's ``stop_stream`` cancels another's.

Several Tritons: ``url`` may list several ``host:port`` (comma-separated) or be a
``dns:///name:port`` target (a Kubernetes headless Service: every address of the name). The
channel balances calls over them with gRPC's ``round_robin`` policy (a server that is down is
skipped), and gRPC's retry policy sends a call that got no response yet (UNAVAILABLE: refused,
stopping) to another server. No routing code of our own.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import secrets
import socket
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2

from trident.contract import (
    ADD_SPECIAL_TOKENS_PARAMETER,
    DETOKENIZE_PARAMETER,
    TOKEN_STRS_PARAMETER,
    TOKENIZE_PARAMETER,
    ModelLimits,
    TextRequest,
    control_inputs,
    llm_inputs,
)
from trident.triton_wire import infer_request, is_final, output_arrays

from .backend import ADMITTED, Admitted, ChoiceEnd, Event, Finished, PromptLogprobs, TextDelta
from .errors import ApiError, internal_error, timeout_error, unavailable
from .triton_codec import (
    StreamResponse,
    build_cancel_request,
    build_infer_request,
    model_error,
    parse_stream_response,
    tagged_error,
)
from .triton_relay import CallTimedOut, Relay, RelayCall

log = logging.getLogger("trident.gateway.triton")

_UNAVAILABLE_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
#: Seconds a call whose client left may take to end after its cancel request (sent on the same
#: call, so at the Triton that holds the request) before the call is cancelled: llm ends it
#: within its cancel check interval (0.1 s) and the engine's stop; this is the safety net.
CANCEL_GRACE = 3.0
#: Seconds a tokenize or detokenize call may take (llm answers it on its accepting thread).
TOKENIZER_TIMEOUT = 30.0
_SERVICE = "inference.GRPCInferenceService"


def grpc_target(url: str) -> str:
    """The channel target for ``TRITON_GRPC_URL``: a ``dns:///`` (or other scheme) target as
    given; one ``host:port`` as given; several, comma-separated, as one ``ipv4:``/``ipv6:``
    address list (gRPC has no static multi-host resolver for names), each name resolved now."""
    url = url.strip()
    if "://" in url or url.startswith(("ipv4:", "ipv6:", "unix:")):
        return url
    parts = [p.strip() for p in url.split(",") if p.strip()]
    if len(parts) == 1:
        return parts[0]
    v4, v6 = [], []
    for part in parts:
        host, _, port = part.rpartition(":")
        host = host.strip("[]")
        for family, *_rest, addr in socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM):
            (v6 if family == socket.AF_INET6 else v4).append(
                f"[{addr[0]}]:{addr[1]}" if family == socket.AF_INET6 else f"{addr[0]}:{addr[1]}")
            break  # one address per listed server
    if v4 and v6:
        raise ValueError(f"TRITON_GRPC_URL mixes IPv4 and IPv6 servers: {url}")
    return ("ipv6:" if v6 else "ipv4:") + ",".join(v6 or v4)


def service_config(*, retries: int) -> str:
    """round_robin over every address, and gRPC's retries of a call that has no response yet."""
    config: dict[str, Any] = {"loadBalancingConfig": [{"round_robin": {}}]}
    if retries > 1:
        config["methodConfig"] = [{
            "name": [{"service": _SERVICE}],
            "retryPolicy": {
                "maxAttempts": retries,
                "initialBackoff": "0.05s",
                "maxBackoff": "0.5s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }]
    return json.dumps(config)


def keepalive_options(seconds: float) -> list[tuple[str, int]]:
    """HTTP/2 pings on every connection to Triton, every ``seconds``, busy or idle, each to be
    answered within ``seconds`` (0: none). Without them a Triton that stops answering while its
    host's TCP stays up (a frozen process) or whose host is gone without a reset (a lost node,
    a partition) keeps its connection READY: round_robin hands it every other call, and each
    hangs until the request timeout. With them the connection closes within two periods: the
    calls on it end with UNAVAILABLE (a new one is retried on another server), and round_robin
    skips that server until it answers again. Triton must accept the pings: trident's launchers
    start it with trident.triton_launcher.GRPC_KEEPALIVE_ARGS."""
    if not seconds:
        return []
    ms = int(seconds * 1000)
    return [
        ("grpc.keepalive_time_ms", ms),
        ("grpc.keepalive_timeout_ms", ms),
        # Every ping's answer, the flow-control (BDP) pings sent with a call's data included: with
        # keepalive on, gRPC core waits a minute for those by default (measured: a call to a
        # frozen Triton failed after 60 s, with this at 2 s after 2 s).
        ("grpc.http2.ping_timeout_ms", ms),
        ("grpc.keepalive_permit_without_calls", 1),  # an idle connection is checked too
        ("grpc.http2.max_pings_without_data", 0),  # and keeps being checked while idle
    ]


class TritonGeneration:
    """One ``ModelStreamInfer`` call, read as gateway events (see ``backend.Generation``)."""

    def __init__(self, call: RelayCall, *, request_id: str, retry_after: int, timeout: float) -> None:
        self._call = call
        self._request_id = request_id
        self._log_extra = {"request_id": request_id}  # read outside the request context
        self._retry_after = retry_after
        self._timeout = timeout
        self._closed = False
        self._ends: dict[int, ChoiceEnd] = {}  # each choice's last response
        self._prompt_tokens = 0
        self._cached_tokens: int | None = None
        self._ended = False
        self._pending_error: ApiError | None = None
        self._prompt_ids: tuple[tuple[int, ...], ...] | None = None  # from the admission, when asked for
        self._prompt_logprobs: PromptLogprobs | None = None  # from its response, when asked for

    def next_events(self, timeout: float | None) -> list[Event] | None:
        """Every event that has arrived, waiting up to ``timeout`` for the first; None when the
        timeout passed; [] once the generation ended. Raises the typed errors."""
        if self._pending_error is not None:  # after the events that came before it
            error, self._pending_error = self._pending_error, None
            raise error
        if self._ended:
            return []
        items = self._call.take(timeout)
        if items is None:
            return None
        events: list[Event] = []
        for item in items:
            if isinstance(item, StreamResponse):
                if item.admitted:
                    if item.prompt_token_ids is not None:
                        self._prompt_ids = (item.prompt_token_ids,)
                    events.append(Admitted(item.server, item.prompt_tokens or None, self._prompt_ids)
                                  if item.server or item.prompt_tokens else ADMITTED)
                    continue
                if item.prompt_logprobs is not None:
                    self._prompt_logprobs = item.prompt_logprobs
                if item.text or item.logprobs is not None and item.logprobs.tokens or item.output_tokens:
                    events.append(TextDelta(item.text, item.index, item.logprobs, item.output_tokens))
                if item.finished is not None:
                    self._ends[item.finished.index] = item.finished
                    self._prompt_tokens = item.prompt_tokens
                    if item.cached_tokens is not None:
                        self._cached_tokens = item.cached_tokens
            elif item is None:  # the call ended
                self._ended = True
                if self._closed:
                    return events
                if not self._ends:
                    log.error("Triton stream ended without finish_reason", extra=self._log_extra)
                    raise internal_error(self._request_id)
                events.append(self._finished())
            else:
                self._ended = True
                if self._closed:
                    return events
                if events:  # text that arrived before the failure is sent first
                    self._pending_error = self._error(item)
                    return events
                raise self._error(item)
        if not events and not self._ended:
            return self.next_events(timeout)  # only the empty final response: wait for the end
        return events

    def _finished(self) -> Finished:
        ends = tuple(self._ends[i] for i in sorted(self._ends))
        return Finished(finish_reason=ends[0].finish_reason, prompt_tokens=self._prompt_tokens,
                        completion_tokens=sum(end.completion_tokens for end in ends),
                        choices=ends if len(ends) > 1 or ends[0].cum_logprob is not None or ends[0].stop is not None
                        else (),
                        cached_tokens=self._cached_tokens, prompt_token_ids=self._prompt_ids,
                        prompt_logprobs=None if self._prompt_logprobs is None else (self._prompt_logprobs,))

    def __iter__(self) -> Iterator[Event]:
        while True:
            events = self.next_events(None)
            if not events:
                return
            yield from events

    def _error(self, exc: BaseException) -> ApiError:
        if isinstance(exc, ApiError):
            if exc.detail:
                log.error("model error: %s", exc.detail, extra=self._log_extra)
            return exc
        if isinstance(exc, ValueError):  # a response that does not follow the "llm" interface
            log.error("bad response from Triton: %s", exc, extra=self._log_extra)
            return internal_error(self._request_id)
        if isinstance(exc, grpc.RpcError):
            return self._rpc_error(exc)
        if isinstance(exc, CallTimedOut):
            # REQUEST_TIMEOUT bounds the whole generation, queueing included; the call is ended
            # with its cancel request, so the engine frees the slot. Before the first event this
            # is an HTTP 504, later an error event with the same object.
            return timeout_error(self._timeout, self._request_id)
        log.error("Triton call failed: %r", exc, extra=self._log_extra)
        return internal_error(self._request_id)

    def close(self) -> None:
        self._closed = True
        self._call.cancel()  # a no-op once the call has ended

    def _rpc_error(self, err: grpc.RpcError) -> ApiError:
        return rpc_error(err, retry_after=self._retry_after, timeout=self._timeout, request_id=self._request_id)


def rpc_error(err: grpc.RpcError, *, retry_after: int, timeout: float, request_id: str) -> ApiError:
    """The API error a failed call stands for: the model's tagged error, 503 when the server is
    gone, 504 past the deadline, else 500."""
    code, details = err.code(), err.details() or ""
    tagged = tagged_error(details, retry_after=retry_after)
    if tagged is not None:
        return tagged
    log.warning("Triton gRPC error: %s %s", code, details, extra={"request_id": request_id})
    # gRPC core's own INTERNAL (not Triton's): the connection broke under the call, e.g. the
    # server was killed as the request went out; the server is gone, not failing.
    transport = code == grpc.StatusCode.INTERNAL and details == "Internal error from Core"
    if code in _UNAVAILABLE_CODES or code == grpc.StatusCode.CANCELLED or transport:
        return unavailable("The inference server is unavailable; try again later", retry_after)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:  # the last resort after a timeout (CallTimedOut)
        return timeout_error(timeout, request_id)
    return internal_error(request_id)


class TritonBackend:
    """Generations on one or several Triton servers over gRPC (see the module docstring).

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
        retries: int = 3,
        keepalive: float = 10.0,
    ) -> None:
        self.url = url
        self.target = grpc_target(url)
        self.models = dict(models)
        self.request_timeout = request_timeout
        self.ready_timeout = ready_timeout
        self.connect_timeout = connect_timeout
        self.retry_after = retry_after
        self.retries = retries
        self.keepalive = keepalive
        self._relay: Relay | None = None
        self._relay_lock = threading.Lock()  # held only while a relay is built (nothing yields)
        self._limits: dict[str, ModelLimits] = {}
        self._limit_tasks: dict[str, asyncio.Future] = {}  # relay loop only

    def _channel_options(self) -> list[tuple[str, Any]]:
        return [
            ("grpc.max_send_message_length", -1),
            ("grpc.max_receive_message_length", -1),
            # gRPC core takes this as the minimum connect timeout (default 20 s).
            ("grpc.min_reconnect_backoff_ms", int(self.connect_timeout * 1000)),
            # Reconnect soon after a Triton comes back (the default backoff grows to 120 s,
            # during which calls to it would fail fast with UNAVAILABLE).
            ("grpc.initial_reconnect_backoff_ms", 500),
            ("grpc.max_reconnect_backoff_ms", 2000),
            ("grpc.service_config", service_config(retries=self.retries)),
            ("grpc.enable_retries", 1),
            # A dns:/// target is re-resolved when a connection breaks; not more often than this.
            ("grpc.dns_min_time_between_resolutions_ms", 5000),
            *keepalive_options(self.keepalive),
        ]

    @property
    def relay(self) -> Relay:
        """This process's relay thread and channel, created on first use, never shared across
        a fork."""
        relay = self._relay
        if relay is None or relay.pid != os.getpid():
            with self._relay_lock:
                relay = self._relay
                if relay is None or relay.pid != os.getpid():
                    relay = self._relay = Relay(self.target, self._channel_options())
        return relay

    def generate(self, params: TextRequest, *, request_id: str) -> TritonGeneration:
        triton_model = self.models[params.model]
        # A client that leaves is handled by asking llm to end its request (a cancel request
        # naming this random token), not by cancelling the call: see Relay.stream.
        token = secrets.token_hex(12)
        request = build_infer_request(triton_model, llm_inputs(params), request_id=request_id, admission=True,
                                      cancel_token=token)
        retry_after = self.retry_after

        def parse(response: Any) -> StreamResponse:
            return parse_stream_response(response, request_id=request_id, retry_after=retry_after)

        call = self.relay.stream(request, timeout=self.request_timeout, parse=parse,
                                 cancel_request=functools.partial(build_cancel_request, triton_model, token),
                                 cancel_grace=CANCEL_GRACE)
        return TritonGeneration(call, request_id=request_id, retry_after=retry_after, timeout=self.request_timeout)

    def tokenize(self, model: str, text: str, *, add_special_tokens: bool, request_id: str) -> list[int]:
        """The ids ``llm`` gives a prompt of ``text`` (trident.contract TOKENIZE_PARAMETER)."""
        return self._tokenize(model, text, add_special_tokens=add_special_tokens, request_id=request_id)[0]

    def tokenize_pieces(self, model: str, text: str, *, add_special_tokens: bool,
                        request_id: str) -> tuple[list[int], list[str]]:
        """The ids and their vocabulary pieces (trident.contract TOKEN_STRS_PARAMETER)."""
        ids, pieces = self._tokenize(model, text, add_special_tokens=add_special_tokens, request_id=request_id,
                                     pieces=True)
        if len(pieces) != len(ids):
            log.error("llm answered %d ids with %d pieces", len(ids), len(pieces), extra={"request_id": request_id})
            raise internal_error(request_id)
        return ids, pieces

    def _tokenize(self, model: str, text: str, *, add_special_tokens: bool, request_id: str,
                  pieces: bool = False) -> tuple[list[int], list[str]]:
        inputs = {**control_inputs(), "text_input": np.array([[text.encode("utf-8")]], dtype=np.object_)}
        request = infer_request(self.models[model], inputs, request_id=request_id,
                                outputs=("output_token_ids", "token_strs") if pieces else ("output_token_ids",),
                                bool_parameters=(TOKENIZE_PARAMETER, TOKEN_STRS_PARAMETER) if pieces
                                else (TOKENIZE_PARAMETER,))
        if not add_special_tokens:
            request.parameters[ADD_SPECIAL_TOKENS_PARAMETER].bool_param = False
        answer = self._answer(request, request_id)
        ids, strs = answer.get("output_token_ids"), answer.get("token_strs")
        return ([] if ids is None else [int(i) for i in ids.reshape(-1).tolist()],
                [] if strs is None else [bytes(t).decode("utf-8", "replace") for t in strs.reshape(-1).tolist()])

    def detokenize(self, model: str, ids: list[int], *, request_id: str) -> str:
        """The text of ``ids`` (trident.contract DETOKENIZE_PARAMETER)."""
        inputs = {**control_inputs(), "input_ids": np.array(ids, dtype=np.int32).reshape(1, len(ids))}
        request = infer_request(self.models[model], inputs, request_id=request_id, outputs=("text_output",),
                                bool_parameters=(DETOKENIZE_PARAMETER,))
        text = self._answer(request, request_id).get("text_output")
        return "" if text is None or not text.size else bytes(text.reshape(-1)[0]).decode("utf-8", "replace")

    def _answer(self, request: Any, request_id: str) -> dict[str, np.ndarray]:
        """The outputs of the final response of a one-request ``llm`` call that gets one answer;
        the typed errors otherwise."""
        try:
            return output_arrays(self.relay.run(self._one_answer(request, request_id), timeout=TOKENIZER_TIMEOUT + 5))
        except grpc.RpcError as err:
            raise rpc_error(err, retry_after=self.retry_after, timeout=TOKENIZER_TIMEOUT, request_id=request_id) from None
        except TimeoutError:
            raise timeout_error(TOKENIZER_TIMEOUT, request_id) from None

    async def _one_answer(self, request: Any, request_id: str) -> Any:
        call = self.relay.stub.ModelStreamInfer(timeout=TOKENIZER_TIMEOUT)
        await call.write(request)
        await call.done_writing()
        answer = None
        async for message in call:  # read to the call's end: it is never cancelled (see Relay.stream)
            if message.error_message:
                raise model_error(message.error_message, request_id=request_id, retry_after=self.retry_after)
            if is_final(message.infer_response):
                answer = message.infer_response
        if answer is None:
            raise unavailable("The inference server ended the call without an answer", self.retry_after)
        return answer

    def check_ready(self) -> None:
        """Ready while at least one server is: round_robin picks a server for each probe, so this
        asks until one answers ready (up to one try per listed server, and at least 3)."""
        tries = max(3, self.target.count(",") + 1)
        last: ApiError | None = None
        for _ in range(tries):
            try:
                self.relay.run(self._ready_probe(), timeout=self.ready_timeout * 4)
                return
            except ApiError as err:
                last = err
            except (grpc.RpcError, TimeoutError) as err:
                log.warning("Triton readiness check failed: %r", err)
                last = unavailable("The inference server is unreachable", self.retry_after)
        assert last is not None
        raise last

    async def _ready_probe(self) -> None:
        stub, timeout = self.relay.stub, self.ready_timeout
        if not (await stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=timeout, wait_for_ready=False)).live:
            raise unavailable("The inference server is not live", self.retry_after)
        if not (await stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=timeout, wait_for_ready=False)).ready:
            raise unavailable("The inference server is not ready", self.retry_after)
        for public, triton_model in self.models.items():
            request = service_pb2.ModelReadyRequest(name=triton_model)
            if not (await stub.ModelReady(request, timeout=timeout, wait_for_ready=False)).ready:
                raise unavailable(f"The model '{public}' is not ready", self.retry_after)
            self._limits[triton_model] = await self._read_limits(triton_model)  # kept fresh by probes

    def limits(self, model: str) -> ModelLimits:
        """The Triton model's limits from its config parameters (the repository build wrote them):
        asked once per worker process (requests arriving meanwhile wait for that one answer),
        refreshed by every readiness check."""
        if model not in self._limits:
            try:
                self._limits[model] = self.relay.run(self._read_limits_once(model), timeout=self.ready_timeout * 2)
            except (grpc.RpcError, TimeoutError) as err:
                log.warning("reading the limits of %s failed: %r", model, err)
                raise unavailable("The inference server is unreachable", self.retry_after) from None
        return self._limits[model]

    async def _read_limits_once(self, model: str) -> ModelLimits:
        """On the relay loop: one ModelConfig call per model in flight, shared by every caller."""
        task = self._limit_tasks.get(model)
        if task is None or task.done() and task.exception() is not None:
            task = self._limit_tasks[model] = asyncio.ensure_future(self._read_limits(model))
        return await asyncio.shield(task)

    def warm_up(self) -> None:
        """Build this worker's relay and read the served models' limits now, not in the first
        requests (a burst of them waited for both). Errors are only logged: Triton may be down."""
        for model in self.models.values():
            try:
                self.limits(model)
            except Exception as exc:
                log.info("warm-up: limits of %s not read yet (%s)", model, exc)

    async def _read_limits(self, model: str) -> ModelLimits:
        response = await self.relay.stub.ModelConfig(service_pb2.ModelConfigRequest(name=model),
                                                     timeout=self.ready_timeout, wait_for_ready=False)
        params = {k: v.string_value for k, v in response.config.parameters.items()}
        return ModelLimits.from_parameters(params)

    def close(self) -> None:
        if self._relay is not None and self._relay.pid == os.getpid():
            self._relay.close()
        self._relay = None
