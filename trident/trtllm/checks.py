"""Preflight and post-mortem checks for the GPU path, each with an error that says what to do."""
from __future__ import annotations

import dataclasses
import json
import re
import subprocess
from pathlib import Path
from typing import Callable, Sequence

from . import TRITON_IMAGE, TRTLLM_VERSION


class GpuSetupError(RuntimeError):
    """The machine or image cannot run this step; the message says what is missing."""


@dataclasses.dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    memory_mib: int
    driver: str


def list_gpus(*, run: Callable = subprocess.run) -> list[Gpu]:
    """The GPUs nvidia-smi sees; GpuSetupError when there is no working driver or no GPU."""
    try:
        proc = run(["nvidia-smi", "--query-gpu=index,name,memory.total,driver_version",
                    "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=60)
    except FileNotFoundError as exc:
        raise GpuSetupError(
            "nvidia-smi not found: no NVIDIA driver is visible here. Run on a GPU machine, and in "
            "Docker pass the GPUs in (docker run --gpus all ...).") from exc
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise GpuSetupError(f"nvidia-smi failed to run: {exc}") from exc
    if proc.returncode != 0:
        raise GpuSetupError(f"nvidia-smi exited with {proc.returncode}: "
                            f"{(proc.stderr or proc.stdout).strip()[:500]}")
    gpus = []
    for line in proc.stdout.strip().splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 4:
            continue
        index, name, memory, driver = fields
        gpus.append(Gpu(int(index), name, int(float(memory)), driver))
    if not gpus:
        raise GpuSetupError("nvidia-smi lists no GPU")
    return gpus


def require_gpus(*, world_size: int, gpus: Sequence[Gpu]) -> None:
    if len(gpus) < world_size:
        raise GpuSetupError(
            f"tp x pp = {world_size} needs {world_size} GPUs, this machine shows {len(gpus)} "
            f"({', '.join(g.name for g in gpus)}); lower --tp-size/--pp-size or use a bigger machine")


def tensorrt_llm_version(*, python: str, run: Callable = subprocess.run) -> str:
    """Import tensorrt_llm in a child interpreter (it needs CUDA) and return its version."""
    code = "import sys, tensorrt_llm; sys.stdout.write('\\nTRTLLM_VERSION=' + tensorrt_llm.__version__)"
    try:
        proc = run([python, "-c", code], capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise GpuSetupError(f"could not run {python} to import tensorrt_llm: {exc}") from exc
    match = re.search(r"^TRTLLM_VERSION=(\S+)$", proc.stdout, re.MULTILINE)
    if proc.returncode != 0 or match is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        raise GpuSetupError(
            f"tensorrt_llm does not import with {python} (exit {proc.returncode}). Use the image "
            f"{TRITON_IMAGE} (Dockerfile.triton), which ships TensorRT-LLM {TRTLLM_VERSION}.\n"
            + "\n".join(tail))
    return match.group(1)


def require_pinned_version(version: str, *, pinned: str = TRTLLM_VERSION) -> None:
    if version != pinned:
        raise GpuSetupError(
            f"tensorrt_llm {version} is installed, this project is pinned to {pinned} "
            f"(image {TRITON_IMAGE}). Later releases removed convert_checkpoint/trtllm-build and "
            "the C++ Triton backend; earlier ones differ in flags and backend parameters.")


def engine_version(engine_dir: Path) -> str | None:
    """The TensorRT-LLM version that built the engines (config.json "version"), None if absent."""
    path = Path(engine_dir) / "config.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get("version")


def check_engine_version(*, engine_dir: Path, runtime_version: str) -> None:
    """Engines only load in the TensorRT-LLM (and TensorRT) they were built with."""
    built = engine_version(engine_dir)
    if built is None:
        raise GpuSetupError(f"{engine_dir}/config.json is missing or has no version: not an engine folder")
    if built != runtime_version:
        raise GpuSetupError(
            f"the engines in {engine_dir} were built by TensorRT-LLM {built}, the runtime here is "
            f"{runtime_version}: rebuild them (build/build_engine.py --force, or delete the folder)")


def engine_world_size(engine_dir: Path) -> int:
    """tp x pp of built engines, from their config.json (pretrained_config.mapping)."""
    path = Path(engine_dir) / "config.json"
    config = json.loads(path.read_text())
    mapping = (config.get("pretrained_config") or {}).get("mapping") or {}
    if "world_size" in mapping:
        return int(mapping["world_size"])
    return int(mapping.get("tp_size", 1)) * int(mapping.get("pp_size", 1))


# What an out-of-memory looks like in the converter / trtllm-build / TensorRT output.
OOM_PATTERNS = (
    re.compile(r"CUDA out of memory", re.I),
    re.compile(r"OutOfMemoryError"),
    re.compile(r"cudaErrorMemoryAllocation|CUDA_ERROR_OUT_OF_MEMORY"),
    re.compile(r"out of memory", re.I),
    re.compile(r"Requested amount of GPU memory .* could not be allocated", re.I),
    re.compile(r"std::bad_alloc|MemoryError"),
)
KILLED_BY_SIGNAL = {-9, 137}


def explain_failure(*, step: str, returncode: int, output_tail: Sequence[str]) -> str:
    """One message for a failed build step: OOM gets its own advice, the rest the log tail."""
    text = "\n".join(output_tail)
    tail = "\n".join(f"    {line}" for line in list(output_tail)[-25:])
    if any(p.search(text) for p in OOM_PATTERNS) or returncode in KILLED_BY_SIGNAL:
        where = ("the host ran out of memory (the process was killed)"
                 if returncode in KILLED_BY_SIGNAL and not any(p.search(text) for p in OOM_PATTERNS)
                 else "it ran out of memory")
        return (f"{step} failed: {where}. Lower --max-batch-size, --max-num-tokens or "
                "--max-seq-len, split the model over more GPUs (--tp-size), or free the GPU "
                f"(nvidia-smi shows what holds it).\n  last output:\n{tail}")
    return f"{step} failed with exit code {returncode}.\n  last output:\n{tail}"
