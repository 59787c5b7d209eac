"""Streaming at more streams than the engine has slots, and clients that vanish at every stage.

The small-batch Triton has SMALL_BATCH engine slots; these tests run 12x and 50x that many
streams through the real gateway. Timing is judged by the engine's own counters (tokens
generated against tokens the clients received, decode steps), not by wall-clock bounds, except
where the contract names one (the engine idle within 2 s of the last client gone).
"""
import socket
import threading
import time

import pytest
import requests

from conftest import SMALL_BATCH, start_gateway
from e2e_helpers import API_KEY, AUTH, engine_metrics

COUNTING = {"prompt": "1, 2, 3, 4, 5, 6,", "temperature": 0, "stream": True}


@pytest.fixture(scope="module")
def load_gateway(small_triton, tmp_path_factory):
    gw = start_gateway(small_triton, tmp_path_factory, extra_env={"TRIDENT_HEARTBEAT_INTERVAL": "0.5"})
    yield gw
    gw.stop()


class Stream:
    """One SSE client on its own thread: what arrived, in order (headers, comments, events)."""

    received = 0  # token events over all streams (under lock)
    lock = threading.Lock()

    def __init__(self, url, body, *, drop_after_tokens=None):
        self.url, self.body, self.drop_after = url, body, drop_after_tokens
        self.log = []  # kinds in arrival order: "headers", "comment", "token", "done", "error"
        self.status = None
        self.text = ""
        self.dropped_at = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self.thread.start()
        return self

    def _run(self):
        r = requests.post(self.url + "/generate", json=self.body, headers=AUTH, stream=True, timeout=300)
        self.status = r.status_code
        self.log.append("headers")
        if self.drop_after == 0:
            self._drop(r)
            return
        tokens = 0
        for line in r.iter_lines():
            if line.startswith(b":"):
                self.log.append("comment")
            elif line.startswith(b"event: "):
                kind = line[7:].decode()
                self.log.append(kind)
                if kind == "token":
                    tokens += 1
                    with Stream.lock:
                        Stream.received += 1
                    if self.drop_after is not None and tokens >= self.drop_after:
                        self._drop(r)
                        return
            elif line.startswith(b"data: ") and self.log[-1] == "token":
                self.text += __import__("json").loads(line[6:])["text"]
        r.close()

    def _drop(self, response):
        # Close the TCP connection itself (requests may otherwise keep it in its pool).
        raw = response.raw
        try:
            sock = raw._fp.fp.raw._sock  # the http.client socket under urllib3
            sock.shutdown(socket.SHUT_RDWR)
        except (AttributeError, OSError):
            pass
        response.close()
        self.dropped_at = time.monotonic()


def join_all(streams, triton, *, seconds=180):
    """Wait for every client thread, failing with what the stuck ones saw (and the engine's
    counters) instead of hanging when one never finishes."""
    deadline = time.monotonic() + seconds
    for s in streams:
        s.thread.join(timeout=max(0.0, deadline - time.monotonic()))
    stuck = [s for s in streams if s.thread.is_alive()]
    assert not stuck, (f"{len(stuck)} of {len(streams)} clients still waiting after {seconds} s; "
                       f"their status and last events: {[(s.status, s.log[-4:]) for s in stuck[:10]]}; "
                       f"engine: {engine_metrics(triton)}")


def test_streams_beyond_the_slots_get_tokens_as_the_engine_makes_them(load_gateway, small_triton):
    """48 streams on 4 slots (44 waiting in the engine's queue). Before the fix the llm model's
    responses waited for a thread of the Python backend's pool, all of which were held by BLS
    calls waiting for their first token: clients got nothing until the first batch ended. Here,
    at every moment, the clients have received nearly every token the engine has generated."""
    n, tokens = 12 * SMALL_BATCH, 96
    Stream.received = 0
    before = engine_metrics(small_triton)
    samples, stop = [], threading.Event()

    def monitor():
        while not stop.is_set():
            with Stream.lock:
                received = Stream.received
            generated = engine_metrics(small_triton)["generated"] - before["generated"]
            samples.append((generated, received))
            time.sleep(0.1)

    watcher = threading.Thread(target=monitor, daemon=True)
    watcher.start()
    streams = [Stream(load_gateway.url, {**COUNTING, "max_new_tokens": tokens}).start() for _ in range(n)]
    join_all(streams, small_triton)
    stop.set()
    watcher.join()

    assert all(s.status == 200 and s.log[-1] == "done" for s in streams), [s.log[-3:] for s in streams]
    assert len({s.text for s in streams}) == 1  # greedy: every stream the same text
    # With the bug, a whole batch's tokens (4 x 96) were held until that batch ended. Without it,
    # clients trail the engine only by what it makes while its counter is published (every 0.1 s)
    # and a scheduling hiccup of a loaded 2-core machine (0.3 s: ~90 tokens here): half a batch
    # separates the two with a wide margin on both sides.
    lag = max(generated - received for generated, received in samples)
    assert lag <= SMALL_BATCH * tokens // 2, f"clients lagged the engine by {lag} tokens: {samples}"
    # Streams that waited for a slot got their 200 and heartbeats (0.5 s) before any token.
    waited = [s for s in streams if s.log.index("token") > s.log.index("headers") + 1]
    assert len(waited) >= n // 2, [s.log[:4] for s in streams]
    assert all(s.log[1] == "comment" for s in waited)


