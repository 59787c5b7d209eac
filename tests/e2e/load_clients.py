"""SSE clients on threads for the load tests: streams that run to the end or hang up at a
chosen point, and the disconnect storms that the tests run against the default and the grouped
(``stream_interval``) repositories."""
import json
import socket
import threading
import time

import requests
import urllib3

from e2e_helpers import AUTH, engine_metrics, wait_for

COUNTING = {"prompt": "1, 2, 3, 4, 5, 6,", "temperature": 0, "stream": True}


class Stream:
    """One SSE client on its own thread: what arrived, in order (headers, comments, events)."""

    received = 0  # token events over all streams (under lock)
    lock = threading.Lock()

    def __init__(self, url, body, *, drop_after_tokens=None, drop_when=None, headers=None):
        """Hangs up on the headers when ``drop_after_tokens`` is 0, else at the first token event
        at which it has at least ``drop_after_tokens`` token events (when given) and ``drop_when``
        (a threading.Event, when given) is set. ``headers`` add to (or replace) the test key's."""
        self.url, self.body, self.drop_after, self.drop_when = url, body, drop_after_tokens, drop_when
        self.headers = {**AUTH, **(headers or {})}
        # kinds in arrival order: "headers", "comment", "token", "done", "error", and "broken"
        # when the connection broke under it (the server's end went away)
        self.log = []
        self.status = None
        self.port = None  # the client's end of its connection (set with its headers)
        self.text = ""
        self.dropped_at = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self.thread.start()
        return self

    def _run(self):
        r = requests.post(self.url + "/generate", json=self.body, headers=self.headers, stream=True, timeout=300)
        self.status = r.status_code
        try:
            self.port = _socket(r).getsockname()[1]
        except (AttributeError, OSError):
            pass  # no socket left: the response was read with its headers
        self.log.append("headers")
        if self.drop_after == 0:
            self._drop(r)
            return
        try:
            self._read(r)
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError):
            self.log.append("broken")

    def _read(self, r):
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
                    if ((self.drop_after is None or tokens >= self.drop_after)
                            and (self.drop_when is None or self.drop_when.is_set())
                            and (self.drop_after is not None or self.drop_when is not None)):
                        self._drop(r)
                        return
            elif line.startswith(b"data: ") and self.log[-1] == "token":
                self.text += json.loads(line[6:])["text"]
        r.close()

    def _drop(self, response):
        # Close the TCP connection itself (requests may otherwise keep it in its pool).
        try:
            _socket(response).shutdown(socket.SHUT_RDWR)
        except (AttributeError, OSError):
            pass
        response.close()
        self.dropped_at = time.monotonic()


def _socket(response):
    return response.raw._fp.fp.raw._sock  # the http.client socket under urllib3


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


def _engine_until(triton, done, since, what):
    """The engine's counters once ``done(counters)``; fails if that takes 2 s past ``since``."""
    while True:
        now = engine_metrics(triton)
        if done(now):
            return now
        assert time.monotonic() - since < 2.0, f"{what} 2 s after the last client left: {now}"
        time.sleep(0.05)


def _idle_and_settled(triton, last_drop):
    """The engine's counters a second after it went idle (no active or waiting request), which
    must be within 2 s of ``last_drop``; fails if it computed a token in that second."""
    now = _engine_until(triton, lambda m: m["active"] == 0 and m["waiting"] == 0, last_drop, "engine still busy")
    time.sleep(1.0)
    settled = engine_metrics(triton)
    assert settled["generated"] == now["generated"], "tokens still computed after every client left"
    return settled


def cancelled_before_the_engine(triton, since: int) -> int:
    """Requests that llm cancelled before they reached the engine (its log), among the log's
    lines from ``since`` on: a cancellation that reaches llm while the request still waits for
    a worker ends it there, and the engine never sees it."""
    return sum("cancelled by the client (before reaching the engine" in line for line in log_since(triton, since))


def log_mark(triton) -> int:
    return len(triton.log_path.read_text(errors="replace").splitlines())


def log_since(triton, mark: int) -> list[str]:
    """The lines of Triton's log from ``mark`` (a :func:`log_mark`) on."""
    return triton.log_path.read_text(errors="replace").splitlines()[mark:]


def disconnect_storm(url, triton, *, clients, slots, max_new_tokens=900):
    """``clients`` streams that hang up after 2 token events, and ``clients`` more, queued behind
    them, that hang up as soon as they have their 200: see :func:`_storm`."""
    _storm(url, triton, leaving=clients, staying=clients, slots=slots, max_new_tokens=max_new_tokens)


