"""POST /v1/responses (gateway.responses): OpenAI's Responses API, through the official
``openai`` client's ``responses`` against the in-process gateway (WSGI transport, fake backend),
its bodies and events checked against the app's own /openapi.json."""

from __future__ import annotations

import json

import httpx2
import jsonschema_rs
import openai
import pytest
from openai_fixtures import AUTH, KEY, MODEL
from test_gateway_anthropic import check_events, make_app  # the app with the tools template and hermes
from test_gateway_openai_tools import WEATHER, says
from test_gateway_output_controls import piece

from gateway.backend import Admitted, Finished, TextDelta
from gateway.errors import ServerError
from gateway.responses import responses_param
from trident.contract import ModelLimits

TOOL = {"type": "function", "name": "get_weather", "description": "The weather", "parameters": WEATHER}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.fixture
def app(tmp_path):
    return make_app(tmp_path)


def client_of(app):
    http = httpx2.Client(transport=httpx2.WSGITransport(app=app))
    return openai.OpenAI(base_url="http://gateway/v1", api_key=KEY, http_client=http, max_retries=0)


def check_response(spec, body):
    jsonschema_rs.Draft202012Validator({**spec, "$ref": "#/components/schemas/ResponsesResponse"}).validate(body)
    return body


def events_of(spec, response):
    """The stream's events, once checked against the document (order, numbering, shapes)."""
    return check_events(spec, response, "/v1/responses")


def post(web, **body):
    return web.post("/v1/responses", json={"input": "Weather in Paris?", **body}, headers=AUTH)


def test_the_official_client_gets_a_response_and_a_stream(app):
    flask_app, backend, web, spec = app
    client = client_of(flask_app)
    response = client.responses.create(model=MODEL, input="Weather in Paris?", instructions="Be brief.",
                                       max_output_tokens=20)
    assert response.object == "response" and response.id.startswith("resp_") and response.status == "completed"
    assert response.output_text == "Hello, world ✓!" and response.output[0].role == "assistant"
    assert response.usage.input_tokens > 0 and response.usage.output_tokens == 6
    assert response.usage.total_tokens == response.usage.input_tokens + 6
    assert response.instructions == "Be brief." and response.max_output_tokens == 20 and response.error is None
    assert backend.last_params.prompt == "<system>Be brief.\n<user>Weather in Paris?\n<assistant>"
    with client.responses.stream(model=MODEL, input="Weather in Paris?", max_output_tokens=20) as stream:
        deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == "Hello, world ✓!" == final.output_text and final.status == "completed"
    assert final.usage.output_tokens == 6
    check_response(spec, post(web, max_output_tokens=20).get_json())
    kinds = [e["type"] for e in events_of(spec, post(web, max_output_tokens=20, stream=True))]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * 6, "response.output_text.done",
                     "response.content_part.done", "response.output_item.done", "response.completed"]


def test_input_items_become_the_chat_turns(app):
    """Messages (developer is a system turn), an assistant's reasoning and calls joined to its
    turn, the calls' outputs as tool messages."""
    _, backend, web, _ = app
    items = [{"role": "developer", "content": "Use tools."},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather"},
                                                              {"type": "input_text", "text": "in Paris?"}]},
             {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text",
                                                                             "text": "Call it."}]},
             {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
             {"type": "function_call_output", "call_id": "call_1", "output": "18 C"},
             {"role": "assistant", "content": [{"type": "output_text", "text": "It is 18 C.", "annotations": []}]},
             {"role": "user", "content": "Thanks"}]
    assert post(web, input=items, tools=[TOOL]).status_code == 200
    prompt = backend.last_params.prompt
    assert prompt.endswith('<system>Use tools.\n<user>Weather\nin Paris?\n<assistant>CALL get_weather '
                           '{"city": "Paris"} city=Paris\n<tool>RESULT OF call_1: 18 C\n'
                           '<assistant>It is 18 C.\n<user>Thanks\n<assistant>'), prompt


