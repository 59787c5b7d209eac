"""The GPU stack end to end: build engines, serve them with Triton, generate, batch in flight.

Runs only where ``nvidia-smi`` works and ``tensorrt_llm`` imports (the image of Dockerfile.triton
with the GPUs passed in, see docs/gpu.md); skipped elsewhere, with the reason. The build goes
through build/build_engine.py and Triton through scripts/launch_triton_gpu.py, the same entry
points the container uses; the fixtures (conftest.py) are the end-to-end tier's
(tests/testkit.py). TRIDENT_GPU_BUILD_DIR keeps engines between runs (--skip-existing).
"""
import json
import queue
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from gpu_stack import FINISH_REASONS, MISSING, PARIS

from trident.trtllm import TRTLLM_VERSION
from trident.trtllm.checks import check_engine_version, engine_world_size, tensorrt_llm_version

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(MISSING is not None, reason=f"GPU stack not available: {MISSING}"),
]


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
    out = generate(triton.grpc_url, PARIS, max_tokens=8)
    assert "Paris" in out["text"], out
    assert out["finish_reason"] in {"length", "eos_token"}
    assert out["prompt_tokens"] == len(tokenizer(PARIS).input_ids)
    assert 1 <= out["completion_tokens"] <= 8
    assert generate(triton.grpc_url, PARIS, max_tokens=8)["text"] == out["text"]  # greedy is deterministic


def test_streaming_chunks_add_up_to_the_non_streaming_text(triton):
    plain = generate(triton.grpc_url, PARIS, max_tokens=24)
    streamed = generate(triton.grpc_url, PARIS, max_tokens=24, stream=True)
    assert len(streamed["chunks"]) > 1
    assert streamed["text"] == plain["text"]
    assert streamed["finish_reason"] == plain["finish_reason"]


def test_stop_sequence_ends_the_engine_request(triton):
    """The llm model sends the backend a stop request (same request id); the stream must end."""
    full = generate(triton.grpc_url, "Once upon a time", max_tokens=48)
    words = full["text"].split()
    assert len(words) >= 6, full
    stop = words[len(words) // 2]
    start = time.monotonic()
    cut = generate(triton.grpc_url, "Once upon a time", max_tokens=48, stop_words=[stop], timeout=60)
    assert cut["finish_reason"] == "stop_sequence", cut
    assert cut["text"] == full["text"][:full["text"].index(stop)]
    assert cut["completion_tokens"] < full["completion_tokens"]
    assert time.monotonic() - start < 30


def test_inflight_batching_serves_concurrent_requests_together(triton):
    prompt, n = "Write a long story about a lighthouse keeper.", 12
    generate(triton.grpc_url, prompt, max_tokens=8)  # warm up
    start = time.monotonic()
    single = generate(triton.grpc_url, prompt, max_tokens=128)
    one = time.monotonic() - start
    start = time.monotonic()
    with ThreadPoolExecutor(n) as pool:
        outs = list(pool.map(lambda _: generate(triton.grpc_url, prompt, max_tokens=128), range(n)))
    together = time.monotonic() - start
    assert all(o["finish_reason"] in FINISH_REASONS and o["completion_tokens"] >= 1 for o in outs)
    assert sum(o["completion_tokens"] for o in outs) >= n * min(single["completion_tokens"], 16)
    # One after another would take n x one; batched in flight they share engine steps.
    assert together < 0.4 * n * one, f"{n} concurrent requests took {together:.2f}s, one took {one:.2f}s"


def test_seeded_sampling_is_reproducible(triton):
    a = generate(triton.grpc_url, PARIS, max_tokens=16, temperature=1.0, seed=1234)
    b = generate(triton.grpc_url, PARIS, max_tokens=16, temperature=1.0, seed=1234)
    assert a["text"] == b["text"]


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
