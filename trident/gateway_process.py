"""Run the gateway under gunicorn with the gevent + gRPC worker, as a child process.

HTTPS: give ``certfile`` and ``keyfile`` (PEM), or set ``GATEWAY_CERTFILE`` and
``GATEWAY_KEYFILE`` in the environment (also in ``extra_env``); gunicorn then serves TLS only.
"""
from __future__ import annotations

import logging
import os
import ssl
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from .child_process import ChildServer

log = logging.getLogger(__name__)

WORKER_CLASS = "gateway.worker.GeventGrpcWorker"
APP = "gateway:create_app()"
CONFIG = "python:gateway.gunicorn_conf"  # Prometheus multiprocess metrics across workers


class GatewayStartError(RuntimeError):
    pass


class GatewayProcess(ChildServer):
    name = "gateway"  # gunicorn stops its workers gracefully on SIGTERM

    def __init__(self, *, port: int, triton_grpc_url: str, log_path: Path, workers: int = 1,
                 host: str = "127.0.0.1", extra_env: dict | None = None, extra_args: tuple = (),
                 certfile: str | os.PathLike | None = None, keyfile: str | os.PathLike | None = None,
                 drain_timeout: float | None = None):
        super().__init__(log_path=log_path)
        self.port = port
        self.host = host
        self.workers = workers
        self.env = dict(os.environ)
        self.env["TRIDENT_TRITON_GRPC_URL"] = triton_grpc_url
        self.env.update(extra_env or {})
        if drain_timeout is not None:
            self.env["GATEWAY_DRAIN_TIMEOUT"] = str(drain_timeout)
        self.drain_timeout = float(self.env.get("GATEWAY_DRAIN_TIMEOUT") or 30)
        self.extra_args = tuple(extra_args)
        certfile = certfile or self.env.get("GATEWAY_CERTFILE") or None
        keyfile = keyfile or self.env.get("GATEWAY_KEYFILE") or None
        if bool(certfile) != bool(keyfile):
            raise ValueError("HTTPS needs both a certificate and a key (GATEWAY_CERTFILE and GATEWAY_KEYFILE)")
        self.certfile, self.keyfile = certfile, keyfile

    @property
    def url(self) -> str:
        scheme = "https" if self.certfile else "http"
        return f"{scheme}://{'127.0.0.1' if self.host in ('0.0.0.0', '') else self.host}:{self.port}"

    def command(self) -> list[str]:
        gunicorn = str(Path(sys.executable).parent / "gunicorn")
        tls = ["--certfile", str(self.certfile), "--keyfile", str(self.keyfile)] if self.certfile else []
        return [gunicorn, "-c", CONFIG, "-k", WORKER_CLASS, "-w", str(self.workers), "-b", f"{self.host}:{self.port}",
                *tls, *self.extra_args, APP]

    def start(self, *, timeout: float = 60.0, echo: bool = False) -> "GatewayProcess":
        log.info("starting the gateway on %s (%d worker(s)), log: %s", self.url, self.workers,
                 "terminal" if echo else self.log_path)
        self._spawn(self.command(), env=self.env, echo=echo)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.exited():
                raise GatewayStartError(f"gunicorn exited with {self.process.returncode}\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=2, context=self._probe_context()) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.3)
        self.stop()
        raise GatewayStartError(f"gateway not healthy after {timeout:.0f}s\n{self.log_tail()}")

    def _probe_context(self) -> ssl.SSLContext | None:
        """The health probe of our own child on loopback: TLS without verification (the
        certificate may be self-signed or name another host); clients verify it."""
        if not self.certfile:
            return None
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context

    def stop(self, *, timeout: float | None = None) -> None:
        """SIGTERM: the gateway drains (open streams get GATEWAY_DRAIN_TIMEOUT), then exits;
        killed past the drain plus 10 s."""
        super().stop(timeout=self.drain_timeout + 10 if timeout is None else timeout)
