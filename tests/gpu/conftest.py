"""GPU tier fixtures, built on the end-to-end tier's (tests/testkit.py): engines built with
build/build_engine.py, Triton through scripts/launch_triton_gpu.py, the real gateway."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import testkit
from gpu_stack import MISSING, TRITONSERVER, GpuTriton
from testkit import ROOT, free_port, model_dir

from trident.triton_launcher import TritonPorts


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    if MISSING is not None:
        pytest.skip(f"GPU stack not available: {MISSING}")
    if not (model_dir() / "config.json").is_file():
        pytest.fail(f"no HF checkpoint in {model_dir()}: run `make model` or set TRIDENT_MODEL_DIR")
    out = Path(os.environ.get("TRIDENT_GPU_BUILD_DIR") or tmp_path_factory.mktemp("gpu-build"))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "build/build_engine.py"), "--model-dir", str(model_dir()), "--out", str(out),
         "--max-batch-size", "16", "--max-seq-len", "1024", "--max-num-tokens", "4096", "--skip-existing"],
        capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, f"engine build failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-4000:]}"
    return out


@pytest.fixture(scope="session")
def tokenizer(built):
    """The tokenizer as the served models load it: from the build's compatibility view.

    Overrides tests/conftest.py's, which reads TRIDENT_MODEL_DIR: that checkpoint is written by
    transformers 5 ("tokenizer_class": "TokenizersBackend"), which the image's transformers 4.57.3
    cannot load; build_engine.py writes <out>/hf with the class it can (trident/trtllm/checkpoint.py).
    """
    from transformers import AutoTokenizer

    from trident.trtllm.plan import BuildLayout

    return AutoTokenizer.from_pretrained(str(BuildLayout.under(built).hf_dir))


@pytest.fixture(scope="session")
def triton(built, tmp_path_factory):
    if not Path(TRITONSERVER).is_file():
        pytest.skip(f"no tritonserver at {TRITONSERVER} (set TRIDENT_TRITONSERVER; the NGC image has it)")
    server = testkit.started(GpuTriton(
        model_repository=built / "model_repository", work_dir=tmp_path_factory.mktemp("triton"),
        ports=TritonPorts(http=free_port(), grpc=free_port(), metrics=free_port()),
        ready_models=("tensorrt_llm", "llm")))
    server.start(timeout=600)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def gateway(triton, tmp_path_factory):
    key = "gpu-test-" + os.urandom(6).hex()
    gw = testkit.start_gateway(triton.grpc_url, tmp_path_factory.mktemp("gateway"), api_key=key)
    yield gw, key
    gw.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    testkit.attach_logs(outcome.get_result())
