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
from gateway.reasoning import PARSERS, SYNTAXES, ReasoningReader, split_reasoning

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


# the syntaxes of models that open their thinking themselves (glm45; mistral's tags)
OPENED_CASES = [
    ("<think>2+2 is 4.</think>\n\nIt is 4.", "2+2 is 4.", "\n\nIt is 4."),
    ("It is 4.", None, "It is 4."),  # not opened: no thinking (thinking off, or not needed)
    ("2+2 is 4.</think>It is 4.", None, "2+2 is 4.</think>It is 4."),
    ("\n<think>\nhm", "\nhm", None),  # cut while thinking: all reasoning
    ("<thi", None, "<thi"),
    ("", None, None),
]
def mistral(text: str | None) -> str | None:
    """A case of the <think> syntax in Magistral's tags."""
    return text if text is None else text.replace("<think>", "[THINK]").replace("</think>", "[/THINK]")


SEED_CASES = [  # ByteDance Seed-OSS: R1's rules with its own tags
    ("<seed:think>2+2 is 4.</seed:think>It is 4.", "2+2 is 4.", "It is 4."),
    ("2+2 is 4.</seed:think>It is 4.", "2+2 is 4.", "It is 4."),
    ("<think>x</think>y", "<think>x</think>y", None),
]
SYNTAX_CASES = ([("deepseek_r1", *case) for case in CASES] + [("glm47", *case) for case in CASES]
                + [("glm45", *case) for case in OPENED_CASES] + [("seed_oss", *case) for case in SEED_CASES]
                + [("mistral", *(mistral(part) for part in case)) for case in OPENED_CASES])



def pieces(text: str, size: int, parser: str = "deepseek_r1") -> tuple[str, str, bool]:
    reader = ReasoningReader(SYNTAXES[parser])
    thought, content = [], []
    for start in range(0, len(text), size):
        t, c = reader.feed(text[start:start + size])
        thought.append(t)
        content.append(c)
    t, c = reader.finish()
    return "".join(thought) + t, "".join(content) + c, reader.thought_ended


@pytest.mark.parametrize(("parser", "text", "thought", "content"), SYNTAX_CASES)
def test_reasoning_and_content_of_a_whole_text_and_of_its_pieces_of_every_size(parser, text, thought, content):
    assert split_reasoning(text, parser) == (thought, content)
    for size in range(1, len(text) + 1):
        got_thought, got_content, ended = pieces(text, size, parser)
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
    for name in (None, "", *PARSERS):
        make_openai_app(tmp_path / str(name), {"REASONING_PARSER": name})
    with pytest.raises(ValueError, match="REASONING_PARSER must be one of deepseek_r1, glm45, glm47, mistral, qwen3, "
                                         "seed_oss"):
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


@pytest.mark.parametrize("parser", ["glm45", "mistral"])
def test_models_that_open_their_thinking_themselves_through_the_app(tmp_path, parser):
    """glm45 and mistral: a reply that opens its thinking has it apart, whole and streamed; one
    that does not is all content; mistral's tags are special tokens, so the text is asked for
    with them (as vLLM does)."""
    app, backend = make_openai_app(tmp_path, {"TOKENIZER_DIR": str(tokenizer_dir(tmp_path / "t", TOOLS_TEMPLATE)),
                                              "REASONING_PARSER": parser})
    client, spec = app.test_client(), app.test_client().get("/openapi.json").get_json()
    spoken = ["[THINK]The user", " wants Paris.[/TH", "INK]\n\nIt is ", "sunny."] if parser == "mistral" else SPOKEN
    backend.script = says(*spoken)
    message = chat(client).get_json()["choices"][0]["message"]
    assert (message["reasoning"], message["content"]) == ("The user wants Paris.", "\n\nIt is sunny.")
    assert backend.last_params.sampling.skip_special_tokens is (parser != "mistral")
    deltas = [c["choices"][0]["delta"] for c in streamed_chunks(spec, chat(client, stream=True))]
    assert "".join(d.get("reasoning", "") for d in deltas) == "The user wants Paris."
    assert "".join(d.get("content") or "" for d in deltas) == "\n\nIt is sunny."
    backend.script = says("It is ", "sunny.")
    message = chat(client).get_json()["choices"][0]["message"]
    assert (message["reasoning"], message["content"]) == (None, "It is sunny.")


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
