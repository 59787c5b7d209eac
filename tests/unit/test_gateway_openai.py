"""/v1/models, /v1/completions, /v1/chat/completions in-process with the fake backend: request
mapping to TextRequest, errors, JSON bodies, SSE chunks, [DONE], include_usage, shared
auth and rate limits, retry advice."""

from __future__ import annotations

import json

import pytest
from gateway_fakes import FakeBackend, Pause, wait_until
from testkit import assert_error
from openai_fixtures import AUTH, KEY, MODEL, SMOL_SYSTEM, make_openai_app, sse_data

from gateway import create_app
from gateway.auth import hash_key
from gateway.backend import Finished, TextDelta
from gateway.errors import ClientError, ServerError
from trident.contract import SamplingParams, TextRequest

USER = [{"role": "user", "content": "Hi"}]
CHAT = {"messages": USER}
COMPLETION = {"prompt": "Hi there"}


@pytest.fixture
def app_backend(tmp_path):
    return make_openai_app(tmp_path)


@pytest.fixture
def client(app_backend):
    return app_backend[0].test_client()


@pytest.fixture
def backend(app_backend):
    return app_backend[1]




# -- request mapping ----------------------------------------------------------------------------


def test_completion_defaults(client, backend):
    response = client.post("/v1/completions", json=COMPLETION, headers=AUTH)
    assert response.status_code == 200
    assert backend.last_params == TextRequest(prompt="Hi there", model=MODEL, sampling=SamplingParams(max_new_tokens=16))


def test_chat_defaults_render_the_chat_template(client, backend):
    response = client.post("/v1/chat/completions", json=CHAT, headers=AUTH)
    assert response.status_code == 200
    expected = SMOL_SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert backend.last_params == TextRequest(prompt=expected, model=MODEL, sampling=SamplingParams(max_new_tokens=512),
                                              add_special_tokens=False)  # the template rendered them


def test_every_openai_parameter_is_mapped(client, backend):
    body = {
        "model": MODEL, "prompt": ["Once"], "max_tokens": 7, "temperature": 0, "top_p": 0.5, "n": 1,
        "stop": "\n", "seed": 42, "stream": False, "frequency_penalty": 0, "presence_penalty": 0.0,
        "logit_bias": {}, "user": "someone", "top_k": 3, "repetition_penalty": 1.2, "suffix": None,
        "echo": False, "best_of": 1, "logprobs": None,
    }
    assert client.post("/v1/completions", json=body, headers=AUTH).status_code == 200
    assert backend.last_params == TextRequest(prompt="Once", model=MODEL, stream=False, sampling=SamplingParams(
        max_new_tokens=7, temperature=0.0, top_p=0.5, top_k=3, repetition_penalty=1.2, stop=("\n",), seed=42,
    ))
    assert isinstance(backend.last_params.sampling.temperature, float)


def test_chat_parameters_and_ignored_fields(client, backend):
    body = {
        **CHAT, "max_completion_tokens": 9, "stop": ["a", "bb"], "seed": -1, "logprobs": False,
        "top_logprobs": 0, "response_format": {"type": "text"}, "tools": [], "tool_choice": "none",
        "metadata": {"a": "b"}, "store": False, "service_tier": "auto", "parallel_tool_calls": True,
        "user": "u", "stream": True, "stream_options": {"include_usage": False},
    }
    assert client.post("/v1/chat/completions", json=body, headers=AUTH).status_code == 200
    params = backend.last_params
    assert (params.sampling.max_new_tokens, params.sampling.stop, params.stream) == (9, ("a", "bb"), True)
    assert params.sampling.seed == 2**64 - 1  # OpenAI's int64 seeds, modulo 2**64


def test_max_tokens_and_max_completion_tokens_may_agree(client, backend):
    body = {**CHAT, "max_tokens": 5, "max_completion_tokens": 5}
    assert client.post("/v1/chat/completions", json=body, headers=AUTH).status_code == 200
    assert backend.last_params.sampling.max_new_tokens == 5
    assert client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 6}, headers=AUTH).status_code == 200
    assert backend.last_params.sampling.max_new_tokens == 6


@pytest.mark.parametrize(("path", "body", "max_tokens"), [
    ("/v1/completions", {**COMPLETION, "max_tokens": 40}, 40),
    ("/v1/completions", COMPLETION, 16),  # the endpoint's default max_tokens
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 30, "min_tokens": 3}, 30),
    ("/v1/chat/completions", CHAT, 512),
])
def test_ignore_eos_bans_the_end_token_up_to_max_tokens(client, backend, path, body, max_tokens):
    """vLLM's ignore_eos, as benchmark clients send it (vLLM's bench serve, SGLang's
    bench_serving): its own field, next to the min_tokens given (which alone holds back stop
    sequences and stop tokens); the engines ban their end token up to max_tokens; false changes
    nothing."""
    assert client.post(path, json={**body, "ignore_eos": True}, headers=AUTH).status_code == 200
    sampling = backend.last_params.sampling
    assert (sampling.ignore_eos, sampling.min_tokens, sampling.max_new_tokens) == (
        True, body.get("min_tokens", 0), max_tokens)
    assert sampling.engine_min_tokens == max_tokens
    assert client.post(path, json={**body, "ignore_eos": False}, headers=AUTH).status_code == 200
    sampling = backend.last_params.sampling
    assert (sampling.ignore_eos, sampling.min_tokens) == (False, body.get("min_tokens", 0))
    assert sampling.engine_min_tokens == body.get("min_tokens", 0)
    response = client.post(path, json={**body, "ignore_eos": "yes"}, headers=AUTH)
    assert_error(response, 400, "invalid_request_error", "ignore_eos",
                 'ignore_eos must be a boolean (true or false), got string "yes"')


