#!/usr/bin/env python3
"""Run N Tritons (embedded CPU build) and the gateway in the foreground, supervised.

    make serve                      # one Triton
    make serve TRITON_REPLICAS=2    # two, on their own ports; the gateway balances over both

A Triton that crashes is restarted by itself (with backoff, and a log line); the gateway keeps
serving from the others, or answers 503 while none is up, and recovers by itself. So is a
Triton that runs but fails its stream probe (trident.stream_probe: its gRPC stream handler or its
``llm`` stub stuck, which Triton's HTTP health endpoints do not show) several times in a row. Ctrl-C (or
SIGTERM) drains the gateway (open streams get GATEWAY_DRAIN_TIMEOUT), then stops the Tritons,
each with its exit timeout for the requests in flight.
"""
import argparse
import functools
import logging
import os
import secrets
import shlex
import signal
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trident import stream_probe  # noqa: E402
from trident.gateway_process import GatewayProcess  # noqa: E402
from trident.supervisor import Supervised  # noqa: E402
from trident.triton_launcher import TritonPorts, TritonServer  # noqa: E402

log = logging.getLogger("serve")
PORT_STEP = 10  # replica i listens on the base ports + 10 * i


def api_key(key_file: Path) -> tuple[str, str]:
    """The key and where it came from: TRIDENT_API_KEY if set; else a key kept in an untracked
    local file (made once)."""
    key = os.environ.get("TRIDENT_API_KEY")
    if key:
        return key, "operator"
    if key_file.is_file():
        return key_file.read_text().strip(), "file"
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key = "tk-" + secrets.token_urlsafe(24)
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    log.info("created an API key in %s", key_file)
    return key, "generated"


def replica_ports(base: TritonPorts, i: int) -> TritonPorts:
    return TritonPorts(http=base.http + PORT_STEP * i, grpc=base.grpc + PORT_STEP * i,
                       metrics=base.metrics + PORT_STEP * i)


def banner(gateway: GatewayProcess, tritons: list, key: str, origin: str, key_file: Path) -> str:
    body = '{"prompt": "The capital of France is", "max_new_tokens": 8, "temperature": 0}'
    if origin == "operator":  # the operator's secret: never printed (a terminal's output is often logged)
        key_line, shell_key = "from TRIDENT_API_KEY (not shown)", "$TRIDENT_API_KEY"
    else:
        key_line = f"{key}   ({'created now' if origin == 'generated' else 'from'} {key_file})"
        shell_key = key
    servers = "\n".join(f"  triton {i}: gRPC {t.grpc_url}, HTTP {t.http_url}   (log: {t.log_path})"
                        for i, t in enumerate(tritons))
    return f"""
trident is ready.
  gateway : {gateway.url}   (log: {gateway.log_path})
{servers}
  API key : {key_line}

Try it:
  curl -s {gateway.url}/generate -H "Authorization: Bearer {shell_key}" \\
       -H 'Content-Type: application/json' -d {shlex.quote(body)}

Ctrl-C stops everything.
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--tokenizer-dir", type=Path, required=True,
                        help="tokenizer (and chat template) of the served model, for /v1/chat")
    parser.add_argument("--work-dir", type=Path, default=ROOT / ".cache" / "run")
    parser.add_argument("--key-file", type=Path, default=ROOT / ".trident" / "api_key")
    parser.add_argument("--workers", type=int, default=int(os.environ.get("GATEWAY_WORKERS", "1")))
    parser.add_argument("--host", default=os.environ.get("GATEWAY_HOST", "127.0.0.1"))
    parser.add_argument("--triton-replicas", type=int, default=int(os.environ.get("TRITON_REPLICAS") or 1))
    parser.add_argument("--probe-interval", type=float, default=float(os.environ.get("TRIDENT_PROBE_INTERVAL") or 15),
                        help="seconds between stream probes of each Triton (0: none); TRIDENT_PROBE_INTERVAL")
    parser.add_argument("--probe-timeout", type=float, default=10.0, help="seconds a stream probe (every ping of it) may take")
    parser.add_argument("--probe-failures", type=int, default=3,
                        help="failed stream probes in a row that restart a Triton")
    parser.add_argument("--restart-backoff", type=float, default=1.0,
                        help="seconds before a Triton that exited or failed its probes is restarted, doubled for "
                             "each restart within a minute of the last start (up to 30 s)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[serve] %(message)s")
    if args.triton_replicas < 1:
        parser.error("--triton-replicas must be at least 1")
    if args.restart_backoff < 0:
        parser.error("--restart-backoff must be at least 0")

    port = int(os.environ.get("GATEWAY_PORT", "8080"))
    key, origin = api_key(args.key_file)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    base = TritonPorts.from_env()
    tritons = [
        TritonServer(model_repository=args.model_repository, work_dir=args.work_dir / f"triton-{i}",
                     ports=replica_ports(base, i),
                     log_path=args.work_dir / ("triton.log" if i == 0 else f"triton-{i}.log"))
        for i in range(args.triton_replicas)
    ]
    gateway = GatewayProcess(port=port, host=args.host, workers=args.workers,
                             triton_grpc_url=",".join(t.grpc_url for t in tritons),
                             log_path=args.work_dir / "gateway.log",
                             extra_env={"TRIDENT_API_KEY": key,
                                        "TRIDENT_TOKENIZER_DIR": str(args.tokenizer_dir.resolve()),
                                        # the served model's public name: its folder's, as vLLM
                                        # names a model by its path (SmolLM2's folder gives the
                                        # default); TRIDENT_MODEL_NAME chooses another
                                        "TRIDENT_MODEL_NAME": os.environ.get("TRIDENT_MODEL_NAME")
                                        or args.tokenizer_dir.resolve().name})
    supervised = [Supervised(t, label=f"Triton {i}" if len(tritons) > 1 else "Triton",
                             probe=functools.partial(stream_probe.probe, t.grpc_url, timeout=args.probe_timeout),
                             probe_interval=args.probe_interval, probe_failures=args.probe_failures,
                             min_backoff=args.restart_backoff)
                  for i, t in enumerate(tritons)]
    supervised.append(Supervised(gateway, label="the gateway", start_timeout=60))
    try:
        # Tritons load their models in parallel (each on its own thread), then the gateway.
        errors: list[BaseException] = []

        def first_start(s: Supervised) -> None:
            try:
                s.start()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=first_start, args=(s,), daemon=True) for s in supervised[:-1]]
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive() and not stop.is_set():
                t.join(0.5)
        if stop.is_set():
            return 130
        if errors:
            raise errors[0]
        supervised[-1].start()
        print(banner(gateway, tritons, key, origin, args.key_file), flush=True)
        while not stop.wait(1.0):
            for s in supervised:
                s.check()
        log.info("stopping: the gateway drains, then the Tritons stop")
        return 0
    finally:
        supervised[-1].stop()  # the gateway first: it drains the open streams
        for s in supervised[:-1]:
            s.stop()


if __name__ == "__main__":
    sys.exit(main())
