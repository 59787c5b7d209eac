"""The tritonserver command line for TensorRT-LLM engines, one process per GPU rank under MPI.

Leader mode, as NVIDIA's ``triton_backend/scripts/launch_triton_server.py`` (TensorRT-LLM 1.2)
builds it: ``mpirun --allow-run-as-root -n 1 tritonserver <rank 0> : -n 1 tritonserver <rank 1>
...``. Every rank runs a tritonserver; rank 0 loads the whole repository and serves HTTP/gRPC,
ranks > 0 load only the engine model (``--model-control-mode=explicit --load-model=...``), join
the engine's MPI world, and stay inside that model's initialization until the leader shuts down,
so they never open their ports. Each rank gets its own Python-backend shared-memory prefix.

Orchestrator mode (``TRTLLM_ORCHESTRATOR=1``: one tritonserver that spawns
``trtllmExecutorWorker`` processes with MPI_Comm_spawn) is the alternative NVIDIA uses for
several engine models in one server; with one engine model leader mode is simpler (no spawn
support needed from the MPI runtime) and is what this project uses.

A world size of 1 needs no MPI (the launcher's ``--no-mpi`` case): tritonserver runs directly.
Unlike the upstream script, no ``:`` is left after the last rank and each option appears once.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from ..triton_launcher import GRPC_KEEPALIVE_ARGS, python_thread_pool_size
from .checks import engine_world_size

TRITONSERVER = "/opt/tritonserver/bin/tritonserver"


def rank_args(*, rank: int, tritonserver: str, model_repository: Path, http_port: int, grpc_port: int,
              metrics_port: int, engine_model: str, log_verbose: int, python_pool: int = 32,
              exit_timeout: int = 30) -> list[str]:
    args = [
        tritonserver,
        f"--model-repository={model_repository}",
        f"--grpc-port={grpc_port}",
        f"--http-port={http_port}",
        f"--metrics-port={metrics_port}",
    ]
    if rank == 0:  # the rank that serves: keepalive as on CPU
        args += [f"--log-verbose={log_verbose}", *GRPC_KEEPALIVE_ARGS]
    else:
        args += ["--model-control-mode=explicit", f"--load-model={engine_model}"]
    args += [
        "--disable-auto-complete-config",
        f"--backend-config=python,shm-region-prefix-name=prefix{rank}_",
        # Where llm falls back to BLS (no gRPC client in the image), each of its calls holds a
        # thread of this pool until the engine's first response: trident.triton_launcher.
        f"--backend-config=python,thread-pool-size={python_pool}",
        f"--exit-timeout-secs={exit_timeout}",
    ]
    return args


def triton_command(*, world_size: int, model_repository: Path, tritonserver: str = TRITONSERVER,
                   http_port: int = 8000, grpc_port: int = 8001, metrics_port: int = 8002,
                   engine_model: str = "tensorrt_llm", log_verbose: int = 0,
                   mpirun: str = "mpirun", extra_mpirun_args: Sequence[str] = ()) -> list[str]:
    if world_size < 1:
        raise ValueError(f"world size must be at least 1, got {world_size}")
    common = dict(tritonserver=tritonserver, model_repository=Path(model_repository), http_port=http_port,
                  grpc_port=grpc_port, metrics_port=metrics_port, engine_model=engine_model,
                  log_verbose=log_verbose, python_pool=python_thread_pool_size(Path(model_repository)))
    if world_size == 1:
        return rank_args(rank=0, **common)
    cmd = [mpirun, "--allow-run-as-root", *extra_mpirun_args]
    for rank in range(world_size):
        if rank:
            cmd.append(":")
        cmd += ["-n", "1", *rank_args(rank=rank, **common)]
    return cmd


_MODEL_PATH = re.compile(r'key:\s*"gpt_model_path"\s*value:\s*\{\s*string_value:\s*"([^"]*)"')


def engine_dir_of(model_repository: Path, *, engine_model: str = "tensorrt_llm") -> Path:
    """The engine folder a filled repository points at (its gpt_model_path parameter)."""
    config = Path(model_repository) / engine_model / "config.pbtxt"
    if not config.is_file():
        raise FileNotFoundError(f"{config} not found: build the repository with build/build_engine.py")
    match = _MODEL_PATH.search(config.read_text())
    if match is None:
        raise ValueError(f"{config} has no gpt_model_path parameter")
    return Path(match.group(1))


def world_size_of(model_repository: Path, *, engine_model: str = "tensorrt_llm") -> int:
    """tp x pp of the engines the repository serves: that many ranks must be launched."""
    return engine_world_size(engine_dir_of(model_repository, engine_model=engine_model))