def test_messages_content_parts_roles_and_names(client, backend):
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}], "name": "ann"},
        {"role": "assistant", "content": "ok", "refusal": None, "tool_calls": None, "audio": None},
        {"role": "user", "content": "again"},
    ]
    assert client.post("/v1/chat/completions", json={"messages": messages}, headers=AUTH).status_code == 200
    assert backend.last_params.prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\none\ntwo<|im_end|>\n"
        "<|im_start|>assistant\nok<|im_end|>\n<|im_start|>user\nagain<|im_end|>\n<|im_start|>assistant\n"
    )


# -- request errors -----------------------------------------------------------------------------

BAD_COMPLETIONS = [
    ({}, "prompt", "prompt is required"),
    ({"prompt": ""}, "prompt", "prompt must be a non-empty string"),
    ({"prompt": ["a"] * 33}, "prompt", "prompt must hold 1 to 32 prompts, got an array of 33"),
    ({"prompt": []}, "prompt", "prompt must hold 1 to 32 prompts, got an array of 0"),
    ({"prompt": ["a", ""]}, "prompt", "prompt[1] must be a non-empty string"),
    ({"prompt": ["a", [1]]}, "prompt", "prompt must be a string, an array of strings, an array of token ids or "
     "an array of arrays of token ids, got an array holding array"),
    ({"prompt": [[1], "a"]}, "prompt", "prompt must be a string, an array of strings, an array of token ids or "
     "an array of arrays of token ids, got an array holding string \"a\""),
    ({"prompt": [1, "a"]}, "prompt", "prompt must be a string, an array of strings, an array of token ids or "
     "an array of arrays of token ids, got an array holding integer 1"),
    ({"prompt": [[1, 2], []]}, "prompt", "prompt[1] must be a non-empty array of token ids"),
    ({"prompt": [[]]}, "prompt", "prompt must be a non-empty array of token ids"),
    ({"prompt": [-1]}, "prompt", "prompt must hold token ids, integers from 0 to 2147483647, got integer -1"),
    ({"prompt": [2**31]}, "prompt", "prompt must hold token ids, integers from 0 to 2147483647, got integer 2147483648"),
    ({"prompt": [[5, 1.5]]}, "prompt", "prompt must hold token ids, integers from 0 to 2147483647, got number 1.5"),
    ({"prompt": [[5], [True]]}, "prompt",
     "prompt[1] must hold token ids, integers from 0 to 2147483647, got boolean true"),
    ({"prompt": [[1]] * 33}, "prompt", "prompt must hold 1 to 32 prompts, got an array of 33"),
    ({"prompt": [1] * 2040, "max_tokens": 9}, "prompt", "the prompt has 2040 tokens and max_new_tokens is 9: "
     "together 2049, over the model's context of 2048 tokens"),
    ({"prompt": [[1], [1] * 2040], "max_tokens": 9}, "prompt", "the prompt has 2040 tokens and max_new_tokens is 9: "
     "together 2049, over the model's context of 2048 tokens"),
    ({"prompt": 5}, "prompt", "prompt must be a string, got integer 5"),
    ({"prompt": "x", "n": 17}, "n", "n must be between 1 and 16, got 17"),
    ({"prompt": "x", "n": 0}, "n", "n must be between 1 and 16, got 0"),
    ({"prompt": "x", "best_of": 17}, "best_of", "best_of must be between 1 and 16, got 17"),
    ({"prompt": "x", "n": 3, "best_of": 2}, "best_of", "best_of (2) must be at least n (3)"),
    ({"prompt": "x", "best_of": 2, "stream": True}, "best_of",
     "best_of cannot be used with stream: the best choices are known only at the end"),
    ({"prompt": "x", "logprobs": 21}, "logprobs", "logprobs must be between 0 and 20, got 21"),
    ({"prompt": "x", "logprobs": True}, "logprobs", "logprobs must be an integer, got boolean true"),
    ({"prompt": "x", "min_tokens": 20}, "min_tokens", "min_tokens (20) must be at most max_tokens (16)"),
    ({"prompt": "x", "min_p": 1.5}, "min_p", "min_p must be between 0 and 1, got 1.5"),
    ({"prompt": "x", "response_format": {"type": "xml"}}, "response_format",
     "response_format.type must be one of text, json_object, json_schema, got string \"xml\""),
    ({"prompt": "x", "suffix": "end"}, "suffix", "suffix is not supported"),
    ({"prompt": "x", "frequency_penalty": 2.5}, "frequency_penalty",
     "frequency_penalty must be between -2 and 2, got 2.5"),
    ({"prompt": "x", "presence_penalty": -3}, "presence_penalty",
     "presence_penalty must be between -2 and 2, got -3"),
    ({"prompt": "x", "logit_bias": {"1": 101}}, "logit_bias", "logit_bias[1] must be between -100 and 100, got 101"),
    ({"prompt": "x", "logit_bias": {"a": 1}}, "logit_bias",
     "logit_bias: keys must be token ids (non-negative integers), got string \"a\""),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens", "max_tokens must be between 1 and 2048, got 0 (0 only with echo: the prompt scored, nothing generated)"),
    ({"prompt": "x", "max_tokens": 1.5}, "max_tokens", "max_tokens must be an integer, got number 1.5"),
    ({"prompt": "x", "temperature": 3}, "temperature", "temperature must be between 0 and 2, got 3"),
    ({"prompt": "x", "top_p": 0}, "top_p", "top_p must be greater than 0 and at most 1, got 0"),
    ({"prompt": "x", "stop": ""}, "stop", "stop must be a non-empty string"),
    ({"prompt": "x", "stop": ["a", 1]}, "stop", "stop[1] must be a string, got integer 1"),
    ({"prompt": "x", "stop": ["s"] * 17}, "stop", "stop must have at most 16 items, got 17"),
    ({"prompt": "x", "seed": 2**64}, "seed",
     "seed must be between -9223372036854775808 and 18446744073709551615, got 18446744073709551616"),
    ({"prompt": "x", "stream": "yes"}, "stream", "stream must be a boolean (true or false), got string \"yes\""),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options",
     'stream_options is only allowed with "stream": true'),
    ({"prompt": "x", "stream": True, "stream_options": {"usage": True}}, "stream_options",
     "stream_options has an unrecognized field: usage"),
    ({"prompt": "x", "stream": True, "stream_options": {"include_usage": 1}}, "stream_options",
     "stream_options.include_usage must be a boolean (true or false), got integer 1"),
    ({"prompt": "x", "stream": True, "stream_options": []}, "stream_options",
     "stream_options must be an object, got array"),
    ({"prompt": "x", "foo": 1, "bar": 2}, "foo", "Unrecognized request arguments supplied: foo, bar"),
    ({"prompt": "x", "messages": USER}, "messages", "Unrecognized request argument supplied: messages"),
]


