"""Auth, rate limits, error envelopes, request ids, health, config: in-process, fake backend."""

from __future__ import annotations

import json
import logging
import re

import pytest
from gateway_fakes import FakeBackend
from testkit import AUTH, KEY, MODEL, assert_error

from gateway import create_app
from gateway.auth import hash_key
from gateway.backend import Finished
from gateway.config import load_config
from gateway.errors import ClientError, ServerError

BODY = {"prompt": "Hi there"}


def make_client(config=None, backend=None):
    return create_app({"API_KEY": KEY, **(config or {})}, backend=backend or FakeBackend()).test_client()


# -- authentication ---------------------------------------------------------------------------

MISSING = "Missing API key: send the header 'Authorization: Bearer <api key>'"
MALFORMED = "Malformed Authorization header: expected 'Bearer <api key>'"


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (None, MISSING),
        ("", MISSING),
        ("Basic dXNlcjpwYXNz", MALFORMED),
        ("Bearer", MALFORMED),
        ("Bearer ", MALFORMED),
        (f"Bearer {KEY} extra", MALFORMED),
        (KEY, MALFORMED),
        ("Bearer wrong-key", "Invalid API key"),
        (f"Bearer {KEY}x", "Invalid API key"),
    ],
)
def test_bad_credentials_are_401(header, message):
    backend = FakeBackend()
    client = make_client(backend=backend)
    headers = {"Authorization": header} if header is not None else {}
    response = client.post("/generate", json=BODY, headers=headers)
    assert_error(response, 401, "authentication_error", None, message)
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert backend.calls == []


def test_401_comes_before_body_validation():
    response = make_client().post("/generate", data=b"{", headers={"Content-Type": "application/json"})
    assert response.status_code == 401


def test_scheme_is_case_insensitive():
    response = make_client().post("/generate", json=BODY, headers={"Authorization": f"bearer {KEY}"})
    assert response.status_code == 200


def test_no_key_configured_refuses_every_generation(monkeypatch):
    monkeypatch.delenv("TRIDENT_API_KEY", raising=False)
    monkeypatch.delenv("TRIDENT_API_KEYS_FILE", raising=False)
    client = create_app({}, backend=FakeBackend()).test_client()
    for headers in ({}, AUTH, {"Authorization": "Bearer "}):
        response = client.post("/generate", json=BODY, headers=headers)
        assert_error(
            response,
            401,
            "authentication_error",
            None,
            "No API keys are configured on this server, so no request can be authenticated",
        )
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200


def keys_file(tmp_path, entries):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(entries))
    return str(path)


def test_keys_file_models_and_403(tmp_path):
    path = keys_file(
        tmp_path,
        [
            {"name": "alice", "sha256": hash_key("alice-key"), "models": ["other-model"]},
            {"name": "bob", "sha256": hash_key("bob-key").upper(), "models": [MODEL], "rate_limit": "100/minute"},
            {"name": "carol", "sha256": hash_key("carol-key"), "models": ["*"]},
        ],
    )
    client = create_app({"API_KEYS_FILE": path}, backend=FakeBackend()).test_client()

    def gen(key, body=BODY):
        return client.post("/generate", json=body, headers={"Authorization": f"Bearer {key}"})

    assert_error(gen("alice-key"), 403, "permission_error", "model", f"API key 'alice' may not use the model '{MODEL}'")
    assert gen("bob-key").status_code == 200
    assert gen("carol-key").status_code == 200
    assert gen("dave-key").status_code == 401
    # the body is validated before the model permission: 400 and 404 first
    assert gen("alice-key", {"prompt": ""}).status_code == 400
    assert gen("alice-key", {"prompt": "x", "model": "nope"}).status_code == 404


def test_env_key_and_keys_file_together(tmp_path, monkeypatch):
    path = keys_file(tmp_path, [{"name": "bob", "sha256": hash_key("bob-key"), "models": ["*"]}])
    monkeypatch.setenv("TRIDENT_API_KEY", "env-key")
    monkeypatch.setenv("TRIDENT_API_KEYS_FILE", path)
    client = create_app(backend=FakeBackend()).test_client()
    for key in ("env-key", "bob-key"):
        assert client.post("/generate", json=BODY, headers={"Authorization": f"Bearer {key}"}).status_code == 200


@pytest.mark.parametrize(
    "entries",
    [
        {"name": "a"},
        [{"name": "a", "sha256": "abc", "models": ["*"]}],
        [{"sha256": hash_key("k"), "models": ["*"]}],
        [{"name": "a", "sha256": hash_key("k"), "models": []}],
        [{"name": "a", "sha256": hash_key("k"), "models": ["*"], "rate_limit": "lots"}],
        [{"name": "a", "sha256": hash_key("k"), "models": ["*"], "key": "k"}],
        [{"name": "a", "sha256": hash_key("k")}, {"name": "a", "sha256": hash_key("j")}],
    ],
)
def test_bad_keys_file_stops_start_up(tmp_path, entries):
    with pytest.raises(ValueError):
        create_app({"API_KEYS_FILE": keys_file(tmp_path, entries)}, backend=FakeBackend())


