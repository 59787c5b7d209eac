"""The first slice end to end: gateway -> Triton gRPC -> llm -> CPU engine, and back."""
import concurrent.futures as cf

import numpy as np

from e2e_helpers import post, sse_events

PARIS = {"prompt": "The capital of France is", "max_new_tokens": 8, "temperature": 0}


def test_generate_returns_the_documented_shape(client, tokenizer):
    r = post(client, **PARIS)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"id", "object", "created", "model", "choices", "usage"}
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["model"] == "smollm2-135m-instruct"
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["logprobs"] is None
    assert "Paris" in choice["text"]
    assert not choice["text"].startswith(PARIS["prompt"])
    assert choice["finish_reason"] in {"length", "stop_sequence", "eos_token"}
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(tokenizer(PARIS["prompt"]).input_ids)
    assert 1 <= usage["completion_tokens"] <= 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    if choice["finish_reason"] == "length":
        assert usage["completion_tokens"] == 8
    assert r.headers.get("X-Request-ID")


def test_greedy_text_matches_transformers(client, checkpoint_dir, tokenizer):
    """The served text is what HF transformers' own greedy decoding gives (same checkpoint)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(checkpoint_dir), dtype=torch.float32)
    ids = tokenizer(PARIS["prompt"], return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    expected = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    r = post(client, **{**PARIS, "max_new_tokens": 4})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == expected


def test_streaming_equals_non_streaming(client):
    plain = post(client, **PARIS).json()
    r = client.post(client.base_url + "/generate", json={**PARIS, "stream": True}, stream=True, timeout=120)
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(r)
    names = [e for e, _ in events]
    assert names[-1] == "done" and set(names[:-1]) == {"token"}, names
    text = "".join(d["text"] for e, d in events if e == "token")
    assert text == plain["choices"][0]["text"]
    done = events[-1][1]
    assert done["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert done["usage"] == plain["usage"]


PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "List three primary colors:",
    "What is 2 + 2?",
    "Name a famous physicist.",
    "Translate 'good morning' to Spanish:",
    "The largest planet in the solar system is",
    "Complete the sentence: The quick brown fox",
]


def test_sixteen_concurrent_streams_through_one_worker(client):
    """16 SSE streams at once through a single gevent worker all complete, each correct."""
    requests_ = [{"prompt": PROMPTS[i % len(PROMPTS)], "max_new_tokens": 12, "temperature": 0}
                 for i in range(16)]
    expected = {}
    for body in requests_[:len(PROMPTS)]:
        r = post(client, **body)
        assert r.status_code == 200, r.text
        expected[body["prompt"]] = r.json()["choices"][0]["text"]

    def stream(body):
        r = client.post(client.base_url + "/generate", json={**body, "stream": True}, stream=True,
                        timeout=300)
        assert r.status_code == 200, r.text
        return body["prompt"], sse_events(r)

    with cf.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(stream, requests_))
    for prompt, events in results:
        assert events[-1][0] == "done", events[-3:]
        text = "".join(d["text"] for e, d in events if e == "token")
        assert text == expected[prompt], prompt


def test_missing_key_is_401(gateway):
    import requests

    r = requests.post(gateway.url + "/generate", json=PARIS, timeout=30)
    assert r.status_code == 401
    assert r.headers.get("WWW-Authenticate", "").startswith("Bearer")
    assert r.json()["error"]["type"] == "authentication_error"


def test_direct_grpc_ensemble_streams_nvidia_tensor_names(triton):
    """Power users: tritonclient code written for NVIDIA's ensemble works unchanged."""
    import queue

    import tritonclient.grpc as grpcclient

    def tensor(name, value, dtype):
        arr = np.array([[value]], dtype=dtype)
        t = grpcclient.InferInput(name, arr.shape, "BYTES" if dtype == object else
                                  {np.int32: "INT32", np.float32: "FP32", np.bool_: "BOOL"}[dtype])
        t.set_data_from_numpy(arr)
        return t

    inputs = [
        tensor("text_input", "The capital of France is".encode(), object),
        tensor("max_tokens", 8, np.int32),
        tensor("temperature", 0.0, np.float32),
        tensor("stream", True, np.bool_),
    ]
    results: "queue.Queue" = queue.Queue()
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    client.async_stream_infer("ensemble", inputs, request_id="1",
                              enable_empty_final_response=True)
    pieces, final = [], None
    while True:
        result, error = results.get(timeout=120)
        assert error is None, error
        response = result.get_response()
        out = result.as_numpy("text_output")
        if out is not None:
            pieces.append(out.reshape(-1)[0].decode())
        if result.as_numpy("finish_reason") is not None:
            final = result.as_numpy("finish_reason").reshape(-1)[0].decode()
        if response.parameters["triton_final_response"].bool_param:
            break
    client.stop_stream()
    client.close()
    assert "Paris" in "".join(pieces)
    assert final in {"length", "eos_token"}
