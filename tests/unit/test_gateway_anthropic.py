"""POST /v1/messages (gateway.anthropic): Anthropic's Messages API, through the official
``anthropic`` client against the in-process gateway (WSGI transport, fake backend), and its
bodies checked against the app's own /openapi.json."""

from __future__ import annotations

import json

import anthropic
import httpx2
import jsonschema_rs
import openapi_sse
import pytest
from openai_fixtures import AUTH, KEY, MODEL, make_openai_app, tokenizer_dir
from test_gateway_openai_tools import TOOLS_TEMPLATE, says

from gateway.anthropic import messages_param
from gateway.backend import Admitted, ChoiceEnd, Finished

WEATHER = {"name": "get_weather", "description": "The weather of a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
USER = [{"role": "user", "content": "Weather in Paris?"}]


def client_of(app):
    http = httpx2.Client(transport=httpx2.WSGITransport(app=app))
    return anthropic.Anthropic(base_url="http://gateway", api_key=KEY, http_client=http, max_retries=0)


def make_app(tmp_path, **config):
    app, backend = make_openai_app(tmp_path, {"TOKENIZER_DIR": str(tokenizer_dir(tmp_path / "t", TOOLS_TEMPLATE)),
                                              "TOOL_CALL_PARSER": "hermes", **config})
    web = app.test_client()
    return app, backend, web, web.get("/openapi.json").get_json()


@pytest.fixture
def app(tmp_path):
    return make_app(tmp_path)


def check_message(spec, body):
    jsonschema_rs.Draft202012Validator({**spec, "$ref": "#/components/schemas/AnthropicMessageResponse"}).validate(body)
    return body


def check_events(spec, response, path="/v1/messages"):
    """The stream's named events (of ``path``'s API), once checked against the document."""
    assert response.status_code == 200, response.get_data(as_text=True)
    openapi_sse.check_sse(spec, path, response.get_data())
    return named_events(response.get_data())


def named_events(body: bytes) -> list[dict]:
    """The JSON of each named SSE event of a body (comments left out), each named as its type."""
    events = []
    for block in body.decode("utf-8").split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if lines:
            name, data = lines[0].removeprefix("event: "), json.loads(lines[1].removeprefix("data: "))
            assert data["type"] == name
            events.append(data)
    return events


def test_the_official_client_gets_a_message_and_a_stream(app):
    flask_app, backend, web, spec = app
    client = client_of(flask_app)
    message = client.messages.create(model=MODEL, max_tokens=20, messages=USER)
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert [(b.type, b.text) for b in message.content] == [("text", "Hello, world ✓!")]
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    assert message.usage.input_tokens > 0 and message.usage.output_tokens == 6
    prompt = backend.last_params.prompt
    assert prompt == "<user>Weather in Paris?\n<assistant>"
    with client.messages.stream(model=MODEL, max_tokens=20, messages=USER) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Hello, world ✓!" and final.content[0].text == text
    assert final.stop_reason == "end_turn" and final.usage.input_tokens == message.usage.input_tokens
    check_message(spec, web.post("/v1/messages", json={"max_tokens": 20, "messages": USER}, headers=AUTH).get_json())


def test_system_prompt_history_and_prefill_reach_the_template(app):
    _, backend, web, _ = app
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Count to three."},
                {"role": "assistant", "content": [{"type": "text", "text": "One, two,"}]}]
    body = {"max_tokens": 5, "system": [{"type": "text", "text": "Be brief."}], "messages": messages}
    assert web.post("/v1/messages", json=body, headers=AUTH).status_code == 200
    assert backend.last_params.prompt == ("<system>Be brief.\n<user>Hi\nthere\n<assistant>Hello.\n"
                                          "<user>Count to three.\n<assistant>One, two,")  # the reply continues it


