"""Operations on the real stack (gunicorn + gevent workers + the real Triton): rate limits shared
in Redis across 4 workers, /metrics summed across workers, the JSON request log, the in-flight
cap under a burst, TLS, timeouts, the body limit, and Redis going away mid-stream.

Three gateways of their own (the session's Triton is shared): ``redis_gateway`` (4 workers,
keys file, Redis storage), ``tls_gateway`` (HTTPS, 1 worker, MAX_IN_FLIGHT=4) and
``timeout_gateway`` (REQUEST_TIMEOUT=2 s, a 2000-byte body limit, BODY_TIMEOUT=1.5 s).
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import json
import shutil
import subprocess
import threading
import time
import uuid

import pytest
import requests

from conftest import start_gateway, start_redis, stop_redis
from testkit import MODEL, free_port

from e2e_helpers import API_KEY, AUTH, engine_metrics, log_lines, open_generate, sample, scrape, sse_events, wait_for
from gateway.keys import add_key


@pytest.fixture(scope="module")
def redis_gateway(triton, tmp_path_factory, redis_url):
    keys = tmp_path_factory.mktemp("keys") / "keys.json"
    limited = add_key(keys, name="limited", models=["*"], rate_limit="10/minute")
    free = add_key(keys, name="free", models=["*"])
    gw = start_gateway(triton, tmp_path_factory, workers=4, extra_env={
        "TRIDENT_API_KEYS_FILE": str(keys),
        "TRIDENT_RATELIMIT_STORAGE_URI": redis_url,
        "TRIDENT_REQUEST_TIMEOUT": "60",  # a broken engine fails these tests in a minute, not ten
    })
    gw.keys = {"limited": limited, "free": free}
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed (Debian: apt-get install -y openssl)")
    work = tmp_path_factory.mktemp("tls")
    cert, key = work / "cert.pem", work / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return cert, key


@pytest.fixture(scope="module")
def tls_gateway(triton, tmp_path_factory, certificate):
    cert, key = certificate
    gw = start_gateway(triton, tmp_path_factory, extra_env={
        "GATEWAY_CERTFILE": str(cert), "GATEWAY_KEYFILE": str(key),
        "TRIDENT_MAX_IN_FLIGHT": "4", "TRIDENT_RETRY_AFTER": "2", "TRIDENT_REQUEST_TIMEOUT": "60",
    })
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def timeout_gateway(triton, tmp_path_factory):
    gw = start_gateway(triton, tmp_path_factory, extra_env={
        "TRIDENT_REQUEST_TIMEOUT": "2", "TRIDENT_MAX_BODY_BYTES": "2000", "TRIDENT_HEARTBEAT_INTERVAL": "0.5",
        "TRIDENT_BODY_TIMEOUT": "1.5",
    })
    yield gw
    gw.stop()


# -- rate limits in Redis, metrics and logs across 4 workers ----------------------------------


def test_rate_limit_holds_exactly_across_4_workers(redis_gateway):
    """10/minute for the key, 30 requests on 30 connections at once: exactly 10 pass."""
    auth = {"Authorization": f"Bearer {redis_gateway.keys['limited']}", "Connection": "close"}
    start = threading.Barrier(30)
    ids = [f"rl-{uuid.uuid4().hex[:12]}" for _ in range(30)]

    def one(request_id):
        start.wait(30)
        return requests.post(redis_gateway.url + "/generate", timeout=60,
                             headers={**auth, "X-Request-ID": request_id},
                             json={"prompt": "Hi", "max_new_tokens": 1, "temperature": 0})

    with cf.ThreadPoolExecutor(30) as pool:
        responses = list(pool.map(one, ids))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 10 + [429] * 20, statuses
    for r in responses:
        assert r.headers["X-RateLimit-Limit"] == "10"
        if r.status_code == 429:
            error = r.json()["error"]
            assert error["type"] == "rate_limit_error" and error["code"] == 429
            assert 0 < int(r.headers["Retry-After"]) <= 60
            assert r.headers["X-RateLimit-Remaining"] == "0"
            assert int(r.headers["X-RateLimit-Reset"]) > time.time() - 5
    # several worker processes answered (their pids are in the request log lines)
    def logged():
        found = [line for line in log_lines(redis_gateway) if line.get("request_id") in ids]
        return found if len(found) == 30 else None

    lines = wait_for(logged)
    assert lines, "expected 30 request log lines"
    assert len({line["pid"] for line in lines}) >= 2, "all requests went to one worker"
    assert sorted(line["status"] for line in lines) == statuses
    # every worker's rejections, summed in /metrics whichever worker answers the scrape
    for _ in range(4):
        samples = scrape(redis_gateway.url)
        rejected = sample(samples, "trident_gateway_rate_limited_requests_total", endpoint="/generate", key="limited")
        assert rejected == 20


def test_connections_spread_over_the_workers(redis_gateway):
    """100 connections over 4 workers: no worker takes more than 40 %. Each worker listens on its
    own socket (SO_REUSEPORT, gateway.gunicorn_conf) and the kernel spreads connections over
    them; with one shared socket one gevent worker could take a whole burst."""
    ids = [f"spread-{uuid.uuid4().hex[:12]}" for _ in range(100)]

    def one(request_id):  # refused at once (401): the worker that accepted it logs it
        return requests.post(redis_gateway.url + "/generate", json={"prompt": "x"}, timeout=30,
                             headers={"Authorization": "Bearer not-a-key", "Connection": "close",
                                      "X-Request-ID": request_id}).status_code

    with cf.ThreadPoolExecutor(20) as pool:
        assert set(pool.map(one, ids)) == {401}

    def logged():
        found = [line for line in log_lines(redis_gateway) if line.get("request_id") in ids]
        return found if len(found) == 100 else None

    lines = wait_for(logged)
    assert lines, "expected 100 request log lines"
    per_worker = sorted(collections.Counter(line["pid"] for line in lines).values())
    assert len(per_worker) == 4 and per_worker[-1] <= 40, per_worker


def test_metrics_are_summed_across_workers(redis_gateway):
    auth = {"Authorization": f"Bearer {redis_gateway.keys['free']}", "Connection": "close"}
    gen = {"endpoint": "/generate", "model": MODEL}
    before = scrape(redis_gateway.url)

    def one(i):
        r = requests.post(redis_gateway.url + "/generate", headers=auth, stream=True, timeout=60,
                          json={"prompt": f"Count to {i}:", "max_new_tokens": 6, "temperature": 0, "stream": True})
        assert r.status_code == 200, r.text
        events = sse_events(r)
        assert events[-1][0] == "done", events
        return events[-1][1]["usage"], sum(1 for e, d in events if e == "token" and d["text"])

    with cf.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    prompt_tokens = sum(u["prompt_tokens"] for u, _ in results)
    completion_tokens = sum(u["completion_tokens"] for u, _ in results)
    gaps = sum(n - 1 for _, n in results)

    def moved(samples, name, **labels):
        return sample(samples, name, **labels) - sample(before, name, **labels)

    # A request is recorded when its response closes, just after its last bytes left: a client
    # can have read its whole stream a moment before that.
    wait_for(lambda: moved(scrape(redis_gateway.url), "trident_gateway_requests_total",
                           endpoint="/generate", status="200") >= 8, timeout=10)
    for _ in range(4):  # any worker may answer; each sees every worker's numbers
        after = scrape(redis_gateway.url)
        assert moved(after, "trident_gateway_requests_total", endpoint="/generate", status="200") == 8
        assert moved(after, "trident_gateway_request_duration_seconds_count", endpoint="/generate") == 8
        assert moved(after, "trident_gateway_time_to_first_token_seconds_count", **gen) == 8
        assert moved(after, "trident_gateway_inter_token_latency_seconds_count", **gen) == gaps
        assert moved(after, "trident_gateway_prompt_tokens_total", **gen) == prompt_tokens
        assert moved(after, "trident_gateway_completion_tokens_total", **gen) == completion_tokens
        assert sample(after, "trident_gateway_in_flight_requests") == 0
        assert 0 < moved(after, "trident_gateway_time_to_first_token_seconds_sum", **gen) < 8 * 30


def test_request_log_is_one_json_line_without_secrets(redis_gateway):
    key = redis_gateway.keys["free"]
    request_id = f"log-{uuid.uuid4().hex[:12]}"
    marker = f"zebra{uuid.uuid4().hex[:8]}"
    r = requests.post(redis_gateway.url + "/generate", timeout=60,
                      headers={"Authorization": f"Bearer {key}", "X-Request-ID": request_id},
                      json={"prompt": f"Say {marker}.", "max_new_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    output = r.json()["choices"][0]["text"]
    lines = wait_for(lambda: [l for l in log_lines(redis_gateway) if l.get("request_id") == request_id])
    assert len(lines) == 1, lines
    (line,) = lines
    assert line["msg"] == "generation" and line["level"] == "INFO" and line["logger"] == "trident.gateway.request"
    assert line["key"] == "free" and line["model"] == MODEL and line["status"] == 200
    assert line["prompt_tokens"] == usage["prompt_tokens"]
    assert line["completion_tokens"] == usage["completion_tokens"]
    assert line["finish_reason"] == r.json()["choices"][0]["finish_reason"]
    assert 0 < line["duration_s"] < 60 and line["params"]["max_new_tokens"] == 4
    text = redis_gateway.log_path.read_text(errors="replace")
    assert marker not in text  # prompts are not logged by default
    assert key not in text and API_KEY not in text  # keys never are
    assert output.strip() == "" or output not in json.dumps(line)


# -- TLS and the in-flight cap ----------------------------------------------------------------


def test_https_with_a_self_signed_certificate(tls_gateway, certificate):
    cert, _ = certificate
    assert tls_gateway.url.startswith("https://")
    assert requests.get(tls_gateway.url + "/healthz", verify=str(cert), timeout=10).json() == {"status": "ok"}
    r = requests.post(tls_gateway.url + "/generate", verify=str(cert), headers=AUTH, timeout=60,
                      json={"prompt": "The capital of France is", "max_new_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    with pytest.raises(requests.exceptions.SSLError):  # the client checks the certificate
        requests.get(tls_gateway.url + "/healthz", timeout=10)
    with pytest.raises(requests.exceptions.ConnectionError):  # no plain HTTP on a TLS port
        requests.get(tls_gateway.url.replace("https://", "http://") + "/healthz", timeout=10)


def test_burst_over_the_in_flight_cap_gets_fast_503s_and_never_hangs(tls_gateway, certificate):
    """MAX_IN_FLIGHT=4 and 54 requests at once: each is a complete answer or a 503 with
    Retry-After; nothing waits in a queue, nothing hangs."""
    cert, _ = certificate
    n = 4 + 50
    start = threading.Barrier(n)
    before = scrape(tls_gateway.url, verify=str(cert))

    def one(i):
        stream = i % 2 == 1
        start.wait(60)
        began = time.monotonic()
        r = requests.post(tls_gateway.url + "/generate", verify=str(cert), headers=AUTH, stream=stream,
                          timeout=60, json={"prompt": f"Once upon a time, {i} dragons", "max_new_tokens": 24,
                                            "temperature": 0, "stream": stream})
        if r.status_code != 200:
            return r.status_code, r.headers.get("Retry-After"), r.json(), time.monotonic() - began
        if stream:
            events = sse_events(r)
            return 200, None, events, time.monotonic() - began
        return 200, None, r.json(), time.monotonic() - began

    with cf.ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(one, i) for i in range(n)]
        done, not_done = cf.wait(futures, timeout=120)
    assert not not_done, f"{len(not_done)} requests hung"
    results = [f.result() for f in futures]
    ok = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] == 503]
    assert len(ok) + len(refused) == n, [r[:3] for r in results if r[0] not in (200, 503)]
    assert len(ok) >= 4 and len(refused) >= 1, (len(ok), len(refused))
    for status, _, body, _ in ok:
        if isinstance(body, list):  # streamed: tokens, then done
            assert body[-1][0] == "done" and {e for e, _ in body[:-1]} <= {"token"}, body
            assert body[-1][1]["usage"]["completion_tokens"] >= 1
        else:
            assert body["choices"][0]["finish_reason"] in ("length", "eos_token", "stop_sequence")
            assert body["usage"]["completion_tokens"] >= 1
    for status, retry_after, body, elapsed in refused:
        assert int(retry_after) == 2
        assert body["error"]["type"] == "service_unavailable"
        assert body["error"]["message"] == (
            "The gateway is at its limit of 4 concurrent generations; try again later")
        assert elapsed < 15, elapsed  # refused at once (the bound is loose: 54 TLS handshakes on 2 cores)
    # A streamed answer gives its slot back when its body ends, just after its last bytes left:
    # a client can have read them first.
    after = wait_for(lambda: (lambda s: s if sample(s, "trident_gateway_in_flight_requests") == 0 else None)(
        scrape(tls_gateway.url, verify=str(cert))), timeout=10)
    assert after is not None, "a generation's slot was not given back"
    moved = (sample(after, "trident_gateway_requests_total", endpoint="/generate", status="503")
             - sample(before, "trident_gateway_requests_total", endpoint="/generate", status="503"))
    assert moved == len(refused)


# -- timeouts and the body limit --------------------------------------------------------------

LONG = {"prompt": "Once upon a time, in a land far away, there lived a dragon who", "max_new_tokens": 2000,
        "temperature": 0}


def _engine_idle(triton) -> bool:
    return engine_metrics(triton)["active"] == 0


def _log_size(triton) -> int:
    return len(triton.log_path.read_text(errors="replace").splitlines())


def _cancellations_since(triton, mark: int) -> list[str]:
    lines = triton.log_path.read_text(errors="replace").splitlines()[mark:]
    return [line for line in lines if "cancelled by the client" in line]


def test_timeout_without_streaming_is_a_504(timeout_gateway, triton):
    """A generation past REQUEST_TIMEOUT is ended like one whose client left: by a cancel
    request on its own call, which llm answers (it logs how), not by cancelling the gRPC call
    (which Triton 2.51 can deadlock on: docs/architecture.md)."""
    mark = _log_size(triton)
    started = time.monotonic()
    r = requests.post(timeout_gateway.url + "/generate", headers={**AUTH, "X-Request-ID": "timeout-plain"},
                      json=LONG, timeout=60)
    elapsed = time.monotonic() - started
    assert r.status_code == 504, r.text
    assert r.json() == {"error": {
        "message": "Generation did not finish within the request timeout of 2 s (request id timeout-plain)",
        "type": "timeout_error", "param": None, "code": 504}}
    assert 1.9 < elapsed < 10
    assert wait_for(lambda: _engine_idle(triton), timeout=10), "the engine kept generating after the timeout"
    cancelled = wait_for(lambda: _cancellations_since(triton, mark))
    assert len(cancelled) == 1 and "at the engine, cancel request" in cancelled[0], cancelled


def test_timeout_while_streaming_is_an_error_event(timeout_gateway, triton):
    mark = _log_size(triton)
    started = time.monotonic()
    r = requests.post(timeout_gateway.url + "/generate", headers={**AUTH, "X-Request-ID": "timeout-stream"},
                      json={**LONG, "stream": True}, stream=True, timeout=60)
    assert r.status_code == 200
    events = sse_events(r)
    elapsed = time.monotonic() - started
    names = [e for e, _ in events]
    assert names[-1] == "error" and "done" not in names and names.count("token") >= 1, names
    assert events[-1][1] == {"error": {
        "message": "Generation did not finish within the request timeout of 2 s (request id timeout-stream)",
        "type": "timeout_error", "param": None, "code": 504}}
    assert 1.9 < elapsed < 10
    assert wait_for(lambda: _engine_idle(triton), timeout=10), "the engine kept generating after the timeout"
    cancelled = wait_for(lambda: _cancellations_since(triton, mark))
    assert len(cancelled) == 1 and "at the engine, cancel request" in cancelled[0], cancelled
    generated = engine_metrics(triton)["generated"]
    time.sleep(1)
    assert engine_metrics(triton)["generated"] == generated
    lines = wait_for(lambda: [line for line in log_lines(timeout_gateway)
                              if line.get("request_id") == "timeout-stream" and line["msg"] == "generation"])
    assert lines and lines[0]["status"] == 200 and lines[0]["error"] == "timeout_error"
    assert lines[0]["completion_tokens"] is None and lines[0]["ttft_s"] < 2


def test_body_over_the_limit_is_413(timeout_gateway):
    r = requests.post(timeout_gateway.url + "/generate", headers=AUTH, timeout=30,
                      json={"prompt": "x" * 5000, "max_new_tokens": 1})
    assert r.status_code == 413
    assert r.json() == {"error": {"message": "Request body is larger than the limit of 2000 bytes",
                                  "type": "invalid_request_error", "param": None, "code": 413}}


def _raw_post(url: str, body: bytes, *, sent: int, then: bytes = b"", pause: float = 0.0) -> bytes:
    """POST /generate over a plain socket: ``sent`` bytes of ``body``, ``pause`` seconds, then
    ``then``; everything the server answers until it closes the connection (or 10 s pass)."""
    with open_generate(url, body[:sent], content_length=len(body), timeout=10) as sock:
        time.sleep(pause)
        if then:
            sock.sendall(then)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except TimeoutError:
            pass
    return answer


def test_a_body_that_stalls_is_a_408_and_its_connection_closes(timeout_gateway):
    """A client that sends its headers and part of its body, then nothing (stalled, or gone behind a
    NAT without closing): a 408 after BODY_TIMEOUT (1.5 s here), then the connection closes,
    instead of a connection and greenlet held for ever. A body that arrives in pieces within the
    limit is served."""
    body = json.dumps({"prompt": "1, 2, 3,", "max_new_tokens": 1, "temperature": 0}).encode()
    started = time.monotonic()
    answer = _raw_post(timeout_gateway.url, body, sent=10)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"code":408' in answer and b"did not arrive within 1.5 s" in answer
    assert time.monotonic() - started < 9  # closed by the server, not by this client's 10 s
    slow = _raw_post(timeout_gateway.url, body, sent=10, then=body[10:], pause=0.5)
    assert slow.startswith(b"HTTP/1.1 200"), slow[:200]


def test_no_log_line_metric_or_error_holds_a_key_or_its_hash(redis_gateway):
    """Keys travel in every request; none, nor its SHA-256 (what the keys file stores), may reach
    the gateway's log, its /metrics or an error message, whatever the request."""
    import hashlib

    keys = [*redis_gateway.keys.values(), API_KEY, "sk-wrong-" + uuid.uuid4().hex]
    bodies = []
    for key in keys:
        for body in ({"prompt": "Hi", "max_new_tokens": 1, "temperature": 0}, {"prompt": ""}, {"nope": 1}):
            r = requests.post(redis_gateway.url + "/generate", json=body, timeout=60,
                              headers={"Authorization": f"Bearer {key}"})
            bodies.append(r.text)
        bodies.append(requests.get(redis_gateway.url + "/v1/models", timeout=30,
                                   headers={"Authorization": f"Bearer {key}"}).text)
    time.sleep(0.5)
    metrics = requests.get(redis_gateway.url + "/metrics", timeout=30).text
    log = redis_gateway.log_path.read_text(errors="replace")
    for key in keys:
        for secret in (key, hashlib.sha256(key.encode()).hexdigest()):
            assert secret not in log and secret not in metrics
            assert not any(secret in body for body in bodies)


