"""Ids of requests, completions and leases: 32 hex digits, unique, not secret.

``uuid.uuid4()`` reads the OS's random source, a system call that releases the GIL; under a
burst the gevent thread then waited for the gRPC relay and poller threads to give it back
(cProfile of a worker, wall time: ``posix.urandom`` 215 us per call). The CPU saved per request
was within noise when measured side by side. These ids need to be unique, not unpredictable, so
they come from ``random``, which each forked worker reseeds (CPython re-seeds the module's
generator in a child after ``fork``).
"""

from __future__ import annotations

import random
import re

#: a request id a client may give (its X-Request-ID, vLLM's request_id): echoed and logged as it is
TAME_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=@-]{1,128}$")


def new_id() -> str:
    return f"{random.getrandbits(128):032x}"