def test_stop_sequences_say_which_one_ended_the_text(app):
    """The llm model says which stop sequence ended the text (ChoiceEnd.stop), whole and
    streamed: stop_sequence is that one, even when another one given ends the text too; a stop
    token of the model's own is end_turn."""
    flask_app, backend, web, spec = app

    def stopped(stop):
        def script(params):
            texts = ["It is sun", "ny. E"] if params.stream else ["It is sunny. E"]
            return [*texts, Finished("stop_sequence", prompt_tokens=3, completion_tokens=2,
                                     choices=(ChoiceEnd(0, "stop_sequence", 2, stop=stop),))]
        return script

    client = client_of(flask_app)
    stops = ["E", "ND", " END"]  # "E" also ends the text: the llm model's word decides
    backend.script = stopped("ND")
    message = client.messages.create(model=MODEL, max_tokens=20, messages=USER, stop_sequences=stops)
    assert backend.last_params.sampling.stop == tuple(stops) and not backend.last_params.sampling.include_stop_str_in_output
    assert message.content[0].text == "It is sunny. E" and message.stop_reason == "stop_sequence"
    assert message.stop_sequence == "ND"
    with client.messages.stream(model=MODEL, max_tokens=20, messages=USER, stop_sequences=stops) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "It is sunny. E" and (final.stop_reason, final.stop_sequence) == ("stop_sequence", "ND")
    backend.script = stopped(128009)  # an end token of the model's own (generation_config.json)
    message = client.messages.create(model=MODEL, max_tokens=20, messages=USER, stop_sequences=stops)
    assert (message.stop_reason, message.stop_sequence) == ("end_turn", None)
    backend.script = says("It is", " sunny", reason="length")
    message = client.messages.create(model=MODEL, max_tokens=2, messages=USER)
    assert message.stop_reason == "max_tokens"


@pytest.mark.parametrize("stream", [False, True])
def test_tools_forced_and_chosen_become_tool_use_blocks(tmp_path, stream):
    """A forced tool (constrained) and a call the model chose (hermes syntax, after its thinking
    with REASONING_PARSER): tool_use blocks, stop_reason tool_use; the thinking a thinking block."""
    flask_app, backend, web, spec = make_app(tmp_path, REASONING_PARSER="qwen3")
    client = client_of(flask_app)
    backend.script = says('{"city": ', '"Paris"}')
    kwargs = dict(model=MODEL, max_tokens=20, messages=USER, tools=[WEATHER],
                  tool_choice={"type": "tool", "name": "get_weather"})
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    for choice, script, city in ((kwargs["tool_choice"], says('{"city": ', '"Paris"}'), "Paris"),
                                 ({"type": "auto"}, says("<think>They want", " Oslo.</think>", "Sure.", call), "Oslo")):
        backend.script = script
        kwargs["tool_choice"] = choice
        if stream:
            with client.messages.stream(**kwargs) as events:
                message = events.get_final_message()
        else:
            message = client.messages.create(**kwargs)
        uses = [b for b in message.content if b.type == "tool_use"]
        assert [(u.name, u.input) for u in uses] == [("get_weather", {"city": city})]
        assert message.stop_reason == "tool_use"
        if choice["type"] == "tool":
            assert backend.last_params.sampling.guide is not None  # forced: constrained to the input schema
        else:
            assert [b.type for b in message.content] == ["thinking", "text", "tool_use"]
            assert message.content[0].thinking == "They want Oslo." and message.content[1].text == "Sure."
    raw = web.post("/v1/messages", json={**kwargs, "stream": True}, headers=AUTH)
    kinds = [(e["type"], (e.get("content_block") or e.get("delta") or {}).get("type")) for e in check_events(spec, raw)]
    assert kinds[0] == ("message_start", None) and kinds[-2:] == [("message_delta", None), ("message_stop", None)]
    assert ("content_block_start", "tool_use") in kinds and ("content_block_delta", "input_json_delta") in kinds


