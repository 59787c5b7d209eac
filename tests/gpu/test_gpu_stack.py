"""The GPU stack end to end: build engines, serve them with Triton, generate, batch in flight.

Runs only where ``nvidia-smi`` works and ``tensorrt_llm`` imports (the image of Dockerfile.triton
with the GPUs passed in, see docs/gpu.md); skipped elsewhere, with the reason. The build goes
through build/build_engine.py and Triton through scripts/launch_triton_gpu.py, the same entry
points the container uses. TRIDENT_GPU_BUILD_DIR keeps engines between runs (--skip-existing).
"""
import functools
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from trident.trtllm import TRTLLM_VERSION  # noqa: E402
from trident.trtllm.checks import check_engine_version, engine_world_size, tensorrt_llm_version  # noqa: E402
from trident.trtllm.plan import BuildLayout  # noqa: E402

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
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(MISSING is not None, reason=f"GPU stack not available: {MISSING}"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_dir() -> Path:
    return Path(os.environ.get("TRIDENT_MODEL_DIR", ROOT / ".cache/models/smollm2-135m-instruct"))


@pytest.fixture(scope="session")
def built(tmp_path_factory):
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

    return AutoTokenizer.from_pretrained(str(BuildLayout.under(built).hf_dir))


@pytest.fixture(scope="session")
def triton(built, tmp_path_factory):
    if not Path(TRITONSERVER).is_file():
        pytest.skip(f"no tritonserver at {TRITONSERVER} (set TRIDENT_TRITONSERVER; the NGC image has it)")
    ports = {"http": free_port(), "grpc": free_port(), "metrics": free_port()}
    log_path = tmp_path_factory.mktemp("triton") / "triton.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts/launch_triton_gpu.py"), "--model-repository",
         str(built / "model_repository"), "--tritonserver", TRITONSERVER, "--http-port", str(ports["http"]),
         "--grpc-port", str(ports["grpc"]), "--metrics-port", str(ports["metrics"])],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{ports['http']}"

    def tail():
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-80:])

    try:
        deadline = time.monotonic() + 600
        while not all(ready(f"{base}/v2/models/{m}/ready") for m in ("tensorrt_llm", "llm")):
            if proc.poll() is not None:
                pytest.fail(f"Triton exited with {proc.returncode}:\n{tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"Triton not ready after 600 s:\n{tail()}")
            time.sleep(1)
        yield {"grpc": f"127.0.0.1:{ports['grpc']}", "http": base, "metrics": ports["metrics"], "tail": tail}
    finally:
        try:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass
        log.close()


def ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def generate(url: str, prompt: str, *, max_tokens: int, temperature: float = 0.0, stream: bool = False,
             stop_words=(), seed=None, timeout: float = 120.0) -> dict:
    """One request to the llm model over a gRPC stream; the text and the final statistics."""
    import tritonclient.grpc as grpcclient

    def tensor(name, array, dtype):
        t = grpcclient.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        return t

    inputs = [tensor("text_input", np.array([[prompt.encode()]], dtype=object), "BYTES"),
              tensor("max_tokens", np.array([[max_tokens]], dtype=np.int32), "INT32"),
              tensor("temperature", np.array([[temperature]], dtype=np.float32), "FP32"),
              tensor("stream", np.array([[stream]], dtype=np.bool_), "BOOL")]
    if stop_words:
        inputs.append(tensor("stop_words", np.array([[w.encode() for w in stop_words]], dtype=object), "BYTES"))
    if seed is not None:
        inputs.append(tensor("seed", np.array([[seed]], dtype=np.uint64), "UINT64"))
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        client.async_stream_infer("llm", inputs, enable_empty_final_response=True)
        chunks, out = [], {}
        while True:
            result, error = results.get(timeout=timeout)
            if error is not None:
                raise RuntimeError(str(error))
            text = result.as_numpy("text_output")
            if text is not None:
                chunks.append(text.reshape(-1)[0].decode("utf-8"))
            for name in ("finish_reason", "prompt_tokens", "completion_tokens"):
                value = result.as_numpy(name)
                if value is not None:
                    item = value.reshape(-1)[0]
                    out[name] = item.decode() if isinstance(item, bytes) else int(item)
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
    finally:
        client.stop_stream()
        client.close()
    return {"text": "".join(chunks), "chunks": chunks, **out}


def test_engines_were_built_by_the_pinned_tensorrt_llm(built):
    engines = built / "engines"
    assert json.loads((engines / "config.json").read_text())["version"] == TRTLLM_VERSION
    assert engine_world_size(engines) == 1 and (engines / "rank0.engine").stat().st_size > 0
    check_engine_version(engine_dir=engines, runtime_version=tensorrt_llm_version(python=sys.executable))
    stamp = json.loads((built / "build.json").read_text())
    assert stamp["tensorrt_llm"] == TRTLLM_VERSION and stamp["engine"]["max_seq_len"] == 1024


def test_greedy_generation_through_triton(triton, tokenizer):
    out = generate(triton["grpc"], PARIS, max_tokens=8)
    assert "Paris" in out["text"], out
    assert out["finish_reason"] in {"length", "eos_token"}
    assert out["prompt_tokens"] == len(tokenizer(PARIS).input_ids)
    assert 1 <= out["completion_tokens"] <= 8
    assert generate(triton["grpc"], PARIS, max_tokens=8)["text"] == out["text"]  # greedy is deterministic


def test_streaming_chunks_add_up_to_the_non_streaming_text(triton):
    plain = generate(triton["grpc"], PARIS, max_tokens=24)
    streamed = generate(triton["grpc"], PARIS, max_tokens=24, stream=True)
    assert len(streamed["chunks"]) > 1
    assert streamed["text"] == plain["text"]
    assert streamed["finish_reason"] == plain["finish_reason"]


def test_stop_sequence_ends_the_engine_request(triton):
    """The llm model sends the backend a stop request (same request id); the stream must end."""
    full = generate(triton["grpc"], "Once upon a time", max_tokens=48)
    words = full["text"].split()
    assert len(words) >= 6, full
    stop = words[len(words) // 2]
    start = time.monotonic()
    cut = generate(triton["grpc"], "Once upon a time", max_tokens=48, stop_words=[stop], timeout=60)
    assert cut["finish_reason"] == "stop_sequence", cut
    assert cut["text"] == full["text"][:full["text"].index(stop)]
    assert cut["completion_tokens"] < full["completion_tokens"]
    assert time.monotonic() - start < 30


def test_inflight_batching_serves_concurrent_requests_together(triton):
    prompt, n = "Write a long story about a lighthouse keeper.", 12
    generate(triton["grpc"], prompt, max_tokens=8)  # warm up
    start = time.monotonic()
    single = generate(triton["grpc"], prompt, max_tokens=128)
    one = time.monotonic() - start
    start = time.monotonic()
    with ThreadPoolExecutor(n) as pool:
        outs = list(pool.map(lambda _: generate(triton["grpc"], prompt, max_tokens=128), range(n)))
    together = time.monotonic() - start
    assert all(o["finish_reason"] in FINISH_REASONS and o["completion_tokens"] >= 1 for o in outs)
    assert sum(o["completion_tokens"] for o in outs) >= n * min(single["completion_tokens"], 16)
    # One after another would take n x one; batched in flight they share engine steps.
    assert together < 0.4 * n * one, f"{n} concurrent requests took {together:.2f}s, one took {one:.2f}s"


def test_seeded_sampling_is_reproducible(triton):
    a = generate(triton["grpc"], PARIS, max_tokens=16, temperature=1.0, seed=1234)
    b = generate(triton["grpc"], PARIS, max_tokens=16, temperature=1.0, seed=1234)
    assert a["text"] == b["text"]


@pytest.fixture(scope="session")
def gateway(triton, tmp_path_factory):
    pytest.importorskip("flask", reason="gateway dependencies not installed (pip install -e .)")
    pytest.importorskip("gunicorn", reason="gateway dependencies not installed (pip install -e .)")
    from trident.gateway_process import GatewayProcess

    key = "gpu-test-" + os.urandom(6).hex()
    work = tmp_path_factory.mktemp("gateway")
    gw = GatewayProcess(port=free_port(), triton_grpc_url=triton["grpc"], log_path=work / "gateway.log",
                        extra_env={"TRIDENT_API_KEY": key})
    gw.start(timeout=60)
    yield gw, key
    gw.stop()


def test_gateway_generates_on_the_gpu_engine(gateway):
    import requests

    gw, key = gateway
    headers = {"Authorization": f"Bearer {key}"}
    body = {"prompt": PARIS, "max_new_tokens": 8, "temperature": 0}
    r = requests.post(f"{gw.url}/generate", json=body, headers=headers, timeout=120)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert "Paris" in choice["text"] and choice["finish_reason"] in FINISH_REASONS
    r = requests.post(f"{gw.url}/generate", json={**body, "stream": True}, headers=headers, timeout=120, stream=True)
    assert r.status_code == 200
    texts = [json.loads(line[5:]).get("text", "") for line in r.iter_lines(decode_unicode=True)
             if line.startswith("data:") and '"text"' in line]
    assert "".join(texts) == choice["text"]
