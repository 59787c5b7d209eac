"""HTTP routes: ``/generate`` (JSON or SSE), ``/healthz``, ``/readyz``.

Order of checks for a generation: API key (401), endpoint allowed for the key (403), rate limit
(429), body and fields (413, 400), model served (404), model allowed for the key (403),
in-flight limit (503); then the backend, whose errors before the first event are HTTP statuses
too (STYLE 4). ``/metrics`` is added by gateway.telemetry.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Response, current_app, g, jsonify, request

from .auth import authorize_model, require_api_key
from .backend import Event, Finished, Generation, TextDelta
from .disconnect import DisconnectWatch
from .errors import ApiError, ClientGone, internal_error
from trident.contract import TextRequest
from .ratelimit import rate_limited
from .schemas import load_generate, read_json_object
from .sse import SSEBody, error_bytes, event_bytes
from .state import GatewayState
from .telemetry import note_params, observe_generation

log = logging.getLogger("trident.gateway")

bp = Blueprint("gateway", __name__)


def _state() -> GatewayState:
    return current_app.extensions["trident"]


@bp.get("/healthz")
def healthz() -> Any:
    """200 while the process runs; no key."""
    return {"status": "ok"}


@bp.get("/readyz")
def readyz() -> Any:
    """200 when Triton is live and ready and every served model is ready, else 503; no key."""
    _state().backend.check_ready()
    return {"status": "ready"}


@bp.post("/generate", endpoint="generate")
@bp.post("/generate/", endpoint="generate")
@require_api_key
@rate_limited
def generate() -> Any:
    """The completion as JSON, or with ``"stream": true`` as server-sent events (gateway.sse)."""
    params = load_generate(_state().generate_schema, read_json_object(request))
    generation, done = start_generation(params)
    if params.stream:
        return stream_response(generation, done)
    text, finished = collect(generation, done)
    return jsonify(
        {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": params.model,
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finished.finish_reason}],
            "usage": finished.usage,
        }
    )


# -- shared by every generation endpoint (/generate here, /v1/* in gateway.openai_routes) ----


def start_generation(params: TextRequest) -> tuple[Generation, Callable[[], None]]:
    """Once the request is validated: the key may use the model (403), an in-flight slot (503),
    the backend call. Returns the generation and ``done``, to call once when it is over (gives
    the slot back); ``collect`` and ``stream_response`` call it. The generation is measured
    (metrics, the request's log line: gateway.telemetry)."""
    state = _state()
    note_params(params)
    authorize_model(g.api_key, params.model)
    request_id: str = g.request_id
    done = state.in_flight.acquire(state.retry_after)  # once, when the generation is over
    try:
        generation = observe_generation(state.backend.generate(params, request_id=request_id), params)
    except BaseException:
        done()
        raise
    return generation, done


def collect(generation: Generation, done: Callable[[], None]) -> tuple[str, Finished]:
    """The whole text and the final event of a non-streaming generation; a client that goes
    away meanwhile cancels it (gateway.disconnect) and gets :class:`ClientGone`."""
    parts: list[str] = []
    finished: Finished | None = None
    watch = DisconnectWatch.start(request.environ, generation.close)
    try:
        for event in generation:
            if isinstance(event, TextDelta):
                parts.append(event.text)
            elif isinstance(event, Finished):
                finished = event
        if finished is None:
            if watch.gone:
                raise ClientGone()
            log.error("generation ended without a final event")
            raise internal_error(g.request_id)
    finally:
        watch.stop()
        generation.close()
        done()
    return "".join(parts), finished


def stream_response(
    generation: Generation,
    done: Callable[[], None],
    *,
    encode: Callable[[Event], bytes] = event_bytes,
    encode_error: Callable[[ApiError], bytes] = error_bytes,
) -> Response:
    """The SSE response of a streaming generation; ``encode``/``encode_error`` as in SSEBody."""
    request_id: str = g.request_id
    events = iter(generation)
    try:
        first = next(events)  # errors before any token are still HTTP statuses
    except StopIteration:
        generation.close()
        done()
        log.error("generation ended without a final event")
        raise internal_error(request_id) from None
    except BaseException:
        generation.close()
        done()
        raise
    body = SSEBody(
        first,
        generation,
        events,
        heartbeat_interval=_state().heartbeat_interval,
        request_id=request_id,
        on_close=done,
        encode=encode,
        encode_error=encode_error,
        environ=request.environ,
    )
    return Response(
        body,
        status=200,
        mimetype="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )

