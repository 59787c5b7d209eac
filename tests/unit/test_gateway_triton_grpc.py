"""TritonBackend over real gRPC, against an in-process fake Triton server (no Triton needed)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor

import pytest
from gateway_fakes import FakeTriton, start_fake_triton
from testkit import AUTH, KEY, MODEL, free_port, wait_until

from gateway import create_app
from gateway.backend import Finished, TextDelta
from gateway.errors import ClientError, ServerError
from trident.contract import CANCEL_TOKEN_PARAMETER, SamplingParams, TextRequest
from gateway.triton_backend import TritonBackend



@pytest.fixture(scope="module")
def fake():
    servicer = FakeTriton()
    server, port = start_fake_triton(servicer)
    yield servicer, port
    server.stop(grace=None)


@pytest.fixture
def backend(fake):
    _, port = fake
    b = TritonBackend(url=f"127.0.0.1:{port}", models={MODEL: "llm"}, request_timeout=10, ready_timeout=1)
    yield b
    b.close()


def run(backend, prompt, stream=False, **sampling):
    request = TextRequest(prompt=prompt, model=MODEL, stream=stream, sampling=SamplingParams(**sampling))
    generation = backend.generate(request, request_id="rid-1")
    try:
        return list(generation)
    finally:
        generation.close()


def test_streaming_with_empty_final_response(backend, fake):
    events = run(backend, "Hi there", stream=True, seed=3)
    assert events == [TextDelta("Hello"), TextDelta(","), TextDelta(" world"), Finished("eos_token", 2, 3)]
    request = fake[0].requests[-1]
    assert request.model_name == "llm" and request.id == "rid-1"
    assert request.parameters["triton_enable_empty_final_response"].bool_param is True
    assert {t.name for t in request.inputs} == {
        "text_input", "max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "stream"}


def test_non_streaming_final_response_with_outputs(backend):
    assert run(backend, "Hi there") == [TextDelta("Hello, world"), Finished("eos_token", 2, 3)]


def test_one_relay_per_process_is_reused(backend):
    run(backend, "a")
    relay = backend.relay
    run(backend, "b")
    assert backend.relay is relay and relay.stub is backend.relay.stub


def test_tagged_model_error_before_output_is_raised_on_first_event(backend):
    with pytest.raises(ClientError) as info:
        run(backend, "error-400")
    assert (info.value.status, info.value.param) == (400, "prompt")
    assert info.value.message == "prompt has 5000 tokens, the context 2048"


def test_untagged_model_error_is_500_without_internals(backend):
    with pytest.raises(ServerError) as info:
        run(backend, "error-500")
    assert info.value.status == 500 and "exploded" not in info.value.message and "rid-1" in info.value.message


def test_error_after_output(backend):
    generation = backend.generate(TextRequest(prompt="error-after", model=MODEL, stream=True), request_id="r")
    events = iter(generation)
    assert next(events) == TextDelta("Hello")
    with pytest.raises(ServerError) as info:
        next(events)
    assert info.value.status == 503 and info.value.headers["Retry-After"] == "5"
    generation.close()


def test_stream_without_finish_is_500(backend):
    with pytest.raises(ServerError) as info:
        run(backend, "no-finish", stream=True)
    assert info.value.status == 500


def test_close_cancels_on_the_server(backend, fake):
    servicer, _ = fake
    generation = backend.generate(TextRequest(prompt="slow", model=MODEL, stream=True), request_id="r")
    events = iter(generation)
    assert next(events) == TextDelta("Hello")
    before = servicer.cancelled.count("slow")
    generation.close()
    assert list(events) == []  # ends quietly after close
    assert wait_until(lambda: servicer.cancelled.count("slow") == before + 1), (before, servicer.cancelled)


def test_close_ends_the_call_with_a_cancel_request_not_a_grpc_cancel(backend, fake):
    """Triton 2.51's gRPC endpoint can deadlock when a client cancels a stream while a response
    of it is being written: a client that leaves is handled by a cancel request naming the
    request's token, on a second call, and the first call ends with its final response."""
    servicer, _ = fake
    generation = backend.generate(TextRequest(prompt="slow", model=MODEL, stream=True), request_id="soft")
    events = iter(generation)
    assert next(events) == TextDelta("Hello")
    (request,) = [r for r in servicer.requests if r.id == "soft"]
    token = request.parameters[CANCEL_TOKEN_PARAMETER].string_param
    assert len(token) >= 16
    before, grpc_before = servicer.cancelled.count("slow"), servicer.grpc_cancelled.count("slow")
    generation.close()
    assert wait_until(lambda: servicer.cancelled.count("slow") == before + 1)
    assert servicer.cancel_requests.count(token) == 1
    time.sleep(0.2)
    assert servicer.grpc_cancelled.count("slow") == grpc_before