def test_keys_are_never_logged(caplog):
    caplog.set_level(logging.DEBUG)
    client = make_client()
    client.post("/generate", json=BODY, headers=AUTH)
    client.post("/generate", json={"prompt": ""}, headers=AUTH)
    client.post("/generate", json=BODY, headers={"Authorization": "Bearer secret-wrong-key"})
    assert caplog.records, "expected some logs"
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert KEY not in text and "secret-wrong-key" not in text


# -- rate limits ------------------------------------------------------------------------------


def test_rate_limit_per_key_is_429_with_headers(tmp_path):
    path = keys_file(
        tmp_path,
        [
            {"name": "slow", "sha256": hash_key("slow-key"), "models": ["*"], "rate_limit": "2/minute"},
            {"name": "free", "sha256": hash_key("free-key"), "models": ["*"]},
        ],
    )
    client = create_app({"API_KEYS_FILE": path}, backend=FakeBackend()).test_client()
    slow = {"Authorization": "Bearer slow-key"}
    first = client.post("/generate", json=BODY, headers=slow)
    assert first.status_code == 200
    assert first.headers["X-RateLimit-Limit"] == "2" and first.headers["X-RateLimit-Remaining"] == "1"
    assert client.post("/generate", json=BODY, headers=slow).status_code == 200
    third = client.post("/generate", json=BODY, headers=slow)
    assert_error(third, 429, "rate_limit_error", None, "Rate limit exceeded: 2 per 1 minute")
    assert 0 < int(third.headers["Retry-After"]) <= 60
    assert third.headers["X-RateLimit-Remaining"] == "0"
    assert "X-Request-ID" in third.headers
    for _ in range(5):  # a key without a limit (and no default) is not limited
        assert client.post("/generate", json=BODY, headers={"Authorization": "Bearer free-key"}).status_code == 200


def test_a_key_without_a_limit_skips_the_limiters_work(tmp_path, monkeypatch):
    """Cost, not behaviour: flask-limiter resolves a route's limits twice per request (its hook
    and the route's decorator); for a key without a limit it must not get that far. A limited
    key still goes through it."""
    from gateway.ratelimit import limiter

    path = keys_file(
        tmp_path,
        [
            {"name": "slow", "sha256": hash_key("slow-key"), "models": ["*"], "rate_limit": "5/minute"},
            {"name": "free", "sha256": hash_key("free-key"), "models": ["*"]},
        ],
    )
    client = create_app({"API_KEYS_FILE": path}, backend=FakeBackend()).test_client()
    resolved = []
    real = limiter.limit_manager.resolve_limits
    monkeypatch.setattr(limiter.limit_manager, "resolve_limits", lambda *a, **k: resolved.append(a) or real(*a, **k))
    for _ in range(3):
        assert client.post("/generate", json=BODY, headers={"Authorization": "Bearer free-key"}).status_code == 200
    assert resolved == []
    assert client.post("/generate", json=BODY, headers={"Authorization": "Bearer slow-key"}).status_code == 200
    assert resolved


def test_default_rate_limit_applies_to_keys_without_one():
    client = make_client({"DEFAULT_RATE_LIMIT": "1/minute"})
    assert client.post("/generate", json=BODY, headers=AUTH).status_code == 200
    assert client.post("/generate", json=BODY, headers=AUTH).status_code == 429
    assert client.get("/healthz").status_code == 200  # health is never limited


# -- envelopes of other errors ----------------------------------------------------------------


def test_unknown_path_is_404_envelope():
    assert_error(make_client().get("/nope"), 404, "not_found_error", None, "Unknown path: /nope")


def test_wrong_method_is_405_envelope():
    response = make_client().get("/generate", headers=AUTH)
    assert_error(response, 405, "invalid_request_error", None, "Method GET is not allowed for /generate; allowed: POST")
    assert response.headers["Allow"]


def test_body_over_limit_is_413_envelope():
    client = make_client({"MAX_BODY_BYTES": 100})
    response = client.post("/generate", json={"prompt": "x" * 200}, headers=AUTH)
    assert_error(response, 413, "invalid_request_error", None, "Request body is larger than the limit of 100 bytes")


