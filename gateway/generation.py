"""Running one generation for a route, shared by ``/generate`` (gateway.routes) and ``/v1/*``
(gateway.openai_routes): admission, then the whole text (:func:`collect`) or the SSE stream
(:func:`stream_response`).

Order of checks once the body is valid: model allowed for the key (403), the in-flight slot
(503), the backend call; the backend's errors before its admission (or first event) are HTTP
statuses too (STYLE 4).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from flask import Response, current_app, g, request

from trident.contract import TextRequest

from .auth import authorize_model, for_key
from .backend import Admitted, Event, Finished, Generation
from .choices import Choice, gather
from .disconnect import DisconnectWatch
from .drain import DRAIN
from .errors import ApiError, ClientGone, internal_error, public_param, unavailable
from .sse import SSEBody, error_bytes, event_bytes, event_source
from .state import GatewayState
from .telemetry import note_params, observe_generation

log = logging.getLogger("trident.gateway")


def _state() -> GatewayState:
    return current_app.extensions["trident"]


def start_generation(params: TextRequest) -> tuple[Generation, Callable[[], None]]:
    """Once the request is validated: the key may use the model (403), the gateway is not
    draining (503), the key has a generation to spare (429, gateway.concurrency), an in-flight
    slot (503), the backend call. Returns the generation and ``done``, to call once when it is over (gives
    the slot back); ``collect`` and ``stream_response`` call it. The generation is measured
    (metrics, the request's log line: gateway.telemetry)."""
    state = _state()
    note_params(params)
    authorize_model(g.api_key, params.model)
    if DRAIN.draining:  # a kept-alive connection asking after SIGTERM
        raise unavailable("The gateway is shutting down; retry the request", state.retry_after)
    request_id: str = g.request_id
    key = g.api_key
    release_key = state.key_concurrency.acquire(key.name, key.max_concurrent or state.default_max_concurrent,
                                                retry_after=state.retry_after)  # 429 over the key's bound
    try:
        release_slot = state.in_flight.acquire(state.retry_after)
    except BaseException:
        release_key()
        raise

    def done() -> None:  # once, when the generation is over
        release_slot()
        release_key()

    try:
        generation = observe_generation(state.backend.generate(for_key(params, key), request_id=request_id), params)
    except BaseException:
        done()
        raise
    return generation, done


def collect(generation: Generation, done: Callable[[], None], n: int = 1) -> tuple[list[Choice], Finished]:
    """Every choice (its text, tokens and end) and the final event of a non-streaming generation
    of ``n`` choices; a client that goes away meanwhile cancels it (gateway.disconnect) and gets
    :class:`ClientGone`."""
    watch = DisconnectWatch.start(request.environ, generation.close)
    try:
        choices, finished = gather(generation, n)
        if finished is None:
            if watch.gone:
                raise ClientGone()
            log.error("generation ended without a final event")
            raise internal_error(g.request_id)
    finally:
        watch.stop()
        generation.close()
        done()
    return choices, finished


def stream_response(
    generation: Generation,
    done: Callable[[], None],
    *,
    encode: Callable[[Event], bytes] = event_bytes,
    encode_error: Callable[[ApiError], bytes] = error_bytes,
    encode_admitted: Callable[[Admitted], bytes] | None = None,
) -> Response:
    """The SSE response of a streaming generation; ``encode``/``encode_error``/``encode_admitted``
    as in SSEBody (an error names the route's fields: ``g.param_names``,
    gateway.errors.public_param)."""
    request_id: str = g.request_id
    names = g.get("param_names")
    if names:
        raw_encode_error = encode_error

        def encode_error(error: ApiError) -> bytes:
            return raw_encode_error(public_param(error, names))
    source = event_source(generation)
    try:
        first = None
        while first is None:  # the admission, or the first events: errors before are HTTP statuses
            first = source.next_events(_state().heartbeat_interval)
        if not first:
            log.error("generation ended without a final event")
            raise internal_error(request_id)
    except BaseException:
        generation.close()
        done()
        raise
    body = SSEBody(
        first,
        generation,
        source,
        heartbeat_interval=_state().heartbeat_interval,
        request_id=request_id,
        on_close=done,
        encode=encode,
        encode_error=encode_error,
        encode_admitted=encode_admitted,
        environ=request.environ,
    )
    return Response(
        body,
        status=200,
        mimetype="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )

