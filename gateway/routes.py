"""HTTP routes: ``/generate`` (JSON or SSE), ``/healthz``, ``/readyz``.

Order of checks for a generation: API key (401), rate limit (429), body and fields (413, 400),
model served (404), model allowed for the key (403), in-flight limit (503); then the backend,
whose errors before the first event are HTTP statuses too (STYLE 4).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Response, current_app, g, jsonify, request

from .auth import authorize_model, require_api_key
from .backend import Finished, Generation, TextDelta
from .errors import internal_error
from .params import GenerationParams
from .ratelimit import rate_limited
from .schemas import load_generate, read_json_object
from .sse import SSEBody
from .state import GatewayState

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
    state = _state()
    params = load_generate(state.generate_schema, read_json_object(request))
    authorize_model(g.api_key, params.model)
    request_id: str = g.request_id
    key_name: str = g.api_key.name
    release = state.in_flight.acquire(state.retry_after)
    started = time.monotonic()

    def done(finished: Finished | None) -> None:  # once, when the generation is over
        release()
        _log_done(request_id, key_name, params, finished, started)

    try:
        generation = state.backend.generate(params, request_id=request_id)
    except BaseException:
        done(None)
        raise
    if params.stream:
        return _stream(generation, request_id, state.heartbeat_interval, done)
    return _complete(generation, params, done)


def _complete(generation: Generation, params: GenerationParams, done: Callable[[Finished | None], None]) -> Any:
    parts: list[str] = []
    finished: Finished | None = None
    try:
        for event in generation:
            if isinstance(event, TextDelta):
                parts.append(event.text)
            else:
                finished = event
        if finished is None:
            log.error("generation ended without a final event")
            raise internal_error(g.request_id)
    finally:
        generation.close()
        done(finished)
    return jsonify(
        {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": params.model,
            "choices": [
                {"text": "".join(parts), "index": 0, "logprobs": None, "finish_reason": finished.finish_reason}
            ],
            "usage": finished.usage,
        }
    )


def _stream(
    generation: Generation, request_id: str, heartbeat: float, done: Callable[[Finished | None], None]
) -> Response:
    events = iter(generation)
    try:
        first = next(events)  # errors before any token are still HTTP statuses
    except StopIteration:
        generation.close()
        done(None)
        log.error("generation ended without a final event")
        raise internal_error(request_id) from None
    except BaseException:
        generation.close()
        done(None)
        raise
    body = SSEBody(first, generation, events, heartbeat_interval=heartbeat, request_id=request_id, on_close=done)
    return Response(
        body,
        status=200,
        mimetype="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _log_done(
    request_id: str, key_name: str, params: GenerationParams, finished: Finished | None, started: float
) -> None:
    outcome: dict[str, Any] = {"key": key_name, **params.log_fields()}
    if finished is not None:
        outcome.update(finish_reason=finished.finish_reason, **finished.usage)
    else:
        outcome["finish_reason"] = None
    outcome["seconds"] = round(time.monotonic() - started, 3)
    log.info("generation %s", outcome, extra={"request_id": request_id})
