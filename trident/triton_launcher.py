"""Run the ``tritonserver`` binary shipped in the ``nvidia-pytriton`` wheel, on CPU.

The wheel carries Triton 2.51 with the Python backend and one backend stub per Python
version. Triton expects a backend folder laid out as ``<dir>/python/{libtriton_python.so,
triton_python_backend_utils.py, triton_python_backend_stub}``, so one is assembled (with
symlinks) for the running interpreter. The stub's embedded Python finds the virtualenv's
packages through the ``python`` first on ``PATH``, so the venv's ``bin`` goes first.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Sequence

from . import shm_regions
from .child_process import ChildServer
from .contract import ENGINE_GRPC_ENV, SERVER_ID_ENV

log = logging.getLogger(__name__)

DEFAULT_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
PORT_ENV = {"http": "TRITON_HTTP_PORT", "grpc": "TRITON_GRPC_PORT", "metrics": "TRITON_METRICS_PORT"}


class TritonStartError(RuntimeError):
    """Triton did not become ready; the message carries the tail of its log."""


@dataclasses.dataclass(frozen=True)
class TritonPorts:
    http: int
    grpc: int
    metrics: int

    @classmethod
    def from_env(cls, env: dict | None = None) -> "TritonPorts":
        env = os.environ if env is None else env
        return cls(**{k: int(env.get(PORT_ENV[k], v)) for k, v in DEFAULT_PORTS.items()})


def pytriton_root() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonStartError("nvidia-pytriton is not installed (pip install nvidia-pytriton==0.7.0)")
    return Path(list(spec.submodule_search_locations)[0]) / "tritonserver"


def prepare_backend_dir(*, dest: Path, python_version: str | None = None) -> Path:
    """Lay out ``dest/python`` with the Python backend and the stub for this interpreter."""
    root = pytriton_root()
    version = python_version or f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise TritonStartError(f"no Triton Python backend stub for Python {version} in {stub.parent.parent}")
    backend = Path(dest) / "python"
    backend.mkdir(parents=True, exist_ok=True)
    sources = {
        "libtriton_python.so": root / "backends" / "python" / "libtriton_python.so",
        "triton_python_backend_utils.py": root / "backends" / "python" / "triton_python_backend_utils.py",
        "triton_python_backend_stub": stub,
    }
    for name, src in sources.items():
        link = backend / name
        if link.is_symlink() or link.exists():
            if link.resolve() == src.resolve():
                continue
            link.unlink()
        link.symlink_to(src)
    return Path(dest)


def python_libdir() -> str:
    """The folder of the running interpreter's own ``libpython3.X.so.1.0``, if it has one.

    The stub is linked against ``libpython3.X.so.1.0`` and takes the first one the loader
    finds; the system's (say 3.11.2) with another build's stdlib (say pyenv's 3.11.7) fails
    on extension modules such as ``_ssl``. Putting the interpreter's own library first keeps
    library and stdlib from the same build.
    """
    import sysconfig

    libdir = sysconfig.get_config_var("LIBDIR") or ""
    name = f"libpython{sys.version_info.major}.{sys.version_info.minor}.so.1.0"
    return libdir if libdir and (Path(libdir) / name).exists() else ""


def triton_env(*, base: dict | None = None) -> dict:
    """Environment for tritonserver: bundled libs on LD_LIBRARY_PATH, the venv's bin first."""
    env = dict(os.environ if base is None else base)
    libs = pytriton_root().parent.parent / "nvidia_pytriton.libs"
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (python_libdir(), str(libs), env.get("LD_LIBRARY_PATH", "")) if p
    )
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([venv_bin, env.get("PATH", "")])
    # The stub imports the project's code from the editable install; keep stray user site
    # packages out of the stub's interpreter.
    env.setdefault("PYTHONNOUSERSITE", "1")
    return env


# Threads the Python backend's parent keeps for one model instance beyond the llm model's
# engine streams (BLS calls in its fallback): its own responses, the engine model's responses.
THREAD_POOL_HEADROOM = 32
DEFAULT_THREAD_POOL = 32  # the Python backend's own default
_MAX_CONCURRENT = re.compile(
    r'key:\s*"max_concurrent_requests"\s*value:\s*\{\s*string_value:\s*"(\d+)"')


