"""Keep child servers running: a server that exits unexpectedly is restarted, with backoff.

``scripts/serve.py`` (``make serve``) supervises its Tritons and its gateway with this: a crashed
Triton is started again by itself (1 s, then 2, 4 ... up to 30 s between failed attempts; the
wait resets once a start succeeded and the server ran a minute), with a log line each time,
while the gateway keeps serving from the other Tritons, or answers 503 while none is up, and
reconnects on its own (gRPC re-resolves and reconnects). Restarts happen on a thread of their
own, since starting Triton waits for its models to load.

A server can also be alive and useless: Triton's HTTP health endpoints stay "live" and "ready"
while its gRPC stream handler is deadlocked or its ``llm`` stub hangs, and every request then
hangs or fails. With a ``probe`` (for Triton: trident.stream_probe.probe, stream calls the
``llm`` model answers ahead of its queue), a thread calls it every ``probe_interval`` seconds;
after ``probe_failures`` failures in a row the server is restarted as if it had exited, with a
log line that gives the last failure.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional, Protocol

log = logging.getLogger("trident.supervisor")


class Server(Protocol):
    name: str

    def start(self, *, timeout: float = ..., echo: bool = ...) -> object: ...

    def stop(self, *, timeout: float | None = ...) -> None: ...

    def exited(self) -> bool: ...


class Supervised:
    """One server under supervision (``label`` names it in the log: "Triton 2")."""

    def __init__(self, server: Server, *, label: str, start_timeout: float = 600.0,
                 min_backoff: float = 1.0, max_backoff: float = 30.0, stable_after: float = 60.0,
                 probe: Optional[Callable[[], object]] = None, probe_interval: float = 15.0,
                 probe_failures: int = 3) -> None:
        self.server = server
        self.label = label
        self.start_timeout = start_timeout
        self.min_backoff, self.max_backoff, self.stable_after = min_backoff, max_backoff, stable_after
        self.probe, self.probe_interval, self.probe_failures = probe, probe_interval, max(1, probe_failures)
        self.restarts = 0
        self._backoff = min_backoff
        self._started_at = 0.0
        self._restarting: threading.Thread | None = None
        self._stopping = threading.Event()
        self._probing: threading.Thread | None = None
        # Why the server is to be restarted although it runs (set by the probe thread).
        self._unhealthy: Optional[str] = None

    def start(self) -> None:
        """The first start, in the caller's thread (errors are raised); then the probe thread."""
        self.server.start(timeout=self.start_timeout)
        self._started_at = time.monotonic()
        if self.probe is not None and self.probe_interval > 0 and self._probing is None:
            self._probing = threading.Thread(target=self._probe_loop, daemon=True, name=f"probe-{self.label}")
            self._probing.start()

    def _restart_pending(self) -> bool:
        return self._restarting is not None and self._restarting.is_alive()

    def _probe_loop(self) -> None:
        failures = 0
        while not self._stopping.wait(self.probe_interval):
            if self._unhealthy is not None or self._restart_pending() or self.server.exited():
                failures = 0  # check() restarts it: probe the new one
                continue
            restarts = self.restarts
            try:
                self.probe()
            except Exception as exc:  # any failure counts: the probe's message says what it was
                if self.restarts != restarts or self._restart_pending() or self.server.exited():
                    failures = 0  # it went down (or was restarted) meanwhile: check() sees to that
                    continue
                failures += 1
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                log.warning("%s failed its probe (%d of %d in a row): %s", self.label, failures,
                            self.probe_failures, reason)
                if failures >= self.probe_failures and not self._stopping.is_set():
                    self._unhealthy, failures = reason, 0
            else:
                failures = 0

    def check(self) -> None:
        """Call often: restart the server (in the background) if it exited or failed its probe."""
        if self._stopping.is_set() or self._restart_pending():
            return
        unhealthy = self._unhealthy
        if unhealthy is None and not self.server.exited():
            return
        code = getattr(getattr(self.server, "process", None), "returncode", None)
        if time.monotonic() - self._started_at > self.stable_after:
            self._backoff = self.min_backoff  # it had been running fine: restart at once-ish
        if unhealthy is not None and not self.server.exited():
            log.error("%s is running but failed %d probes in a row (%s); restarting it in %g s", self.label,
                      self.probe_failures, unhealthy, self._backoff)
        else:
            log.error("%s exited (code %s); restarting it in %g s", self.label, code, self._backoff)
        self._restarting = threading.Thread(target=self._restart, args=(self._backoff,), daemon=True,
                                            name=f"restart-{self.label}")
        self._backoff = min(self._backoff * 2, self.max_backoff)
        self._restarting.start()

    def _restart(self, delay: float) -> None:
        if self._stopping.wait(delay):
            return
        self.restarts += 1
        self._unhealthy = None
        try:
            self.server.stop(timeout=5)  # a hung one or whatever is left of the old process group
            self.server.start(timeout=self.start_timeout)
        except Exception as exc:  # noted; the next check tries again, later
            log.error("%s did not come back: %s", self.label, str(exc).splitlines()[0] if str(exc) else exc)
            return
        self._started_at = time.monotonic()
        log.info("%s is back (restart %d)", self.label, self.restarts)

    def stop(self) -> None:
        self._stopping.set()
        if self._restarting is not None:
            self._restarting.join(timeout=1)
        if self._probing is not None:
            self._probing.join(timeout=1)
        self.server.stop()
