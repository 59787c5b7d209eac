"""REASONING_PARSER (gateway.reasoning): a reasoning model's thinking read out of its chat
replies, as a whole and in pieces of every size, and through the app with the fake backend
(replies checked against the app's own /openapi.json)."""

from __future__ import annotations

import json

import pytest
from gateway_fakes import Finished
from openai_fixtures import AUTH, make_openai_app, tokenizer_dir
from test_gateway_openai_tools import TOOLS, TOOLS_TEMPLATE, USER, check_response, says, streamed_chunks

from gateway.backend import ChoiceEnd, TextDelta
from gateway.reasoning import ReasoningReader, split_reasoning

CASES = [
    # text, reasoning, content
    ("<think>2+2 is 4.</think>\n\nIt is 4.", "2+2 is 4.", "\n\nIt is 4."),
    ("2+2 is 4.</think>It is 4.", "2+2 is 4.", "It is 4."),  # the template opened the thinking
    ("\n<think>\nhm</think>", "\nhm", None),  # nothing after it: no content
    ("<think>still thinking", "still thinking", None),  # cut while thinking: all reasoning
    ("a < b </thin", "a < b </thin", None),
    ("x</think>a</think>b", "x", "a</think>b"),  # only the first ends the thinking
    ("<thi", "<thi", None),
    ("", None, None),
]


def pieces(text: str, size: int) -> tuple[str, str, bool]:
    reader = ReasoningReader()
    thought, content = [], []
    for start in range(0, len(text), size):
        t, c = reader.feed(text[start:start + size])
        thought.append(t)
        content.append(c)
    t, c = reader.finish()
    return "".join(thought) + t, "".join(content) + c, reader.thought_ended


@pytest.mark.parametrize(("text", "thought", "content"), CASES)
def test_reasoning_and_content_of_a_whole_text_and_of_its_pieces_of_every_size(text, thought, content):
    assert split_reasoning(text) == (thought, content)
    for size in range(1, len(text) + 1):
        got_thought, got_content, ended = pieces(text, size)
        assert (got_thought or None, (got_content or None) if ended else None) == (thought, content), size


def test_thinking_is_handed_out_as_soon_as_it_cannot_be_the_end_of_it():
    reader = ReasoningReader()
    assert reader.feed("  ") == ("", "")
    assert reader.feed("<th") == ("", "")  # may be <think>
    assert reader.feed("ink>Let me") == ("Let me", "")
    assert reader.feed(" see </th") == (" see ", "")
    assert reader.feed("ink>Yes") == ("", "Yes")
    assert reader.feed(".") == ("", ".")


def test_a_parser_the_gateway_does_not_have_stops_it_from_starting(tmp_path):
    for name in (None, "", "deepseek_r1", "qwen3"):
        make_openai_app(tmp_path / str(name), {"REASONING_PARSER": name})
    with pytest.raises(ValueError, match="REASONING_PARSER must be one of deepseek_r1, qwen3"):
        make_openai_app(tmp_path / "bad", {"REASONING_PARSER": "granite"})


# -- through the app -----------------------------------------------------------------------------


@pytest.fixture
def app(tmp_path):
    app, backend = make_openai_app(tmp_path, {"TOKENIZER_DIR": str(tokenizer_dir(tmp_path / "t", TOOLS_TEMPLATE)),
                                              "REASONING_PARSER": "deepseek_r1", "TOOL_CALL_PARSER": "hermes"})
    client = app.test_client()
    return client, backend, client.get("/openapi.json").get_json()


def chat(client, **body):
    return client.post("/v1/chat/completions", json={"messages": USER, **body}, headers=AUTH)


SPOKEN = ["<think>The user", " wants Paris.</th", "ink>\n\nIt is ", "sunny."]


def test_a_reply_has_its_reasoning_apart_from_its_content_whole_and_streamed(app):
    client, backend, spec = app
    backend.script = says(*SPOKEN)
    body = chat(client).get_json()
    check_response(spec, body)
    message = body["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "\n\nIt is sunny.", "reasoning": "The user wants Paris.",
                       "reasoning_content": "The user wants Paris."}
    chunks = streamed_chunks(spec, chat(client, stream=True))
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert "".join(d.get("reasoning", "") for d in deltas) == "The user wants Paris."
    assert all(d.get("reasoning") == d.get("reasoning_content") for d in deltas)
    assert "".join(d.get("content") or "" for d in deltas) == "\n\nIt is sunny."
    first_content = next(i for i, d in enumerate(deltas) if d.get("content"))
    assert not any(d.get("reasoning") for d in deltas[first_content + 1:])  # thinking first, then the answer


