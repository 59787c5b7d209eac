"""The /generate contract on the real stack: finish reasons, stop sequences, UTF-8, seeds,
and a client disconnect that frees the engine."""
import time

import pytest

from e2e_helpers import engine_metrics, post, sse_events


def chat(tokenizer, text):
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)


def generate(client, **body):
    r = post(client, **body)
    assert r.status_code == 200, r.text
    return r.json()


def stream(client, **body):
    r = client.post(client.base_url + "/generate", json={**body, "stream": True}, stream=True, timeout=300)
    assert r.status_code == 200, r.text
    events = sse_events(r)
    assert events[-1][0] == "done", events[-3:]
    return "".join(d["text"] for e, d in events if e == "token"), events[-1][1], events


def test_finish_reason_length(client):
    body = generate(client, prompt="Once upon a time", max_new_tokens=5, temperature=0)
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 5


def test_finish_reason_eos_token(client, tokenizer):
    body = generate(client, prompt=chat(tokenizer, "Repeat exactly: 🎉🚀😀"), max_new_tokens=40,
                    temperature=0)
    assert body["choices"][0]["finish_reason"] == "eos_token"
    assert body["usage"]["completion_tokens"] < 40
    assert "<|im_end|>" not in body["choices"][0]["text"]


def token_boundary_stop(tokenizer, text):
    """A stop string that spans the boundary between two generated tokens."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    pieces = [tokenizer.decode(ids[:i]) for i in range(len(ids) + 1)]
    for i in range(2, len(ids) - 1):
        left, right = pieces[i], pieces[i + 1]
        if len(pieces[i]) - len(pieces[i - 1]) >= 2 and len(right) - len(left) >= 2 and left == text[:len(left)]:
            stop = text[len(left) - 2: len(left) + 2]
            if text.find(stop) == len(left) - 2:
                return stop, text[: len(left) - 2]
    pytest.fail(f"no token boundary found in {text!r}")


@pytest.mark.parametrize("streamed", [False, True])
def test_stop_sequence_spanning_tokens(client, tokenizer, streamed):
    base = {"prompt": "The capital of France is", "max_new_tokens": 24, "temperature": 0}
    full = generate(client, **base)["choices"][0]["text"]
    stop, expected = token_boundary_stop(tokenizer, full)
    req = {**base, "stop_sequences": ["never-generated-xyz", stop]}
    if streamed:
        text, done, _ = stream(client, **req)
        finish, usage = done["finish_reason"], done["usage"]
    else:
        body = generate(client, **req)
        text, finish, usage = body["choices"][0]["text"], body["choices"][0]["finish_reason"], body["usage"]
    assert (text, finish) == (expected, "stop_sequence"), stop
    assert stop not in text
    # The engine stopped at the match: it did not run on to max_new_tokens.
    assert usage["completion_tokens"] < 24


UNICODE_PROMPTS = ["Repeat exactly: Crème brûlée, café, naïve.", "Repeat exactly: 東京 北京 上海",
                   "Repeat exactly: 🎉🚀😀"]


@pytest.mark.parametrize("text", UNICODE_PROMPTS)
def test_unicode_streamed_and_not_are_byte_identical(client, tokenizer, text):
    req = {"prompt": chat(tokenizer, text), "max_new_tokens": 24, "temperature": 0}
    plain = generate(client, **req)["choices"][0]["text"]
    assert any(ord(c) > 127 for c in plain), plain
    assert "\ufffd" not in plain
    streamed, _, events = stream(client, **req)
    assert streamed.encode("utf-8") == plain.encode("utf-8")
    for _, data in events[:-1]:
        assert "\ufffd" not in data["text"]  # no chunk holds half a character


def test_spaces_and_newlines_survive_streaming(client):
    req = {"prompt": "Write a short poem:\n", "max_new_tokens": 30, "temperature": 0}
    plain = generate(client, **req)["choices"][0]["text"]
    assert " " in plain
    streamed, _, _ = stream(client, **req)
    assert streamed == plain


def test_same_seed_same_text(client):
    req = {"prompt": "Tell me a story about a dragon.", "max_new_tokens": 20, "temperature": 1.0,
           "top_p": 0.95, "seed": 1234}
    first = generate(client, **req)["choices"][0]["text"]
    assert generate(client, **req)["choices"][0]["text"] == first
    streamed, _, _ = stream(client, **req)
    assert streamed == first
    others = {generate(client, **{**req, "seed": s})["choices"][0]["text"] for s in (1, 2, 3)}
    assert others != {first}, "different seeds should not all give the same sample"


def test_disconnect_cancels_the_engine_request(client, triton):
    before = engine_metrics(triton)
    r = client.post(client.base_url + "/generate", stream=True, timeout=120,
                    # min_tokens: the model may not end the essay by itself before the cancel lands
                    # (greedy text varies with the batch it shares; a fresh-clone run saw it end early)
                    json={"prompt": "Write a very long essay about the sea.", "max_new_tokens": 1500,
                          "min_tokens": 1500, "temperature": 0, "stream": True})
    assert r.status_code == 200
    lines = r.iter_lines()
    tokens = 0
    for line in lines:
        if line.startswith(b"event: token"):
            tokens += 1
            if tokens == 5:
                break
    r.close()  # the client goes away mid-stream
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        now = engine_metrics(triton)
        if now["cancelled"] > before["cancelled"] and now["active"] == 0:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"engine did not cancel the request: before {before}, now {now}")
    settled = now["generated"]
    time.sleep(1.0)
    assert engine_metrics(triton)["generated"] == settled, "tokens still computed after cancel"
    assert settled - before["generated"] < 1500


def test_direct_grpc_and_the_gateway_share_the_defaults(client, triton):
    """One set of sampling defaults (trident.contract.SamplingParams): a direct gRPC request to
    llm with no sampling inputs and a /generate request with no sampling fields, with the same
    seed, sample the same text (temperature 1.0, top_p 1.0, top_k 0 on both paths)."""
    import grpc
    import numpy as np
    from tritonclient.grpc import service_pb2_grpc

    from gateway.triton_codec import FINAL_FLAG, build_infer_request

    prompt, seed = "Once upon a time, in a small village,", 4242
    via_gateway = generate(client, prompt=prompt, max_new_tokens=24, seed=seed)["choices"][0]["text"]
    inputs = {"text_input": np.array([[prompt.encode()]], dtype=object), "max_tokens": np.array([[24]], np.int32),
              "seed": np.array([[seed]], np.uint64)}
    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(triton.grpc_url))
    text = ""
    for response in stub.ModelStreamInfer(iter((build_infer_request("llm", inputs),)), timeout=120):
        assert not response.error_message, response.error_message
        infer = response.infer_response
        for out, raw in zip(infer.outputs, infer.raw_output_contents):
            if out.name == "text_output" and raw:
                text += raw[4:].decode()
        if infer.parameters[FINAL_FLAG].bool_param:
            break
    assert text == via_gateway
    greedy = generate(client, prompt=prompt, max_new_tokens=24, temperature=0)["choices"][0]["text"]
    assert text != greedy  # the shared default samples; it is not greedy decoding


def test_a_streamed_requests_last_token_comes_in_its_final_response(client, triton):
    """Direct gRPC to llm, streaming: every token but the last in a response of its own, the last
    one in the final response (with finish_reason), as the engine sends it; no empty final
    response after it. The texts add up to the gateway's answer."""
    import grpc
    import numpy as np
    from tritonclient.grpc import service_pb2_grpc

    from gateway.triton_codec import FINAL_FLAG, build_infer_request

    prompt, tokens = "1, 2, 3, 4, 5, 6,", 4
    plain = generate(client, prompt=prompt, max_new_tokens=tokens, temperature=0)["choices"][0]["text"]
    inputs = {"text_input": np.array([[prompt.encode()]], dtype=object), "max_tokens": np.array([[tokens]], np.int32),
              "temperature": np.array([[0.0]], np.float32), "stream": np.array([[True]])}
    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(triton.grpc_url))
    responses = []  # (text, finish_reason or None, final flag)
    for response in stub.ModelStreamInfer(iter((build_infer_request("llm", inputs),)), timeout=120):
        assert not response.error_message, response.error_message
        infer = response.infer_response
        raw = dict(zip((o.name for o in infer.outputs), infer.raw_output_contents))
        text = raw["text_output"][4:].decode() if raw.get("text_output") else ""
        reason = raw["finish_reason"][4:].decode() if raw.get("finish_reason") else None
        responses.append((text, reason, infer.parameters[FINAL_FLAG].bool_param))
        if responses[-1][2]:
            break
    assert [final for _, _, final in responses] == [False] * (tokens - 1) + [True], responses
    assert all(text for text, _, _ in responses), responses  # the final one carries the last token
    assert responses[-1][1] == "length" and all(reason is None for _, reason, _ in responses[:-1])
    assert "".join(text for text, _, _ in responses) == plain