def python_thread_pool_size(model_repository: Path, *, llm_model: str = "llm") -> int:
    """The Python backend's ``thread-pool-size`` for a repository: the llm model's
    ``max_concurrent_requests`` plus headroom.

    The pool sends the models' own responses. When ``llm`` streams from the engine over BLS (its
    fallback where no gRPC client is installed: trident.engine_grpc), every decoupled BLS call
    also holds a thread of it until the engine's first response, and a pool no larger than the
    requests waiting in the engine's queue sent nothing until a batch ended.
    """
    config = Path(model_repository) / llm_model / "config.pbtxt"
    try:
        match = _MAX_CONCURRENT.search(config.read_text())
    except OSError:
        match = None
    concurrent = int(match.group(1)) if match else 256  # LlmSettings' default
    return max(DEFAULT_THREAD_POOL, concurrent + THREAD_POOL_HEADROOM)


#: HTTP/2 keepalive on Triton's gRPC endpoint. Triton accepts its clients' pings (the gateway's,
#: every 10 s, gateway.triton_backend.keepalive_options) on busy and idle connections, at most one
#: a second (gRPC's default policy allows one in 5 minutes without data, and closes a connection
#: that pings more often: GOAWAY "too_many_pings"), and pings its clients every 10 s, so that the
#: calls of a client that froze or whose host is gone end within 20 s (llm then finds them
#: cancelled and stops their generations) instead of running to their end.
GRPC_KEEPALIVE_ARGS = (
    "--grpc-keepalive-permit-without-calls=1",
    "--grpc-http2-min-recv-ping-interval-without-data=1000",
    "--grpc-keepalive-time=10000",
    "--grpc-keepalive-timeout=10000",
    "--grpc-http2-max-pings-without-data=0",
)


def build_command(*, model_repository: Path, backend_dir: Path, ports: TritonPorts,
                  log_verbose: int = 0, exit_timeout: int = 30,
                  extra_args: Sequence[str] = ()) -> list[str]:
    pool = python_thread_pool_size(model_repository)
    return [
        str(pytriton_root() / "bin" / "tritonserver"),
        f"--model-repository={model_repository}",
        f"--backend-directory={backend_dir}",
        f"--cache-directory={pytriton_root() / 'caches'}",
        f"--http-port={ports.http}",
        f"--grpc-port={ports.grpc}",
        f"--metrics-port={ports.metrics}",
        "--allow-http=true",
        "--allow-grpc=true",
        "--allow-metrics=true",
        "--allow-gpu-metrics=false",
        "--exit-on-error=true",
        "--strict-readiness=true",
        f"--backend-config=python,thread-pool-size={pool}",
        *GRPC_KEEPALIVE_ARGS,
        # On SIGINT/SIGTERM Triton stops taking requests and waits this long for the ones in
        # flight (and model unloads) before it exits.
        f"--exit-timeout-secs={exit_timeout}",
        f"--log-verbose={log_verbose}",
        *extra_args,
    ]