@pytest.mark.parametrize("stream", [False, True])
def test_calls_forced_and_chosen_become_function_call_items(tmp_path, stream):
    """A named function (constrained), "required", and "auto" with the deployment's parser; the
    thinking (REASONING_PARSER) a reasoning item first."""
    flask_app, backend, web, spec = make_app(tmp_path, REASONING_PARSER="qwen3")
    for choice, script in ((({"type": "function", "name": "get_weather"}), says('{"city": ', '"Paris"}')),
                           ("required", says('[{"name": "get_weather", "parameters": {"city": "Paris"}}]')),
                           ("auto", says("<think>They want", " Paris.</think>", CALL))):
        backend.script = script
        response = post(web, tools=[TOOL], tool_choice=choice, stream=stream)
        if stream:
            events = events_of(spec, response)
            final = events[-1]["response"]
            assert [e["arguments"] for e in events if e["type"] == "response.function_call_arguments.done"] == \
                ['{"city": "Paris"}']
            added = [e["item"]["type"] for e in events if e["type"] == "response.output_item.added"]
            assert added == [item["type"] for item in final["output"]]
        else:
            final = check_response(spec, response.get_json())
        calls = [item for item in final["output"] if item["type"] == "function_call"]
        assert [(c["name"], json.loads(c["arguments"]), c["status"]) for c in calls] == \
            [("get_weather", {"city": "Paris"}, "completed")]
        assert calls[0]["call_id"].startswith("call_") and calls[0]["id"].startswith("fc_")
        if choice == "auto":
            assert final["output"][0]["type"] == "reasoning"
            assert final["output"][0]["content"] == [{"type": "reasoning_text", "text": "They want Paris."}]
    client = client_of(flask_app)
    backend.script = says("<think>Paris.</think>", CALL)
    [thought, call] = client.responses.create(model=MODEL, input="Weather?", tools=[TOOL]).output
    assert thought.type == "reasoning" and thought.content[0].text == "Paris."
    assert call.type == "function_call" and json.loads(call.arguments) == {"city": "Paris"}


def test_text_format_is_the_chat_response_format(app):
    _, backend, web, spec = app
    backend.script = says('{"a": 1}')
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    body = check_response(spec, post(web, text={"format": {"type": "json_schema", "name": "a", "schema": schema,
                                                           "strict": True}}).get_json())
    assert body["output"][0]["content"][0]["text"] == '{"a": 1}' and body["text"]["format"]["name"] == "a"
    guide = backend.last_params.sampling.guide
    assert guide.type == "json_schema" and json.loads(guide.text) == schema
    assert post(web, text={"format": {"type": "json_object"}}).status_code == 200
    guide = backend.last_params.sampling.guide
    assert web.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                  "response_format": {"type": "json_object"}},
                    headers=AUTH).status_code == 200
    assert guide is not None and guide == backend.last_params.sampling.guide  # chat's json_object
    assert post(web, text={"format": {"type": "text"}}).status_code == 200
    assert backend.last_params.sampling.guide is None