def test_deadline_before_output_is_504(fake):
    servicer, port = fake
    backend = TritonBackend(url=f"127.0.0.1:{port}", models={MODEL: "llm"}, request_timeout=0.3)
    before = servicer.cancelled.count("stall")
    with pytest.raises(ServerError) as info:
        run(backend, "stall")
    assert info.value.status == 504 and info.value.type == "timeout_error"
    assert info.value.message == "Generation did not finish within the request timeout of 0.3 s (request id rid-1)"
    assert "Retry-After" not in info.value.headers
    # the deadline ends the call on the server too: nothing more is computed
    assert wait_until(lambda: servicer.cancelled.count("stall") == before + 1), servicer.cancelled


def test_deadline_after_output_is_504(fake):
    _, port = fake
    backend = TritonBackend(url=f"127.0.0.1:{port}", models={MODEL: "llm"}, request_timeout=0.3)
    generation = backend.generate(TextRequest(prompt="stall-after", model=MODEL, stream=True), request_id="r")
    events = iter(generation)
    assert next(events) == TextDelta("Hello")
    with pytest.raises(ServerError) as info:
        next(events)
    assert info.value.status == 504 and "request timeout of 0.3 s" in info.value.message


def test_unreachable_triton_is_a_fast_503():
    backend = TritonBackend(url=f"127.0.0.1:{free_port()}", models={MODEL: "llm"}, ready_timeout=1)
    started = time.monotonic()
    with pytest.raises(ServerError) as info:
        run(backend, "Hi")
    assert info.value.status == 503 and info.value.headers["Retry-After"] == "5"
    with pytest.raises(ServerError) as info:
        backend.check_ready()
    assert info.value.status == 503 and info.value.message == "The inference server is unreachable"
    assert time.monotonic() - started < 3


def test_check_ready(backend, fake):
    servicer, _ = fake
    backend.check_ready()
    servicer.ready_models.clear()
    try:
        with pytest.raises(ServerError) as info:
            backend.check_ready()
        assert info.value.status == 503 and info.value.message == f"The model '{MODEL}' is not ready"
    finally:
        servicer.ready_models.add("llm")


# -- through the Flask app ------------------------------------------------------------------


@pytest.fixture
def client(fake):
    _, port = fake
    app = create_app({"API_KEY": KEY, "TRITON_GRPC_URL": f"127.0.0.1:{port}", "HEARTBEAT_INTERVAL": 0.05})
    return app.test_client()


