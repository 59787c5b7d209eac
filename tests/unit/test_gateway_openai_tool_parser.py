"""tool_choice "auto" (gateway.tool_parsers): the hermes syntax read out of a choice's text, as a
whole and in pieces of every size, and through the app with TOOL_CALL_PARSER (fake backend;
replies checked against the app's own /openapi.json)."""

from __future__ import annotations

import itertools
import json

import pytest
from gateway_fakes import Finished
from openai_fixtures import make_openai_app, tokenizer_dir
from test_gateway_openai import backend, client  # noqa: F401 (fixtures)
from test_gateway_openai_tools import NAMED, TOOLS_TEMPLATE, chat, check_response, says, streamed_chunks

from gateway.backend import ChoiceEnd, TextDelta
from gateway.tool_parsers import AutoCalls, check_parser, split_calls

NAMES = ("get_weather", "noop")
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
NOOP = '<tool_call>\n{"name": "noop", "arguments": {}}\n</tool_call>'


def ids():
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def pieces(text: str, size: int, most=None) -> tuple[str, list[dict]]:
    reader = AutoCalls(NAMES, ids(), most=most)
    content, calls = [], []
    for start in range(0, len(text), size):
        got, new = reader.feed(text[start:start + size])
        content.append(got)
        calls.extend(new)
    content.append(reader.finish())
    return "".join(content), calls


def names_and_arguments(calls):
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


CASES = [
    # text, content, calls
    ("The weather is fine.", "The weather is fine.", []),
    (CALL, None, [("get_weather", {"city": "Paris"})]),
    ("Let me look.\n\n" + CALL + "\n" + NOOP + "\n", "Let me look.", [("get_weather", {"city": "Paris"}), ("noop", {})]),
    (CALL + "\nDone.", "Done.", [("get_weather", {"city": "Paris"})]),
    # arguments as a JSON string, and "parameters" (some models write these)
    ('<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}</tool_call>', None,
     [("get_weather", {"city": "Oslo"})]),
    ('<tool_call>{"name": "noop", "parameters": {}}</tool_call>', None, [("noop", {})]),
    # not calls of a declared function: they stay text, as does a block never closed
    ('a <tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', 'a <tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', []),
    ("a <tool_call>not json</tool_call>", "a <tool_call>not json</tool_call>", []),
    ('a <tool_call>["get_weather"]</tool_call>', 'a <tool_call>["get_weather"]</tool_call>', []),
    ('ok <tool_call>{"name": "get_weather", "argu', 'ok <tool_call>{"name": "get_weather", "argu', []),
    ("x < y and <tool", "x < y and <tool", []),
    ("  ", "  ", []),
]


@pytest.mark.parametrize(("text", "content", "calls"), CASES)
def test_content_and_calls_of_a_whole_text_and_of_its_pieces_of_every_size(text, content, calls):
    whole_content, whole_calls = split_calls(text, NAMES, ids())
    assert (whole_content, names_and_arguments(whole_calls)) == (content, calls)
    assert all(c["id"].startswith("call_") and c["type"] == "function" and "index" not in c for c in whole_calls)
    for size in range(1, len(text) + 1):
        got, streamed = pieces(text, size)
        assert got == (content or ""), size
        assert names_and_arguments(streamed) == calls and [c["index"] for c in streamed] == list(range(len(calls)))


def test_content_is_handed_out_as_soon_as_it_cannot_start_a_call_and_calls_once_closed():
    reader = AutoCalls(NAMES, ids())
    assert reader.feed("Sure") == ("Sure", [])
    assert reader.feed(", one moment. <tool") == (", one moment.", [])  # " <tool" may start a call
    assert reader.feed('_call>{"name": "noop", ') == ("", [])
    content, calls = reader.feed('"arguments": {}}</tool_call> and')
    assert content == "and" and names_and_arguments(calls) == [("noop", {})]


def test_parallel_tool_calls_false_keeps_the_first_call():
    content, calls = split_calls(CALL + NOOP, NAMES, ids(), most=1)
    assert content is None and names_and_arguments(calls) == [("get_weather", {"city": "Paris"})]
    assert names_and_arguments(pieces(CALL + NOOP, 5, most=1)[1]) == [("get_weather", {"city": "Paris"})]


def test_a_parser_the_gateway_does_not_have_stops_it_from_starting(tmp_path):
    check_parser(None)
    check_parser("hermes")
    with pytest.raises(ValueError, match="TOOL_CALL_PARSER must be one of hermes"):
        check_parser("mistral")
    with pytest.raises(ValueError, match="TOOL_CALL_PARSER"):
        make_openai_app(tmp_path, {"TOOL_CALL_PARSER": "llama4"})


# -- through the app -----------------------------------------------------------------------------


@pytest.fixture
def app_backend(tmp_path):  # test_gateway_openai's client and backend fixtures take this app
    return make_openai_app(tmp_path, {"TOKENIZER_DIR": str(tokenizer_dir(tmp_path / "tools", TOOLS_TEMPLATE)),
                                      "TOOL_CALL_PARSER": "hermes"})


