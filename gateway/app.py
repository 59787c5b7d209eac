"""The app factory (STYLE 6): ``create_app(config=None)``, config read late, handlers once.

Served as ``gunicorn -k gateway.worker.GeventGrpcWorker 'gateway:create_app()'``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flask import Flask, Response, g, has_request_context, request

from .auth import KeyStore
from .backend import Backend
from .concurrency import KeyConcurrency, is_redis
from .config import load_config
from .errors import register_error_handlers
from .openai_routes import init_app as init_openai
from .openapi import init_app as init_openapi
from .tokenizer_routes import init_app as init_tokenizer
from .ratelimit import limiter
from .retry import add_retry_advice
from .routes import bp
from .schemas import GenerateSchema
from .state import GatewayState, InFlight
from . import telemetry
from .telemetry import formatter
from .ids import TAME_REQUEST_ID, new_id

log = logging.getLogger("trident.gateway")



def create_app(config: Mapping[str, Any] | None = None, *, backend: Backend | None = None) -> Flask:
    """Build the gateway.

    ``config`` overrides every other source (see ``gateway.config``). ``backend`` replaces the
    Triton gRPC backend (tests pass a fake); by default a ``TritonBackend`` is built from the
    config and connects lazily, on the first request of each worker process.
    """
    app = Flask(__name__)
    load_config(app, config)
    app.json.sort_keys = False  # keep the contract's field order
    app.json.ensure_ascii = False

    keys = KeyStore.from_config(app.config)
    if not keys:
        log.warning("no API keys are configured: every generation request will be refused with 401")
    served = {app.config["MODEL_NAME"]: app.config["TRITON_MODEL"]}
    if backend is None:
        from .triton_backend import TritonBackend  # grpc is imported, not connected

        backend = TritonBackend(
            url=app.config["TRITON_GRPC_URL"],
            models=served,
            request_timeout=app.config["REQUEST_TIMEOUT"],
            ready_timeout=app.config["READY_TIMEOUT"],
            connect_timeout=app.config["CONNECT_TIMEOUT"],
            retry_after=app.config["RETRY_AFTER"],
            keepalive=app.config["GRPC_KEEPALIVE"],
        )
    app.extensions["trident"] = GatewayState(
        backend=backend,
        keys=keys,
        generate_schema=GenerateSchema(
            limits=lambda model: backend.limits(served[model]),
            served_models=list(served),
            default_model=app.config["MODEL_NAME"],
        ),
        in_flight=InFlight(app.config["MAX_IN_FLIGHT"]),
        heartbeat_interval=app.config["HEARTBEAT_INTERVAL"],
        retry_after=app.config["RETRY_AFTER"],
        key_concurrency=KeyConcurrency(app.config["RATELIMIT_STORAGE_URI"],
                                       lease=app.config["CONCURRENCY_LEASE"], timeout=app.config["STORE_TIMEOUT"],
                                       fail_open=bool(app.config.get("RATELIMIT_SWALLOW_ERRORS")),
                                       memory_fallback=bool(app.config.get("RATELIMIT_IN_MEMORY_FALLBACK_ENABLED"))),
        default_max_concurrent=app.config["DEFAULT_MAX_CONCURRENT"],
    )

    register_error_handlers(app)
    app.before_request(_assign_request_id)  # before the limiter's hook: its 429 has an id too
    app.after_request(_send_request_id)
    app.after_request(add_retry_advice)  # registered before the limiter: runs after its headers
    telemetry.init_app(app)  # metrics + request log line for every route; before the limiter too
    if is_redis(app.config["RATELIMIT_STORAGE_URI"]):
        # A Redis that does not answer (a host gone without a reset) costs a request STORE_TIMEOUT,
        # not the OS's TCP timeout of minutes; the operator's own options win.
        store_timeout = app.config["STORE_TIMEOUT"]
        timeouts = {"socket_connect_timeout": store_timeout, "socket_timeout": store_timeout}
        app.config["RATELIMIT_STORAGE_OPTIONS"] = {**timeouts, **(app.config.get("RATELIMIT_STORAGE_OPTIONS") or {})}
    limiter.init_app(app)
    app.register_blueprint(bp)
    init_openai(app)  # /v1/*
    init_tokenizer(app)  # /tokenize, /detokenize (after /v1: they share its chat template)
    init_openapi(app)  # /openapi.json
    _configure_logging(app.config["LOG_FORMAT"])
    if app.config["SEND_TIMEOUT"]:
        app.wsgi_app = SendTimeout(app.wsgi_app, app.config["SEND_TIMEOUT"])  # type: ignore[method-assign]
    return app


class SendTimeout:
    """WSGI middleware: once the app has answered, every write of the response to the client's
    socket may wait ``seconds`` for the client to take bytes. A client that stopped reading (a
    frozen process, a host gone without a reset: the kernel's buffers fill and the write blocks)
    would otherwise hold its connection, its key's ``max_concurrent`` place and a place of
    ``MAX_IN_FLIGHT`` for as long as its TCP connection lives, which for a frozen process that
    still acknowledges with a zero window is forever. The write then raises ``socket.timeout``;
    gunicorn closes the body (a generation still running is cancelled, its places given back)
    and gateway.worker closes the connection. The timeout covers only the response: the body's
    read has its own limit (``BODY_TIMEOUT``) and gateway.worker takes it off again between
    requests. Only under gunicorn (``gunicorn.socket``); a bare WSGI server keeps its own."""

    def __init__(self, app: Any, seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        body = self.app(environ, start_response)
        sock = environ.get("gunicorn.socket")
        if sock is not None:
            sock.settimeout(self.seconds)
        return body


def _assign_request_id() -> None:
    sent = request.headers.get("X-Request-ID", "")
    # A client's X-Request-ID is echoed (and logged) when it is tame; otherwise a new one.
    g.client_request_id = bool(TAME_REQUEST_ID.match(sent))
    g.request_id = sent if g.client_request_id else new_id()


def _send_request_id(response: Response) -> Response:
    response.headers["X-Request-ID"] = g.get("request_id") or new_id()
    return response


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` to log records made while a request is handled ("-" otherwise)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = g.get("request_id", "-") if has_request_context() else "-"
        return True


def _configure_logging(kind: str) -> None:
    """A stderr handler for ``trident.*`` unless the process configured logging itself
    (gunicorn configures only its own loggers): one JSON object per line (``LOG_FORMAT=json``,
    the default) or text (``LOG_FORMAT=text``); see ``gateway.telemetry``."""
    logger = logging.getLogger("trident")
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(formatter(kind))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