@pytest.mark.parametrize(("body", "param", "message"), BAD_COMPLETIONS)
def test_bad_completion_requests_are_400(client, backend, body, param, message):
    response = client.post("/v1/completions", json=body, headers=AUTH)
    assert_error(response, 400, "invalid_request_error", param, message)
    assert backend.calls == []


BAD_CHATS = [
    ({}, "messages", "messages is required"),
    ({"messages": None}, "messages", "messages must be an array, got null"),
    ({"messages": []}, "messages", "messages must have at least 1 item"),
    ({"messages": "hi"}, "messages", "messages must be an array of objects, got string \"hi\""),
    ({"messages": ["hi"]}, "messages", "messages[0] must be an object, got string \"hi\""),
    ({"messages": [{"content": "x"}]}, "messages", "messages[0].role is required"),
    ({"messages": [{"role": "user"}]}, "messages", "messages[0].content is required"),
    ({"messages": [*USER, {"role": "tool", "content": "x"}]}, "messages",
     "messages[1].tool_call_id is required in tool messages: the id of the call answered"),
    ({"messages": [*USER, {"role": "function", "content": "x"}]}, "messages",
     "messages[1].role must be one of system, developer, user, assistant, tool, got function"),
    ({"messages": [{"role": "user", "content": None}]}, "messages",
     "messages[0].content must be a string or an array of text parts, got null"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages",
     'messages[0].content[0] must be a text part ({"type": "text", "text": ...}): only text content is supported, '
     'got type string "image_url"'),
    ({"messages": [{"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]}]}, "messages",
     "messages[0].tool_calls[0].type is required"),
    ({"messages": [{"role": "user", "content": "x", "extra": 1}]}, "messages",
     "messages[0] has an unrecognized field: extra"),
    ({**CHAT, "max_tokens": 3, "max_completion_tokens": 4}, "max_tokens",
     "max_tokens and max_completion_tokens were both given, with different values (3 and 4): "
     "send only max_completion_tokens"),
    ({**CHAT, "max_completion_tokens": 5000}, "max_completion_tokens",
     "max_completion_tokens must be between 1 and 2048, got 5000"),
    ({**CHAT, "logprobs": 2}, "logprobs", "logprobs must be a boolean (true or false), got integer 2"),
    ({**CHAT, "top_logprobs": 2}, "top_logprobs", 'top_logprobs needs "logprobs": true'),
    ({**CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "top_logprobs must be between 0 and 20, got 21"),
    ({**CHAT, "n": 17}, "n", "n must be between 1 and 16, got 17"),
    ({**CHAT, "best_of": 2}, "best_of", "Unrecognized request argument supplied: best_of"),
    ({**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format",
     "response_format.json_schema.schema must be a JSON schema (an object), got null"),
    ({**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice",
     'tool_choice "auto" (the default when tools are given) is not supported: this deployment names no parser of '
     'the model\'s own tool-call syntax (TOOL_CALL_PARSER). Send "required", a named function ({"type": '
     '"function", "function": {"name": ...}}) or "none"'),
    ({**CHAT, "tool_choice": "required"}, "tool_choice",
     "tool_choice needs tools: give the functions the model may call in tools"),
    ({**CHAT, "modalities": ["text", "audio"]}, "modalities", "modalities: only text output is supported"),
    ({**CHAT, "prompt": "x"}, "prompt", "Unrecognized request argument supplied: prompt"),
]


@pytest.mark.parametrize(("body", "param", "message"), BAD_CHATS)
def test_bad_chat_requests_are_400(client, backend, body, param, message):
    response = client.post("/v1/chat/completions", json=body, headers=AUTH)
    assert_error(response, 400, "invalid_request_error", param, message)
    assert backend.calls == []


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_malformed_json_is_400(client, path):
    response = client.post(path, data=b"{", headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.get_json()["error"]["message"].startswith("Request body is not valid JSON")


@pytest.mark.parametrize(("path", "body"), [("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)])
def test_unknown_model_is_404(client, path, body):
    response = client.post(path, json={**body, "model": "gpt-4"}, headers=AUTH)
    assert_error(response, 404, "not_found_error", "model",
                 f"The model 'gpt-4' does not exist or is not served here (served: {MODEL})")


def test_chat_template_refusal_is_400(tmp_path):
    template = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversations must start with user') }}" \
               "{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    from openai_fixtures import tokenizer_dir

    app = create_app({"API_KEY": KEY, "TOKENIZER_DIR": str(tokenizer_dir(tmp_path / "t", template))},
                     backend=FakeBackend())
    response = app.test_client().post(
        "/v1/chat/completions", json={"messages": [{"role": "assistant", "content": "x"}]}, headers=AUTH
    )
    assert_error(response, 400, "invalid_request_error", "messages",
                 "messages could not be rendered with the model's chat template: Conversations must start with user")


def test_chat_without_a_template_is_501_not_to_be_retried(monkeypatch):
    monkeypatch.delenv("TRIDENT_TOKENIZER_DIR", raising=False)
    backend = FakeBackend()
    client = create_app({"API_KEY": KEY}, backend=backend).test_client()
    response = client.post("/v1/chat/completions", json=CHAT, headers=AUTH)
    assert_error(response, 501, "server_error", None,
                 "Chat completions are not available: this gateway has no chat template configured "
                 "(TOKENIZER_DIR); use /v1/completions")
    assert response.headers["x-should-retry"] == "false"
    assert client.post("/v1/completions", json=COMPLETION, headers=AUTH).status_code == 200


def test_a_bad_tokenizer_dir_stops_the_app_from_starting(tmp_path):
    with pytest.raises(ValueError, match="has no tokenizer_config.json"):
        create_app({"API_KEY": KEY, "TOKENIZER_DIR": str(tmp_path)}, backend=FakeBackend())


# -- JSON responses -----------------------------------------------------------------------------


@pytest.mark.parametrize(("reason", "openai_reason"), [("eos_token", "stop"), ("stop_sequence", "stop"),
                                                       ("length", "length")])
def test_completion_response(tmp_path, reason, openai_reason):
    backend = FakeBackend(script=lambda p: ["Hello", " world", Finished(reason, 3, 2)])
    client = make_openai_app(tmp_path, backend=backend)[0].test_client()
    body = client.post("/v1/completions", json=COMPLETION, headers=AUTH).get_json()
    assert body["id"].startswith("cmpl-") and isinstance(body["created"], int)
    assert {k: v for k, v in body.items() if k not in ("id", "created")} == {
        "object": "text_completion",
        "model": MODEL,
        "choices": [{"text": "Hello world", "index": 0, "logprobs": None, "finish_reason": openai_reason,
                     "stop_reason": None}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }


def test_chat_response(tmp_path):
    backend = FakeBackend(script=lambda p: ["Hi!", Finished("eos_token", 20, 2)])
    client = make_openai_app(tmp_path, backend=backend)[0].test_client()
    body = client.post("/v1/chat/completions", json=CHAT, headers=AUTH).get_json()
    assert body["id"].startswith("chatcmpl-")
    assert {k: v for k, v in body.items() if k not in ("id", "created")} == {
        "object": "chat.completion",
        "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi!"}, "logprobs": None,
                     "finish_reason": "stop", "stop_reason": None}],
        "usage": {"prompt_tokens": 20, "completion_tokens": 2, "total_tokens": 22},
    }


# -- streams ------------------------------------------------------------------------------------


def _script(p):
    return ["Hel", "", "lo", Finished("length", 4, 2)]


@pytest.mark.parametrize("include_usage", [False, True])
def test_completion_stream_chunks(tmp_path, include_usage):
    client = make_openai_app(tmp_path, backend=FakeBackend(script=_script))[0].test_client()
    body = {**COMPLETION, "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    response = client.post("/v1/completions", json=body, headers=AUTH)
    assert response.status_code == 200 and response.mimetype == "text/event-stream"
    data = sse_data(response)
    assert data[-1] == "[DONE]" and "[DONE]" not in data[:-1]
    chunks = data[:-1]
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("cmpl-")
    assert all(c["object"] == "text_completion" and c["model"] == MODEL for c in chunks)
    usage = {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
    choices = [
        [{"text": "Hel", "index": 0, "logprobs": None, "finish_reason": None}],
        [{"text": "lo", "index": 0, "logprobs": None, "finish_reason": None}],
        [{"text": "", "index": 0, "logprobs": None, "finish_reason": "length", "stop_reason": None}],
    ]
    if include_usage:
        assert [c["choices"] for c in chunks] == [*choices, []]
        assert [c["usage"] for c in chunks] == [None, None, None, usage]
    else:
        assert [c["choices"] for c in chunks] == choices
        assert all("usage" not in c for c in chunks)


@pytest.mark.parametrize("include_usage", [False, True])
def test_chat_stream_chunks(tmp_path, include_usage):
    client = make_openai_app(tmp_path, backend=FakeBackend(script=_script))[0].test_client()
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": include_usage}}
    data = sse_data(client.post("/v1/chat/completions", json=body, headers=AUTH))
    assert data[-1] == "[DONE]"
    chunks = data[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"].startswith("chatcmpl-") for c in chunks)
    deltas = [(c["choices"][0]["delta"], c["choices"][0]["finish_reason"]) for c in chunks if c["choices"]]
    assert deltas == [({"role": "assistant", "content": "Hel"}, None), ({"content": "lo"}, None), ({}, "length")]
    assert (chunks[-1]["choices"] == []) is include_usage
    if include_usage:
        assert chunks[-1]["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}


def test_chat_stream_of_no_text_still_sends_the_role(tmp_path):
    client = make_openai_app(tmp_path, backend=FakeBackend(script=lambda p: [Finished("eos_token", 4, 0)]))[0].test_client()
    data = sse_data(client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=AUTH))
    assert [c["choices"][0] for c in data[:-1]] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": "stop",
         "stop_reason": None}
    ]
    assert data[-1] == "[DONE]"


@pytest.mark.parametrize("path,body", [("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)])
def test_failure_after_the_stream_began_is_an_error_chunk_then_done(tmp_path, path, body):
    error = ServerError("The inference server is unavailable; try again later", status=503, retry_after=5)
    client = make_openai_app(tmp_path, backend=FakeBackend(script=lambda p: ["Hel", error]))[0].test_client()
    data = sse_data(client.post(path, json={**body, "stream": True}, headers=AUTH))
    assert data[-2] == {"error": {"message": error.message, "type": "service_unavailable", "param": None, "code": 503}}
    assert data[-1] == "[DONE]"


@pytest.mark.parametrize("path,body,param", [("/v1/completions", COMPLETION, "prompt"),
                                             ("/v1/chat/completions", CHAT, "messages")])
@pytest.mark.parametrize("stream", [False, True])
def test_failure_before_any_output_is_an_http_status(tmp_path, path, body, param, stream):
    """The llm model's 400 (its field "prompt": chat's messages)."""
    error = ClientError("prompt has 3000 tokens, over the context", param="prompt")
    client = make_openai_app(tmp_path, backend=FakeBackend(script=lambda p: [error]))[0].test_client()
    response = client.post(path, json={**body, "stream": stream}, headers=AUTH)
    assert_error(response, 400, "invalid_request_error", param, error.message)


def test_stream_heartbeats_and_closing_cancels(tmp_path):
    backend = FakeBackend(script=lambda p: ["a", Pause(5), "b", Finished("eos_token", 1, 2)])
    app, _ = make_openai_app(tmp_path, {"HEARTBEAT_INTERVAL": 0.05}, backend=backend)
    response = app.test_client().post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=AUTH,
                                      buffered=False)
    chunks = iter(response.response)
    assert next(chunks).startswith(b"data: ")
    assert next(chunks) == b": keep-alive\n\n"
    response.close()  # what the server does when the client went away
    assert wait_until(lambda: backend.generations[0].closed.is_set())
    assert app.extensions["trident"].in_flight.count == 0


# -- models -------------------------------------------------------------------------------------


def test_models_list_and_retrieve(client):
    listed = client.get("/v1/models", headers=AUTH).get_json()
    assert listed["object"] == "list"
    assert [(m["id"], m["object"], m["owned_by"]) for m in listed["data"]] == [(MODEL, "model", "trident")]
    one = client.get(f"/v1/models/{MODEL}", headers=AUTH).get_json()
    assert one == listed["data"][0]
    assert_error(client.get("/v1/models/gpt-4", headers=AUTH), 404, "not_found_error", "model",
                 "The model 'gpt-4' does not exist or is not served here")
    assert (one["root"], one["max_model_len"]) == (MODEL, 2048)  # vLLM's fields: the context Triton reports


def test_model_cards_leave_max_model_len_out_while_triton_cannot_say_it(tmp_path):
    class Unreachable(FakeBackend):
        def limits(self, model):
            raise ServerError("The inference server is unreachable", status=503, retry_after=5)

    client = make_openai_app(tmp_path, backend=Unreachable())[0].test_client()
    listed = client.get("/v1/models", headers=AUTH)
    assert listed.status_code == 200 and "max_model_len" not in listed.get_json()["data"][0]
    assert client.get(f"/v1/models/{MODEL}", headers=AUTH).get_json()["id"] == MODEL


def test_models_are_those_the_key_may_use(tmp_path):
    keys = [{"name": "other", "sha256": hash_key("other-key"), "models": ["another-model"]}]
    app, backend = make_openai_app(tmp_path, {"API_KEYS": keys})
    client = app.test_client()
    other = {"Authorization": "Bearer other-key"}
    assert client.get("/v1/models", headers=other).get_json()["data"] == []
    assert_error(client.get(f"/v1/models/{MODEL}", headers=other), 403, "permission_error", "model",
                 f"API key 'other' may not use the model '{MODEL}'")
    response = client.post("/v1/chat/completions", json=CHAT, headers=other)
    assert_error(response, 403, "permission_error", "model", f"API key 'other' may not use the model '{MODEL}'")
    assert backend.calls == []


# -- auth, rate limits, overload ----------------------------------------------------------------


@pytest.mark.parametrize(("method", "path", "body"), [
    ("get", "/v1/models", None), ("get", f"/v1/models/{MODEL}", None),
    ("post", "/v1/completions", COMPLETION), ("post", "/v1/chat/completions", CHAT),
])
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}])
def test_v1_needs_a_key(client, backend, method, path, body, headers):
    response = getattr(client, method)(path, json=body, headers=headers)
    assert response.status_code == 401
    assert response.get_json()["error"]["type"] == "authentication_error"
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert backend.calls == []


def test_one_rate_limit_budget_across_generate_and_v1(tmp_path):
    app, backend = make_openai_app(tmp_path, {"DEFAULT_RATE_LIMIT": "3/minute"})
    client = app.test_client()
    assert client.post("/generate", json={"prompt": "x"}, headers=AUTH).status_code == 200
    assert client.post("/v1/completions", json=COMPLETION, headers=AUTH).status_code == 200
    assert client.post("/v1/chat/completions", json=CHAT, headers=AUTH).status_code == 200
    assert client.get("/v1/models", headers=AUTH).status_code == 200  # listing is not a generation
    for path, body in (("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION), ("/generate", {"prompt": "x"})):
        response = client.post(path, json=body, headers=AUTH)
        assert_error(response, 429, "rate_limit_error", None, "Rate limit exceeded: 3 per 1 minute")
        assert 0 < int(response.headers["Retry-After"]) <= 60
        assert response.headers["x-should-retry"] == "true"  # waiting Retry-After works
    assert len(backend.calls) == 3


def test_429_with_a_long_wait_says_do_not_retry(tmp_path):
    client = make_openai_app(tmp_path, {"DEFAULT_RATE_LIMIT": "1/hour"})[0].test_client()
    assert client.post("/v1/completions", json=COMPLETION, headers=AUTH).status_code == 200
    response = client.post("/v1/completions", json=COMPLETION, headers=AUTH)
    assert response.status_code == 429
    assert int(response.headers["Retry-After"]) > 60
    assert response.headers["x-should-retry"] == "false"


@pytest.mark.parametrize(("retry_after", "advice"), [(5, "true"), (60, "true"), (61, "false")])
def test_503_carries_retry_after_and_advice(tmp_path, retry_after, advice):
    error = ServerError("The inference server is unavailable; try again later", status=503, retry_after=retry_after)
    client = make_openai_app(tmp_path, backend=FakeBackend(generate_error=error))[0].test_client()
    response = client.post("/v1/chat/completions", json=CHAT, headers=AUTH)
    assert_error(response, 503, "service_unavailable", None, error.message)
    assert response.headers["Retry-After"] == str(retry_after)
    assert response.headers["x-should-retry"] == advice


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/completions", COMPLETION, "prompt"),
    ("/v1/chat/completions", CHAT, "messages"),
    ("/v1/responses", {"input": "Hi"}, "input"),
    ("/v1/messages", {"max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]}, "messages"),
])
def test_a_prompt_over_the_context_is_a_400_naming_the_endpoints_own_field(tmp_path, path, body, param):
    """The llm model's 400 names its field "prompt": chat, Responses and Messages have none of
    that name, and say which of theirs holds the conversation."""
    error = ClientError("the prompt has 3000 tokens and max_new_tokens is 16: together 3016, over the model's "
                        "context of 2048 tokens", param="prompt")
    client = make_openai_app(tmp_path, backend=FakeBackend(generate_error=error))[0].test_client()
    response = client.post(path, json={"model": MODEL, **body}, headers=AUTH)
    assert response.status_code == 400, response.get_json()
    assert response.get_json()["error"]["param"] == param and "context" in response.get_json()["error"]["message"]


def test_504_timeout_says_do_not_retry(tmp_path):
    from gateway.errors import timeout_error

    error = timeout_error(30, "req-1")
    client = make_openai_app(tmp_path, backend=FakeBackend(generate_error=error))[0].test_client()
    response = client.post("/v1/chat/completions", json=CHAT, headers=AUTH)
    assert response.status_code == 504
    assert response.headers["x-should-retry"] == "false"


def test_in_flight_limit_is_shared_with_generate(tmp_path):
    backend = FakeBackend(script=lambda p: ["a", Pause(5), Finished("eos_token", 1, 1)])
    app, _ = make_openai_app(tmp_path, {"MAX_IN_FLIGHT": 1, "RETRY_AFTER": 3}, backend=backend)
    client = app.test_client()
    running = client.post("/generate", json={"prompt": "x", "stream": True}, headers=AUTH, buffered=False)
    response = client.post("/v1/chat/completions", json=CHAT, headers=AUTH)
    assert response.status_code == 503 and response.headers["Retry-After"] == "3"
    assert response.headers["x-should-retry"] == "true"
    running.close()


def test_errors_without_retry_after_get_no_advice(client):
    response = client.post("/v1/completions", json={"prompt": ""}, headers=AUTH)
    assert response.status_code == 400 and "x-should-retry" not in response.headers


def test_request_id_is_echoed(client):
    response = client.post("/v1/completions", json=COMPLETION, headers={**AUTH, "X-Request-ID": "abc-1"})
    assert response.headers["X-Request-ID"] == "abc-1"


def test_log_line_has_no_prompt(client, caplog):
    caplog.set_level("INFO", logger="trident")
    client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "secret words"}]},
                headers=AUTH)
    # The structured fields of the request line are what the JSON log writes.
    text = "\n".join(r.getMessage() + json.dumps(getattr(r, "fields", {}), default=str)
                     for r in caplog.records)
    assert "generation" in text and '"status": 200' in text
    assert "secret words" not in text and KEY not in text


def test_json_dumps_of_chunks_keeps_unicode(tmp_path):
    client = make_openai_app(tmp_path, backend=FakeBackend(script=lambda p: ["✓ é", Finished("eos_token", 1, 1)]))[0]
    raw = client.test_client().post("/v1/completions", json={**COMPLETION, "stream": True}, headers=AUTH).get_data()
    assert "✓ é".encode() in raw
    assert json.loads(raw.split(b"\n\n")[0][len(b"data: "):])["choices"][0]["text"] == "✓ é"


# -- /v1/completions with an array of prompts (gateway.prompts) -----------------------------------


def _per_prompt_script(params):
    """Each choice's text names its prompt and its index; prompt "boom" fails before any text,
    prompt "late" after some; cum_logprob makes choice k of prompt "b" the best for k = n - 1."""
    from gateway.backend import ChoiceEnd

    if params.prompt == "boom":
        return [ClientError("prompt has 3000 tokens, over the context", param="prompt")]
    n = params.sampling.n
    steps = [TextDelta(f"{params.prompt}-{k}", index=k) for k in range(n)]
    if params.prompt == "late":
        return [*steps, ServerError("the engine failed", status=500)]
    ends = tuple(ChoiceEnd(k, "length", 2, cum_logprob=float(k if params.prompt == "b" else -k)) for k in range(n))
    return [*steps, Finished("length", prompt_tokens=len(params.prompt), completion_tokens=2 * n, choices=ends)]


@pytest.fixture
def prompts_app(tmp_path):
    return make_openai_app(tmp_path, backend=FakeBackend(script=_per_prompt_script))


def test_an_array_of_prompts_is_one_generation_each_answered_together(prompts_app):
    """LangChain's OpenAI class sends its batches so. The choices of prompt i are i*n..i*n+n-1,
    the usage is summed."""
    app, backend = prompts_app
    response = app.test_client().post("/v1/completions", headers=AUTH,
                                      json={"prompt": ["a", "bb", "ccc"], "n": 2, "max_tokens": 4})
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    assert [(c["index"], c["text"]) for c in body["choices"]] == [
        (0, "a-0"), (1, "a-1"), (2, "bb-0"), (3, "bb-1"), (4, "ccc-0"), (5, "ccc-1")]
    assert body["usage"] == {"prompt_tokens": 6, "completion_tokens": 12, "total_tokens": 18}
    assert [params.prompt for params, _ in backend.calls] == ["a", "bb", "ccc"]
    assert all(params.sampling.n == 2 and params.sampling.max_new_tokens == 4 for params, _ in backend.calls)
    assert app.extensions["trident"].in_flight.count == 0


def _ids_script(params):
    """A prompt of token ids answers with its ids as text."""
    assert params.prompt == "" and params.prompt_ids
    return [TextDelta(" ".join(map(str, params.prompt_ids))),
            Finished("length", prompt_tokens=len(params.prompt_ids), completion_tokens=1)]


@pytest.mark.parametrize("stream", [False, True])
def test_prompts_of_token_ids_are_sent_as_ids(tmp_path, stream):
    """OpenAI's two forms of token ids (vLLM's, llama.cpp's; lm-evaluation-harness sends them):
    [ids] is one prompt, [[ids], [ids]] several; the ids go to llm as they are, not as text."""
    from trident.contract import ModelLimits

    app, backend = make_openai_app(tmp_path, backend=FakeBackend(script=_ids_script,
                                                                 model_limits=ModelLimits(vocab_size=50)))
    client = app.test_client()
    response = client.post("/v1/completions", headers=AUTH, json={"prompt": [3, 1, 4], "max_tokens": 2, "stream": stream})
    assert response.status_code == 200, response.get_data(as_text=True)
    text = "".join(d["choices"][0]["text"] for d in sse_data(response)[:-1] if d["choices"]) if stream else \
        response.get_json()["choices"][0]["text"]
    assert text == "3 1 4"
    assert backend.last_params.prompt_ids == (3, 1, 4) and backend.last_params.prompt == ""

    response = client.post("/v1/completions", headers=AUTH, json={"prompt": [[1, 5], [9]], "max_tokens": 2})
    assert response.status_code == 200, response.get_data(as_text=True)
    assert [(c["index"], c["text"]) for c in response.get_json()["choices"]] == [(0, "1 5"), (1, "9")]
    assert response.get_json()["usage"]["prompt_tokens"] == 3
    assert [params.prompt_ids for params, _ in backend.calls[-2:]] == [(1, 5), (9,)]

    calls = len(backend.calls)
    response = client.post("/v1/completions", headers=AUTH, json={"prompt": [[1], [7, 50]], "max_tokens": 2})
    assert_error(response, 400, "invalid_request_error", "prompt",
                 "prompt: token id 50 (at 1) is not a token of the model (ids are below 50)")
    assert len(backend.calls) == calls


def test_best_of_picks_within_each_prompt(prompts_app):
    app, _ = prompts_app
    response = app.test_client().post("/v1/completions", headers=AUTH,
                                      json={"prompt": ["a", "b"], "n": 1, "best_of": 3, "max_tokens": 4})
    assert response.status_code == 200, response.get_data(as_text=True)
    assert [(c["index"], c["text"]) for c in response.get_json()["choices"]] == [(0, "a-0"), (1, "b-2")]


@pytest.mark.parametrize("include_usage", [False, True])
def test_an_array_of_prompts_streams_every_choice_with_its_index(prompts_app, include_usage):
    app, _ = prompts_app
    body = {"prompt": ["a", "bb"], "max_tokens": 4, "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    response = app.test_client().post("/v1/completions", headers=AUTH, json=body)
    assert response.status_code == 200
    chunks = sse_data(response)
    assert chunks[-1] == "[DONE]"
    texts = {c["choices"][0]["index"]: c["choices"][0]["text"] for c in chunks[:-1]
             if c["choices"] and c["choices"][0]["text"]}
    assert texts == {0: "a-0", 1: "bb-0"}
    ends = [c["choices"][0] for c in chunks[:-1] if c["choices"] and c["choices"][0]["finish_reason"]]
    assert sorted((e["index"], e["finish_reason"]) for e in ends) == [(0, "length"), (1, "length")]
    usage = [c["usage"] for c in chunks[:-1] if c.get("usage")]
    assert usage == ([{"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}] if include_usage else [])
    assert app.extensions["trident"].in_flight.count == 0


@pytest.mark.parametrize("stream", [False, True])
def test_a_prompt_refused_fails_the_request_before_its_200_and_stops_the_others(prompts_app, stream):
    app, backend = prompts_app
    response = app.test_client().post("/v1/completions", headers=AUTH,
                                      json={"prompt": ["a", "boom", "bb"], "max_tokens": 4, "stream": stream})
    assert_error(response, 400, "invalid_request_error", "prompt", "prompt has 3000 tokens, over the context")
    assert all(generation.closed.is_set() for generation in backend.generations)
    assert app.extensions["trident"].in_flight.count == 0


def test_a_prompt_failing_mid_stream_is_an_error_chunk(prompts_app):
    app, backend = prompts_app
    response = app.test_client().post("/v1/completions", headers=AUTH,
                                      json={"prompt": ["a", "late"], "max_tokens": 4, "stream": True})
    assert response.status_code == 200
    chunks = sse_data(response)
    assert chunks[-1] == "[DONE]" and chunks[-2]["error"]["code"] == 500, chunks
    assert all(generation.closed.is_set() for generation in backend.generations)
    assert app.extensions["trident"].in_flight.count == 0


def test_each_prompt_takes_an_in_flight_place(tmp_path):
    """3 prompts over MAX_IN_FLIGHT 2: a 503, and the two places taken are given back."""
    app, backend = make_openai_app(tmp_path, {"MAX_IN_FLIGHT": 2, "RETRY_AFTER": 3},
                                   backend=FakeBackend(script=_per_prompt_script))
    response = app.test_client().post("/v1/completions", headers=AUTH, json={"prompt": ["a", "b", "c"]})
    assert response.status_code == 503 and response.headers["Retry-After"] == "3"
    assert len(backend.generations) == 2 and all(g.closed.is_set() for g in backend.generations)
    assert app.extensions["trident"].in_flight.count == 0
    assert app.test_client().post("/v1/completions", headers=AUTH, json={"prompt": ["a", "b"]}).status_code == 200


def test_closing_the_prompts_generation_closes_every_prompt():
    """A client that leaves (gateway.disconnect calls close) cancels every prompt's generation,
    also one still waiting for its first event."""
    from gateway.backend import TextDelta as Delta
    from gateway.prompts import PromptsGeneration
    from gateway_fakes import FakeGeneration

    gens = [FakeGeneration([Delta("x"), Pause(30)]), FakeGeneration([Pause(30)])]
    combined = PromptsGeneration(gens, n=1)
    events = iter(combined)
    combined.close()
    assert list(events) == []
    assert all(g.closed.is_set() for g in gens)


@pytest.mark.parametrize("stream", [False, True])
def test_usage_says_how_many_prompt_tokens_came_from_the_prefix_cache(tmp_path, stream):
    """OpenAI's usage.prompt_tokens_details.cached_tokens when the engine reports it (the CPU
    engine), summed over the prompts of a request; absent when it does not (GPU); /generate's
    usage (shared/API.md) is unchanged."""
    cached = {"Hi there": 8, "Hello": 2}
    backend = FakeBackend(script=lambda p: ["Hi", Finished("length", 12, 1, cached_tokens=cached.get(p.prompt))])
    client = make_openai_app(tmp_path, backend=backend)[0].test_client()
    extra = {"stream": True, "stream_options": {"include_usage": True}} if stream else {}

    def usage(path: str, body: dict) -> dict:
        response = client.post(path, json={**body, **extra}, headers=AUTH)
        assert response.status_code == 200, response.get_data(as_text=True)
        return sse_data(response)[-2]["usage"] if stream else response.get_json()["usage"]

    details = {"prompt_tokens": 12, "completion_tokens": 1, "total_tokens": 13, "prompt_tokens_details": {"cached_tokens": 8}}
    assert usage("/v1/completions", COMPLETION) == details
    two = usage("/v1/completions", {"prompt": ["Hi there", "Hello"]})
    assert two["prompt_tokens_details"] == {"cached_tokens": 10} and two["prompt_tokens"] == 24
    assert "prompt_tokens_details" not in usage("/v1/completions", {"prompt": "Bye"})
    assert usage("/v1/chat/completions", CHAT) == {k: v for k, v in details.items() if k != "prompt_tokens_details"}
    response = client.post("/generate", json={"prompt": "Hi there"}, headers=AUTH)
    assert response.get_json()["usage"] == {"prompt_tokens": 12, "completion_tokens": 1, "total_tokens": 13}