def test_logprobs_come_with_the_output_text_when_included(app):
    """include "message.output_text.logprobs" (and top_logprobs for alternatives): chat's
    log-probabilities in the output_text, whole and streamed (the deltas' lists add up to the
    done event's and the final item's)."""
    flask_app, backend, web, spec = app

    def script(params):
        k = params.sampling.logprobs
        assert k is not None
        return [TextDelta("Hel", 0, piece(("H", -0.5), ("el", -0.25), top=k)),
                TextDelta("lo!", 0, piece(("lo", -0.125), ("!", -1.0), top=k)),
                Finished("eos_token", prompt_tokens=3, completion_tokens=4)]

    backend.script = script
    body = check_response(spec, post(web, include=["message.output_text.logprobs"]).get_json())
    part = body["output"][0]["content"][0]
    assert part["text"] == "Hello!" and [(t["token"], t["logprob"]) for t in part["logprobs"]] == [
        ("H", -0.5), ("el", -0.25), ("lo", -0.125), ("!", -1.0)]
    assert all(t["top_logprobs"] == [] for t in part["logprobs"]) and backend.last_params.sampling.logprobs == 0
    body = check_response(spec, post(web, top_logprobs=2).get_json())
    assert body["top_logprobs"] == 2 and body["output"][0]["content"][0]["logprobs"][0]["top_logprobs"] == [
        {"token": "H", "logprob": -0.5, "bytes": [72]}, {"token": "alt0", "logprob": -1.5, "bytes": [97, 108, 116, 48]}]
    events = events_of(spec, post(web, top_logprobs=2, stream=True))
    deltas = [t for e in events if e["type"] == "response.output_text.delta" for t in e["logprobs"]]
    [done] = [e for e in events if e["type"] == "response.output_text.done"]
    final = events[-1]["response"]["output"][0]["content"][0]["logprobs"]
    assert [t["token"] for t in deltas] == ["H", "el", "lo", "!"] and deltas == done["logprobs"] == final
    with client_of(flask_app).responses.stream(model=MODEL, input="x", include=["message.output_text.logprobs"],
                                                top_logprobs=1) as stream:
        final = stream.get_final_response()
    assert [t.token for t in final.output[0].content[0].logprobs] == ["H", "el", "lo", "!"]
    backend.script = says("Hello")
    assert post(web).get_json()["output"][0]["content"][0]["logprobs"] == []  # not asked: none
    assert backend.last_params.sampling.logprobs is None


def test_a_reply_cut_by_max_output_tokens_is_incomplete(app):
    """The response, and the item the cut ended (text; a named call's arguments)."""
    _, backend, web, spec = app
    backend.script = says("Hello", " there", reason="length")
    body = check_response(spec, post(web, max_output_tokens=2).get_json())
    assert body["status"] == "incomplete" and body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["output"][0]["status"] == "incomplete"
    events = events_of(spec, post(web, max_output_tokens=2, stream=True))
    assert events[-1]["type"] == "response.incomplete" and events[-1]["response"]["status"] == "incomplete"
    assert events[-2]["type"] == "response.output_item.done" and events[-2]["item"]["status"] == "incomplete"
    # a call reported whole stays completed (the cut came after it); a named call's cut arguments do not
    for choice, script, status in (("required", says('[{"name": "get_weather", "parameters": {"city": "Paris"}}, {"na',
                                                     reason="length"), "completed"),
                                   ({"type": "function", "name": "get_weather"}, says('{"city": "Pa', reason="length"),
                                    "incomplete")):
        backend.script = script
        for stream in (False, True):
            response = post(web, tools=[TOOL], tool_choice=choice, max_output_tokens=9, stream=stream)
            body = events_of(spec, response)[-1]["response"] if stream else check_response(spec, response.get_json())
            assert body["status"] == "incomplete" and [i["status"] for i in body["output"]] == [status], body


def test_the_stream_starts_once_the_server_took_the_request_and_ends_with_an_error_event_on_failure(app):
    _, backend, web, spec = app
    backend.script = lambda params: [Admitted("vm:1", prompt_tokens=3), "Hel", ServerError("the engine went away",
                                                                                           status=503)]
    events = events_of(spec, post(web, stream=True))
    assert [e["type"] for e in events[:2]] == ["response.created", "response.in_progress"]
    assert events[-1]["type"] == "error" and events[-1]["code"] == "service_unavailable"
    assert events[-1]["message"] == "the engine went away"


@pytest.mark.parametrize("body, param", [
    ({"input": None}, "input"),
    ({"input": []}, "input"),
    ({"input": [{"role": "robot", "content": "x"}]}, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]}, "input"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f"}]}, "input"),
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"background": True}, "background"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"max_output_tokens": 10**9}, "max_output_tokens"),
    ({"temperature": 3}, "temperature"),
    ({"tools": [{"type": "web_search"}]}, "tools"),
    ({"tools": [{**TOOL, "name": "bad name"}]}, "tools"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"text": {"format": {"type": "json_schema"}}}, "text"),
    ({"top_logprobs": 21}, "top_logprobs"),
    ({"model": "other"}, "model"),
    ({"truncation": "middle"}, "truncation"),
    ({"truncation": True}, "truncation"),
])
def test_bad_requests_are_4xx_naming_the_responses_field(app, body, param):
    _, _, web, _ = app
    response = post(web, **body)
    error = response.get_json()["error"]
    assert 400 <= response.status_code < 500 and error["param"] == param, error