def test_a_tool_result_goes_back_as_a_tool_message(app):
    _, backend, web, _ = app
    messages = [*USER,
                {"role": "assistant", "content": [{"type": "text", "text": "Checking."},
                                                  {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                                   "input": {"city": "Paris"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                              "content": [{"type": "text", "text": "18 C, sunny"}]}]}]
    body = {"max_tokens": 5, "messages": messages, "tools": [WEATHER], "tool_choice": {"type": "none"}}
    response = web.post("/v1/messages", json=body, headers=AUTH)
    assert response.status_code == 200, response.get_json()
    assert backend.last_params.prompt.split("\n", 1)[1] == (
        "<user>Weather in Paris?\n"
        '<assistant>CALL get_weather {"city": "Paris"} city=ParisChecking.\n'
        "<tool>RESULT OF toolu_1: 18 C, sunny\n<assistant>")


def test_thinking_disabled_and_output_format_map_to_the_chat_fields(app):
    _, backend, web, spec = app
    backend.script = says('{"a": 1}')
    body = {"max_tokens": 9, "messages": USER, "thinking": {"type": "disabled"},
            "output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}}}
    reply = check_message(spec, web.post("/v1/messages", json=body, headers=AUTH).get_json())
    assert reply["content"] == [{"type": "text", "text": '{"a": 1}'}]
    assert backend.last_params.sampling.guide is not None


def test_the_key_may_come_as_x_api_key(app):
    _, _, web, _ = app
    body = {"max_tokens": 5, "messages": USER}
    assert web.post("/v1/messages", json=body, headers={"x-api-key": KEY}).status_code == 200
    assert web.post("/v1/messages", json=body, headers={"x-api-key": "wrong"}).status_code == 401
    assert web.post("/v1/messages", json=body).status_code == 401


@pytest.mark.parametrize("body, param", [
    ({"messages": USER}, "max_tokens"),
    ({"max_tokens": 5}, "messages"),
    ({"max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}, "messages"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "messages"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "tool_use", "id": "a", "name": "b",
                                                                   "input": {}}]}]}, "messages"),
    ({"max_tokens": 5, "messages": USER, "temperature": 1.5}, "temperature"),
    ({"max_tokens": 5, "messages": USER, "stop_sequences": [""]}, "stop_sequences"),
    ({"max_tokens": 5, "messages": USER, "tools": [{**WEATHER, "type": "web_search_20250305"}]}, "tools"),
    ({"max_tokens": 5, "messages": USER, "tools": [WEATHER], "tool_choice": {"type": "tool", "name": "nope"}},
     "tool_choice"),
    ({"max_tokens": 5, "messages": USER, "tools": [{**WEATHER, "name": "bad name"}]}, "tools"),
    ({"max_tokens": 5, "messages": USER, "container": "x"}, "container"),
    ({"max_tokens": 10**9, "messages": USER}, "max_tokens"),
    ({"max_tokens": 0, "messages": USER}, "max_tokens"),  # Anthropic's cache pre-warming: not offered
    ({"max_tokens": 5, "messages": USER, "model": "other"}, "model"),
])
def test_bad_requests_are_4xx_naming_the_messages_field(app, body, param):
    _, backend, web, spec = app
    response = web.post("/v1/messages", json=body, headers=AUTH)
    assert 400 <= response.status_code < 500 and response.get_json()["error"]["param"] == param, response.get_json()


def check_error(spec, response, status, kind):
    """An error on Anthropic's paths: Anthropic's shape (checked against the document), its type
    for the status, the request id in the body and in Anthropic's request-id header."""
    body = response.get_json()
    assert response.status_code == status, body
    jsonschema_rs.Draft202012Validator({**spec, "$ref": "#/components/schemas/AnthropicError"}).validate(body)
    assert body["type"] == "error" and body["error"]["type"] == kind and body["error"]["message"]
    assert body["request_id"] == response.headers["request-id"] == response.headers["X-Request-ID"]
    return body


def test_errors_are_anthropics_shape_from_the_key_check_to_the_rate_limit(tmp_path):
    """What the anthropic client raises, and what agent tools print (error.type, error.message),
    for a bad field, a bad key, an unknown path, a body too large, a rate limit and a busy
    engine; the other endpoints keep the contract's envelope."""
    flask_app, backend, web, spec = make_app(tmp_path, MAX_BODY_BYTES=4096)
    client = client_of(flask_app)
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(model=MODEL, max_tokens=5, messages=USER, extra_body={"temperature": 1.5})
    assert caught.value.body["error"]["type"] == "invalid_request_error"
    assert caught.value.body["error"]["param"] == "temperature" and caught.value.request_id
    with pytest.raises(anthropic.AuthenticationError) as caught:
        anthropic.Anthropic(base_url="http://gateway", api_key="wrong", max_retries=0,
                            http_client=httpx2.Client(transport=httpx2.WSGITransport(app=flask_app))
                            ).messages.create(model=MODEL, max_tokens=5, messages=USER)
    assert caught.value.body["error"]["type"] == "authentication_error"
    body = {"max_tokens": 5, "messages": USER}
    check_error(spec, web.post("/v1/messages", json=body), 401, "authentication_error")
    check_error(spec, web.post("/v1/messages/nope", json=body, headers=AUTH), 404, "not_found_error")
    check_error(spec, web.post("/v1/messages", json={**body, "system": "x" * 5000}, headers=AUTH), 413,
                "request_too_large")
    check_error(spec, web.post("/v1/messages/count_tokens", json={"messages": 1}, headers=AUTH), 400,
                "invalid_request_error")
    _, _, limited_web, _ = make_app(tmp_path / "limited", DEFAULT_RATE_LIMIT="2/minute")
    limited = [limited_web.post("/v1/messages", json=body, headers=AUTH) for _ in range(3)]
    assert [r.status_code for r in limited[:-1]] == [200, 200]
    check_error(spec, limited[-1], 429, "rate_limit_error")
    assert web.post("/v1/chat/completions", json={"messages": USER}).get_json()["error"]["type"] == \
        "authentication_error"  # the contract's envelope elsewhere: no top-level type
    assert "type" not in web.post("/v1/chat/completions", json={"messages": USER}).get_json()