def test_a_disconnect_storm_leaves_the_engine_idle(load_gateway, small_triton):
    """100 clients hang up after 2 tokens, 100 as soon as they have their 200 (still queued).
    Every one of them is cancelled in the engine, those still queued before reaching prefill,
    and the engine is idle within 2 s of the last hang-up."""
    before = engine_metrics(small_triton)
    body = {**COUNTING, "max_new_tokens": 400}
    late = [Stream(load_gateway.url, body, drop_after_tokens=2).start() for _ in range(100)]
    time.sleep(0.5)  # so that the early leavers queue behind them
    early = [Stream(load_gateway.url, body, drop_after_tokens=0).start() for _ in range(100)]
    join_all(late + early, small_triton)
    assert all(s.status == 200 and s.dropped_at is not None for s in late + early)
    last_drop = max(s.dropped_at for s in late + early)
    while True:
        now = engine_metrics(small_triton)
        if now["active"] == 0 and now["waiting"] == 0:
            break
        assert time.monotonic() - last_drop < 2.0, f"engine still busy 2 s after the last client left: {now}"
        time.sleep(0.05)
    time.sleep(1.0)
    settled = engine_metrics(small_triton)
    assert settled["generated"] == now["generated"], "tokens still computed after every client left"
    assert settled["cancelled"] - before["cancelled"] == 200
    # The early leavers never got a slot: only the late ones (and any that the queue reached in
    # the ~0.2 s a cancellation takes to arrive) were prefilled.
    prefilled = settled["prefilled"] - before["prefilled"]
    assert prefilled <= 100 + 2 * SMALL_BATCH, prefilled


@pytest.fixture(scope="module")
def quiet_gateway(small_triton, tmp_path_factory):
    """Heartbeats every 10 minutes: a client that leaves can only be noticed on its socket."""
    gw = start_gateway(small_triton, tmp_path_factory, extra_env={"TRIDENT_HEARTBEAT_INTERVAL": "600"})
    yield gw
    gw.stop()


def raw_request(url, body):
    """Send one request on a plain socket and return it (the response is never read)."""
    import json
    from urllib.parse import urlparse

    u = urlparse(url)
    data = json.dumps(body).encode()
    sock = socket.create_connection((u.hostname, u.port), timeout=30)
    sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


@pytest.mark.parametrize("streamed", [False, True])
def test_a_client_that_leaves_is_noticed_without_a_write(quiet_gateway, small_triton, streamed):
    """The gateway watches the client's socket: a client that hangs up while its generation is
    queued in the engine, or running, cancels it within the llm model's polling interval, not
    at the next heartbeat (10 minutes here) or at the end of the generation. One that leaves
    while queued never reaches prefill."""
    def engine_until(predicate, what):
        deadline = time.monotonic() + 60
        while not predicate(now := engine_metrics(small_triton)):
            assert time.monotonic() < deadline, f"{what}: {now}"
            time.sleep(0.05)
        return now

    before = engine_metrics(small_triton)
    body = {**COUNTING, "stream": streamed, "max_new_tokens": 800}
    running = [raw_request(quiet_gateway.url, body) for _ in range(SMALL_BATCH)]
    engine_until(lambda m: m["active"] == SMALL_BATCH and m["generated"] > before["generated"], "not running")
    queued = [raw_request(quiet_gateway.url, body) for _ in range(SMALL_BATCH)]
    engine_until(lambda m: m["waiting"] == SMALL_BATCH, "not queued")
    for sock in queued:
        sock.close()
    left = time.monotonic()
    now = engine_until(lambda m: m["waiting"] == 0, "the queued requests were not cancelled")
    assert time.monotonic() - left < 2.0, "queued requests cancelled late"
    assert now["prefilled"] - before["prefilled"] == SMALL_BATCH  # the queued ones never started
    assert now["active"] == SMALL_BATCH
    for sock in running:
        sock.close()
    left = time.monotonic()
    now = engine_until(lambda m: m["active"] == 0, "the running requests were not cancelled")
    assert time.monotonic() - left < 2.0, "running requests cancelled late"
    assert now["cancelled"] - before["cancelled"] == 2 * SMALL_BATCH
    assert now["prefilled"] - before["prefilled"] == SMALL_BATCH
