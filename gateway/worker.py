"""The gunicorn worker class: gevent, then gRPC's gevent integration.

    gunicorn -k gateway.worker.GeventGrpcWorker 'gateway:create_app()'

Without ``grpc.experimental.gevent.init_gevent()`` a gevent worker locks up on its first gRPC
call. It must run after gevent has patched the process and before any gRPC channel exists;
import-time set-up and gunicorn's pre-fork hooks do not work (measured, see
shared/ARCHITECTURE.md). ``patch()`` runs first thing in the worker process, with or without
``--preload``, and the backend creates its channel lazily, on the first request.
"""

from __future__ import annotations

from grpc.experimental import gevent as grpc_gevent
from gunicorn.workers.ggevent import GeventWorker


class GeventGrpcWorker(GeventWorker):
    """gunicorn's gevent worker with ``init_gevent()`` right after the monkey-patching."""

    def patch(self) -> None:
        super().patch()
        grpc_gevent.init_gevent()
