"""Keep child servers running: a server that exits unexpectedly is restarted, with backoff.

``scripts/serve.py`` (``make serve``) supervises its Tritons and its gateway with this: a crashed
Triton is started again by itself (1 s, then 2, 4 ... up to 30 s between failed attempts; the
wait resets once a start succeeded and the server ran a minute), with a log line each time,
while the gateway keeps serving from the other Tritons, or answers 503 while none is up, and
reconnects on its own (gRPC re-resolves and reconnects). Restarts happen on a thread of their
own, since starting Triton waits for its models to load.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Protocol

log = logging.getLogger("trident.supervisor")


class Server(Protocol):
    name: str

    def start(self, *, timeout: float = ..., echo: bool = ...) -> object: ...

    def stop(self, *, timeout: float | None = ...) -> None: ...

    def exited(self) -> bool: ...


class Supervised:
    """One server under supervision (``label`` names it in the log: "Triton 2")."""

    def __init__(self, server: Server, *, label: str, start_timeout: float = 600.0,
                 min_backoff: float = 1.0, max_backoff: float = 30.0, stable_after: float = 60.0) -> None:
        self.server = server
        self.label = label
        self.start_timeout = start_timeout
        self.min_backoff, self.max_backoff, self.stable_after = min_backoff, max_backoff, stable_after
        self.restarts = 0
        self._backoff = min_backoff
        self._started_at = 0.0
        self._restarting: threading.Thread | None = None
        self._stopping = threading.Event()

    def start(self) -> None:
        """The first start, in the caller's thread (errors are raised)."""
        self.server.start(timeout=self.start_timeout)
        self._started_at = time.monotonic()

    def check(self) -> None:
        """Call often: restart the server (in the background) if it exited."""
        if self._stopping.is_set() or (self._restarting is not None and self._restarting.is_alive()):
            return
        if not self.server.exited():
            return
        code = getattr(getattr(self.server, "process", None), "returncode", None)
        if time.monotonic() - self._started_at > self.stable_after:
            self._backoff = self.min_backoff  # it had been running fine: restart at once-ish
        log.error("%s exited (code %s); restarting it in %.0f s", self.label, code, self._backoff)
        self._restarting = threading.Thread(target=self._restart, args=(self._backoff,), daemon=True,
                                            name=f"restart-{self.label}")
        self._backoff = min(self._backoff * 2, self.max_backoff)
        self._restarting.start()

    def _restart(self, delay: float) -> None:
        if self._stopping.wait(delay):
            return
        self.restarts += 1
        try:
            self.server.stop(timeout=5)  # whatever is left of the old process group
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
        self.server.stop()
