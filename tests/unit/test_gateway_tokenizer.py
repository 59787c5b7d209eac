"""POST /tokenize and /detokenize (gateway.tokenizer_routes), in process with the fake backend,
whose tokenizer gives each character its code (and 1 for the special token)."""

from __future__ import annotations

import jsonschema_rs
import pytest
from gateway_fakes import FakeBackend
from openai_fixtures import AUTH, KEY, MODEL, SMOL_SYSTEM, make_openai_app
from testkit import assert_error

from gateway import create_app
from gateway.auth import hash_key
from gateway.errors import unavailable
from trident.contract import ModelLimits


@pytest.fixture
def app(tmp_path):
    return make_openai_app(tmp_path, backend=FakeBackend(model_limits=ModelLimits(max_context=64, vocab_size=300,
                                                                                   max_prompt_chars=200)))


def test_tokenize_a_prompt_answers_as_vllm_does(app):
    app, backend = app
    client = app.test_client()
    body = client.post("/tokenize", json={"prompt": "hi"}, headers=AUTH).get_json()
    assert body == {"count": 3, "max_model_len": 64, "tokens": [1, 104, 105]}
    body = client.post("/tokenize", json={"model": MODEL, "prompt": "hi", "add_special_tokens": False},
                       headers=AUTH).get_json()
    assert body == {"count": 2, "max_model_len": 64, "tokens": [104, 105]}
    assert backend.tokenizer_calls == [("tokenize", MODEL, "hi", True), ("tokenize", MODEL, "hi", False)]
    assert backend.calls == []  # no generation
    spec = client.get("/openapi.json").get_json()
    for body in ({"prompt": "hi", "return_token_strs": True},
                 {"messages": [{"role": "user", "content": "hi"}], "return_token_strs": True}):
        answer = client.post("/tokenize", json=body, headers=AUTH).get_json()  # vLLM's return_token_strs
        assert len(answer["token_strs"]) == len(answer["tokens"]) == answer["count"]
        jsonschema_rs.Draft202012Validator({**spec, "$ref": "#/components/schemas/TokenizeResponse"}).validate(answer)
    assert answer["token_strs"][-3:] == list("nt\n")  # the rendered conversation's last pieces
    assert client.post("/tokenize", json={"prompt": "hi", "return_token_strs": True},
                       headers=AUTH).get_json()["token_strs"] == ["<s>", "h", "i"]
    no = client.post("/tokenize", json={"prompt": "hi", "return_token_strs": False}, headers=AUTH).get_json()
    assert "token_strs" not in no


def test_tokenize_messages_renders_them_as_chat_completions_does(app):
    """The same prompt /v1/chat/completions sends; no special token unless asked (vLLM's
    defaults for messages)."""
    app, backend = app
    client = app.test_client()
    messages = [{"role": "user", "content": "hi"}]
    assert client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 4}, headers=AUTH).status_code == 200
    chat_prompt = backend.last_params.prompt
    body = client.post("/tokenize", json={"messages": messages}, headers=AUTH).get_json()
    assert body["tokens"] == [ord(c) for c in chat_prompt] and body["count"] == len(chat_prompt)
    assert chat_prompt == SMOL_SYSTEM + "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    client.post("/tokenize", json={"messages": messages, "add_generation_prompt": False, "add_special_tokens": True},
                headers=AUTH)
    assert backend.tokenizer_calls[-1] == ("tokenize", MODEL, SMOL_SYSTEM + "<|im_start|>user\nhi<|im_end|>\n", True)
    prefill = [*messages, {"role": "assistant", "content": "Hel"}]
    assert client.post("/v1/chat/completions", json={"messages": prefill, "max_tokens": 4, "continue_final_message": True},
                       headers=AUTH).status_code == 200
    assert backend.last_params.prompt.endswith("<|im_start|>assistant\nHel")
    client.post("/tokenize", json={"messages": prefill, "continue_final_message": True}, headers=AUTH)
    assert backend.tokenizer_calls[-1] == ("tokenize", MODEL, backend.last_params.prompt, False)


def test_null_means_not_given(app):
    """As everywhere: a null field is its default (found by the live fuzz: a null prompt was a
    500)."""
    app, backend = app
    client = app.test_client()
    messages = [{"role": "user", "content": "hi"}]
    nulls = {"add_special_tokens": None, "model": None}
    assert client.post("/tokenize", json={"prompt": "hi", "messages": None, **nulls}, headers=AUTH).status_code == 200
    assert client.post("/tokenize", json={"prompt": None, "messages": messages, "add_generation_prompt": None,
                                          "tools": None, **nulls}, headers=AUTH).status_code == 200
    assert backend.tokenizer_calls == [
        ("tokenize", MODEL, "hi", True),
        ("tokenize", MODEL, SMOL_SYSTEM + "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", False)]


def test_detokenize_answers_the_text(app):
    app, backend = app
    body = app.test_client().post("/detokenize", json={"tokens": [1, 104, 105, 299]}, headers=AUTH).get_json()
    assert body == {"prompt": "hi<299>"}
    assert backend.tokenizer_calls == [("detokenize", MODEL, [1, 104, 105, 299])]


