"""Server-sent events of POST /generate with "stream": true, against the fake backend."""

from __future__ import annotations

import json
import threading

import pytest
from gateway_fakes import FakeBackend, Gate, Pause, default_script
from testkit import AUTH, wait_until

from gateway.backend import ADMITTED, Finished
from gateway.errors import ClientError, ServerError

BODY = {"prompt": "Hi there"}


def parse_sse(raw: str) -> list[tuple[str, object]]:
    """[(event name, decoded data)], with ("comment", text) for comment blocks."""
    assert raw.endswith("\n\n"), raw
    events = []
    for block in raw[:-2].split("\n\n"):
        lines = block.split("\n")
        if all(line.startswith(":") for line in lines):
            events.append(("comment", "\n".join(lines)))
            continue
        assert len(lines) == 2 and lines[0].startswith("event: ") and lines[1].startswith("data: "), block
        events.append((lines[0][len("event: "):], json.loads(lines[1][len("data: "):])))
    return events


def stream(client, body=None, headers=None):
    return client.post("/generate", json={**(body or BODY), "stream": True}, headers={**AUTH, **(headers or {})})


def test_stream_events_match_the_contract(make_app):
    client = make_app(backend=FakeBackend()).test_client()
    response = stream(client)
    assert response.status_code == 200
    assert response.mimetype == "text/event-stream"
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["X-Request-ID"]
    raw = response.get_data(as_text=True)
    assert raw.startswith('event: token\ndata: {"text": "Hello"}\n\nevent: token\ndata: {"text": ","}\n\n')
    assert raw.endswith(
        'event: done\ndata: {"finish_reason": "eos_token", '
        '"usage": {"prompt_tokens": 2, "completion_tokens": 6, "total_tokens": 8}}\n\n'
    )
    events = parse_sse(raw)
    assert [name for name, _ in events] == ["token"] * 6 + ["done"]


@pytest.mark.parametrize("max_new_tokens", [1, 3, 6, 100])
def test_stream_concatenation_equals_completion(max_new_tokens, make_app):
    client = make_app(backend=FakeBackend()).test_client()
    body = {**BODY, "max_new_tokens": max_new_tokens}
    completion = client.post("/generate", json=body, headers=AUTH).get_json()
    events = parse_sse(stream(client, body).get_data(as_text=True))
    text = "".join(data["text"] for name, data in events if name == "token")
    assert text == completion["choices"][0]["text"]
    done = events[-1]
    assert done == ("done", {"finish_reason": completion["choices"][0]["finish_reason"], "usage": completion["usage"]})


