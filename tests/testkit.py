"""Test helpers shared by every tier (importable as ``testkit``: tests/conftest.py puts this
folder on the path). Defined once: keys, the served model's name, ports, the error envelope."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from trident.child_process import free_port  # noqa: F401 (shared by every tier as testkit.free_port)

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key-123"  # in-process tiers; the end-to-end tier makes a random one (e2e_helpers.API_KEY)
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = "smollm2-135m-instruct"  # the public model name the gateway serves by default


def model_dir() -> Path:
    """The prepared checkpoint (make test prepares it; TRIDENT_MODEL_DIR overrides)."""
    return Path(os.environ.get("TRIDENT_MODEL_DIR", ROOT / ".cache/models/smollm2-135m-instruct"))


def wait_until(predicate: Callable[[], bool], timeout: float = 2.0, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def assert_error(response, status: int, type_: str, param: str | None, message: str) -> None:
    """The response is exactly this error in the envelope of shared/API.md (a Flask test
    response or a requests one)."""
    text = response.get_data(as_text=True) if hasattr(response, "get_data") else response.text
    assert response.status_code == status, text
    assert response.headers["Content-Type"].startswith("application/json"), response.headers
    body = response.get_json() if hasattr(response, "get_json") else response.json()
    assert body == {"error": {"message": message, "type": type_, "param": param, "code": status}}


# -- a real Redis (the gateway's shared limits: unit and end-to-end tiers) ------------------------

def start_redis(work: Path, port: int) -> subprocess.Popen:
    """A redis-server on ``port`` (no persistence), answering pings; skips the test without one."""
    import pytest

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (Debian: apt-get install -y redis-server)")
    log = open(work / "redis.log", "ab")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(work), "--save", "",
         "--appendonly", "no", "--daemonize", "no"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    log.close()
    import redis

    client = redis.Redis(host="127.0.0.1", port=port)
    if not wait_until(lambda: _pings(client), timeout=15, interval=0.05):
        stop_redis(proc)
        pytest.fail(f"redis-server did not answer on {port}: {(work / 'redis.log').read_text()}")
    return proc


@contextlib.contextmanager
def running_redis(work: Path) -> Iterator[str]:
    """A redis-server of its own in ``work`` for the block, as its URL (skips without one)."""
    port = free_port()
    proc = start_redis(work, port)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop_redis(proc)


def stop_redis(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _pings(client) -> bool:
    try:
        return bool(client.ping())
    except Exception:
        return False


# -- servers of the end-to-end tiers (tests/e2e, tests/gpu) ---------------------------------------

SERVERS: list = []  # every server started by a fixture: their logs are attached to failures


def started(server):
    """Register a child server (trident.child_process.ChildServer) for log attachment."""
    SERVERS.append(server)
    return server


def attach_logs(report) -> None:
    """From a ``pytest_runtest_makereport`` hook: the tail of each server's log on a failure."""
    if report.failed:
        for server in SERVERS:
            report.sections.append((f"{type(server).__name__} log", server.log_tail(80)))


def start_gateway(triton_grpc_url: str, work: Path, *, api_key: str, workers: int = 1, extra_env=None,
                  drain_timeout: float = 5):
    """The real gateway (gunicorn + gevent) on a free port, pointed at ``triton_grpc_url``."""
    from trident.gateway_process import GatewayProcess

    env = {"TRIDENT_API_KEY": api_key, "TRIDENT_TOKENIZER_DIR": str(model_dir()), **(extra_env or {})}
    gw = started(GatewayProcess(port=free_port(), triton_grpc_url=triton_grpc_url, workers=workers,
                                log_path=Path(work) / "gateway.log", extra_env=env, drain_timeout=drain_timeout))
    return gw.start(timeout=60)