def test_app_completion_and_stream_over_grpc(client):
    completion = client.post("/generate", json={"prompt": "Hi there"}, headers=AUTH).get_json()
    assert completion["choices"][0]["text"] == "Hello, world"
    assert completion["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    raw = client.post("/generate", json={"prompt": "Hi there", "stream": True}, headers=AUTH).get_data(as_text=True)
    tokens = [json.loads(line[6:])["text"] for line in raw.split("\n") if line.startswith('data: {"text"')]
    assert "".join(tokens) == "Hello, world"
    assert raw.endswith('"usage": {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}}\n\n')


def test_app_maps_model_errors_to_statuses(client):
    response = client.post("/generate", json={"prompt": "error-400", "stream": True}, headers=AUTH)
    assert response.status_code == 400 and response.get_json()["error"]["param"] == "prompt"
    response = client.post("/generate", json={"prompt": "error-500"}, headers={**AUTH, "X-Request-ID": "r-5"})
    assert response.status_code == 500
    assert response.get_json()["error"]["message"].endswith("(request id r-5).")
    assert client.get("/readyz").status_code == 200


def test_app_disconnect_cancels_triton_stream(client, fake):
    servicer, _ = fake
    before = servicer.cancelled.count("slow")
    response = client.post("/generate", json={"prompt": "slow", "stream": True}, headers=AUTH, buffered=False)
    chunks = iter(response.response)
    assert next(chunks) == b'event: token\ndata: {"text": "Hello"}\n\n'
    assert next(chunks) == b": keep-alive\n\n"
    response.close()
    assert wait_until(lambda: servicer.cancelled.count("slow") == before + 1)


def test_concurrent_first_calls_share_one_relay(fake):
    """Several requests arriving at once on a fresh worker build one relay (one event loop):
    two loops in one process made grpc.aio mix their futures ("attached to a different loop")."""
    backend = TritonBackend(url=f"127.0.0.1:{fake[1]}", models={MODEL: "llm"})
    try:
        with ThreadPoolExecutor(8) as pool:
            limits = list(pool.map(lambda _: backend.limits("llm"), range(8)))
        assert len(set(limits)) == 1
        with ThreadPoolExecutor(8) as pool:
            outs = list(pool.map(lambda _: run(backend, "Hi there"), range(8)))
        assert all(o[-1] == Finished("eos_token", 2, 3) for o in outs)
    finally:
        backend.close()


def test_text_that_arrives_with_a_failure_is_not_lost(backend):
    """The relay hands over everything that arrived at once: text then an error in one batch
    gives the text, and the error on the next read."""
    generation = backend.generate(TextRequest(prompt="error-after", model=MODEL, stream=True), request_id="r")
    assert wait_until(lambda: generation._call.done, timeout=5)  # both arrived before the first read
    assert generation.next_events(1) == [TextDelta("Hello")]
    with pytest.raises(ServerError) as info:
        generation.next_events(1)
    assert info.value.status == 503
    generation.close()


def test_keepalive_pings_every_connection_and_triton_is_started_to_accept_them():
    """HTTP/2 pings every GRPC_KEEPALIVE s on busy and idle connections, each answer (the
    flow-control pings' too) within as long; Triton's launch flags accept one a second, the
    least the config allows (tests/e2e/test_scale.py freezes a Triton)."""
    from gateway.config import GRPC_KEEPALIVE_MIN
    from gateway.triton_backend import keepalive_options
    from trident.triton_launcher import GRPC_KEEPALIVE_ARGS, TritonPorts, build_command

    options = dict(TritonBackend(url="127.0.0.1:1", models={MODEL: "llm"}, keepalive=3)._channel_options())
    assert {k: options[k] for k in ("grpc.keepalive_time_ms", "grpc.keepalive_timeout_ms", "grpc.http2.ping_timeout_ms",
                                    "grpc.keepalive_permit_without_calls", "grpc.http2.max_pings_without_data")} \
        == {"grpc.keepalive_time_ms": 3000, "grpc.keepalive_timeout_ms": 3000, "grpc.http2.ping_timeout_ms": 3000,
            "grpc.keepalive_permit_without_calls": 1, "grpc.http2.max_pings_without_data": 0}
    assert keepalive_options(0) == []
    app = create_app({"API_KEY": KEY, "TRITON_GRPC_URL": "127.0.0.1:1"})
    assert app.config["GRPC_KEEPALIVE"] == 10 and app.extensions["trident"].backend.keepalive == 10
    assert "--grpc-keepalive-permit-without-calls=1" in GRPC_KEEPALIVE_ARGS
    assert f"--grpc-http2-min-recv-ping-interval-without-data={int(GRPC_KEEPALIVE_MIN * 1000)}" in GRPC_KEEPALIVE_ARGS
    command = build_command(model_repository=Path("/r"), backend_dir=Path("/b"), ports=TritonPorts(1, 2, 3))
    assert set(GRPC_KEEPALIVE_ARGS) <= set(command)

