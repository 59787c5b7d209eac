"""SSE clients on threads for the load tests: streams that run to the end or hang up at a
chosen point, and the disconnect storms that the tests run against the default and the grouped
(``stream_interval``) repositories."""
import json
import socket
import threading
import time

import requests

from e2e_helpers import AUTH, engine_metrics, wait_for

COUNTING = {"prompt": "1, 2, 3, 4, 5, 6,", "temperature": 0, "stream": True}


class Stream:
    """One SSE client on its own thread: what arrived, in order (headers, comments, events)."""

    received = 0  # token events over all streams (under lock)
    lock = threading.Lock()

    def __init__(self, url, body, *, drop_after_tokens=None, drop_when=None):
        """Hangs up after ``drop_after_tokens`` token events (0: on the headers), or at the
        first token event after ``drop_when`` (a threading.Event) is set."""
        self.url, self.body, self.drop_after, self.drop_when = url, body, drop_after_tokens, drop_when
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
                    if (self.drop_after is not None and tokens >= self.drop_after
                            or self.drop_when is not None and self.drop_when.is_set()):
                        self._drop(r)
                        return
            elif line.startswith(b"data: ") and self.log[-1] == "token":
                self.text += json.loads(line[6:])["text"]
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
    lines = triton.log_path.read_text(errors="replace").splitlines()[since:]
    return sum("cancelled by the client (before reaching the engine" in line for line in lines)


def log_mark(triton) -> int:
    return len(triton.log_path.read_text(errors="replace").splitlines())


def disconnect_storm(url, triton, *, clients, slots, max_new_tokens=400):
    """``clients`` streams hang up after 2 token events, then ``clients`` more as soon as they
    have their 200 (still queued). Checks that every one of them is cancelled in the engine,
    those still queued before reaching prefill, and that the engine is idle within 2 s of the
    last hang-up and computes no token after."""
    before, mark = engine_metrics(triton), log_mark(triton)
    body = {**COUNTING, "max_new_tokens": max_new_tokens}
    late = [Stream(url, body, drop_after_tokens=2).start() for _ in range(clients)]
    time.sleep(0.5)  # so that the early leavers queue behind them
    early = [Stream(url, body, drop_after_tokens=0).start() for _ in range(clients)]
    join_all(late + early, triton)
    assert all(s.status == 200 and s.dropped_at is not None for s in late + early)
    settled = _idle_and_settled(triton, max(s.dropped_at for s in late + early))
    in_llm = cancelled_before_the_engine(triton, mark)
    assert settled["cancelled"] - before["cancelled"] + in_llm == 2 * clients, (before, settled, in_llm)
    # The early leavers never got a slot: only the late ones (and any that the queue reached in
    # the ~0.2 s a cancellation takes to arrive) were prefilled.
    prefilled = settled["prefilled"] - before["prefilled"]
    assert prefilled <= clients + 2 * slots, prefilled


def held_slots_storm(url, triton, *, clients, slots, max_new_tokens=900):
    """``slots`` streams hold every engine slot while ``clients`` more queue behind them and hang
    up as soon as they have their 200. Those are cancelled while queued: the engine has cancelled
    every one of them within 2 s of the last, and not one of them is ever prefilled. Then the holders hang up
    at their next token event: all cancelled, the engine idle within 2 s, no token computed after.
    Nothing here depends on how fast the queue would have moved: the slots stay held until the
    queue is empty."""
    before, mark = engine_metrics(triton), log_mark(triton)
    body = {**COUNTING, "max_new_tokens": max_new_tokens}
    release = threading.Event()
    holders = [Stream(url, body, drop_when=release).start() for _ in range(slots)]
    assert wait_for(lambda: all("token" in h.log for h in holders), timeout=120), [h.log[:3] for h in holders]
    queued = [Stream(url, body, drop_after_tokens=0).start() for _ in range(clients)]
    join_all(queued, triton)
    assert all(s.status == 200 and s.dropped_at is not None for s in queued)
    # Every one of them cancelled by the engine, not just its queue empty: a request still on its
    # way to the engine when the queue was read would reach it later, with a slot free by then.
    _engine_until(triton, lambda m: m["waiting"] == 0 and m["cancelled"] - before["cancelled"]
                  + cancelled_before_the_engine(triton, mark) == clients,
                  max(s.dropped_at for s in queued), "queued requests not all cancelled")
    assert not any(h.dropped_at for h in holders), "a holder ended before the queue emptied"
    release.set()
    join_all(holders, triton)
    assert all(h.status == 200 and h.dropped_at is not None for h in holders)
    settled = _idle_and_settled(triton, max(h.dropped_at for h in holders))
    in_llm = cancelled_before_the_engine(triton, mark)
    assert settled["cancelled"] - before["cancelled"] + in_llm == slots + clients, (before, settled, in_llm)
    assert settled["prefilled"] - before["prefilled"] == slots, (before, settled)  # the holders only