def test_stream_that_finishes_without_text(make_app):
    backend = FakeBackend(script=lambda p: [Finished("eos_token", prompt_tokens=2, completion_tokens=1)])
    events = parse_sse(stream(make_app(backend=backend).test_client()).get_data(as_text=True))
    assert events == [
        ("done", {"finish_reason": "eos_token", "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}})
    ]


def test_error_before_first_token_is_an_http_status_not_a_stream(make_app):
    error = ClientError("prompt has 3000 tokens, more than the context of 2048", param="prompt")
    response = stream(make_app(backend=FakeBackend(script=lambda p: [Pause(0.01), error])).test_client())
    assert response.status_code == 400
    assert response.mimetype == "application/json"
    assert response.get_json()["error"]["param"] == "prompt"


@pytest.mark.parametrize(
    ("failure", "expected"),
    [
        (
            ServerError("The inference server is unavailable; try again later", status=503, retry_after=5),
            {"message": "The inference server is unavailable; try again later", "type": "service_unavailable",
             "param": None, "code": 503},
        ),
        (
            RuntimeError("secret internal detail"),
            {"message": "The server had an error while processing your request (request id rid-1).",
             "type": "server_error", "param": None, "code": 500},
        ),
    ],
)
def test_failure_after_first_token_is_an_error_event(failure, expected, make_app):
    backend = FakeBackend(script=lambda p: ["Hello", " there", failure, "never"])
    app = make_app(backend=backend)
    response = stream(app.test_client(), headers={"X-Request-ID": "rid-1"})
    assert response.status_code == 200
    events = parse_sse(response.get_data(as_text=True))
    assert events == [("token", {"text": "Hello"}), ("token", {"text": " there"}), ("error", {"error": expected})]
    assert backend.generations[0].closed.is_set()
    assert app.extensions["trident"].in_flight.count == 0


def test_generation_without_final_event_ends_with_error_event(make_app):
    backend = FakeBackend(script=lambda p: ["Hello", "!"])
    events = parse_sse(stream(make_app(backend=backend).test_client()).get_data(as_text=True))
    assert events[-1][0] == "error" and events[-1][1]["error"]["type"] == "server_error"


def test_heartbeats_while_waiting_for_the_next_token(make_app):
    """The next token waits for the test (a gate, not a pause: a slow moment of the machine
    cannot make the wait shorter than the heartbeats it must hold) until two heartbeats came."""
    gate = threading.Event()
    backend = FakeBackend(script=lambda p: ["a", Gate(gate), "b", Finished("length", 1, 2)])
    client = make_app(backend=backend, HEARTBEAT_INTERVAL=0.05).test_client()
    response = client.post("/generate", json={**BODY, "stream": True}, headers=AUTH, buffered=False)
    chunks = iter(response.response)
    raw = next(chunks).decode()
    while raw.count(": keep-alive\n\n") < 2:
        raw += next(chunks).decode()
    gate.set()
    raw += b"".join(chunks).decode()
    response.close()
    names = [name for name, _ in parse_sse(raw)]
    assert names[0] == "token" and names[-2:] == ["token", "done"]
    beats = names[1:-2]
    assert len(beats) >= 2 and set(beats) == {"comment"}


def test_client_disconnect_cancels_the_generation(make_app):
    steps = ["a", "b", Pause(10), "c", Finished("length", 1, 3)]
    backend = FakeBackend(script=lambda p: list(steps))
    app = make_app(backend=backend, HEARTBEAT_INTERVAL=0.05)
    response = app.test_client().post("/generate", json={**BODY, "stream": True}, headers=AUTH, buffered=False)
    chunks = iter(response.response)
    received = b""
    while received.count(b"event: token") < 2:  # "a" and "b", in one chunk or two
        received += next(chunks)
    assert next(chunks) == b": keep-alive\n\n"
    response.close()  # what the WSGI server does when a write to the client fails
    generation = backend.generations[0]
    assert generation.closed.is_set()
    assert wait_until(lambda: generation.consumed == 3)  # nothing after the pause was produced
    assert app.extensions["trident"].in_flight.count == 0


def test_stream_params_reach_the_backend(make_app):
    backend = FakeBackend(script=default_script)
    stream(make_app(backend=backend).test_client(), {**BODY, "seed": 0, "stop_sequences": ["\n"]}).get_data()
    params = backend.last_params
    assert params.stream is True and params.sampling.seed == 0 and params.sampling.stop == ("\n",)


def test_admission_starts_the_stream_before_any_token(make_app):
    """Triton's llm model admits a request (validated, queued) long before its first token when
    the engine is busy: the 200 and a first comment go out at once, heartbeats follow while it
    waits, and a failure after that is an error event."""
    backend = FakeBackend(script=lambda p: [ADMITTED, Pause(0.25), "a", Finished("length", 1, 1)])
    app = make_app(backend=backend, HEARTBEAT_INTERVAL=0.05)
    response = app.test_client().post("/generate", json={**BODY, "stream": True}, headers=AUTH, buffered=False)
    assert response.status_code == 200 and response.mimetype == "text/event-stream"
    chunks = iter(response.response)
    assert next(chunks) == b": keep-alive\n\n"  # sent before the generation produced anything
    assert backend.generations[0].consumed <= 2  # admission, maybe the pause: no text yet
    names = [name for name, _ in parse_sse(b"".join(chunks).decode())]
    assert names[-2:] == ["token", "done"] and len(names) >= 4 and set(names[:-2]) == {"comment"}


def test_failure_after_admission_is_an_error_event(make_app):
    error = ServerError("The inference server is unavailable; try again later", status=503, retry_after=5)
    backend = FakeBackend(script=lambda p: [ADMITTED, Pause(0.01), error])
    response = stream(make_app(backend=backend).test_client())
    assert response.status_code == 200
    events = parse_sse(response.get_data(as_text=True))
    assert [name for name, _ in events] == ["comment", "error"]
    assert events[1][1]["error"]["code"] == 503


def test_admission_is_invisible_without_streaming(make_app):
    backend = FakeBackend(script=lambda p: [ADMITTED, Pause(0.01), "Hello", Finished("eos_token", 2, 1)])
    response = make_app(backend=backend).test_client().post("/generate", json=BODY, headers=AUTH)
    assert response.status_code == 200
    assert response.get_json()["choices"][0]["text"] == "Hello"


def test_the_drain_deadline_ends_open_streams_with_an_error_event(make_app):
    """After SIGTERM open streams may finish; past GATEWAY_DRAIN_TIMEOUT each still open gets an
    error event (503, shutting down) and ends, and new generations and /readyz get 503."""
    from gateway.drain import DRAIN

    backend = FakeBackend(script=lambda p: ["a", Pause(30), "never", Finished("length", 1, 2)])
    app = make_app(backend=backend, HEARTBEAT_INTERVAL=0.05)
    client = app.test_client()
    response = client.post("/generate", json={**BODY, "stream": True}, headers=AUTH, buffered=False)
    chunks = iter(response.response)
    assert next(chunks).startswith(b"event: token")
    assert DRAIN.streams, "the open stream is registered for the drain"
    try:
        DRAIN.started = 0.0  # what SIGTERM does (gateway.worker -> DRAIN.begin)
        assert client.get("/readyz").status_code == 503
        refused = client.post("/generate", json=BODY, headers=AUTH)
        assert refused.status_code == 503 and refused.headers["Retry-After"]
        DRAIN.end_streams()  # the deadline
        rest = parse_sse(b"".join(chunks).decode())
    finally:
        DRAIN.started = None
    names = [name for name, _ in rest]
    assert names[-1] == "error" and "done" not in names and set(names[:-1]) <= {"comment"}
    assert rest[-1][1]["error"]["code"] == 503 and rest[-1][1]["error"]["type"] == "service_unavailable"
    assert backend.generations[0].closed.is_set()
    assert not DRAIN.streams


def test_a_key_bounded_to_two_open_generations_gets_429_for_a_third(make_app):
    """max_concurrent in the keys file (OWASP API4): a third open generation of the key is a 429
    with Retry-After while two stream; once one ends, the next one passes."""
    from gateway.auth import hash_key

    backend = FakeBackend(script=lambda p: ["a", Pause(30 if p.stream else 0), Finished("length", 1, 1)])
    app = make_app(backend=backend, API_KEYS=[{"name": "two", "sha256": hash_key("k2"), "models": ["*"],
                                               "max_concurrent": 2}])
    client = app.test_client()
    auth = {"Authorization": "Bearer k2"}
    open_ = [client.post("/generate", json={**BODY, "stream": True}, headers=auth, buffered=False) for _ in range(2)]
    assert [r.status_code for r in open_] == [200, 200]
    third = client.post("/generate", json={**BODY, "stream": True}, headers=auth)
    assert third.status_code == 429 and third.headers["Retry-After"] == "5"
    assert third.get_json()["error"] == {
        "message": "API key 'two' already has 2 generations open, its limit; retry when one ends",
        "type": "rate_limit_error", "param": None, "code": 429}
    assert client.post("/generate", json=BODY, headers=AUTH).status_code == 200  # other keys: unaffected
    open_[0].close()
    assert client.post("/generate", json=BODY, headers=auth).status_code == 200
    open_[1].close()


@pytest.mark.parametrize("text", ["Hello", ' "quoted" \\ back\nslash\t\x01 é ✓ 🎉', ""])
def test_the_fast_token_event_is_the_json_encoders_bytes(text):
    from gateway.backend import TextDelta
    from gateway.sse import event_bytes, sse_event

    assert event_bytes(TextDelta(text)) == sse_event("token", {"text": text})
