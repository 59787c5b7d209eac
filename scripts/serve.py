#!/usr/bin/env python3
"""Run Triton (embedded CPU build) and the gateway in the foreground; Ctrl-C stops both."""
import argparse
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

from trident.gateway_process import GatewayProcess  # noqa: E402
from trident.triton_launcher import TritonPorts, TritonServer  # noqa: E402

log = logging.getLogger("serve")


def api_key(key_file: Path) -> str:
    """TRIDENT_API_KEY if set; else a key kept in an untracked local file (made once)."""
    key = os.environ.get("TRIDENT_API_KEY")
    if key:
        return key
    if key_file.is_file():
        return key_file.read_text().strip()
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key = "tk-" + secrets.token_urlsafe(24)
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    log.info("created an API key in %s", key_file)
    return key


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--tokenizer-dir", type=Path, required=True,
                        help="tokenizer (and chat template) of the served model, for /v1/chat")
    parser.add_argument("--work-dir", type=Path, default=ROOT / ".cache" / "run")
    parser.add_argument("--key-file", type=Path, default=ROOT / ".trident" / "api_key")
    parser.add_argument("--workers", type=int, default=int(os.environ.get("GATEWAY_WORKERS", "1")))
    parser.add_argument("--host", default=os.environ.get("GATEWAY_HOST", "127.0.0.1"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[serve] %(message)s")

    port = int(os.environ.get("GATEWAY_PORT", "8080"))
    key = api_key(args.key_file)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    triton = TritonServer(model_repository=args.model_repository, work_dir=args.work_dir,
                          ports=TritonPorts.from_env(), log_path=args.work_dir / "triton.log")
    gateway = GatewayProcess(port=port, host=args.host, workers=args.workers,
                             triton_grpc_url=triton.grpc_url, log_path=args.work_dir / "gateway.log",
                             extra_env={"TRIDENT_API_KEY": key,
                                        "TRIDENT_TOKENIZER_DIR": str(args.tokenizer_dir.resolve())})
    try:
        triton.start()
        if stop.is_set():
            return 130
        gateway.start()
        body = '{"prompt": "The capital of France is", "max_new_tokens": 8, "temperature": 0}'
        print(f"""
trident is ready.
  gateway : {gateway.url}   (log: {gateway.log_path})
  triton  : gRPC {triton.grpc_url}, HTTP {triton.http_url}   (log: {triton.log_path})
  API key : {key}

Try it:
  curl -s {gateway.url}/generate -H 'Authorization: Bearer {key}' \\
       -H 'Content-Type: application/json' -d {shlex.quote(body)}

Ctrl-C stops both servers.
""", flush=True)
        while not stop.wait(1.0):
            for name, proc in (("Triton", triton.process), ("gateway", gateway.process)):
                if proc is None or proc.poll() is not None:
                    log.error("%s exited unexpectedly; stopping", name)
                    tail = triton.log_tail() if name == "Triton" else gateway.log_tail()
                    print(tail, file=sys.stderr)
                    return 1
        log.info("stopping")
        return 0
    finally:
        gateway.stop()
        triton.stop()


if __name__ == "__main__":
    sys.exit(main())