@pytest.mark.parametrize(
    ("error", "status", "type_", "param", "retry_after"),
    [
        (ClientError("prompt has 3000 tokens; with max_new_tokens 128 that exceeds the context of 2048", param="prompt"),
         400, "invalid_request_error", "prompt", None),
        (ServerError("The inference server is unavailable; try again later", status=503, retry_after=5),
         503, "service_unavailable", None, "5"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("when", ["generate", "first_event"])
def test_backend_errors_before_output_are_http_statuses(error, status, type_, param, retry_after, stream, when):
    backend = FakeBackend(generate_error=error) if when == "generate" else FakeBackend(script=lambda p: [error])
    response = make_client(backend=backend).post("/generate", json={**BODY, "stream": stream}, headers=AUTH)
    assert_error(response, status, type_, param, error.message)
    assert response.headers.get("Retry-After") == retry_after


def test_unexpected_backend_failure_is_500_with_request_id_and_no_internals():
    backend = FakeBackend(script=lambda p: ["partial", RuntimeError("secret internal detail")])
    response = make_client(backend=backend).post(
        "/generate", json=BODY, headers={**AUTH, "X-Request-ID": "req-42"}
    )
    assert_error(
        response,
        500,
        "server_error",
        None,
        "The server had an error while processing your request (request id req-42).",
    )
    assert "secret" not in response.get_data(as_text=True)


def test_generation_without_final_event_is_500():
    backend = FakeBackend(script=lambda p: ["text"])
    response = make_client(backend=backend).post("/generate", json=BODY, headers=AUTH)
    assert response.status_code == 500 and response.get_json()["error"]["type"] == "server_error"


# -- request ids ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [("post", "/generate", BODY), ("post", "/generate", {"prompt": ""}), ("get", "/nope", None), ("get", "/healthz", None)],
)
def test_client_request_id_is_echoed(method, path, body):
    client = make_client()
    response = getattr(client, method)(path, json=body, headers={**AUTH, "X-Request-ID": "abc-123"})
    assert response.headers["X-Request-ID"] == "abc-123"


def test_request_id_is_generated_when_absent_or_unusable():
    client = make_client()
    ids = set()
    for headers in ({}, {"X-Request-ID": "has spaces in it"}, {"X-Request-ID": "x" * 200}):
        response = client.post("/generate", json=BODY, headers={**AUTH, **headers})
        assert re.fullmatch(r"[0-9a-f]{32}", response.headers["X-Request-ID"])
        ids.add(response.headers["X-Request-ID"])
    assert len(ids) == 3


def test_request_id_reaches_the_backend():
    backend = FakeBackend()
    make_client(backend=backend).post("/generate", json=BODY, headers={**AUTH, "X-Request-ID": "rid-7"})
    assert backend.calls[-1][1] == "rid-7"


# -- the non-streaming response ---------------------------------------------------------------


def test_completion_response_shape():
    response = make_client().post("/generate", json=BODY, headers=AUTH)
    assert response.status_code == 200
    body = response.get_json()
    assert re.fullmatch(r"cmpl-[0-9a-f]{32}", body.pop("id"))
    assert isinstance(body.pop("created"), int)
    assert body == {
        "object": "text_completion",
        "model": MODEL,
        "choices": [{"text": "Hello, world ✓!", "index": 0, "logprobs": None, "finish_reason": "eos_token"}],
        "usage": {"prompt_tokens": 2, "completion_tokens": 6, "total_tokens": 8},
    }
    assert list(json.loads(response.get_data())) == ["id", "object", "created", "model", "choices", "usage"]


def test_generation_is_closed_after_a_completion():
    backend = FakeBackend()
    make_client(backend=backend).post("/generate", json=BODY, headers=AUTH)
    assert backend.generations[-1].closed.is_set()


# -- health -----------------------------------------------------------------------------------


def test_health_needs_no_key():
    client = make_client()
    assert client.get("/healthz").get_json() == {"status": "ok"}
    assert client.get("/readyz").get_json() == {"status": "ready"}
    assert client.get("/health").get_json() == {"status": "ready"}  # vLLM's and SGLang's name for it


@pytest.mark.parametrize("path", ["/readyz", "/health"])
def test_readyz_is_503_when_backend_is_not_ready(path):
    backend = FakeBackend(ready_error=ServerError("The inference server is unreachable", status=503, retry_after=5))
    response = make_client(backend=backend).get(path)
    assert_error(response, 503, "service_unavailable", None, "The inference server is unreachable")
    assert response.headers["Retry-After"] == "5"


# -- in-flight limit --------------------------------------------------------------------------


def test_in_flight_limit_is_503_and_slots_come_back():
    from gateway_fakes import Pause, default_script

    backend = FakeBackend(script=lambda p: ["a", Pause(5), Finished("length", 1, 1)] if p.stream else default_script(p))
    app = create_app({"API_KEY": KEY, "MAX_IN_FLIGHT": 1, "RETRY_AFTER": 3}, backend=backend)
    client = app.test_client()
    first = client.post("/generate", json={**BODY, "stream": True}, headers=AUTH, buffered=False)
    assert first.status_code == 200
    second = client.post("/generate", json=BODY, headers=AUTH)
    assert_error(
        second, 503, "service_unavailable", None,
        "The gateway is at its limit of 1 concurrent generations; try again later",
    )
    assert second.headers["Retry-After"] == "3"
    first.close()
    assert app.extensions["trident"].in_flight.count == 0
    assert backend.generations[0].closed.is_set()
    assert client.post("/generate", json=BODY, headers=AUTH).status_code == 200
    assert app.extensions["trident"].in_flight.count == 0


# -- config -----------------------------------------------------------------------------------


def test_config_precedence(tmp_path, monkeypatch):
    from flask import Flask

    config_file = tmp_path / "gateway.json"
    config_file.write_text(json.dumps({"TRITON_MODEL": "from-file", "MAX_IN_FLIGHT": 4096, "RETRY_AFTER": 9}))
    env = {
        "TRITON_GRPC_PORT": "9101",
        "TRIDENT_GATEWAY_CONFIG": str(config_file),
        "TRIDENT_MAX_IN_FLIGHT": "8192",
        "TRIDENT_HEARTBEAT_INTERVAL": "0.5",
        "TRIDENT_RATELIMIT_HEADERS_ENABLED": "false",
        "TRIDENT_API_KEY": "12345",
    }
    app = Flask("t")
    load_config(app, {"RETRY_AFTER": 1}, environ=env)
    assert app.config["TRITON_GRPC_URL"] == "localhost:9101"
    assert app.config["TRITON_MODEL"] == "from-file"
    assert app.config["MAX_IN_FLIGHT"] == 8192
    assert app.config["HEARTBEAT_INTERVAL"] == 0.5
    assert app.config["RATELIMIT_HEADERS_ENABLED"] is False
    assert app.config["API_KEY"] == "12345"  # a key stays a string
    assert app.config["RETRY_AFTER"] == 1
    assert app.config["MAX_CONTENT_LENGTH"] == 1 << 20

    load_config(app, None, environ={"TRITON_GRPC_PORT": "9101", "TRIDENT_TRITON_GRPC_URL": "triton:8001"})
    assert app.config["TRITON_GRPC_URL"] == "triton:8001"


@pytest.mark.parametrize(
    "override",
    [{"MAX_IN_FLIGHT": "lots"}, {"READY_TIMEOUT": -1}, {"HEARTBEAT_INTERVAL": 0}, {"BODY_TIMEOUT": 0},
     {"BODY_TIMEOUT": "soon"}, {"MAX_IN_FLIGHT": True}, {"GRPC_KEEPALIVE": 0.5}, {"GRPC_KEEPALIVE": -1},
     {"SEND_TIMEOUT": -1}],
)
def test_bad_config_stops_start_up(override):
    with pytest.raises(ValueError):
        create_app({"API_KEY": KEY, **override}, backend=FakeBackend())


def test_create_app_reads_nothing_at_import_time(monkeypatch):
    monkeypatch.setenv("TRIDENT_MODEL_NAME", "env-model")
    client = create_app({"API_KEY": KEY}, backend=FakeBackend()).test_client()
    assert client.post("/generate", json=BODY, headers=AUTH).get_json()["model"] == "env-model"


def test_a_body_that_does_not_arrive_in_time_is_a_408(monkeypatch):
    """gateway.json_body under gevent: the body's read runs under a timer (BODY_TIMEOUT); its
    expiry is a 408, any other failure of the read passes through. (The real stalled socket:
    tests/e2e/test_operations.py.)"""
    from concurrent.futures import ThreadPoolExecutor

    import gevent

    from gateway import json_body

    app = create_app({"API_KEY": KEY, "BODY_TIMEOUT": 0.05}, backend=FakeBackend())
    monkeypatch.setattr(json_body, "_gevent_timeout", lambda seconds: gevent.Timeout(seconds))

    class Stalled:
        is_json = True

        def __init__(self, failure=None):
            self.failure = failure

        def get_data(self, cache=True):
            if self.failure:
                raise self.failure
            gevent.sleep(5)  # a body that never comes
            return b"{}"

    def read(request):
        with app.app_context():
            try:
                return json_body.read_json_object(request)
            except Exception as exc:
                return exc

    # On a thread of its own: its own gevent hub, not one left behind in this thread for later tests.
    with ThreadPoolExecutor(1) as pool:
        stalled, reset = pool.map(read, [Stalled(), Stalled(OSError("connection reset"))])
    assert isinstance(stalled, ClientError) and stalled.status == 408
    assert "did not arrive within 0.05 s" in stalled.message
    assert isinstance(reset, OSError)
