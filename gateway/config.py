"""Gateway configuration, read late: only when ``create_app`` runs, never at import time.

Precedence, lowest first (STYLE 6):

1. :data:`DEFAULTS`; ``TRITON_GRPC_URL`` defaults to ``localhost:$TRITON_GRPC_PORT`` when that
   environment variable is set, else ``localhost:8001``;
2. a file named by ``TRIDENT_GATEWAY_CONFIG`` (``.json``, ``.toml`` or a Python file of
   upper-case assignments);
3. environment variables ``TRIDENT_<KEY>``, e.g. ``TRIDENT_TRITON_GRPC_URL``,
   ``TRIDENT_API_KEY``, ``TRIDENT_API_KEYS_FILE``, ``TRIDENT_MAX_IN_FLIGHT``;
4. the ``config`` mapping given to ``create_app`` (tests).

Known keys are converted to their type (``"5"`` -> 5 for an int key, ``"true"`` -> True for a
bool key) and a value that does not convert stops the app from starting. Other ``TRIDENT_``
variables are parsed as JSON where they can be, as Flask's ``from_prefixed_env`` does, so Flask
and flask-limiter settings (``TRIDENT_RATELIMIT_STORAGE_URI``) can be set the same way.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from typing import Any

from flask import Flask

ENV_PREFIX = "TRIDENT_"
#: The shortest ping period Triton accepts as trident's launchers start it (seconds; its
#: --grpc-http2-min-recv-ping-interval-without-data, trident.triton_launcher.GRPC_KEEPALIVE_ARGS).
GRPC_KEEPALIVE_MIN = 1.0
CONFIG_FILE_ENV = "TRIDENT_GATEWAY_CONFIG"

DEFAULTS: dict[str, Any] = {
    # Triton
    "TRITON_GRPC_URL": "localhost:8001",
    "TRITON_MODEL": "llm",  # the Triton model the gateway calls
    "MODEL_NAME": "smollm2-135m-instruct",  # the public model name, served by TRITON_MODEL
    "TOKENIZER_DIR": None,  # the served model's tokenizer folder: its chat template, for /v1/chat
    "TOOL_CALL_PARSER": None,  # the model's tool-call syntax, for tool_choice "auto" (gateway.tool_parsers)
    "REASONING_PARSER": None,  # the model's thinking syntax: chat replies' reasoning (gateway.reasoning)
    "REQUEST_TIMEOUT": 600.0,  # seconds one whole generation may take (then its cancel request)
    "READY_TIMEOUT": 2.0,  # seconds: deadline of readiness probes
    "CONNECT_TIMEOUT": 5.0,  # seconds: how long a connection attempt to Triton may take
    "GRPC_KEEPALIVE": 10.0,  # seconds between HTTP/2 pings to each Triton, and for each answer; 0: none
    "RETRY_AFTER": 5,  # seconds, sent with every 503
    # API keys (see gateway.auth)
    "API_KEY": None,  # one key allowed everything (TRIDENT_API_KEY)
    "API_KEYS_FILE": None,  # JSON list of {name, sha256, models, rate_limit}
    "API_KEYS": None,  # the same list given inline (config file or tests)
    "DEFAULT_RATE_LIMIT": None,  # e.g. "60/minute", for keys without their own; None: none
    "DEFAULT_MAX_CONCURRENT": 0,  # open generations per key, for keys without their own; 0: no bound
    "RATELIMIT_STORAGE_URI": "memory://",  # flask-limiter; "redis://..." for several replicas
    "RATELIMIT_HEADERS_ENABLED": True,  # X-RateLimit-* and Retry-After
    "STORE_TIMEOUT": 2.0,  # seconds a Redis connect or command of the limits may take; then a 503
    "CONCURRENCY_LEASE": 30.0,  # seconds an open generation's place in Redis lasts unless its worker renews it
    # Stored responses of /v1/responses (gateway.response_store): "" off, "memory" (this process), "redis://..."
    "RESPONSES_STORE": "",
    "RESPONSES_TTL": 30 * 86400.0,  # seconds a stored response is kept (OpenAI keeps them 30 days)
    "RESPONSES_MEMORY_MB": 256.0,  # the "memory" store's bound per process; the oldest go first
    # HTTP
    "HEARTBEAT_INTERVAL": 5.0,  # seconds between SSE keep-alive comments while waiting
    "MAX_BODY_BYTES": 1 << 20,  # larger bodies are a 413
    "BODY_TIMEOUT": 30.0,  # seconds a request body may take to arrive, once its headers have; then a 408
    "SEND_TIMEOUT": 60.0,  # seconds one write of a response may wait for a client that takes no bytes; 0: none
    "MAX_IN_FLIGHT": 256,  # generations per worker process at once; more are a 503; 0: no limit
    # Logs (see gateway.telemetry)
    "LOG_FORMAT": "json",  # "json": one object per line; "text"
    "LOG_PROMPTS": False,  # put prompts and generated text in the request log line
}

_TYPES: dict[str, type] = {key: type(value) for key, value in DEFAULTS.items() if value is not None}
_TYPES.update({"TOKENIZER_DIR": str, "TOOL_CALL_PARSER": str, "REASONING_PARSER": str, "API_KEY": str, "API_KEYS_FILE": str, "API_KEYS": list, "DEFAULT_RATE_LIMIT": str})
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _coerce(key: str, value: Any) -> Any:
    kind = _TYPES.get(key)
    if kind is None or value is None or (isinstance(value, kind) and not (kind is int and isinstance(value, bool))):
        return value
    try:
        if kind is bool and isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        if kind is int and isinstance(value, str):
            return int(value.strip())
        if kind is float and isinstance(value, (int, str)) and not isinstance(value, bool):
            return float(value)
        if kind is str and isinstance(value, str):
            return value
        if kind is list and isinstance(value, str):
            parsed = json.loads(value)
            if isinstance(parsed, list):
                return parsed
    except ValueError:
        pass
    raise ValueError(f"gateway config {key} must be {kind.__name__}, got {type(value).__name__} {value!r:.60}")


def _load_file(app: Flask, path: str) -> None:
    if path.endswith(".json"):
        app.config.from_file(path, load=json.load)
    elif path.endswith(".toml"):
        app.config.from_file(path, load=tomllib.load, text=False)
    else:
        app.config.from_pyfile(path)


def _env_value(key: str, raw: str) -> Any:
    if key in _TYPES:
        return raw
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def load_config(
    app: Flask, override: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> None:
    """Fill ``app.config`` from defaults, file, ``TRIDENT_*`` environment and ``override``."""
    env = os.environ if environ is None else environ
    app.config.update(DEFAULTS)
    port = env.get("TRITON_GRPC_PORT")
    if port:
        app.config["TRITON_GRPC_URL"] = f"localhost:{port.strip()}"
    path = env.get(CONFIG_FILE_ENV)
    if path:
        _load_file(app, path)
    for name, raw in env.items():
        if name.startswith(ENV_PREFIX) and name != CONFIG_FILE_ENV:
            key = name[len(ENV_PREFIX):]
            app.config[key] = _env_value(key, raw)
    if override:
        app.config.update(override)
    for key in _TYPES:
        app.config[key] = _coerce(key, app.config.get(key))
    _check(app.config)
    app.config["MAX_CONTENT_LENGTH"] = app.config["MAX_BODY_BYTES"]


def _check(config: Mapping[str, Any]) -> None:
    for key in ("HEARTBEAT_INTERVAL", "REQUEST_TIMEOUT", "READY_TIMEOUT", "CONNECT_TIMEOUT", "BODY_TIMEOUT",
                "STORE_TIMEOUT", "CONCURRENCY_LEASE", "RESPONSES_TTL", "RESPONSES_MEMORY_MB"):
        if config[key] <= 0:
            raise ValueError(f"gateway config {key} must be positive")
    if config["GRPC_KEEPALIVE"] and config["GRPC_KEEPALIVE"] < GRPC_KEEPALIVE_MIN:
        raise ValueError(f"gateway config GRPC_KEEPALIVE must be 0 (no pings) or at least {GRPC_KEEPALIVE_MIN:g} s: "
                         "Triton closes a connection that pings more often (trident.triton_launcher)")
    if config["SEND_TIMEOUT"] < 0:
        raise ValueError("gateway config SEND_TIMEOUT must be >= 0 (0: no limit)")
    if config["MAX_IN_FLIGHT"] < 0:
        raise ValueError("gateway config MAX_IN_FLIGHT must be >= 0")
    if config.get("DEFAULT_RATE_LIMIT"):
        from limits import parse_many

        parse_many(config["DEFAULT_RATE_LIMIT"])  # a bad limit stops start-up, not the first request
    if config["LOG_FORMAT"] not in ("json", "text"):
        raise ValueError(f"gateway config LOG_FORMAT must be 'json' or 'text', got {config['LOG_FORMAT']!r}")
    from . import reasoning, response_store, tool_parsers

    response_store.check_store_name(config["RESPONSES_STORE"])

    for key, names, unset in (("TOOL_CALL_PARSER", tool_parsers.PARSERS, 'no tool_choice "auto"'),
                              ("REASONING_PARSER", reasoning.PARSERS, "no reasoning read")):
        if config.get(key) and config[key] not in names:  # the model's syntaxes this gateway reads
            raise ValueError(f"gateway config {key} must be one of {', '.join(names)} (or empty: {unset}), "
                             f"got {config[key]!r}")
