"""Graceful drain on SIGTERM: finish what is open, take nothing new, end on time.

On SIGTERM (gateway.worker calls :func:`begin` from gunicorn's exit handler):

* ``/readyz`` answers 503 at once and so does every new generation (a kept-alive connection may
  still send one); the worker stops listening once a new worker listens on the port, or after
  1 s (gateway.worker.FewAcceptsPerTurnServer.stop_listening), and closes the kept-alive
  connections waiting for their next request at once, fresh ones after 1 s for their first
  (gateway.worker.GeventGrpcWorker.close_idle_connections);
* open streams go on until they finish, for at most ``GATEWAY_DRAIN_TIMEOUT`` seconds (30 by
  default); then each gets an ``event: error`` (503, ``service_unavailable``: "the server is
  shutting down") and ends, and the worker exits. Background responses (gateway.background) go
  on the same way and are stored failed with that error. gunicorn's own graceful timeout is set above
  the drain (gateway.gunicorn_conf), so it never cuts a stream off without that event.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from typing import Any

log = logging.getLogger("trident.gateway")

DEFAULT_TIMEOUT = 30.0


def drain_timeout(environ: Any = os.environ) -> float:
    return float(environ.get("GATEWAY_DRAIN_TIMEOUT") or DEFAULT_TIMEOUT)


class Drain:
    """This process's drain state and its open streams (gateway.sse.SSEBody registers itself, and
    so do a background response's run and a follower of its kept events, gateway.background)."""

    def __init__(self) -> None:
        self.started: float | None = None
        self.streams: weakref.WeakSet[Any] = weakref.WeakSet()

    @property
    def draining(self) -> bool:
        return self.started is not None

    def begin(self, timeout: float) -> None:
        """Start draining; after ``timeout`` seconds, end every stream still open."""
        if self.started is not None:
            return
        self.started = time.monotonic()
        log.info("draining: %d open stream(s) and background response(s), at most %.0f s", len(self.streams), timeout)
        try:
            import gevent

            gevent.spawn_later(timeout, self.end_streams)
        except ImportError:  # pragma: no cover - gevent is a dependency
            pass

    def end_streams(self) -> None:
        from .errors import unavailable

        streams = list(self.streams)
        if streams:
            log.warning("drain time over: ending %d open stream(s) and background response(s)", len(streams))
        for body in streams:
            body.abort(unavailable("The server is shutting down; retry the request", 1))


DRAIN = Drain()
