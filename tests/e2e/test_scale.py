"""Scale-out on the real stack: two Tritons behind one gateway (gRPC round_robin + retries),
failover when one dies, its return, the drain on SIGTERM, and connections spread over workers.

The two Tritons serve the small-batch repository: the session's ``small_triton`` and one of
this module's (``second_triton``), which the failover test kills and starts again.
"""
import concurrent.futures as cf
import json
import os
import signal
import socket
import threading
import time

import pytest
import requests
import testkit
from testkit import free_port

from conftest import SMALL_BATCH, start_gateway
from e2e_helpers import AUTH, engine_metrics, log_lines, sample, scrape, wait_for
from load_clients import COUNTING, Stream, join_all, log_mark, log_since, settled_metrics
from gateway.keys import add_key
from trident.child_process import kill_group
from trident.triton_launcher import TritonPorts, TritonServer

SHORT = {"prompt": "1, 2, 3, 4, 5, 6,", "max_new_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def second_triton(small_repo, tmp_path_factory):
    server = testkit.started(TritonServer(
        model_repository=small_repo, work_dir=tmp_path_factory.mktemp("triton-second"),
        ports=TritonPorts(http=free_port(), grpc=free_port(), metrics=free_port())))
    server.start(timeout=300)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def two_triton_gateway(small_triton, second_triton, tmp_path_factory, redis_url):
    """Two workers, Redis for the shared rate limits, both Tritons as one comma-separated URL."""
    class Both:  # what start_gateway needs of "a Triton"
        grpc_url = f"{small_triton.grpc_url},{second_triton.grpc_url}"

    keys = tmp_path_factory.mktemp("keys") / "keys.json"
    two = add_key(keys, name="two-streams", models=["*"], max_concurrent=2)
    gw = start_gateway(Both, tmp_path_factory, workers=2, extra_env={
        "TRIDENT_RATELIMIT_STORAGE_URI": redis_url, "TRIDENT_REQUEST_TIMEOUT": "120",
        "TRIDENT_API_KEYS_FILE": str(keys)})
    gw.two_streams_key = two
    yield gw
    gw.stop()


def not_ready(gw) -> bool:
    try:
        return requests.get(gw.url + "/readyz", timeout=5).status_code == 503
    except requests.ConnectionError:
        return True


def finished(triton) -> float:
    text = requests.get(f"http://localhost:{triton.ports.metrics}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("trident_engine_requests_finished_total"))


def test_requests_spread_over_both_tritons(two_triton_gateway, small_triton, second_triton):
    """200 requests: each Triton takes 30-70 % (by its engine's own counter), and the gateway's
    logs and metrics say which server answered."""
    before = (finished(small_triton), finished(second_triton))
    ids = [f"spread-{i}" for i in range(200)]

    def one(request_id):
        return requests.post(two_triton_gateway.url + "/generate", json=SHORT, timeout=120,
                             headers={**AUTH, "X-Request-ID": request_id})

    with cf.ThreadPoolExecutor(16) as pool:
        statuses = [r.status_code for r in pool.map(one, ids)]
    assert statuses == [200] * 200
    counts = wait_for(lambda: (lambda a, b: (a, b) if a + b >= 200 else None)(  # published every 0.1 s
        finished(small_triton) - before[0], finished(second_triton) - before[1]))
    assert counts is not None
    a, b = counts
    assert a + b == 200 and 0.3 <= a / 200 <= 0.7, (a, b)
    lines = wait_for(lambda: [x for x in log_lines(two_triton_gateway) if x.get("request_id") in ids]
                     if len([x for x in log_lines(two_triton_gateway) if x.get("request_id") in ids]) == 200 else None)
    servers = {line["server"] for line in lines}
    host = socket.gethostname()
    assert servers == {f"{host}:{small_triton.ports.grpc}", f"{host}:{second_triton.ports.grpc}"}
    samples = scrape(two_triton_gateway.url)
    for server in servers:
        assert sample(samples, "trident_gateway_server_generations_total", server=server) >= 0.3 * 200


def test_a_client_that_leaves_is_cancelled_at_the_triton_that_serves_it(
        two_triton_gateway, small_triton, second_triton):
    """round_robin picks a server for every call, so a cancel request on a call of its own can
    reach the other Triton, whose llm has no such request. Ten clients, one after the other, hang
    up at their first token: each time both engines are idle within 2 s, and each request was
    ended by its cancel request at its own Triton (llm's log), never by a cancelled gRPC call."""
    tritons = (small_triton, second_triton)
    marks = [log_mark(t) for t in tritons]
    # The engines publish their counters every 0.1 s: a read counts only once it shows this
    # client's prefill, so an idle reading from before its request cannot pass for the end of it.
    prefilled = sum(settled_metrics(t)["prefilled"] for t in tritons)
    for i in range(10):
        s = Stream(two_triton_gateway.url, {**COUNTING, "max_new_tokens": 900}, drop_after_tokens=1).start()
        s.thread.join(timeout=60)
        assert s.status == 200 and s.dropped_at is not None, (i, s.status, s.log[-4:])
        while True:
            now = [engine_metrics(t) for t in tritons]
            if (sum(m["prefilled"] for m in now) == prefilled + 1
                    and all(m["active"] == 0 and m["waiting"] == 0 for m in now)):
                prefilled += 1
                break
            assert time.monotonic() - s.dropped_at < 2.0, f"client {i}: engines still busy 2 s after it left: {now}"
            time.sleep(0.05)

    def cancellations():
        return [line for t, mark in zip(tritons, marks) for line in log_since(t, mark)
                if "cancelled by the client" in line]

    ended = wait_for(lambda: (c := cancellations()) and len(c) >= 10 and c, timeout=5)
    assert ended and len(ended) == 10, cancellations()
    assert all("cancel request" in line for line in ended), ended


def test_a_killed_triton_fails_its_streams_and_nothing_else_then_comes_back(
        two_triton_gateway, small_triton, second_triton):
    """Kill one Triton during streams: its streams get an error event, every request after the
    kill succeeds on the other, and once restarted it takes traffic again within 30 s."""
    body = {"prompt": "1, 2, 3, 4, 5, 6,", "max_new_tokens": 300, "temperature": 0, "stream": True}
    outcomes: dict[int, list[str]] = {}

    def stream(i):
        events = []
        with requests.post(two_triton_gateway.url + "/generate", json=body, headers=AUTH, stream=True,
                           timeout=120) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith(b"event: "):
                    events.append(line[7:].decode())
        outcomes[i] = events

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(2 * SMALL_BATCH)]
    for t in threads:
        t.start()
    assert wait_for(lambda: engine_metrics(second_triton)["active"] > 0 and engine_metrics(small_triton)["active"] > 0,
                    timeout=60), "the streams did not reach both Tritons"
    kill_group(second_triton.process.pid)  # SIGKILL: Triton and its stubs, mid-stream
    killed = time.monotonic()
    second_triton.stop()
    after = []
    with cf.ThreadPoolExecutor(8) as pool:
        after = list(pool.map(lambda _: requests.post(two_triton_gateway.url + "/generate", json=SHORT,
                                                      headers=AUTH, timeout=120), range(20)))
    assert [r.status_code for r in after] == [200] * 20, [r.text for r in after if r.status_code != 200][:3]
    for t in threads:
        t.join(timeout=180)
    errors = [e for e in outcomes.values() if e[-1] == "error"]
    assert errors, "the killed Triton's streams should have ended with an error event"
    assert all(e[-1] in ("error", "done") for e in outcomes.values())
    assert time.monotonic() - killed < 120
    second_triton.start(timeout=300)
    back = time.monotonic()
    before = finished(second_triton)

    def took_traffic():
        requests.post(two_triton_gateway.url + "/generate", json=SHORT, headers=AUTH, timeout=60)
        return finished(second_triton) > before

    assert wait_for(took_traffic, timeout=30, interval=0.2), "the restarted Triton got no request in 30 s"
    assert time.monotonic() - back < 30


def test_a_frozen_triton_is_left_out_within_two_keepalives_then_comes_back(
        small_triton, second_triton, tmp_path_factory):
    """One Triton stops answering while its host's TCP stays up (SIGSTOP: a frozen process; a
    node lost without a reset looks the same to the gateway). Without keepalive its connection
    stayed READY: round_robin gave it every other request, and each hung until the request
    timeout (by hand: 3 of 6 requests a 504 after 90 s, every time). With HTTP/2 pings every
    KEEPALIVE s, answered within KEEPALIVE s, its open stream ends with an error event, a
    request sent to it is retried on the other Triton, and requests after that never wait for
    it; once it runs again it takes traffic again, and the generation it held is cancelled."""
    keepalive = 2.0

    class Both:
        grpc_url = f"{small_triton.grpc_url},{second_triton.grpc_url}"

    gw = start_gateway(Both, tmp_path_factory, workers=1, extra_env={"TRIDENT_GRPC_KEEPALIVE": str(keepalive),
                                                                    "TRIDENT_HEARTBEAT_INTERVAL": "0.5"})
    frozen = second_triton.process.pid
    try:
        # Streams until the second Triton holds at least one (round_robin alternates).
        streams = []
        while len(streams) < 8 and engine_metrics(second_triton)["active"] == 0:
            streams.append(Stream(gw.url, {**COUNTING, "max_new_tokens": 900}).start())
            wait_for(lambda: engine_metrics(second_triton)["active"] + engine_metrics(small_triton)["active"]
                     >= len(streams), timeout=30, interval=0.05)
        assert engine_metrics(second_triton)["active"] > 0, "no stream reached the second Triton"
        held = engine_metrics(second_triton)["active"]
        os.kill(frozen, signal.SIGSTOP)
        stopped = time.monotonic()

        def timed(_):
            started = time.monotonic()
            r = requests.post(gw.url + "/generate", json=SHORT, headers=AUTH, timeout=120)
            return r.status_code, time.monotonic() - started

        with cf.ThreadPoolExecutor(6) as pool:
            first = list(pool.map(timed, range(6)))  # some of them sent to the frozen one
        assert [code for code, _ in first] == [200] * 6, first
        assert max(took for _, took in first) < 4 * keepalive + 5, first
        # Its streams ended with an error event (503) within two keepalives (and a margin);
        # the others run on.
        assert wait_for(lambda: sum(s.log[-1:] == ["error"] for s in streams) >= held, timeout=4 * keepalive + 5)
        assert time.monotonic() - stopped < 4 * keepalive + 10
        later = [timed(i) for i in range(6)]
        assert all(code == 200 and took < keepalive for code, took in later), later
    finally:
        os.kill(frozen, signal.SIGCONT)
    try:
        before = finished(second_triton)
        assert wait_for(lambda: requests.post(gw.url + "/generate", json=SHORT, headers=AUTH, timeout=60).ok
                        and finished(second_triton) > before, timeout=30, interval=0.2), \
            "the Triton that ran again got no request in 30 s"
        # The connection it held was closed while it was frozen: llm finds the call cancelled.
        assert wait_for(lambda: engine_metrics(second_triton)["active"] == 0, timeout=30)
        join_all(streams, small_triton)
        assert all(s.log[-1] in ("done", "error") for s in streams), [s.log[-3:] for s in streams]
    finally:
        gw.stop()


def test_sigterm_drains_open_streams(small_triton, second_triton, tmp_path_factory):
    """SIGTERM during 20 open streams: all 20 finish complete, requests during the drain get a 503
    or a refused connection, and the gateway exits within the drain time plus 5 s."""
    class Both:
        grpc_url = f"{small_triton.grpc_url},{second_triton.grpc_url}"

    gw = start_gateway(Both, tmp_path_factory, workers=1, drain_timeout=60)
    # Warm first (the worker's first requests open its gRPC channels), and streams long enough
    # that opening 20 cannot outlast them: at 64 tokens all 20 ended within 2.5 s of opening here,
    # and a slower CI run opened them after they had ended.
    assert requests.post(gw.url + "/generate", json=SHORT, headers=AUTH, timeout=60).status_code == 200
    body = {"prompt": "1, 2, 3, 4, 5, 6,", "max_new_tokens": 256, "temperature": 0, "stream": True}
    results, opened = [], threading.Semaphore(0)

    def stream():
        with requests.post(gw.url + "/generate", json=body, headers=AUTH, stream=True, timeout=120) as r:
            assert r.status_code == 200
            opened.release()  # admitted: its 200 and first comment arrived
            results.append([json.loads(line[6:]) for line in r.iter_lines() if line.startswith(b"data: ")])

    threads = [threading.Thread(target=stream) for _ in range(20)]
    for t in threads:
        t.start()
    for _ in threads:
        assert opened.acquire(timeout=60), "the 20 streams did not all open"
    gw.process.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    # The master relays SIGTERM to its worker a few milliseconds later; a request that lands in
    # between is served (it was accepted before the worker knew). The drain starts when the worker
    # says so: /readyz turns 503 (or the port closes), and from then on nothing new is accepted.
    assert wait_for(lambda: not_ready(gw), timeout=2, interval=0.005), "/readyz still 200 2 s after SIGTERM"
    assert len(results) < 20, "every stream had ended before the drain began: nothing was drained"
    during = []
    while gw.process.poll() is None and time.monotonic() - sent < 65:
        try:
            during.append(requests.post(gw.url + "/generate", json=SHORT, headers=AUTH, timeout=10).status_code)
        except requests.ConnectionError:
            during.append("refused")
        time.sleep(0.2)
    gw.process.wait(timeout=70)
    assert time.monotonic() - sent < 60 + 5
    for t in threads:
        t.join(timeout=30)
    assert len(results) == 20
    assert all(r and "finish_reason" in r[-1] for r in results), [r[-1:] for r in results]
    assert during and set(during) <= {503, "refused"}, during
    gw.stop()


def test_streams_past_the_drain_time_end_with_an_error_event(small_triton, tmp_path_factory):
    gw = start_gateway(small_triton, tmp_path_factory, workers=1, drain_timeout=2)
    body = {"prompt": "1, 2, 3, 4, 5, 6,", "max_new_tokens": 800, "temperature": 0, "stream": True}
    results = []

    def stream():
        with requests.post(gw.url + "/generate", json=body, headers=AUTH, stream=True, timeout=120) as r:
            results.append([line[7:].decode() for line in r.iter_lines() if line.startswith(b"event: ")])

    threads = [threading.Thread(target=stream) for _ in range(3)]
    for t in threads:
        t.start()
    assert wait_for(lambda: engine_metrics(small_triton)["active"] >= 3, timeout=30)
    gw.process.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    gw.process.wait(timeout=30)
    assert time.monotonic() - sent < 2 + 5
    for t in threads:
        t.join(timeout=30)
    assert len(results) == 3 and all(r[-1] == "error" and "done" not in r for r in results), results
    assert wait_for(lambda: engine_metrics(small_triton)["active"] == 0, timeout=10), "streams kept running"
    gw.stop()


def test_a_key_bounded_to_two_streams_gets_429_for_a_third_across_workers(two_triton_gateway):
    """max_concurrent 2, counted in Redis: the third stream is refused (429, Retry-After) while two
    stream, whichever of the 2 workers takes each connection; it passes once one has ended."""
    auth = {"Authorization": f"Bearer {two_triton_gateway.two_streams_key}", "Connection": "close"}
    body = {"prompt": "1, 2, 3, 4, 5, 6,", "max_new_tokens": 200, "temperature": 0, "stream": True}
    first = [requests.post(two_triton_gateway.url + "/generate", json=body, headers=auth, stream=True, timeout=120)
             for _ in range(2)]
    assert [r.status_code for r in first] == [200, 200]
    refused = [requests.post(two_triton_gateway.url + "/generate", json=body, headers=auth, timeout=30)
               for _ in range(4)]  # over both workers (SO_REUSEPORT spreads the connections)
    assert {r.status_code for r in refused} == {429}
    assert all(int(r.headers["Retry-After"]) > 0 and r.json()["error"]["type"] == "rate_limit_error"
               for r in refused)
    for line in first[0].iter_lines():  # the first two still stream
        if line.startswith(b"event: token"):
            break
    first[0].close()
    again = wait_for(lambda: (r := requests.post(two_triton_gateway.url + "/generate", headers=auth, timeout=60,
                                                  json={**SHORT})).status_code == 200 and r, timeout=10)
    assert again, "a stream ended but the key's bound was not given back"
    first[1].close()
