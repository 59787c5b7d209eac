"""trident.supervisor with a fake server: a server that exits is restarted, and so is one that runs
but fails its probe several times in a row; one failed probe among good ones restarts nothing."""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator

from testkit import wait_until

from trident.supervisor import Supervised


class FakeServer:
    name = "fake"

    def __init__(self) -> None:
        self.starts = 0
        self.stops = 0
        self.running = False
        self.lock = threading.Lock()

    def start(self, *, timeout: float = 0, echo: bool = False) -> "FakeServer":
        with self.lock:
            self.starts += 1
            self.running = True
        return self

    def stop(self, *, timeout: float | None = None) -> None:
        with self.lock:
            self.stops += 1
            self.running = False

    def exited(self) -> bool:
        return not self.running


class Probe:
    """Fails its first ``failures`` calls, then answers; counts its calls."""

    def __init__(self, failures: int = 0) -> None:
        self.calls = 0
        self.failures = failures

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise RuntimeError("no answer to a stream ping to llm in 1 s")
        return "server"


@contextlib.contextmanager
def supervising(server, probe, **kwargs) -> Iterator[Supervised]:
    """A started Supervised, and a thread that calls its check() as scripts/serve.py does."""
    supervised = Supervised(server, label="Triton", min_backoff=0.01, probe=probe, **kwargs)
    supervised.start()
    done = threading.Event()

    def loop() -> None:
        while not done.wait(0.01):
            supervised.check()

    checker = threading.Thread(target=loop, daemon=True)
    checker.start()
    try:
        yield supervised
    finally:
        done.set()
        checker.join(5)
        supervised.stop()


def test_a_server_that_fails_its_probe_in_a_row_is_restarted(caplog):
    caplog.set_level(logging.INFO, logger="trident.supervisor")
    server, probe = FakeServer(), Probe(failures=3)
    with supervising(server, probe, probe_interval=0.02, probe_failures=3) as supervised:
        assert wait_until(lambda: probe.calls >= 8, timeout=10)
        assert server.starts == 2 and server.stops == 1 and supervised.restarts == 1
    messages = [r.getMessage() for r in caplog.records]
    assert any("failed 3 probes in a row (no answer to a stream ping" in m for m in messages), messages
    assert any("Triton is back (restart 1)" in m for m in messages), messages


def test_failures_that_are_not_in_a_row_restart_nothing():
    server = FakeServer()
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) % 3 == 0:  # two good answers, one failure, ...
            raise RuntimeError("slow")
        return "server"

    with supervising(server, flaky, probe_interval=0.01, probe_failures=2) as supervised:
        assert wait_until(lambda: len(calls) >= 30, timeout=10)
        assert server.starts == 1 and supervised.restarts == 0


def test_no_probe_while_the_server_is_down_and_an_exit_still_restarts():
    server, probe = FakeServer(), Probe()
    with supervising(server, probe, probe_interval=0.01, probe_failures=1, stable_after=0) as supervised:
        assert wait_until(lambda: probe.calls >= 3, timeout=10)
        server.running = False  # it exits by itself
        assert wait_until(lambda: server.starts == 2, timeout=10)
        assert supervised.restarts == 1


def test_a_probe_that_fails_because_the_server_died_meanwhile_restarts_nothing_more():
    """The third failure in a row comes from a server that exited during that probe and was
    restarted (for its exit) before the probe gave up: one restart, not a second one for a
    failure of the server that is gone."""
    server = FakeServer()
    calls = []

    def dying() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("slow")
        if len(calls) == 3:
            server.running = False  # it dies during this probe ...
            assert wait_until(lambda: server.starts == 2, timeout=10)  # ... and is restarted for that
            raise RuntimeError("no answer to a stream ping to llm in 1 s")
        return "server"

    with supervising(server, dying, probe_interval=0.01, probe_failures=3, stable_after=0) as supervised:
        assert wait_until(lambda: len(calls) >= 10, timeout=10)
        assert server.starts == 2 and supervised.restarts == 1


def test_stop_ends_the_probe_thread():
    server, probe = FakeServer(), Probe()
    supervised = Supervised(server, label="Triton", probe=probe, probe_interval=0.01)
    supervised.start()
    assert wait_until(lambda: probe.calls >= 2, timeout=10)
    supervised.stop()
    calls = probe.calls
    time.sleep(0.1)
    assert probe.calls == calls and not supervised._probing.is_alive()