def test_a_busy_engine_is_an_overloaded_error(app):
    _, backend, web, spec = app
    from gateway.errors import ServerError

    backend.script = lambda params: [ServerError("the engine's queue is full", status=503, retry_after=1)]
    response = web.post("/v1/messages", json={"max_tokens": 5, "messages": USER}, headers=AUTH)
    check_error(spec, response, 503, "overloaded_error")
    assert response.headers["Retry-After"] == "1"


def test_chat_field_names_map_to_the_messages_fields():
    assert [messages_param(p) for p in ("stop", "messages[2].content", "tools[1].function.parameters",
                                        "parallel_tool_calls", "response_format", "max_tokens", None)] == [
        "stop_sequences", "messages", "tools[1].input_schema", "tool_choice", "output_config", "max_tokens", None]


def test_an_error_after_the_stream_began_is_an_error_event(app):
    _, backend, web, spec = app
    from gateway.errors import ServerError

    backend.script = lambda params: ["Hel", ServerError("the engine went away", status=503)]
    events = check_events(spec, web.post("/v1/messages", json={"max_tokens": 5, "messages": USER, "stream": True},
                                         headers=AUTH))
    assert events[0]["type"] == "message_start" and events[-1]["type"] == "error"
    assert events[-1]["error"]["type"] == "overloaded_error"


def test_message_start_reports_the_prompts_tokens_once_the_server_took_the_request(app):
    """Anthropic's first event carries usage.input_tokens (agent tools read it for their context
    accounting): the llm model's admission says the count, before any text."""
    flask_app, backend, web, spec = app
    backend.script = lambda params: [Admitted("vm:1", prompt_tokens=7), "Hel", "lo",
                                     Finished("eos_token", prompt_tokens=7, completion_tokens=2)]
    events = check_events(spec, web.post("/v1/messages", json={"max_tokens": 5, "messages": USER, "stream": True},
                                         headers=AUTH))
    assert events[0]["type"] == "message_start" and events[0]["message"]["usage"] == {"input_tokens": 7,
                                                                                       "output_tokens": 0}
    assert [e["type"] for e in events].count("message_start") == 1 and events[1]["type"] == "content_block_start"
    with client_of(flask_app).messages.stream(model=MODEL, max_tokens=5, messages=USER) as stream:
        first = next(iter(stream))
        assert first.type == "message_start" and first.message.usage.input_tokens == 7
        assert stream.get_final_message().usage.input_tokens == 7
    backend.script = lambda params: ["Hel", Finished("eos_token", prompt_tokens=7, completion_tokens=1)]
    events = check_events(spec, web.post("/v1/messages", json={"max_tokens": 5, "messages": USER, "stream": True},
                                         headers=AUTH))  # a backend that does not admit: known at the end only
    assert events[0]["message"]["usage"]["input_tokens"] == 0 and events[-2]["usage"]["input_tokens"] == 7


def test_count_tokens_counts_the_prompt_the_request_renders(app):
    """/v1/messages/count_tokens (max_tokens not needed): the fake tokenizer gives each character
    of the rendered prompt an id, so the count is the prompt's length, no special token added."""
    flask_app, backend, web, spec = app
    body = {"messages": USER, "system": "Be brief.", "tools": [WEATHER]}
    client = client_of(flask_app)
    count = client.messages.count_tokens(model=MODEL, **body)
    assert web.post("/v1/messages", json={**body, "max_tokens": 5}, headers=AUTH).status_code == 200
    assert count.input_tokens == len(backend.last_params.prompt)
    assert backend.tokenizer_calls[-1] == ("tokenize", MODEL, backend.last_params.prompt, False)
    assert backend.last_params.add_special_tokens is False  # counted as the llm model tokenizes it
    jsonschema_rs.Draft202012Validator({**spec, "$ref": "#/components/schemas/AnthropicTokenCount"}).validate(
        {"input_tokens": count.input_tokens})
    bad = web.post("/v1/messages/count_tokens", json={"messages": [{"role": "robot", "content": "x"}]}, headers=AUTH)
    assert bad.status_code == 400 and bad.get_json()["error"]["param"] == "messages"
    assert web.post("/v1/messages/count_tokens", json=body).status_code == 401