@pytest.fixture
def spec(client):
    return client.get("/openapi.json").get_json()


SPOKEN = ["I will check. <tool_", 'call>\n{"name": "get_weather", "arguments": {"ci', 'ty": "Paris"}}\n</tool_call>',
          "\n<tool_call>", '{"name": "noop", "arguments": {}}</tool_call>']


@pytest.mark.parametrize("choice", ["auto", None])  # None: OpenAI's default with tools
def test_auto_leaves_the_output_free_and_answers_the_calls_the_model_wrote(client, backend, spec, choice):
    backend.script = says(*SPOKEN)
    body = chat(client, **({"tool_choice": choice} if choice else {})).get_json()
    check_response(spec, body)
    assert backend.last_params.sampling.guide is None  # not constrained: the model chooses
    assert backend.last_params.prompt.startswith("TOOLS ")  # the template shows it the functions
    [answer] = body["choices"]
    assert answer["finish_reason"] == "tool_calls"
    message = answer["message"]
    assert message["content"] == "I will check."
    assert names_and_arguments(message["tool_calls"]) == [("get_weather", {"city": "Paris"}), ("noop", {})]
    assert len({c["id"] for c in message["tool_calls"]}) == 2


def test_a_streamed_auto_reply_equals_the_whole_one(client, backend, spec):
    backend.script = says(*SPOKEN)
    response = chat(client, tool_choice="auto", stream=True)
    chunks = streamed_chunks(spec, response)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": "I will check."}  # " <tool_" held back
    calls = [c for d in deltas for c in d.get("tool_calls", [])]
    assert names_and_arguments(calls) == [("get_weather", {"city": "Paris"}), ("noop", {})]
    assert [c["index"] for c in calls] == [0, 1] and all(c["id"].startswith("call_") for c in calls)
    assert "".join(d.get("content") or "" for d in deltas) == "I will check."
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)


@pytest.mark.parametrize("stream", [False, True])
def test_an_answer_without_calls_is_text_that_ends_with_stop(client, backend, spec, stream):
    backend.script = says("It is sunny ", "in Paris. <", "3")
    response = chat(client, tool_choice="auto", stream=stream)
    if stream:
        chunks = streamed_chunks(spec, response)
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        assert not any("tool_calls" in c["choices"][0]["delta"] for c in chunks)
        reason = chunks[-1]["choices"][0]["finish_reason"]
    else:
        body = response.get_json()
        check_response(spec, body)
        message = body["choices"][0]["message"]
        text, reason = message["content"], body["choices"][0]["finish_reason"]
        assert "tool_calls" not in message
    assert (text, reason) == ("It is sunny in Paris. <3", "stop")


def test_a_call_cut_by_max_tokens_is_text_and_the_reason_is_length(client, backend, spec):
    backend.script = says("<tool_call>", '{"name": "get_weather", "argu', reason="length")
    body = chat(client, tool_choice="auto", max_tokens=2).get_json()
    check_response(spec, body)
    [answer] = body["choices"]
    assert answer["finish_reason"] == "length" and "tool_calls" not in answer["message"]
    assert answer["message"]["content"] == '<tool_call>{"name": "get_weather", "argu'


def test_auto_with_parallel_tool_calls_false_answers_one_call(client, backend, spec):
    backend.script = says(*SPOKEN)
    body = chat(client, tool_choice="auto", parallel_tool_calls=False).get_json()
    assert names_and_arguments(body["choices"][0]["message"]["tool_calls"]) == [("get_weather", {"city": "Paris"})]


def test_forced_calls_are_unchanged_beside_a_parser(client, backend, spec):
    backend.script = says('{"city": "Paris"}')
    body = chat(client, tool_choice=NAMED).get_json()
    assert backend.last_params.sampling.guide is not None
    [answer] = body["choices"]
    assert answer["message"]["content"] is None and answer["finish_reason"] == "stop"
    assert names_and_arguments(answer["message"]["tool_calls"]) == [("get_weather", {"city": "Paris"})]


def test_each_choice_of_an_auto_reply_has_its_own_calls(client, backend, spec):
    backend.script = lambda params: [
        TextDelta(CALL, 0), TextDelta("No call.", 1),
        Finished("eos_token", prompt_tokens=3, completion_tokens=4,
                 choices=(ChoiceEnd(0, "eos_token", 2), ChoiceEnd(1, "eos_token", 2)))]
    body = chat(client, tool_choice="auto", n=2).get_json()
    check_response(spec, body)
    first, second = body["choices"]
    assert first["finish_reason"] == "tool_calls" and first["message"]["content"] is None
    assert names_and_arguments(first["message"]["tool_calls"]) == [("get_weather", {"city": "Paris"})]
    assert second["finish_reason"] == "stop" and second["message"] == {"role": "assistant", "content": "No call."}
