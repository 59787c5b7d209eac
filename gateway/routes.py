"""HTTP routes: ``/generate`` (JSON or SSE), ``/healthz``, ``/readyz``.

Order of checks for a generation: API key (401), endpoint allowed for the key (403), rate limit
(429), body and fields (413, 400), model served (404); then gateway.generation (model allowed
for the key, in-flight limit, the backend). ``/metrics`` is added by gateway.telemetry.
"""

from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, current_app, g, jsonify, request

from trident.contract import GUIDE_REGEX

from .auth import require_api_key
from .choices import GenerateEvents, completion_logprobs
from .drain import DRAIN
from .errors import unavailable
from .generation import collect, start_generation, stream_response
from .ratelimit import rate_limited
from .sse import event_bytes
from .json_body import read_json_object
from .schemas import load_request
from .state import GatewayState
from .ids import new_id

bp = Blueprint("gateway", __name__)


def _state() -> GatewayState:
    return current_app.extensions["trident"]


@bp.get("/healthz")
def healthz() -> Any:
    """200 while the process runs; no key."""
    return {"status": "ok"}


@bp.get("/readyz")
@bp.get("/health", endpoint="readyz")
def readyz() -> Any:
    """200 when a Triton is live and ready with every served model, else 503 (also while the
    gateway drains before it exits, gateway.drain); no key. Also ``/health``, vLLM's and
    SGLang's name, which their routers, load balancers and clients probe."""
    if DRAIN.draining:
        raise unavailable("The gateway is shutting down", _state().retry_after)
    _state().backend.check_ready()
    return {"status": "ready"}


@bp.post("/generate", endpoint="generate")
@bp.post("/generate/", endpoint="generate")
@require_api_key
@rate_limited
def generate() -> Any:
    """The completion as JSON, or with ``"stream": true`` as server-sent events (gateway.sse)."""
    params = load_request(_state().generate_schema, read_json_object(request))
    sampling = params.sampling
    if sampling.guide is not None:  # the llm model's errors name the contract's fields
        field = "regex" if sampling.guide.type == GUIDE_REGEX else "response_format"
        g.param_names = {"guided_decoding_guide": field, "guided_decoding_guide_type": field}
    generation, done = start_generation(params)
    if params.stream:
        plain = sampling.n == 1 and sampling.logprobs is None
        return stream_response(generation, done,
                               encode=event_bytes if plain else GenerateEvents(sampling.n, sampling.logprobs is not None))
    choices, finished = collect(generation, done, sampling.n)
    return jsonify(
        {
            "id": f"cmpl-{new_id()}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": params.model,
            "choices": [
                {"text": c.text, "index": c.index,
                 "logprobs": completion_logprobs(c.pieces) if sampling.logprobs is not None else None,
                 "finish_reason": c.finish_reason}
                for c in choices
            ],
            "usage": finished.usage,
        }
    )
