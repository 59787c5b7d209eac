"""Tool calls on /v1/chat/completions (gateway.tools): the guide each tool_choice gives the llm
model, the chat template's view of tools and earlier calls, and the replies (JSON and SSE,
checked against the app's own /openapi.json), with the fake backend."""

from __future__ import annotations

import json

import jsonschema_rs
import openapi_sse
import pytest
from gateway_fakes import Finished
from openai_fixtures import AUTH, make_openai_app, sse_data, tokenizer_dir
from test_gateway_openai import backend, client  # noqa: F401 (fixtures)

from gateway.backend import ChoiceEnd, TextDelta, TokenLogprobs
from testkit import assert_error

# Renders tools and earlier calls the way tool-aware templates do (Qwen2.5, Hermes).
TOOLS_TEMPLATE = (
    "{% if tools %}TOOLS {{ tools | tojson }}\n{% endif %}"
    "{% for m in messages %}<{{ m.role }}>"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}CALL {{ c.function.name }} "
    "{{ c.function.arguments | tojson }} city={{ c.function.arguments.city }}{% endfor %}{% endif %}"
    "{% if m.tool_call_id %}RESULT OF {{ m.tool_call_id }}: {% endif %}{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "noop"}},
]
USER = [{"role": "user", "content": "Weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}
REQUIRED_TEXT = ['[{"name": "get', '_weather", "parameters": {"city": "Pa', 'ris"}}, {"name": "noop", ',
                 '"parameters": {}}', "]"]


@pytest.fixture
def app_backend(tmp_path):  # test_gateway_openai's client and backend fixtures take this app
    return make_openai_app(tmp_path, {"TOKENIZER_DIR": str(tokenizer_dir(tmp_path / "tools", TOOLS_TEMPLATE))})


@pytest.fixture
def spec(client):
    return client.get("/openapi.json").get_json()


def says(*texts, reason="eos_token"):
    """A script: these deltas (joined when not streaming, as the llm model does), then the end."""
    def script(params):
        steps = list(texts) if params.stream else ["".join(texts)]
        return [*steps, Finished(reason, prompt_tokens=3, completion_tokens=len(texts))]
    return script


def chat(client, **body):
    return client.post("/v1/chat/completions", json={"messages": USER, "tools": TOOLS, **body}, headers=AUTH)


def streamed_chunks(spec, response):
    """A chat stream's chunks (without [DONE]), once its events are checked against the document."""
    openapi_sse.check_sse(spec, "/v1/chat/completions", response.get_data())
    return [d for d in sse_data(response) if d != "[DONE]"]


def check_response(spec, body):
    jsonschema_rs.Draft202012Validator({**spec, "$ref": "#/components/schemas/ChatCompletionResponse"}).validate(body)


def test_a_named_function_constrains_the_output_to_its_parameters_and_answers_one_call(client, backend, spec):
    backend.script = says('{"city": "Paris"}')
    response = chat(client, tool_choice=NAMED)
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    check_response(spec, body)
    guide = backend.last_params.sampling.guide
    assert (guide.type, json.loads(guide.text)) == ("json_schema", WEATHER)
    assert backend.last_params.prompt.startswith("TOOLS " + json.dumps(TOOLS))  # the template saw the tools
    [choice] = body["choices"]
    assert choice["finish_reason"] == "stop"
    [call] = choice["message"]["tool_calls"]
    assert choice["message"]["content"] is None
    assert call["id"].startswith("call_") and len(call["id"]) == 29 and call["type"] == "function"
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}


def test_a_function_without_parameters_takes_an_empty_object(client, backend):
    chat(client, tool_choice={"type": "function", "function": {"name": "noop"}})
    assert json.loads(backend.last_params.sampling.guide.text) == {"type": "object", "properties": {}}


def test_annotations_are_left_out_of_the_guide_so_long_descriptions_fit(client, backend):
    """Descriptions constrain nothing: the guide keeps keywords and values only, so 128 functions
    described at length (about 280 KB of schema) are served; a property named "description" and
    enum values stay."""
    parameters = {
        "type": "object", "title": "Args", "description": "d" * 2000,
        "properties": {
            "description": {"type": "string", "description": "a property so named"},
            "kind": {"enum": ["a", "b"], "description": "which", "examples": ["a"]},
            "tags": {"type": "array", "items": {"type": "string", "title": "t"}},
            "when": {"anyOf": [{"type": "string", "description": "iso"}, {"type": "null"}]},
        },
        "required": ["description"],
    }
    tools = [{"type": "function", "function": {"name": f"f{i}", "description": "f" * 200, "parameters": parameters}}
             for i in range(128)]
    response = client.post("/v1/chat/completions", json={"messages": USER, "tools": tools, "tool_choice": "required"},
                           headers=AUTH)
    assert response.status_code == 200, response.get_data(as_text=True)
    schema = json.loads(backend.last_params.sampling.guide.text)
    assert len(schema["items"]["anyOf"]) == 128
    assert schema["items"]["anyOf"][0]["properties"]["parameters"] == {
        "type": "object",
        "properties": {"description": {"type": "string"}, "kind": {"enum": ["a", "b"]},
                       "tags": {"type": "array", "items": {"type": "string"}},
                       "when": {"anyOf": [{"type": "string"}, {"type": "null"}]}},
        "required": ["description"],
    }
    assert "d" * 2000 in backend.last_params.prompt  # the template still shows them


@pytest.mark.parametrize("parallel", [None, True, False])
def test_required_constrains_the_output_to_an_array_of_declared_calls(client, backend, spec, parallel):
    backend.script = says(*REQUIRED_TEXT)
    extra = {} if parallel is None else {"parallel_tool_calls": parallel}
    body = chat(client, tool_choice="required", **extra).get_json()
    check_response(spec, body)
    schema = json.loads(backend.last_params.sampling.guide.text)
    assert schema["type"] == "array" and schema["minItems"] == 1
    assert schema.get("maxItems") == (1 if parallel is False else None)
    assert schema["items"]["anyOf"] == [
        {"type": "object", "properties": {"name": {"type": "string", "enum": ["get_weather"]}, "parameters": WEATHER},
         "required": ["name", "parameters"]},
        {"type": "object", "properties": {"name": {"type": "string", "enum": ["noop"]},
                                          "parameters": {"type": "object", "properties": {}}},
         "required": ["name", "parameters"]},
    ]
    message = body["choices"][0]["message"]
    assert message["content"] is None
    assert [c["function"] for c in message["tool_calls"]] == [
        {"name": "get_weather", "arguments": '{"city": "Paris"}'}, {"name": "noop", "arguments": "{}"}]
    assert len({c["id"] for c in message["tool_calls"]}) == 2


def test_a_required_call_cut_by_max_tokens_has_the_arguments_written_so_far(client, backend, spec):
    """As a named call's: the cut call is in the reply with what its arguments got, whole and
    streamed alike (finish_reason length says why); a call whose arguments had not begun is not."""
    backend.script = says(*REQUIRED_TEXT[:2], reason="length")
    body = chat(client, tool_choice="required").get_json()
    check_response(spec, body)
    [choice] = body["choices"]
    assert choice["finish_reason"] == "length"
    assert [c["function"] for c in choice["message"]["tool_calls"]] == [{"name": "get_weather",
                                                                        "arguments": '{"city": "Pa'}]
    deltas = [c["choices"][0]["delta"] for c in streamed_chunks(spec, chat(client, tool_choice="required", stream=True))]
    streamed = "".join(t["function"]["arguments"] for d in deltas for t in d.get("tool_calls", []))
    assert streamed == '{"city": "Pa'
    backend.script = says(*REQUIRED_TEXT[:3], reason="length")  # the second call's name, not its arguments
    body = chat(client, tool_choice="required").get_json()
    assert [c["function"]["name"] for c in body["choices"][0]["message"]["tool_calls"]] == ["get_weather"]


def test_a_named_call_streams_its_arguments_as_they_come(client, backend, spec):
    pieces = ['{"city', '": "Pa', 'ris"}']
    backend.script = says(*pieces)
    response = chat(client, tool_choice=NAMED, stream=True)
    chunks = streamed_chunks(spec, response)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    first = deltas[0]
    assert first["role"] == "assistant" and first["content"] is None
    [call] = first["tool_calls"]
    assert call["index"] == 0 and call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"] == {"name": "get_weather", "arguments": pieces[0]}
    assert [d["tool_calls"] for d in deltas[1:-1]] == [[{"index": 0, "function": {"arguments": p}}] for p in pieces[1:]]
    assert deltas[-1] == {} and chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_required_calls_stream_their_arguments_as_they_come(client, backend, spec):
    """Each call's name once its element reaches its parameters, then the parameters' text in
    the pieces the model writes them (vLLM and OpenAI stream arguments so)."""
    backend.script = says(*REQUIRED_TEXT)
    response = chat(client, tool_choice="required", stream=True)
    chunks = streamed_chunks(spec, response)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": None}  # the first piece reaches no parameters
    calls = [d["tool_calls"] for d in deltas[1:-1]]
    assert calls[0][0]["id"].startswith("call_") and calls[0][0]["type"] == "function"
    assert [[(c["index"], c["function"].get("name"), c["function"]["arguments"]) for c in cs] for cs in calls] == [
        [(0, "get_weather", ""), (0, None, '{"city": "Pa')], [(0, None, 'ris"}')], [(1, "noop", ""), (1, None, "{}")]]
    assert deltas[-1] == {} and chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_each_choice_has_its_own_calls(client, backend, spec):
    def script(params):
        assert params.sampling.n == 2
        return [TextDelta('[{"name": "noop", "parameters": {}}', 1), TextDelta('[{"name": "noop", ', 0),
                TextDelta('"parameters": {}}]', 0), TextDelta("]", 1),
                Finished("eos_token", 3, 8, (ChoiceEnd(0, "eos_token", 4), ChoiceEnd(1, "eos_token", 4)))]
    backend.script = script
    response = chat(client, tool_choice="required", stream=True, n=2)
    openapi_sse.check_sse(spec, "/v1/chat/completions", response.get_data())
    calls = [(c["choices"][0]["index"], t["index"], t["function"]["name"])
             for c in sse_data(response)[:-1] for t in c["choices"][0]["delta"].get("tool_calls", []) if "id" in t]
    assert calls == [(1, 0, "noop"), (0, 0, "noop")]


def test_logprobs_of_text_that_completes_no_call_are_still_sent(client, backend, spec):
    piece = TokenLogprobs(tokens=('[{"name": "',), token_ids=(7,), logprobs=(-0.5,))
    backend.script = lambda params: [TextDelta('[{"name": "', 0, piece),
                                     Finished("length", prompt_tokens=3, completion_tokens=1)]
    response = chat(client, tool_choice="required", stream=True, logprobs=True)
    openapi_sse.check_sse(spec, "/v1/chat/completions", response.get_data())
    chunks = sse_data(response)[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": None}
    assert [t["logprob"] for t in chunks[0]["choices"][0]["logprobs"]["content"]] == [-0.5]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_tool_choice_none_answers_text_with_the_tools_in_the_prompt(client, backend, spec):
    body = chat(client, tool_choice="none").get_json()
    check_response(spec, body)
    assert backend.last_params.sampling.guide is None
    assert backend.last_params.prompt.startswith("TOOLS ")
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello, world ✓!"}


def test_earlier_calls_and_their_results_reach_the_template(client, backend):
    history = [*USER,
               {"role": "assistant", "content": None, "refusal": None, "tool_calls": [
                   {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                   {"id": "call_2", "type": "function", "function": {"name": "noop", "arguments": "not json"}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
               {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "done"}]}]
    response = client.post("/v1/chat/completions", json={"messages": history}, headers=AUTH)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert backend.last_params.prompt == (
        "<user>Weather in Paris?\n"
        '<assistant>CALL get_weather {"city": "Paris"} city=ParisCALL noop "not json" city=\n'
        "<tool>RESULT OF call_1: 18 C\n<tool>RESULT OF call_2: done\n<assistant>")


BAD = [
    ({"tool_choice": "auto"}, "tool_choice", 'tool_choice "auto" (the default when tools are given) is not supported'),
    ({"tool_choice": "sometimes"}, "tool_choice", 'tool_choice must be one of "none", "auto", "required" or'),
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     'tool_choice names function "nope", which is not in tools'),
    ({"tool_choice": {"type": "function", "function": {"name": "noop", "x": 1}}}, "tool_choice",
     "tool_choice.function has an unrecognized field: x"),
    ({"tool_choice": {"type": "tool", "function": {"name": "noop"}}}, "tool_choice",
     'tool_choice.type must be "function", got string "tool"'),
    ({"tool_choice": {"type": "function"}}, "tool_choice", "tool_choice.function must be an object"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format",
     'response_format cannot be used when tool_choice forces a call ("required")'),
    ({"tool_choice": NAMED, "parallel_tool_calls": "no"}, "parallel_tool_calls", "parallel_tool_calls must be a boolean"),
    ({"tools": [TOOLS[0], TOOLS[0]], "tool_choice": "required"}, "tools",
     'tools[1].function.name "get_weather" is declared twice'),
    ({"tools": [{"type": "function", "function": {"name": "a b"}}], "tool_choice": "required"}, "tools",
     "tools[0].function.name must be 1 to 64 letters, digits, underscores or dashes, got a b"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}], "tool_choice": "required"},
     "tools", "tools[0].function.parameters must be an object, got array"),
    ({"tools": [{"type": "code_interpreter"}], "tool_choice": "required"}, "tools",
     'tools[0].type must be "function", got code_interpreter'),
    ({"tools": [{"type": "function"}], "tool_choice": "required"}, "tools", "tools[0].function is required"),
    ({"tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)], "tool_choice": "required"},
     "tools", "tools must have at most 128 items, got 129"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"enum": ["x" * 100] * 700}}}}}],
      "tool_choice": "required"}, "tools", "the schema of the tools' calls must be at most 65536 characters"),
    ({"tools": [], "tool_choice": NAMED}, "tool_choice", "tool_choice needs tools"),
    ({"functions": [{"name": "f"}]}, "functions",
     "functions (OpenAI's deprecated form of tools) are not supported: send tools"),
    ({"function_call": {"name": "f"}}, "function_call",
     "function_call (OpenAI's deprecated form of tool_choice) is not supported: send tool_choice"),
    ({"messages": [{"role": "tool", "content": "x"}], "tool_choice": "none"}, "messages",
     "messages[0].tool_call_id is required in tool messages"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}], "tool_choice": "none"},
     "messages", "messages[0].tool_calls are only allowed in assistant messages"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": {}}}]}], "tool_choice": "none"},
     "messages", "messages[0].tool_calls[0].function.arguments must be a string, got object"),
    ({"messages": [{"role": "assistant", "content": None}], "tool_choice": "none"}, "messages",
     "messages[0].content must be a string or an array of text parts, got null"),
]