# -- Redis going away and coming back ----------------------------------------------------------


def test_redis_down_is_a_503_to_retry_and_open_streams_end_normally(triton, tmp_path_factory):
    """Redis (the rate limits and open-generation bounds of every worker) stops mid-stream: the
    open stream ends with its `done`, a bounded key's new requests get a 503 with Retry-After
    (not a 500 and a traceback each), a key without limits is served, and once Redis is back
    (same port, empty) the bounded key is served again."""
    work = tmp_path_factory.mktemp("redis-outage")
    port = free_port()
    redis_proc = start_redis(work, port)
    keys = work / "keys.json"
    bounded = add_key(keys, name="bounded", models=["*"], rate_limit="100/minute", max_concurrent=2)
    free = add_key(keys, name="free", models=["*"])
    gw = start_gateway(triton, tmp_path_factory, extra_env={
        "TRIDENT_API_KEYS_FILE": str(keys), "TRIDENT_RATELIMIT_STORAGE_URI": f"redis://127.0.0.1:{port}/0",
        "TRIDENT_RETRY_AFTER": "3", "TRIDENT_REQUEST_TIMEOUT": "60"})
    body = {"prompt": "1, 2, 3, 4, 5, 6,", "max_new_tokens": 24, "temperature": 0}

    def post(key, **extra):
        return requests.post(gw.url + "/generate", json={**body, **extra}, timeout=60,
                             headers={"Authorization": f"Bearer {key}"}, stream=extra.get("stream", False))

    try:
        assert post(bounded).status_code == 200
        stream = post(bounded, stream=True)
        assert stream.status_code == 200
        lines = stream.iter_lines()
        assert any(line.startswith(b"event: token") for line in lines)  # decoding
        stop_redis(redis_proc)
        rest = b"\n".join(lines)
        assert b"event: done" in rest and b"event: error" not in rest

        down = post(bounded)
        assert down.status_code == 503 and down.headers["Retry-After"] == "3", down.text
        assert down.json()["error"]["type"] == "service_unavailable"
        assert post(free).status_code == 200

        redis_proc = start_redis(work, port)
        assert wait_for(lambda: post(bounded).status_code == 200, timeout=30)
        logs = log_lines(gw)
        assert not [line for line in logs if line.get("msg") == "unhandled error"]
        assert any("rate-limit store is unreachable" in line.get("msg", "") for line in logs)
        assert any("could not give back an open generation" in line.get("msg", "") for line in logs)
    finally:
        gw.stop()
        stop_redis(redis_proc)