def test_chat_field_names_map_to_the_responses_fields():
    assert [responses_param(p) for p in ("max_tokens", "messages[2].content", "tools[1].function.parameters",
                                         "response_format", "tool_choice", None)] == [
        "max_output_tokens", "input", "tools[1].parameters", "text", "tool_choice", None]


def test_stateless_fields_are_accepted_and_change_nothing(app):
    _, backend, web, spec = app
    body = check_response(spec, post(web, store=True, metadata={"k": "v"}, include=["reasoning.encrypted_content"],
                                     reasoning={"effort": "low"}, truncation="disabled", user="u",
                                     prompt_cache_key="p", background=False).get_json())
    assert body["store"] is False and body["metadata"] == {"k": "v"}
    assert web.get("/v1/responses/" + body["id"], headers=AUTH).status_code == 404  # nothing was stored
    assert web.post("/v1/responses", json={"input": "x"}).status_code == 401


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": [{"type": "output_text", "text": text, "annotations": []}]}


CONVERSATION = [user("A" * 60), assistant("B" * 60), user("C" * 60), assistant("D" * 10), user("Last?")]
WHOLE = f"<system>Be brief.\n<user>{'A' * 60}\n<assistant>{'B' * 60}\n<user>{'C' * 60}\n<assistant>DDDDDDDDDD\n" \
        "<user>Last?\n<assistant>"
LAST_TWO = f"<system>Be brief.\n<user>{'C' * 60}\n<assistant>DDDDDDDDDD\n<user>Last?\n<assistant>"


def ask(web, spec, **body):
    response = post(web, instructions="Be brief.", input=CONVERSATION, max_output_tokens=20, **body)
    return response.status_code, check_response(spec, response.get_json()) if response.status_code == 200 \
        else response.get_json()["error"]


@pytest.mark.parametrize("stream", [False, True])
def test_truncation_auto_drops_the_oldest_turns_until_the_conversation_fits(app, stream):
    """The fake tokenizer counts a token per character (and one special): the whole conversation
    (~300 tokens) and 20 to generate do not fit a context of 200; keeping the instructions and
    the turns from the second user message on does (137 + 20), and keeping also the turn before
    it would not: those are the turns the engine gets. Without truncation the whole prompt goes
    (and the llm model would answer its 400)."""
    _, backend, web, spec = app
    backend.model_limits = ModelLimits(max_context=200)
    assert len(WHOLE) + 1 + 20 > 200 and len(LAST_TWO) + 1 + 20 <= 200
    status, body = ask(web, spec, truncation="auto", stream=stream) if not stream else (None, None)
    if stream:
        events = events_of(spec, post(web, instructions="Be brief.", input=CONVERSATION, max_output_tokens=20,
                                      truncation="auto", stream=True))
        body = events[-1]["response"]
        assert events[-1]["type"] == "response.completed"
    else:
        assert status == 200
    assert backend.last_params.prompt == LAST_TWO and body["truncation"] == "auto"
    counted = [text for kind, _, text, special in backend.tokenizer_calls if kind == "tokenize"]
    # counted as the llm model tokenizes the rendered conversation: without special tokens added
    assert WHOLE in counted and not any(special for *_, special in backend.tokenizer_calls)
    assert backend.last_params.add_special_tokens is False
    status, body = ask(web, spec)
    assert status == 200 and backend.last_params.prompt == WHOLE and body["truncation"] == "disabled"
    status, body = ask(web, spec, truncation="disabled")
    assert status == 200 and backend.last_params.prompt == WHOLE and body["truncation"] == "disabled"


