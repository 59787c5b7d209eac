"""Per-app state, kept in ``app.extensions["trident"]``: built once by the app factory."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from . import metrics
from .auth import KeyStore
from .concurrency import KeyConcurrency
from .backend import Backend
from .errors import unavailable
from .schemas import GenerateSchema


class InFlight:
    """Counts generations running in this process; past ``limit`` (0: none) a 503, at once:
    there is no queue in the gateway (Triton's scheduler holds the only one). The count is also
    the ``trident_gateway_in_flight_requests`` gauge.

    The lock is never held across anything that could yield to another greenlet, so it is
    safe whether or not it was created before gevent patched ``threading``.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0
        self._lock = threading.Lock()

    def acquire(self, retry_after: int) -> Callable[[], None]:
        """Take a slot; returns the function that gives it back (calling it twice is harmless)."""
        with self._lock:
            if self.limit and self.count >= self.limit:
                raise unavailable(
                    f"The gateway is at its limit of {self.limit} concurrent generations; try again later",
                    retry_after,
                )
            self.count += 1
        metrics.IN_FLIGHT.inc()
        released = False

        def release() -> None:
            nonlocal released
            with self._lock:
                if released:
                    return
                released = True
                self.count -= 1
            metrics.IN_FLIGHT.dec()

        return release


@dataclass
class GatewayState:
    backend: Backend
    keys: KeyStore
    generate_schema: GenerateSchema
    in_flight: InFlight
    heartbeat_interval: float
    retry_after: int
    key_concurrency: KeyConcurrency
    default_max_concurrent: int = 0
