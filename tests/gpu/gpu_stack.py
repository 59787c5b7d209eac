"""Whether the GPU stack can run here, and its Triton launched the way the container launches it."""
import functools
import os
import subprocess
import sys

from testkit import ROOT

from trident.triton_launcher import TritonServer

TRITONSERVER = os.environ.get("TRIDENT_TRITONSERVER", "/opt/tritonserver/bin/tritonserver")
PARIS = "The capital of France is"
FINISH_REASONS = {"length", "eos_token", "stop_sequence"}


@functools.lru_cache(maxsize=None)
def gpu_stack_missing() -> str | None:
    """Why the GPU stack cannot run here, or None when it can."""
    try:
        smi = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"nvidia-smi does not run ({exc}): no NVIDIA GPU or driver here"
    if smi.returncode != 0 or "GPU" not in smi.stdout:
        return f"nvidia-smi lists no GPU (exit {smi.returncode}): {(smi.stderr or smi.stdout).strip()[:200]}"
    imp = subprocess.run([sys.executable, "-c", "import tensorrt_llm"], capture_output=True, text=True, timeout=600)
    if imp.returncode != 0:
        return f"tensorrt_llm does not import: {imp.stderr.strip().splitlines()[-1:] or imp.returncode}"
    return None


MISSING = gpu_stack_missing()


class GpuTriton(TritonServer):
    """The e2e tier's TritonServer (readiness, logs, orderly stop), started through
    scripts/launch_triton_gpu.py (MPI ranks for tensor/pipeline parallelism) on a trtllm repository."""

    def start(self, *, timeout: float = 600.0, echo: bool = False) -> "GpuTriton":
        cmd = [sys.executable, str(ROOT / "scripts/launch_triton_gpu.py"), "--model-repository",
               str(self.model_repository), "--tritonserver", TRITONSERVER, "--http-port", str(self.ports.http),
               "--grpc-port", str(self.ports.grpc), "--metrics-port", str(self.ports.metrics)]
        self._spawn(cmd, env=dict(os.environ), echo=echo)
        try:
            self.wait_ready(timeout=timeout)
        except BaseException:
            self.stop()
            raise
        return self