def test_include_reasoning_false_and_thinking_turned_off(app):
    client, backend, spec = app
    backend.script = says(*SPOKEN)
    message = chat(client, include_reasoning=False).get_json()["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "\n\nIt is sunny."}
    chunks = streamed_chunks(spec, chat(client, stream=True, include_reasoning=False))
    assert not any("reasoning" in c["choices"][0]["delta"] for c in chunks)
    backend.script = says("It is sunny.")  # Qwen3 with enable_thinking false: no thinking at all
    body = chat(client, chat_template_kwargs={"enable_thinking": False}).get_json()
    check_response(spec, body)
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "It is sunny.", "reasoning": None,
                                             "reasoning_content": None}
    body = chat(client).get_json()  # thinking on and no </think>: all of it is reasoning
    assert body["choices"][0]["message"]["content"] is None
    assert body["choices"][0]["message"]["reasoning"] == "It is sunny."


def test_calls_are_read_from_the_content_only(app):
    client, backend, spec = app
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    backend.script = says("<think>I could write ", call, " here.</think>", call)
    for stream in (False, True):
        response = chat(client, tools=TOOLS, stream=stream)
        if stream:
            chunks = streamed_chunks(spec, response)
            calls = [c for chunk in chunks for c in chunk["choices"][0]["delta"].get("tool_calls", [])]
            thought = "".join(chunk["choices"][0]["delta"].get("reasoning", "") for chunk in chunks)
            reason = chunks[-1]["choices"][0]["finish_reason"]
        else:
            body = response.get_json()
            check_response(spec, body)
            message = body["choices"][0]["message"]
            calls, thought, reason = message["tool_calls"], message["reasoning"], body["choices"][0]["finish_reason"]
        assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"city": "Paris"}]
        assert thought == f"I could write {call} here." and reason == "tool_calls"


def test_a_constrained_reply_is_all_content(app):
    client, backend, spec = app
    backend.script = says('{"a": 1}')
    body = chat(client, response_format={"type": "json_object"}).get_json()
    check_response(spec, body)
    assert body["choices"][0]["message"] == {"role": "assistant", "content": '{"a": 1}'}


def test_each_choice_has_its_own_reasoning(app):
    client, backend, spec = app
    backend.script = lambda params: [
        TextDelta("<think>a</think>A", 0), TextDelta("b</think>B", 1),
        Finished("eos_token", prompt_tokens=3, completion_tokens=4,
                 choices=(ChoiceEnd(0, "eos_token", 2), ChoiceEnd(1, "eos_token", 2)))]
    body = chat(client, n=2).get_json()
    check_response(spec, body)
    assert [(c["message"]["reasoning"], c["message"]["content"]) for c in body["choices"]] == [("a", "A"), ("b", "B")]


def test_an_assistants_thinking_sent_back_reaches_the_template_under_both_names(tmp_path):
    template = ("{% for m in messages %}{{ m['role'] }}:{{ m['content'] }}"
                "{% if m.reasoning_content is defined %}[{{ m.reasoning_content }}|{{ m.reasoning }}]{% endif %}\n"
                "{% endfor %}")
    app, backend = make_openai_app(tmp_path, {"TOKENIZER_DIR": str(tokenizer_dir(tmp_path / "t", template))})
    client = app.test_client()
    for name in ("reasoning", "reasoning_content"):
        messages = [*USER, {"role": "assistant", "content": "Paris", name: "They asked."}, *USER]
        assert client.post("/v1/chat/completions", json={"messages": messages}, headers=AUTH).status_code == 200
        assert "assistant:Paris[They asked.|They asked.]user:" in backend.last_params.prompt
    bad = [[{"role": "user", "content": "x", "reasoning": "y"}],
           [{"role": "assistant", "content": "x", "reasoning": "y", "reasoning_content": "z"}]]
    for messages in bad:
        response = client.post("/v1/chat/completions", json={"messages": messages}, headers=AUTH)
        assert response.status_code == 400, response.get_json()
