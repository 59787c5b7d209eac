"""gunicorn settings for the gateway: where it listens, its workers, the drain, Prometheus
multiprocess metrics across workers.

    gunicorn -c python:gateway.gunicorn_conf 'gateway:create_app()'

(``trident.gateway_process.GatewayProcess`` passes ``-c python:gateway.gunicorn_conf`` too.)
From the environment: ``GATEWAY_HOST`` (127.0.0.1), ``GATEWAY_PORT`` (8080), ``GATEWAY_WORKERS``
(1), ``GATEWAY_DRAIN_TIMEOUT`` (30 s: after SIGTERM open streams get that long, gateway.drain;
gunicorn's graceful timeout is 5 s more), ``GATEWAY_KEEPALIVE`` (2 s an idle kept-alive connection
waits for its next request), ``GATEWAY_CERTFILE``/``GATEWAY_KEYFILE`` (HTTPS). The
worker class is gateway.worker.GeventGrpcWorker. ``reuse_port``: every worker opens its own
listening socket with SO_REUSEPORT and the kernel spreads connections over them (with one shared
socket, whichever gevent worker woke first took a whole burst: 30 of 30 connections).

``GRPC_EXPERIMENTS`` gets ``-event_engine_client`` when the ``gateway`` package is imported,
here in the master, before any worker forks (gateway.grpc_env), unless the operator's own value
names that experiment.

Each worker writes its metrics to files in ``PROMETHEUS_MULTIPROC_DIR``; ``/metrics`` sums them.
That variable must be set before prometheus_client is first imported, in the master, so it is
set here, when gunicorn loads this file (before ``--preload`` imports the app, before any
worker forks):

* not set: a fresh private temporary folder, removed when gunicorn exits (however it exits);
* set by the operator: the folder is created if missing and emptied of old ``*.db`` files, as
  prometheus-client requires (stale files from a previous run would be summed in). Give each
  gunicorn its own folder.

``child_exit`` drops a dead worker's live gauge (in-flight) and folds its counters and histograms
into one archive file per kind (gateway.metrics_files): their totals stay, and the folder does not
grow with every worker gunicorn replaces.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

_ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare_multiproc_dir(environ: dict[str, str] | os._Environ[str] = os.environ) -> tuple[Path, bool]:
    """Set up the metrics folder; returns it and whether it was made here (to remove at exit)."""
    given = environ.get(_ENV) or environ.get(_ENV.lower())
    if not given:
        path = Path(tempfile.mkdtemp(prefix="trident-metrics-"))
        environ[_ENV] = str(path)
        return path, True
    path = Path(given)
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink()
    environ[_ENV] = str(path)
    return path, False


def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


bind = [f"{_env('GATEWAY_HOST', '127.0.0.1')}:{_env('GATEWAY_PORT', '8080')}"]
workers = int(_env("GATEWAY_WORKERS", "1"))
worker_class = "gateway.worker.GeventGrpcWorker"
# Seconds an idle kept-alive connection waits for its next request (a connection's first request
# gets GATEWAY_HEADER_TIMEOUT instead: gateway.worker.RequestWait).
# At least 1: with 0 gunicorn reads each request with no time bound at all, the first included.
keepalive = int(_env("GATEWAY_KEEPALIVE", "2"))
if keepalive < 1:
    raise ValueError(f"GATEWAY_KEEPALIVE must be at least 1 (seconds), got {keepalive}: with 0 gunicorn would "
                     "wait for a request without any time limit")
reuse_port = True
graceful_timeout = int(float(_env("GATEWAY_DRAIN_TIMEOUT", "30")) + 5.999)  # gunicorn takes whole seconds
timeout = 120
# gunicorn 25+'s control socket (``gunicornc``: reload, add or remove workers) is off. It listens
# at one fixed path in $HOME, so every gateway on a host took over the same socket and the first
# to stop removed it for the others; the gateway's container has a read-only root file system.
# Signals do the same (HUP reload, TTIN/TTOU workers, TERM drain: docs/operations.md).
control_socket_disable = True
if os.environ.get("GATEWAY_CERTFILE"):
    certfile, keyfile = os.environ["GATEWAY_CERTFILE"], os.environ.get("GATEWAY_KEYFILE")

_multiproc_dir, _made_here = prepare_multiproc_dir()
_master_pid = os.getpid()


def _remove_made_dir() -> None:
    """Remove the folder made here, once, in the master only (forked workers inherit atexit
    handlers and some of their exits run them)."""
    if _made_here and os.getpid() == _master_pid:
        shutil.rmtree(_multiproc_dir, ignore_errors=True)


atexit.register(_remove_made_dir)  # also when gunicorn stops because a worker failed to boot
if "prometheus_client" in sys.modules:  # its value class is chosen once, at import
    print(
        "gateway.gunicorn_conf: prometheus_client was imported before this config set "
        f"{_ENV}; /metrics will show one worker's numbers only",
        file=sys.stderr,
    )


def when_ready(server) -> None:  # noqa: ANN001 (gunicorn's hook signature)
    from gateway.worker import migration_warning

    warning = migration_warning(server.cfg.workers)
    if warning is not None:
        server.log.warning(warning)


def post_worker_init(worker) -> None:  # noqa: ANN001
    """In each worker, once its app is loaded: warm the Triton backend up on a greenlet (its relay
    thread, the served models' limits), so a burst of first requests does not wait for it."""
    backend = getattr(getattr(worker, "wsgi", None), "extensions", {}).get("trident")
    warm_up = getattr(getattr(backend, "backend", None), "warm_up", None)
    if warm_up is not None:
        import gevent

        gevent.spawn(warm_up)


def child_exit(server, worker) -> None:  # noqa: ANN001 (gunicorn's hook signature)
    from gateway import metrics_files

    metrics_files.fold_dead_process(worker.pid, _multiproc_dir)


def on_exit(server) -> None:  # noqa: ANN001
    _remove_made_dir()
