"""gRPC's client I/O for the gateway: the polling client, not the EventEngine thread pool.

grpcio 1.85's client channels read and write their TCP connections on EventEngine's pool of
threads by default: each batch of responses a worker receives goes from a pool thread (epoll,
HTTP/2 framing) to grpc.aio's poller thread (the completion queue) to the hub, two thread
hand-offs before the relay loop sees it. With the ``event_engine_client`` experiment off, the
channel uses gRPC's polling I/O, which the poller thread drives itself in its completion-queue
wait: one hand-off. Measured with scripts/bench_gateway.py (200 streams, one token a response,
echo model; docs/operations.md, Gateway speed): perf put 37 % of a worker's CPU in the pool's
threads, and the worker's CPU per relayed token fell by about a fifth with it off.

``GRPC_EXPERIMENTS`` is read once, when gRPC starts, so this runs before any gateway module can
import ``grpc``: when the ``gateway`` package itself is imported (gateway/__init__.py), which in
gunicorn is in the master, before any worker forks. An operator's own ``GRPC_EXPERIMENTS`` is
kept; one that names ``event_engine_client`` either way decides it. Measured with grpcio 1.85.3
(setup.py asks for >= 1.60); a grpcio that no longer has the experiment logs "Unknown
experiment" once and keeps its default I/O.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

EXPERIMENT = "event_engine_client"


def use_polling_client(environ: MutableMapping[str, str] = os.environ) -> None:
    """Add ``-event_engine_client`` to ``GRPC_EXPERIMENTS`` unless it names that experiment."""
    current = environ.get("GRPC_EXPERIMENTS", "")
    named = {item.strip().lstrip("-") for item in current.split(",")}
    if EXPERIMENT not in named:
        environ["GRPC_EXPERIMENTS"] = ",".join(filter(None, [current.strip(), "-" + EXPERIMENT]))