class TritonServer(ChildServer):
    """A tritonserver child process: ``start()`` waits for readiness, ``stop()`` ends it."""

    name = "Triton"
    stop_signal = signal.SIGINT  # Triton's graceful shutdown: unloads models, stopping the stubs

    def __init__(self, *, model_repository: Path, work_dir: Path, ports: TritonPorts | None = None,
                 log_path: Path | None = None, log_verbose: int = 0, ready_models: Sequence[str] = ("llm",),
                 exit_timeout: int = 30):
        super().__init__(log_path=Path(log_path) if log_path else Path(work_dir).resolve() / "triton.log")
        self.model_repository = Path(model_repository).resolve()
        self.work_dir = Path(work_dir).resolve()
        self.ports = ports or TritonPorts.from_env()
        self.log_verbose = log_verbose
        self.ready_models = tuple(ready_models)
        self.exit_timeout = exit_timeout
        # the shared-memory regions of the running Triton's stubs, read once it is ready (stop()
        # removes them: a Triton that died took its stubs along, and their command lines with them)
        self._regions: set[str] = set()

    @property
    def grpc_url(self) -> str:
        return f"localhost:{self.ports.grpc}"

    @property
    def http_url(self) -> str:
        return f"http://localhost:{self.ports.http}"

    def start(self, *, timeout: float = 300.0, echo: bool = False) -> "TritonServer":
        backend_dir = prepare_backend_dir(dest=self.work_dir / "backends")
        cmd = build_command(model_repository=self.model_repository, backend_dir=backend_dir,
                            ports=self.ports, log_verbose=self.log_verbose, exit_timeout=self.exit_timeout)
        log.info("starting Triton (HTTP %d, gRPC %d, metrics %d), log: %s",
                 self.ports.http, self.ports.grpc, self.ports.metrics, self.log_path)
        env = triton_env()
        env.setdefault(SERVER_ID_ENV, f"{socket.gethostname()}:{self.ports.grpc}")
        env[ENGINE_GRPC_ENV] = f"127.0.0.1:{self.ports.grpc}"  # llm -> engine (trident.engine_grpc)
        shm_regions.remove_stale()  # those of a Triton killed before (make serve's restarts, a pod's)
        self._spawn(cmd, env=env, echo=echo)
        try:
            self.wait_ready(timeout=timeout)
        except BaseException:
            self.stop()
            raise
        self._regions = shm_regions.named_by_processes(group=self.process.pid)
        return self

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as resp:
                if resp.status != 200:
                    return False
            for model in self.ready_models:
                with urllib.request.urlopen(f"{self.http_url}/v2/models/{model}/ready", timeout=2) as resp:
                    if resp.status != 200:
                        return False
            return True
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    def metrics_listening(self) -> bool:
        """Whether the metrics port accepts a connection (``/metrics``, Prometheus' text)."""
        try:
            with socket.create_connection(("localhost", self.ports.metrics), timeout=2):
                return True
        except OSError:
            return False

    def wait_ready(self, *, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last_note = 0.0
        while time.monotonic() < deadline:
            if self.exited():
                raise TritonStartError(
                    f"tritonserver exited with code {self.process.returncode} before it was ready\n"
                    + self.log_tail())
            # Ready, and its metrics endpoint listening: Triton starts that one last, tens of
            # milliseconds after HTTP answers ready (a scrape right after start() was refused).
            if self.is_ready() and self.metrics_listening():
                log.info("Triton is ready")
                return
            now = time.monotonic()
            if now - last_note > 15:
                log.info("waiting for Triton to load the models ...")
                last_note = now
            time.sleep(0.5)
        raise TritonStartError(f"Triton was not ready after {timeout:.0f}s\n" + self.log_tail())

    def stop(self, *, timeout: float | None = None) -> None:
        """SIGINT (Triton stops taking requests and lets in-flight ones end, up to its exit
        timeout), then the process group is killed past ``timeout`` (exit timeout + 10 s). The
        shared-memory regions its stubs named (once it was ready, or now) go too: Triton removes
        them when it stops, not when it is killed (or died), and each holds memory
        (trident.shm_regions)."""
        regions, self._regions = self._regions, set()
        if self.process is not None:
            regions |= shm_regions.named_by_processes(group=self.process.pid)
        super().stop(timeout=self.exit_timeout + 10 if timeout is None else timeout)
        shm_regions.remove(regions)

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m trident.triton_launcher --model-repository DIR``: Triton in the foreground, its
    log on stdout (the CPU image's entry point). SIGTERM or SIGINT stops it gracefully; it exits
    with Triton's status when Triton exits by itself."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--model-repository", required=True, type=Path)
    p.add_argument("--work-dir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "trident-triton")
    p.add_argument("--exit-timeout", type=int, default=int(os.environ.get("TRITON_EXIT_TIMEOUT", "30")),
                   help="seconds in-flight requests get after SIGTERM (TRITON_EXIT_TIMEOUT)")
    p.add_argument("--log-verbose", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[triton-launcher] %(message)s")
    server = TritonServer(model_repository=args.model_repository, work_dir=args.work_dir, ports=TritonPorts.from_env(),
                          log_verbose=args.log_verbose, exit_timeout=args.exit_timeout)
    stopping: list[bool] = []

    def on_signal(*_: object) -> None:
        stopping.append(True)
        if server.process is None or not server.is_ready():
            raise KeyboardInterrupt  # still loading: start() stops Triton and re-raises

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    try:
        server.start(timeout=float("inf"), echo=True)
    except KeyboardInterrupt:
        return 0
    while not stopping and not server.exited():
        time.sleep(0.5)
    code = 0 if stopping else (server.process.returncode or 1)
    server.stop()
    return code


if __name__ == "__main__":
    sys.exit(main())