@pytest.mark.parametrize(("body", "param", "message"), BAD)
def test_tool_requests_that_cannot_be_served_are_400_before_the_backend(client, backend, body, param, message):
    response = chat(client, **body)
    assert response.status_code == 400, response.get_data(as_text=True)
    error = response.get_json()["error"]
    assert (error["param"], error["type"]) == (param, "invalid_request_error")
    assert error["message"].startswith(message), error["message"]
    assert backend.calls == []


def test_an_auto_choice_without_tools_is_plain_text(client, backend):
    response = client.post("/v1/chat/completions", json={"messages": USER, "tools": [], "tool_choice": "auto"},
                           headers=AUTH)
    assert response.status_code == 200
    assert backend.last_params.sampling.guide is None and not backend.last_params.prompt.startswith("TOOLS")


def test_tokenize_renders_tools_as_chat_completions_does(client, backend):
    """/tokenize with messages and tools gives the ids of the prompt a tool request sends."""
    client.post("/v1/chat/completions", json={"messages": USER, "tools": TOOLS, "tool_choice": "required"}, headers=AUTH)
    prompt = backend.last_params.prompt
    assert prompt.startswith("TOOLS ")
    response = client.post("/tokenize", json={"messages": USER, "tools": TOOLS}, headers=AUTH)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert backend.tokenizer_calls[-1] == ("tokenize", backend.last_params.model, prompt, False)
    response = client.post("/tokenize", json={"prompt": "x", "tools": TOOLS}, headers=AUTH)
    assert_error(response, 400, "invalid_request_error", "tools", "tools go with messages")
