#!/usr/bin/env python3
"""Start Triton on a trtllm model repository (from build/build_engine.py), one rank per GPU.

World size 1: tritonserver directly. World size > 1 (tp x pp, read from the engines'
config.json): mpirun in leader mode, as NVIDIA's launch_triton_server.py does. The process
replaces itself with the command (exec), so signals reach Triton. --dry-run prints it.
"""
import argparse
import os
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trident import shm_regions  # noqa: E402
from trident.contract import ENGINE_GRPC_ENV, SERVER_ID_ENV  # noqa: E402
from trident.trtllm.commands import shell_line  # noqa: E402
from trident.trtllm.launch import TRITONSERVER, triton_command, world_size_of  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model-repository", required=True, type=Path)
    p.add_argument("--world-size", type=int, default=None, help="default: tp x pp of the engines")
    p.add_argument("--tritonserver", default=TRITONSERVER)
    p.add_argument("--http-port", type=int, default=int(os.environ.get("TRITON_HTTP_PORT", 8000)))
    p.add_argument("--grpc-port", type=int, default=int(os.environ.get("TRITON_GRPC_PORT", 8001)))
    p.add_argument("--metrics-port", type=int, default=int(os.environ.get("TRITON_METRICS_PORT", 8002)))
    p.add_argument("--log-verbose", type=int, default=0)
    p.add_argument("--dry-run", action="store_true", help="print the command and exit")
    args = p.parse_args()

    repo = args.model_repository.resolve()
    try:
        world_size = args.world_size or world_size_of(repo)
    except (OSError, ValueError) as exc:
        print(f"[launch-triton] error: {exc}", file=sys.stderr)
        return 1
    cmd = triton_command(world_size=world_size, model_repository=repo, tritonserver=args.tritonserver,
                         http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=args.metrics_port,
                         log_verbose=args.log_verbose)
    print(shell_line(cmd), flush=True)
    if args.dry_run:
        return 0
    # Which Triton took a request: in the llm model's admission responses, the gateway's logs.
    os.environ.setdefault(SERVER_ID_ENV, f"{socket.gethostname()}:{args.grpc_port}")
    os.environ[ENGINE_GRPC_ENV] = f"127.0.0.1:{args.grpc_port}"  # llm -> engine (trident.engine_grpc)
    # A Triton killed in this pod before (liveness probe) left its stubs' regions in /dev/shm.
    shm_regions.remove_stale()
    print(f"[launch-triton] world size {world_size}; gRPC on :{args.grpc_port} "
          f"(point the gateway at TRIDENT_TRITON_GRPC_URL=<host>:{args.grpc_port})", flush=True)
    os.execvp(cmd[0], cmd)
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main())
