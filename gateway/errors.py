"""Two typed errors and the one JSON envelope of shared/API.md.

Anything raised anywhere in the gateway ends up here: a :class:`ClientError` (4xx), a
:class:`ServerError` (5xx), one of werkzeug's HTTPExceptions (404 path, 405, 413, and
flask-limiter's 429, which subclasses werkzeug's TooManyRequests), or an unexpected exception,
which becomes a 500 whose message carries the request id and nothing else. The handlers are
registered once, in the app factory (:func:`register_error_handlers`).
"""

from __future__ import annotations

import logging
from typing import Any
from collections.abc import Callable, Mapping, Sequence

from flask import Flask, Response, current_app, g, jsonify, request
from werkzeug.exceptions import HTTPException

log = logging.getLogger("trident.gateway")

#: ``type`` of the envelope by status; other 4xx are ``invalid_request_error``, other 5xx
#: ``server_error``.
ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout_error",  # not in the contract's table: see docs/api.md, "Timeouts"
}


def error_type(status: int) -> str:
    if status in ERROR_TYPES:
        return ERROR_TYPES[status]
    return "invalid_request_error" if status < 500 else "server_error"


class ApiError(Exception):
    """Base of the two typed errors; carries everything the envelope needs."""

    status: int = 500

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status
        self.message = message
        self.param = param
        self.headers = dict(headers or {})
        self.detail: str | None = None  # for logs only, never sent (e.g. the real cause of a 500)

    @property
    def type(self) -> str:
        return error_type(self.status)

    def to_dict(self) -> dict[str, Any]:
        """The error object (the value of ``"error"``), also used by SSE ``event: error``."""
        return {"message": self.message, "type": self.type, "param": self.param, "code": self.status}


class ClientError(ApiError):
    """The request is wrong (4xx); the message tells the client what to change."""

    status = 400

    def __init__(self, message: str, *, status: int = 400, **kwargs: Any) -> None:
        if not 400 <= status < 500:
            raise ValueError(f"ClientError needs a 4xx status, got {status}")
        super().__init__(message, status=status, **kwargs)


class PromptTooLong(ClientError):
    """A prompt longer in characters than any the model can take (checked before tokenizing):
    the 400 that the Responses API's ``truncation: "auto"`` answers by dropping turns."""


class ServerError(ApiError):
    """The gateway or Triton failed (5xx). 503 errors carry ``Retry-After``."""

    status = 500

    def __init__(
        self,
        message: str,
        *,
        status: int = 500,
        retry_after: int | None = None,
        **kwargs: Any,
    ) -> None:
        if not 500 <= status < 600:
            raise ValueError(f"ServerError needs a 5xx status, got {status}")
        super().__init__(message, status=status, **kwargs)
        if retry_after is not None:
            self.headers["Retry-After"] = str(int(retry_after))


class ClientGone(ApiError):
    """The client closed its connection before the response: logged and counted with nginx's
    499 ("client closed request"); nobody reads the response."""

    status = 499

    def __init__(self) -> None:
        super().__init__("The client closed the connection before the response", status=499)


def unavailable(message: str, retry_after: int) -> ServerError:
    """A 503 ``service_unavailable`` with ``Retry-After``."""
    return ServerError(message, status=503, retry_after=retry_after)


def timeout_error(timeout: float, request_id: str) -> ServerError:
    """The 504 ``timeout_error`` of a generation that ran past ``REQUEST_TIMEOUT``."""
    return ServerError(
        f"Generation did not finish within the request timeout of {timeout:g} s (request id {request_id})",
        status=504,
    )


def internal_error(request_id: str) -> ServerError:
    """The 500 every unexpected failure becomes: no internals, only the request id."""
    return ServerError(
        f"The server had an error while processing your request (request id {request_id}).",
        status=500,
    )


#: ``app.extensions`` key of the error bodies of other APIs the gateway serves (their paths' prefix
#: -> the body of an error there): :func:`register_error_body`
ERROR_BODIES = "trident.error_bodies"


def register_error_body(app: Flask, prefix: str, body: Callable[[ApiError, str], dict[str, Any]]) -> None:
    """Errors on paths under ``prefix`` take ``body(error, request_id)`` instead of the contract's
    envelope: an API of another vendor's shape (Anthropic's, gateway.anthropic) answers its
    clients' errors in that vendor's shape, from the key check to the rate limit."""
    app.extensions.setdefault(ERROR_BODIES, {})[prefix] = body


