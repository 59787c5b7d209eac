"""The first slice end to end: gateway -> Triton gRPC -> llm -> CPU engine, and back."""
from __future__ import annotations

import concurrent.futures as cf

import numpy as np
import pytest

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


def _nvidia_client_request(url: str, model: str, inputs: dict) -> tuple[list, str | None]:
    """One request as NVIDIA's tritonclient examples send it ([1, 1] tensors, streaming API):
    every response's outputs, or the error."""
    import queue

    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    results: "queue.Queue" = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    tensors = []
    for name, arr in inputs.items():
        tensor = grpcclient.InferInput(name, arr.shape, np_to_triton_dtype(arr.dtype))
        tensor.set_data_from_numpy(arr)
        tensors.append(tensor)
    client.async_stream_infer(model, tensors, request_id="1", enable_empty_final_response=True)
    outputs, error = [], None
    while True:
        result, error = results.get(timeout=120)
        if error is not None:
            break
        outputs.append({o.name: result.as_numpy(o.name) for o in result.get_response().outputs})
        if result.get_response().parameters["triton_final_response"].bool_param:
            break
    client.stop_stream()
    client.close()
    return outputs, None if error is None else str(error)


@pytest.mark.parametrize("model", ["ensemble", "llm"])
def test_nvidia_clients_beam_width_and_exclude_input_in_output(triton, model):
    """NVIDIA's end_to_end_grpc_client.py sends beam_width (1) and exclude_input_in_output (false
    unless asked) on every request; both were refused as unexpected inputs. With false, a
    non-streaming text_output is the prompt and then the completion (NVIDIA's ensemble does the
    same); a stream never repeats the prompt; beam search is refused naming beam_width."""
    prompt = "The capital of France is"

    def text(stream: bool, exclude: bool, beam_width: int = 1) -> tuple[str, str | None]:
        outputs, error = _nvidia_client_request(triton.grpc_url, model, {
            "text_input": np.array([[prompt.encode()]], dtype=object),
            "max_tokens": np.array([[8]], dtype=np.int32),
            "stream": np.array([[stream]]),
            "beam_width": np.array([[beam_width]], dtype=np.int32),
            "temperature": np.array([[0.0]], dtype=np.float32),
            "exclude_input_in_output": np.array([[exclude]]),
        })
        return "".join(o["text_output"].reshape(-1)[0].decode() for o in outputs if o.get("text_output") is not None), error

    completion, error = text(stream=False, exclude=True)
    assert error is None and "Paris" in completion and not completion.startswith(prompt), (completion, error)
    assert text(stream=False, exclude=False) == (prompt + completion, None)
    assert text(stream=True, exclude=False) == (completion, None)
    _, error = text(stream=False, exclude=True, beam_width=2)
    assert error is not None and "[invalid_request_error:beam_width] beam_width must be 1" in error, error


@pytest.mark.parametrize("model, stream", [("ensemble", True), ("ensemble", False), ("llm", True)])
def test_triton_openai_frontends_request_with_nvidia_token_counts(triton, tokenizer, model, stream):
    """Triton's OpenAI-compatible frontend sends, with every request to a TensorRT-LLM model,
    return_num_input_tokens and return_num_output_tokens (its usage comes from num_input_tokens
    and the num_output_tokens of each response, added up); both were refused as unexpected
    inputs. Now each text response carries the prompt's tokens and the tokens it adds, and they
    add up to completion_tokens; the text is the one without them."""
    prompt = "The capital of France is"
    base = {"text_input": np.array([[prompt.encode()]], dtype=object), "stream": np.array([[stream]]),
            "max_tokens": np.array([[12]], dtype=np.int32), "stop_words": np.array([[b"\n"]], dtype=object),
            "temperature": np.array([[0.0]], dtype=np.float32), "exclude_input_in_output": np.array([[True]])}
    flags = {"return_num_input_tokens": np.array([[True]]), "return_num_output_tokens": np.array([[True]])}
    outputs, error = _nvidia_client_request(triton.grpc_url, model, {**base, **flags})
    assert error is None, error
    texts = [o for o in outputs if o.get("text_output") is not None]
    assert texts and all(o.get("num_input_tokens") is not None and o.get("num_output_tokens") is not None for o in texts)
    assert {int(o["num_input_tokens"].reshape(-1)[0]) for o in texts} == {len(tokenizer(prompt).input_ids)}
    [final] = [o for o in outputs if o.get("completion_tokens") is not None]
    counted = [int(o["num_output_tokens"].reshape(-1)[0]) for o in texts]
    assert sum(counted) == int(final["completion_tokens"].reshape(-1)[0]) >= 1, counted
    if stream:
        assert len(counted) > 1 and all(c >= 0 for c in counted)
    plain, error = _nvidia_client_request(triton.grpc_url, model, base)
    assert error is None and all(o.get("num_output_tokens") is None for o in plain)
    text = lambda outs: "".join(o["text_output"].reshape(-1)[0].decode() for o in outs if o.get("text_output") is not None)
    assert text(outputs) == text(plain) and "Paris" in text(plain)


