"""Ids of requests, completions and leases: 32 hex digits, unique, not secret.

``uuid.uuid4()`` reads the OS's random source, a system call that releases the GIL; with the
gRPC relay thread and gRPC's poller thread waiting for it, taking it back cost the gevent thread
about 200 us a request under a burst (cProfile of a worker: ``posix.urandom`` 215 us per call).
These ids need to be unique, not unpredictable, so they come from ``random``, which each forked
worker reseeds (CPython re-seeds the module's generator in a child after ``fork``).
"""

from __future__ import annotations

import random


def new_id() -> str:
    return f"{random.getrandbits(128):032x}"