def envelope(error: ApiError) -> Response:
    bodies = current_app.extensions.get(ERROR_BODIES) or {}
    shape = next((body for prefix, body in bodies.items() if request.path.startswith(prefix)), None)
    response = jsonify(shape(error, g.get("request_id") or "-") if shape else {"error": error.to_dict()})
    response.status_code = error.status
    for name, value in error.headers.items():
        response.headers[name] = value
    return response


def _http_message(exc: HTTPException) -> str:
    """Short, client-facing messages instead of werkzeug's HTML-ish descriptions."""
    status = exc.code or 500
    if status == 404:
        return f"Unknown path: {request.path}"
    if status == 405:
        allowed = ", ".join(sorted(m for m in (getattr(exc, "valid_methods", None) or []) if m != "OPTIONS"))
        suffix = f"; allowed: {allowed}" if allowed else ""
        return f"Method {request.method} is not allowed for {request.path}{suffix}"
    if status == 413:
        limit = request.max_content_length
        return f"Request body is larger than the limit of {limit} bytes" if limit else "Request body is too large"
    if status == 429:
        return f"Rate limit exceeded: {exc.description}"
    return exc.description or exc.name


def renamed_param(param: str | None, fields: Sequence[tuple[str, str]],
                  tool_parts: Sequence[tuple[str, str]] = ((".function", ""),)) -> str | None:
    """The field of another API's request (Anthropic's, the Responses API's) that a chat field
    an error names stands for: ``fields`` maps chat fields (and their items, ``messages[2]...``)
    to it, the first match winning; in ``tools[i]...``, ``tool_parts`` rename the parts of a
    chat tool's path; any other field keeps its name."""
    if param is None:
        return None
    for chat, ours in fields:
        if param == chat or param.startswith(chat + "["):
            return ours
    if param.startswith("tools["):
        for part, ours in tool_parts:
            param = param.replace(part, ours)
    return param


def public_param(error: ApiError, names: Mapping[str, str] | None) -> ApiError:
    """``error`` naming the request's field where it names a contract one (``names``: contract
    name -> the endpoint's, e.g. ``guided_decoding_guide`` -> ``response_format``). A route
    sets its names in ``g.param_names``; errors from the llm model name the contract's fields."""
    if names and error.param in names:
        error.param = names[error.param]
    return error


def _handle_api_error(exc: ApiError) -> Response:
    public_param(exc, g.get("param_names"))
    if exc.status >= 500:
        log.warning("request failed: %s %s", exc.status, exc.message)
    return envelope(exc)


def _handle_http_exception(exc: HTTPException) -> Response:
    status = exc.code or 500
    if status >= 500:
        return _handle_unexpected(exc)
    headers = {k: v for k, v in exc.get_headers() if k.lower() != "content-type"}
    error = ClientError(_http_message(exc), status=status, headers=headers)
    return envelope(error)


def _handle_unexpected(exc: BaseException) -> Response:
    request_id = getattr(g, "request_id", "-")
    log.error("unhandled error", exc_info=exc)
    return envelope(internal_error(request_id))


def store_unreachable_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean the limits' store (Redis) cannot be reached: refused, timed out.
    Empty without a Redis client (no Redis store either)."""
    try:
        from redis.exceptions import ConnectionError as RedisConnectionError, TimeoutError as RedisTimeoutError
    except ImportError:  # pragma: no cover - the gateway's dependencies include redis
        return ()
    return (RedisConnectionError, RedisTimeoutError)


def _handle_store_unreachable(exc: BaseException) -> Response:
    """Redis (the rate limits' and open-generation bounds' store) unreachable: a 503 to retry,
    with one log line, not a 500 and a traceback per request."""
    log.warning("the rate-limit store is unreachable: %s", exc)
    retry_after = int(current_app.config.get("RETRY_AFTER") or 1)
    return envelope(unavailable("The rate-limit store is unreachable; retry the request shortly", retry_after))


def register_error_handlers(app: Flask) -> None:
    app.register_error_handler(ApiError, _handle_api_error)
    app.register_error_handler(HTTPException, _handle_http_exception)
    app.register_error_handler(Exception, _handle_unexpected)
    for error in store_unreachable_errors():
        app.register_error_handler(error, _handle_store_unreachable)