@pytest.mark.parametrize("model", ["ensemble", "llm"])
def test_a_prompt_of_token_ids_through_the_text_models(triton, tokenizer, model):
    """input_ids (a trident extension: /v1/completions' token-id prompts) with an empty
    text_input: greedy, the same completion as the text; not both; exclude_input_in_output false
    puts the ids' text in front."""
    prompt = "The capital of France is"

    def request(exclude: bool, **inputs) -> tuple[str, str | None]:
        outputs, error = _nvidia_client_request(triton.grpc_url, model, {
            "max_tokens": np.array([[8]], dtype=np.int32), "temperature": np.array([[0.0]], dtype=np.float32),
            "exclude_input_in_output": np.array([[exclude]]), **inputs})
        return "".join(o["text_output"].reshape(-1)[0].decode() for o in outputs if o.get("text_output") is not None), error

    text = np.array([[prompt.encode()]], dtype=object)
    ids = np.array([tokenizer(prompt).input_ids], dtype=np.int32)
    completion, error = request(True, text_input=text)
    assert error is None and "Paris" in completion, (completion, error)
    assert request(True, text_input=np.array([[b""]], dtype=object), input_ids=ids) == (completion, None)
    assert request(False, text_input=np.array([[b""]], dtype=object), input_ids=ids) == (prompt + completion, None)
    _, error = request(True, text_input=text, input_ids=ids)
    assert error is not None and "[invalid_request_error:prompt] give the prompt as text_input or as input_ids" in error


def test_nvidia_engine_clients_beam_width_and_exclude_input_in_output(triton):
    """The engine model takes what NVIDIA's inflight_batcher_llm_client.py sends (beam_width on
    every request), as TensorRT-LLM's backend does: exclude_input_in_output false puts the
    prompt's ids in front of a non-streaming output_ids (absent: the model's parameter, true)."""
    ids = [504, 3575, 282, 4649, 314]

    def output_ids(**extra) -> tuple[list[int], str | None]:
        inputs = {"input_ids": np.array([ids], dtype=np.int32), "input_lengths": np.array([[len(ids)]], dtype=np.int32),
                  "request_output_len": np.array([[4]], dtype=np.int32), "end_id": np.array([[2]], dtype=np.int32),
                  "pad_id": np.array([[2]], dtype=np.int32), "beam_width": np.array([[1]], dtype=np.int32),
                  "runtime_top_k": np.array([[1]], dtype=np.int32), "streaming": np.array([[False]]), **extra}
        outputs, error = _nvidia_client_request(triton.grpc_url, "tensorrt_llm", inputs)
        return [t for o in outputs if o.get("output_ids") is not None for t in o["output_ids"].reshape(-1).tolist()], error

    generated, error = output_ids()
    assert error is None and len(generated) == 4, (generated, error)
    assert output_ids(exclude_input_in_output=np.array([[True]])) == (generated, None)
    assert output_ids(exclude_input_in_output=np.array([[False]])) == (ids + generated, None)
    assert output_ids(exclude_input_in_output=np.array([[False]]), streaming=np.array([[True]])) == (generated, None)
    _, error = output_ids(beam_width=np.array([[3]], dtype=np.int32))
    assert error is not None and "beam_width must be 1" in error, error