def held_slots_storm(url, triton, *, clients, slots, max_new_tokens=900):
    """``slots`` streams hold every engine slot while ``clients`` more queue behind them and hang
    up as soon as they have their 200: see :func:`_storm`."""
    _storm(url, triton, leaving=clients, staying=slots, slots=slots, max_new_tokens=max_new_tokens)


def _storm(url, triton, *, leaving, staying, slots, max_new_tokens):
    """Clients that vanish at two stages, queued and decoding, with nothing left to timing.

    ``staying`` streams start first: ``slots`` of them run, the rest wait in the engine's queue.
    Then ``leaving`` streams queue behind them and hang up as soon as they have their 200. The
    running streams hold every slot until the engine has cancelled every leaver (its cancelled
    counter up by all of them, not just its queue empty: a request still on its way to the engine
    would reach it later, with a slot free by then), so no leaver can be prefilled unless its
    cancellation is lost. Then the staying streams hang up, each at its first token event with
    at least 2 of them (those that waited run through the slots as they free): every one is
    cancelled, the engine is idle within 2 s of the last, computes no token after, and prefilled
    exactly the staying streams.

    The order is the engine's: it admits requests in arrival order, and each group is started
    only once the one before is in the engine's queue. Racing the leavers against the queue
    instead (as this storm once did) failed whenever the engine drained the queue faster than a
    200 reached a client and its hang-up came back, a question of CPU speed, not of correctness."""
    assert staying >= slots  # they hold every slot
    before, mark = settled_metrics(triton), log_mark(triton)
    body = {**COUNTING, "max_new_tokens": max_new_tokens}
    release = threading.Event()
    staying_streams = [Stream(url, body, drop_after_tokens=2, drop_when=release).start() for _ in range(staying)]
    _engine_until_queued(triton, before, staying, slots)
    leavers = [Stream(url, body, drop_after_tokens=0).start() for _ in range(leaving)]
    join_all(leavers, triton)
    assert all(s.status == 200 and s.dropped_at is not None for s in leavers)
    _engine_until(triton, lambda m: m["waiting"] == staying - slots and m["cancelled"] - before["cancelled"]
                  + cancelled_before_the_engine(triton, mark) == leaving,
                  max(s.dropped_at for s in leavers), "queued requests not all cancelled")
    assert not any(s.dropped_at or "done" in s.log for s in staying_streams), "a stream ended before the release"
    now = engine_metrics(triton)
    assert now["prefilled"] - before["prefilled"] == slots, (before, now)  # no leaver reached prefill
    release.set()
    join_all(staying_streams, triton)
    assert all(s.status == 200 and s.dropped_at is not None for s in staying_streams)
    assert all(s.log.count("token") >= 2 for s in staying_streams)
    settled = _idle_and_settled(triton, max(s.dropped_at for s in staying_streams))
    in_llm = cancelled_before_the_engine(triton, mark)
    assert settled["cancelled"] - before["cancelled"] + in_llm == staying + leaving, (before, settled, in_llm)
    assert settled["prefilled"] - before["prefilled"] == staying, (before, settled)  # no leaver, ever


def settled_metrics(triton, *, seconds=60):
    """The engine's counters once it is idle and they have stopped moving: the engine stub
    publishes them every 0.1 s from a thread that can wait for the GIL behind the engine's own,
    so a read right after the last test's requests may still lack the last of their prefills."""
    deadline = time.monotonic() + seconds
    last = engine_metrics(triton)
    while True:
        time.sleep(0.3)
        now = engine_metrics(triton)
        if now == last and now["active"] == 0 and now["waiting"] == 0:
            return now
        assert time.monotonic() < deadline, f"the engine did not settle in {seconds} s: {now}"
        last = now


def _engine_until_queued(triton, before, streams, slots, *, seconds=120):
    """Waits until ``streams`` new requests are in the engine: ``slots`` of them running (and
    decoding), the rest waiting; fails after ``seconds``."""
    ok = wait_for(lambda: (lambda m: m["active"] == slots and m["waiting"] == streams - slots
                           and m["generated"] - before["generated"] >= slots)(engine_metrics(triton)),
                  timeout=seconds)
    assert ok, f"{streams} streams not in the engine after {seconds} s: {engine_metrics(triton)}"