def test_truncation_auto_leaves_a_conversation_that_fits_as_it_is_without_counting_a_short_one(app):
    _, backend, web, spec = app
    status, body = ask(web, spec, truncation="auto")  # context 2048: ~300 bytes need no count
    assert status == 200 and backend.last_params.prompt == WHOLE and backend.tokenizer_calls == []
    backend.model_limits = ModelLimits(max_context=len(WHOLE) + 1 + 20)  # fits exactly, once counted
    status, body = ask(web, spec, truncation="auto")
    assert status == 200 and backend.last_params.prompt == WHOLE
    assert [text for _, _, text, _ in backend.tokenizer_calls] == [WHOLE]


def test_truncation_auto_keeps_as_many_turns_as_fit(app):
    """Forty turns of growing length: what is kept fits, and one more turn would not."""
    _, backend, web, spec = app
    backend.model_limits = ModelLimits(max_context=400)
    turns = [item for i in range(40) for item in (user(f"question {i} " + "q" * i), assistant(f"answer {i}"))]
    response = post(web, input=[*turns, user("And now?")], max_output_tokens=30, truncation="auto")
    assert response.status_code == 200, response.get_json()
    prompt = backend.last_params.prompt
    first = int(prompt.split("<user>question ", 1)[1].split(" ", 1)[0])
    assert prompt.startswith(f"<user>question {first} ") and prompt.endswith("<user>And now?\n<assistant>")
    assert len(prompt) + 1 + 30 <= 400
    one_more = f"<user>question {first - 1} " + "q" * (first - 1) + f"\n<assistant>answer {first - 1}\n" + prompt
    assert len(one_more) + 1 + 30 > 400
    assert len([kind for kind, *_ in backend.tokenizer_calls]) <= 8  # a binary search over 41 turns, not each


def test_truncation_auto_keeps_the_system_messages_and_starts_at_a_user_message(app):
    """A call and its output are never split: the kept turns start at a user message."""
    _, backend, web, spec = app
    backend.model_limits = ModelLimits(max_context=500)  # the tools' definitions take ~300
    items = [{"role": "developer", "content": "Use tools."}, user("W" * 200),
             {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
             {"type": "function_call_output", "call_id": "call_1", "output": "18 C"},
             user("And Rome?"),
             {"type": "function_call", "call_id": "call_2", "name": "get_weather", "arguments": '{"city": "Rome"}'},
             {"type": "function_call_output", "call_id": "call_2", "output": "21 C"}]
    response = post(web, input=items, tools=[TOOL], max_output_tokens=10, truncation="auto")
    assert response.status_code == 200, response.get_json()
    prompt = backend.last_params.prompt
    assert prompt.endswith('<system>Use tools.\n<user>And Rome?\n<assistant>CALL get_weather {"city": "Rome"} '
                           'city=Rome\n<tool>RESULT OF call_2: 21 C\n<assistant>'), prompt
    assert "WWW" not in prompt and "call_1" not in prompt


def test_truncation_auto_answers_the_character_bound_by_dropping_turns_too(app):
    """A conversation over the characters any prompt may have (checked before tokenizing) is a
    400 naming input, or with truncation auto served from its last turns."""
    _, backend, web, spec = app
    backend.model_limits = ModelLimits(max_context=2048, max_prompt_chars=150)
    status, error = ask(web, spec)
    assert status == 400 and error["param"] == "input" and "characters" in error["message"], error
    status, body = ask(web, spec, truncation="auto")
    assert status == 200 and backend.last_params.prompt == LAST_TWO and body["usage"]["input_tokens"] > 0


@pytest.mark.parametrize("limits", [ModelLimits(max_context=60), ModelLimits(max_prompt_chars=30)])
def test_truncation_auto_is_a_400_when_the_last_turn_alone_does_not_fit(app, limits):
    _, backend, web, spec = app
    backend.model_limits = limits
    calls = len(backend.calls)
    status, error = ask(web, spec, truncation="auto")
    assert status == 400 and error["param"] == "input", error
    assert "even with truncation auto" in error["message"] and len(backend.calls) == calls
