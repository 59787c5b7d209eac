"""Per-key rate limits with flask-limiter (created unbound here, bound in the app factory).

Each API key has its own limit (``rate_limit`` in the keys file) or ``DEFAULT_RATE_LIMIT``; a
key with neither is not limited. Limits are counted per key name, in
``RATELIMIT_STORAGE_URI`` (``memory://`` is per process: use Redis for several workers or
replicas). A breach is flask-limiter's ``RateLimitExceeded`` (a werkzeug 429), which the one
error handler turns into the ``rate_limit_error`` envelope; flask-limiter adds ``Retry-After``
and ``X-RateLimit-*`` headers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from flask import current_app, g
from flask_limiter import Limiter

F = TypeVar("F", bound=Callable[..., Any])

_UNLIMITED = "1000000000/second"  # a str for flask-limiter's type; never counted (_no_limit filters such requests)


def _key_identity() -> str:
    key = getattr(g, "api_key", None)
    return f"apikey:{key.name}" if key is not None else "anonymous"


def _key_limit() -> str | None:
    key = getattr(g, "api_key", None)
    if key is not None and key.rate_limit:
        return key.rate_limit
    return current_app.config.get("DEFAULT_RATE_LIMIT") or None


limiter = Limiter(key_func=_key_identity)


@limiter.request_filter
def _no_limit() -> bool:
    """Requests of a key without a limit skip flask-limiter's work at once: its two checks per
    request (its before_request hook and the route's decorator) otherwise resolve and filter the
    route's limits (about a quarter of the app's CPU per request, cProfile). This filter is what
    exempts them: it runs in both checks, the decorator's after ``require_api_key`` set the key."""
    return _key_limit() is None


def rate_limited(view: F) -> F:
    """Route decorator: the authenticated key's limit. Must sit below ``require_api_key``.

    Shared: one budget per key across every route it decorates (``/generate`` and ``/v1/*``)."""
    return limiter.shared_limit(
        lambda: _key_limit() or _UNLIMITED,
        scope="generation",
        key_func=_key_identity,
    )(view)