@pytest.mark.parametrize("path, body, param, message", [
    ("/tokenize", {}, "prompt", "give either prompt or messages"),
    ("/tokenize", {"prompt": None}, "prompt", "give either prompt or messages"),
    ("/tokenize", {"prompt": ""}, "prompt", "prompt must be a non-empty string"),
    ("/tokenize", {"prompt": None, "messages": None}, "prompt", "give either prompt or messages"),
    ("/tokenize", {"prompt": "a", "messages": None, "add_generation_prompt": False}, "add_generation_prompt",
     "add_generation_prompt goes with messages"),
    ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "prompt",
     "give either prompt or messages"),
    ("/tokenize", {"prompt": "a", "add_generation_prompt": True}, "add_generation_prompt",
     "add_generation_prompt goes with messages"),
    ("/tokenize", {"prompt": "a", "continue_final_message": True}, "continue_final_message",
     "continue_final_message goes with messages"),
    ("/tokenize", {"prompt": "a", "chat_template_kwargs": {}}, "chat_template_kwargs",
     "chat_template_kwargs goes with messages"),
    ("/tokenize", {"messages": [{"role": "assistant", "content": "a"}], "continue_final_message": True,
                   "add_generation_prompt": True}, "continue_final_message",
     "continue_final_message and add_generation_prompt cannot both be true: the final message is continued, not "
     "answered (leave add_generation_prompt out)"),
    ("/tokenize", {"messages": [{"role": "user", "content": "a"}], "chat_template_kwargs": {"bos_token": "x"}},
     "chat_template_kwargs", "chat_template_kwargs.bos_token is set by the gateway and cannot be given here"),
    ("/tokenize", {"prompt": 5}, "prompt", "prompt must be a string, got integer 5"),
    ("/tokenize", {"prompt": "x" * 201}, "prompt", "prompt has 201 characters, more than the 200 that can fit "
     "the model's context (checked before tokenizing); shorten it"),
    ("/tokenize", {"prompt": "a", "add_special_tokens": "yes"}, "add_special_tokens",
     "add_special_tokens must be a boolean (true or false), got string \"yes\""),
    ("/tokenize", {"prompt": "a", "echo": True}, "echo", "Unrecognized request argument supplied: echo"),
    ("/tokenize", {"prompt": "a", "return_token_strs": 1}, "return_token_strs",
     "return_token_strs must be a boolean (true or false), got integer 1"),
    ("/detokenize", {}, "tokens", "tokens is required"),
    ("/detokenize", {"tokens": "abc"}, "tokens", "tokens must be an array of token ids, got string \"abc\""),
    ("/detokenize", {"tokens": [3, -1]}, "tokens",
     "tokens[1] must be a token id, an integer from 0 to 2147483647, got integer -1"),
    ("/detokenize", {"tokens": [3, 300]}, "tokens",
     "tokens: token id 300 (at 1) is not a token of the model (ids are below 300)"),
    ("/detokenize", {"tokens": [3] * 65}, "tokens", "tokens holds 65 ids, more than the model's context of 64"),
])
def test_bad_requests_are_400_and_reach_no_tokenizer(app, path, body, param, message):
    app, backend = app
    response = app.test_client().post(path, json=body, headers=AUTH)
    assert_error(response, 400, "invalid_request_error", param, message)
    assert backend.tokenizer_calls == []


@pytest.mark.parametrize("path, body", [("/tokenize", {"prompt": "a"}), ("/detokenize", {"tokens": [3]})])
def test_keys_models_and_rate_limits_apply(tmp_path, path, body):
    keys = [{"name": "other", "sha256": hash_key("other-key"), "models": ["another-model"]},
            {"name": "slow", "sha256": hash_key("slow-key"), "models": ["*"], "rate_limit": "2/minute"}]
    app, backend = make_openai_app(tmp_path, {"API_KEYS": keys})
    client = app.test_client()
    assert client.post(path, json=body).status_code == 401
    assert_error(client.post(path, json={**body, "model": "gpt-4"}, headers=AUTH), 404, "not_found_error", "model",
                 "The model 'gpt-4' does not exist or is not served here (served: smollm2-135m-instruct)")
    assert_error(client.post(path, json=body, headers={"Authorization": "Bearer other-key"}), 403,
                 "permission_error", "model", f"API key 'other' may not use the model '{MODEL}'")
    slow = {"Authorization": "Bearer slow-key"}
    assert client.post(path, json=body, headers=slow).status_code == 200
    assert client.post("/v1/completions", json={"prompt": "a", "max_tokens": 2}, headers=slow).status_code == 200
    assert client.post(path, json=body, headers=slow).status_code == 429  # one budget with generation
    assert len(backend.tokenizer_calls) == 1


def test_messages_without_a_chat_template_are_501(monkeypatch):
    monkeypatch.delenv("TRIDENT_TOKENIZER_DIR", raising=False)
    client = create_app({"API_KEY": KEY}, backend=FakeBackend()).test_client()
    response = client.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}, headers=AUTH)
    assert_error(response, 501, "server_error", None, "Tokenizing messages needs the chat template, which this "
                 "gateway lacks (TOKENIZER_DIR); send prompt")
    assert client.post("/tokenize", json={"prompt": "hi"}, headers=AUTH).status_code == 200


def test_backend_errors_keep_their_status(app, monkeypatch):
    app, backend = app

    def down(*args, **kwargs):
        raise unavailable("The inference server is unavailable; try again later", 5)

    monkeypatch.setattr(backend, "tokenize", down)
    response = app.test_client().post("/tokenize", json={"prompt": "hi"}, headers=AUTH)
    assert_error(response, 503, "service_unavailable", None, "The inference server is unavailable; try again later")
    assert response.headers["Retry-After"] == "5"
