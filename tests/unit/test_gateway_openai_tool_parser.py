"""tool_choice "auto" (gateway.tool_parsers): the hermes, llama3_json, mistral, pythonic,
qwen3_coder, deepseek_v3, deepseek_v31, kimi_k2, glm45/glm47 and minimax_m2 syntaxes read out of a choice's text, as a whole and in pieces of every size, and
through the app with TOOL_CALL_PARSER (fake backend; replies checked against the app's own /openapi.json)."""

from __future__ import annotations

import itertools
import json

import pytest
from gateway_fakes import Finished
from openai_fixtures import make_openai_app, tokenizer_dir
from test_gateway_openai import backend, client  # noqa: F401 (fixtures)
from test_gateway_openai_tools import NAMED, TOOLS_TEMPLATE, chat, check_response, says, streamed_chunks

from gateway.backend import ChoiceEnd, TextDelta
from gateway.tool_parsers import PARSERS, call_reader, split_calls

NAMES = ("get_weather", "noop")
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
NOOP = '<tool_call>\n{"name": "noop", "arguments": {}}\n</tool_call>'


def ids():
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def pieces(text: str, size: int, most=None, parser="hermes") -> tuple[str, list[dict]]:
    reader = call_reader(parser, NAMES, ids(), most=most)
    content, calls = [], []
    for start in range(0, len(text), size):
        got, new = reader.feed(text[start:start + size])
        content.append(got)
        calls.extend(new)
    tail, more = reader.finish()
    assert reader.calls >= len(calls + more)
    return "".join(content) + tail, calls + more


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


LLAMA = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
LLAMA_CASES = [
    ("The weather is fine.", "The weather is fine.", []),
    (LLAMA, None, [("get_weather", {"city": "Paris"})]),
    # after the <|python_tag|> token where the text keeps it, leading whitespace, "arguments"
    ('<|python_tag|>{"name": "noop", "arguments": {}}', None, [("noop", {})]),
    ('\n {"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}', None, [("get_weather", {"city": "Oslo"})]),
    # several, separated by ";" or whitespace; braces and quotes inside strings
    (LLAMA + '; {"name": "noop", "parameters": {}}', None, [("get_weather", {"city": "Paris"}), ("noop", {})]),
    (LLAMA + '\n{"name": "get_weather", "parameters": {"city": "a \\"}{[ b"}};',
     None, [("get_weather", {"city": "Paris"}), ("get_weather", {"city": 'a "}{[ b'})]),
    # from the first object that is not a call, the rest is text
    (LLAMA + " I called it.", "I called it.", [("get_weather", {"city": "Paris"})]),
    (LLAMA + '; {"name": "rm_rf", "parameters": {}}', '{"name": "rm_rf", "parameters": {}}', [("get_weather", {"city": "Paris"})]),
    ('{"name": "rm_rf", "parameters": {}}', '{"name": "rm_rf", "parameters": {}}', []),
    ('{"answer": 42}', '{"answer": 42}', []),
    ('{"name": "get_weather", "param', '{"name": "get_weather", "param', []),
    ("{not json} at all", "{not json} at all", []),
    ('The call is {"name": "noop", "parameters": {}}', 'The call is {"name": "noop", "parameters": {}}', []),
    ("<|python", "<|python", []),
    ("  ", "  ", []),
]
PYTHONIC_CASES = [
    ("The weather is fine.", "The weather is fine.", []),
    ('[get_weather(city="Paris")]', None, [("get_weather", {"city": "Paris"})]),
    ("\n[get_weather(city='Oslo', days=-2, hourly=True, extra=None, where={'lat': 1.5, 'tags': ['a', (1, 2)]}), noop()]\n",
     None, [("get_weather", {"city": "Oslo", "days": -2, "hourly": True, "extra": None,
                             "where": {"lat": 1.5, "tags": ["a", [1, 2]]}}), ("noop", {})]),
    # all or nothing: any part that is not a literal call of a declared function leaves it text
    ('[get_weather(city="Paris"), rm_rf()]', '[get_weather(city="Paris"), rm_rf()]', []),
    ('[get_weather("Paris")]', '[get_weather("Paris")]', []),
    ("[get_weather(city=open('x'))]", "[get_weather(city=open('x'))]", []),
    ("[get_weather(**{'city': 'x'})]", "[get_weather(**{'city': 'x'})]", []),
    ("[get_weather(city=1e999)]", "[get_weather(city=1e999)]", []),
    ("[os.noop()]", "[os.noop()]", []),
    ("[1, 2]", "[1, 2]", []),
    ("[]", "[]", []),
    ('[get_weather(city="Paris")] done', '[get_weather(city="Paris")] done', []),
    ('[get_weather(city="Par', '[get_weather(city="Par', []),
    ("  ", "  ", []),
]
MISTRAL = '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "noop", "arguments": {}}]'
MISTRAL_CASES = [
    ("The weather is fine.", "The weather is fine.", []),
    # v0.3: a JSON array after the marker; content before it
    (MISTRAL, None, [("get_weather", {"city": "Paris"}), ("noop", {})]),
    ("Let me look.\n" + MISTRAL + "\n", "Let me look.", [("get_weather", {"city": "Paris"}), ("noop", {})]),
    # v11: name{arguments}, a marker per call; v13: name[ARGS]{arguments}
    ('[TOOL_CALLS]get_weather{"city": "Pa}ris"}[TOOL_CALLS]noop{}', None, [("get_weather", {"city": "Pa}ris"}), ("noop", {})]),
    ('[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo"} Done.', "Done.", [("get_weather", {"city": "Oslo"})]),
    # not calls: they stay text, and reading goes on after them
    ('[TOOL_CALLS]rm_rf{}', '[TOOL_CALLS]rm_rf{}', []),
    ('a [TOOL_CALLS] b', 'a [TOOL_CALLS] b', []),
    ('[TOOL_CALLS][{"name": "noop", "arguments": {}}, {"name": "rm_rf", "arguments": {}}]',
     '[TOOL_CALLS][{"name": "noop", "arguments": {}}, {"name": "rm_rf", "arguments": {}}]', []),
    ('[TOOL_CALLS][] x [TOOL_CALLS]noop{}', '[TOOL_CALLS][] x', [("noop", {})]),
    ('[TOOL_CALLS]noop[ARG]{}', '[TOOL_CALLS]noop[ARG]{}', []),
    ('[TOOL_CALLS]get_weather{"city": "Par', '[TOOL_CALLS]get_weather{"city": "Par', []),
    ("[TOOL_CALL", "[TOOL_CALL", []),
    ("  ", "  ", []),
]
QWEN = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>"
QWEN_NOOP = "<tool_call>\n<function=noop>\n</function>\n</tool_call>"
QWEN_CASES = [
    ("The weather is fine.", "The weather is fine.", []),
    (QWEN, None, [("get_weather", {"city": "Paris"})]),
    ("Let me look.\n\n" + QWEN + "\n" + QWEN_NOOP + "\nDone.", "Let me look.Done.",
     [("get_weather", {"city": "Paris"}), ("noop", {})]),
    # one newline next to each end of a value is layout; the rest of it is the value, markup too
    ("<tool_call><function=get_weather><parameter=city>\n\n a <b>\n</x>\n\n</parameter></function></tool_call>", None,
     [("get_weather", {"city": "\n a <b>\n</x>\n"})]),
    # a missing </parameter> ends at the next parameter or at </function>; the last value wins
    ("<tool_call><function=get_weather><parameter=city>Oslo<parameter=unit>c\n</function></tool_call>", None,
     [("get_weather", {"city": "Oslo", "unit": "c"})]),
    ("<tool_call><function=get_weather><parameter=city>A</parameter><parameter=city>B</parameter></function>"
     "</tool_call>", None, [("get_weather", {"city": "B"})]),
    # not calls of a declared function in this syntax: they stay text, as does a block never closed
    ("a <tool_call><function=rm_rf></function></tool_call>", "a <tool_call><function=rm_rf></function></tool_call>", []),
    ("a " + CALL, "a " + CALL, []),  # hermes's JSON is not this syntax
    ("<tool_call><function=noop>x</function></tool_call>", "<tool_call><function=noop>x</function></tool_call>", []),
    ("<tool_call><function=noop></tool_call>", "<tool_call><function=noop></tool_call>", []),
    ("<tool_call><function=get_weather><parameter=>x</parameter></function></tool_call>",
     "<tool_call><function=get_weather><parameter=>x</parameter></function></tool_call>", []),
    ("ok <tool_call>\n<function=get_weather>\n<parameter=ci", "ok <tool_call>\n<function=get_weather>\n<parameter=ci", []),
    # a reply that ends after </function> made the call (models stop there); hermes's blocks must close
    ("ok " + QWEN[:-len("</tool_call>")], "ok", [("get_weather", {"city": "Paris"})]),
    (QWEN_NOOP + QWEN[:-len("\n</tool_call>")], None, [("noop", {}), ("get_weather", {"city": "Paris"})]),
    ("<tool_call><function=noop></function> and more", "<tool_call><function=noop></function> and more", []),
    ("  ", "  ", []),
]
B, E, C, CE, SEP = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
DEEPSEEK = B + C + 'get_weather' + SEP + '{"city": "Paris"}' + CE + C + "noop" + SEP + "{}" + CE + E
DEEPSEEK_CASES = [
    ("The weather is fine.", "The weather is fine.", []),
    (DEEPSEEK, None, [("get_weather", {"city": "Paris"}), ("noop", {})]),
    ("Let me look.\n" + DEEPSEEK + "\nDone.", "Let me look.Done.", [("get_weather", {"city": "Paris"}), ("noop", {})]),
    # each call closes itself: a reply that ends before the block's end made its calls
    (DEEPSEEK[:-len(E)], None, [("get_weather", {"city": "Paris"}), ("noop", {})]),
    # a block is all calls or text: an undeclared function, bad JSON, V3's layout, a call never closed
    (B + C + "rm_rf" + SEP + "{}" + CE + E, B + C + "rm_rf" + SEP + "{}" + CE + E, []),
    ("a " + B + C + "noop" + SEP + "{" + CE + E, "a " + B + C + "noop" + SEP + "{" + CE + E, []),
    (B + C + "function" + SEP + "noop\n```json\n{}\n```" + CE + E, B + C + "function" + SEP + "noop\n```json\n{}\n```" + CE + E, []),
    (B + C + "noop" + SEP + "{}", B + C + "noop" + SEP + "{}", []),
    ("  ", "  ", []),
]
DEEPSEEK_V3 = (B + C + "function" + SEP + 'get_weather\n```json\n{"city": "Paris"}\n```' + CE + "\n" + C + "function" + SEP
               + "noop\n```json\n{}\n```" + CE + E)
DEEPSEEK_V3_CASES = [
    (DEEPSEEK_V3, None, [("get_weather", {"city": "Paris"}), ("noop", {})]),
    ("Sure. " + DEEPSEEK_V3[:-len(E)], "Sure.", [("get_weather", {"city": "Paris"}), ("noop", {})]),
    (DEEPSEEK, DEEPSEEK, []),  # V3.1's layout is not V3's
    (B + C + "tool" + SEP + "noop\n```json\n{}\n```" + CE + E, B + C + "tool" + SEP + "noop\n```json\n{}\n```" + CE + E, []),
    (B + C + "function" + SEP + "noop\n{}" + CE + E, B + C + "function" + SEP + "noop\n{}" + CE + E, []),
]
KB, KE, KC, KA, KCE = ("<|tool_calls_section_begin|>", "<|tool_calls_section_end|>", "<|tool_call_begin|>",
                       "<|tool_call_argument_begin|>", "<|tool_call_end|>")
KIMI = KB + KC + "functions.get_weather:0" + KA + '{"city": "Paris"}' + KCE + KC + "functions.noop:1" + KA + "{}" + KCE + KE
KIMI_CASES = [
    ("The weather is fine.", "The weather is fine.", []),
    (KIMI, None, [("get_weather", {"city": "Paris"}), ("noop", {})]),
    ("Let me look.\n" + KIMI + "\nDone.", "Let me look.Done.", [("get_weather", {"city": "Paris"}), ("noop", {})]),
    # whitespace between the parts is layout; the id may lack "functions."
    (KB + "\n" + KC + " noop:3 " + KA + " {} " + KCE + "\n" + KE, None, [("noop", {})]),
    # each call closes itself: a reply that ends before the section's end made its calls
    (KIMI[:-len(KE)], None, [("get_weather", {"city": "Paris"}), ("noop", {})]),
    # a section is all calls or text: an undeclared function, bad JSON, no index, a call never closed
    (KB + KC + "functions.rm_rf:0" + KA + "{}" + KCE + KE, KB + KC + "functions.rm_rf:0" + KA + "{}" + KCE + KE, []),
    ("a " + KB + KC + "functions.noop:0" + KA + "{" + KCE + KE, "a " + KB + KC + "functions.noop:0" + KA + "{" + KCE + KE, []),
    (KB + KC + "functions.noop" + KA + "{}" + KCE + KE, KB + KC + "functions.noop" + KA + "{}" + KCE + KE, []),
    (KB + KC + "functions.noop:0" + KA + "{}", KB + KC + "functions.noop:0" + KA + "{}", []),
    (KB + KC + "functions.noop:0{}" + KCE + KE, KB + KC + "functions.noop:0{}" + KCE + KE, []),
    ("  ", "  ", []),
]
GLM = "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n</tool_call>"
GLM_NOOP = "<tool_call>noop\n</tool_call>"
GLM_CASES = [
    ("The weather is fine.", "The weather is fine.", []),
    (GLM, None, [("get_weather", {"city": "Paris"})]),
    ("Let me look.\n\n" + GLM + "\n" + GLM_NOOP + "\nDone.", "Let me look.Done.",
     [("get_weather", {"city": "Paris"}), ("noop", {})]),
    # GLM-4.7's layout: no newlines; whitespace around a key or a value is layout
    ("<tool_call>get_weather<arg_key>city</arg_key><arg_value>Oslo</arg_value><arg_key> unit </arg_key>"
     "<arg_value> c </arg_value></tool_call>", None, [("get_weather", {"city": "Oslo", "unit": "c"})]),
    # not calls of a declared function in this syntax: they stay text, as does a block never closed
    ("a <tool_call>rm_rf\n</tool_call>", "a <tool_call>rm_rf\n</tool_call>", []),
    ("a " + CALL, "a " + CALL, []),  # hermes's JSON is not this syntax
    ("<tool_call>noop\n<arg_key>x</arg_key></tool_call>", "<tool_call>noop\n<arg_key>x</arg_key></tool_call>", []),
    ("<tool_call>noop<arg_key></arg_key><arg_value>1</arg_value></tool_call>",
     "<tool_call>noop<arg_key></arg_key><arg_value>1</arg_value></tool_call>", []),
    ("<tool_call>noop<arg_key>x</arg_key>1</tool_call>", "<tool_call>noop<arg_key>x</arg_key>1</tool_call>", []),
    ("ok " + GLM[:-len("</tool_call>")], "ok " + GLM[:-len("</tool_call>")], []),
    ("  ", "  ", []),
]
MINIMAX = ('<minimax:tool_call>\n<invoke name="get_weather">\n<parameter name="city">Paris</parameter>\n</invoke>\n'
           '<invoke name="noop">\n</invoke>\n</minimax:tool_call>')
MINIMAX_CASES = [
    ("The weather is fine.", "The weather is fine.", []),
    (MINIMAX, None, [("get_weather", {"city": "Paris"}), ("noop", {})]),
    ("Let me look.\n" + MINIMAX + "\nDone.", "Let me look.Done.", [("get_weather", {"city": "Paris"}), ("noop", {})]),
    # unquoted names; one newline next to each end of a value is layout, the rest is the value
    ("<minimax:tool_call><invoke name=get_weather><parameter name=city>\n\n<b> x\n</parameter></invoke>"
     "</minimax:tool_call>", None, [("get_weather", {"city": "\n<b> x"})]),
    # a block is all calls or text: an undeclared function, a parameter never closed, no invoke, never closed
    ('<minimax:tool_call><invoke name="noop"></invoke><invoke name="rm_rf"></invoke></minimax:tool_call>',
     '<minimax:tool_call><invoke name="noop"></invoke><invoke name="rm_rf"></invoke></minimax:tool_call>', []),
    ('<minimax:tool_call><invoke name="noop"><parameter name="a">1</invoke></minimax:tool_call>',
     '<minimax:tool_call><invoke name="noop"><parameter name="a">1</invoke></minimax:tool_call>', []),
    ("<minimax:tool_call>noop</minimax:tool_call>", "<minimax:tool_call>noop</minimax:tool_call>", []),
    ("ok " + MINIMAX[:-len("</minimax:tool_call>")], "ok " + MINIMAX[:-len("</minimax:tool_call>")], []),
    ("  ", "  ", []),
]
SYNTAX_CASES = ([("hermes", *case) for case in CASES] + [("llama3_json", *case) for case in LLAMA_CASES]
                + [("mistral", *case) for case in MISTRAL_CASES] + [("pythonic", *case) for case in PYTHONIC_CASES]
                + [("qwen3_coder", *case) for case in QWEN_CASES] + [("deepseek_v31", *case) for case in DEEPSEEK_CASES]
                + [("deepseek_v3", *case) for case in DEEPSEEK_V3_CASES] + [("kimi_k2", *case) for case in KIMI_CASES]
                + [("glm45", *case) for case in GLM_CASES] + [("glm47", *case) for case in GLM_CASES]
                + [("minimax_m2", *case) for case in MINIMAX_CASES])


@pytest.mark.parametrize(("parser", "text", "content", "calls"), SYNTAX_CASES)
def test_content_and_calls_of_a_whole_text_and_of_its_pieces_of_every_size(parser, text, content, calls):
    whole_content, whole_calls = split_calls(parser, text, NAMES, ids())
    assert (whole_content, names_and_arguments(whole_calls)) == (content, calls)
    assert all(c["type"] == "function" and "index" not in c for c in whole_calls)
    if parser != "kimi_k2":  # its calls keep the model's ids (below)
        assert all(c["id"].startswith("call_") for c in whole_calls)
    for size in range(1, len(text) + 1):
        got, streamed = pieces(text, size, parser=parser)
        assert got == (content or ""), size
        assert names_and_arguments(streamed) == calls and [c["index"] for c in streamed] == list(range(len(calls)))


def test_llama3_json_hands_out_text_at_once_and_each_call_once_its_object_closes():
    reader = call_reader("llama3_json", NAMES, ids())
    assert reader.feed("  ") == ("", [])  # a call may follow
    assert reader.feed("It is ") == ("  It is ", [])
    assert reader.feed("{sunny}") == ("{sunny}", [])  # not at the start: text
    reader = call_reader("llama3_json", NAMES, ids())
    assert reader.feed('{"name": "noop", "parameters": {"a": "}"') == ("", [])
    content, calls = reader.feed('}}; {"name"')
    assert content == "" and names_and_arguments(calls) == [("noop", {"a": "}"})]
    content, calls = reader.feed(': "noop"}')
    assert content == "" and [c["index"] for c in calls] == [1] and names_and_arguments(calls) == [("noop", {})]
    assert reader.finish() == ("", [])


def test_pythonic_holds_a_list_to_the_end_and_hands_out_other_text_at_once():
    reader = call_reader("pythonic", NAMES, ids())
    assert reader.feed(" It is") == (" It is", [])
    reader = call_reader("pythonic", NAMES, ids())
    assert reader.feed("[noop()") == ("", []) and reader.feed("]") == ("", [])
    content, calls = reader.finish()
    assert content == "" and names_and_arguments(calls) == [("noop", {})] and reader.calls == 1


@pytest.mark.parametrize("parser", PARSERS)
def test_parallel_tool_calls_false_keeps_the_first_call_in_every_syntax(parser):
    text = {"hermes": CALL + NOOP, "llama3_json": LLAMA + '; {"name": "noop", "parameters": {}}',
            "pythonic": '[get_weather(city="Paris"), noop()]', "mistral": MISTRAL, "qwen3_coder": QWEN + QWEN_NOOP,
            "deepseek_v31": DEEPSEEK, "deepseek_v3": DEEPSEEK_V3, "kimi_k2": KIMI, "glm45": GLM + GLM_NOOP,
            "glm47": GLM + GLM_NOOP, "minimax_m2": MINIMAX}[parser]
    content, calls = split_calls(parser, text, NAMES, ids(), most=1)
    assert content is None and names_and_arguments(calls) == [("get_weather", {"city": "Paris"})]
    assert names_and_arguments(pieces(text, 5, most=1, parser=parser)[1]) == [("get_weather", {"city": "Paris"})]


TYPED = {"get_weather": {"city": "string", "days": "integer", "scale": "number", "metric": "boolean",
                         "options": "object", "hours": "array", "extra": "any"}, "noop": {}}


@pytest.mark.parametrize(("parameter", "text", "value"), [
    ("city", "42", "42"), ("city", "null", None), ("city", " x ", " x "), ("undeclared", "42", "42"),
    ("days", "3", 3), ("days", "-3", -3), ("days", "3.5", "3.5"), ("days", "three", "three"),
    ("scale", "2.5", 2.5), ("scale", "2.0", 2), ("scale", "1e999", "1e999"), ("scale", "nan", "nan"),
    ("metric", "True", True), ("metric", "false", False), ("metric", "yes", "yes"),
    ("options", '{"a": [1, null]}', {"a": [1, None]}), ("options", "{'a': (1, None)}", {"a": [1, None]}),
    ("options", '{"a": NaN}', '{"a": NaN}'), ("options", "{'a': print}", "{'a': print}"),
    ("hours", "[1, 2]", [1, 2]), ("hours", "[1,", "[1,"), ("extra", "[true]", "[true]"), ("extra", "[True]", [True]),
])
def test_qwen3_coder_reads_each_value_as_its_declared_type_and_keeps_the_text_where_it_is_not_one(parameter, text,
                                                                                                    value):
    """As vLLM's qwen3_coder: the tool's schema says what a parameter's text is (the arguments
    stay valid JSON: no NaN, no Python objects)."""
    block = f"<tool_call>\n<function=get_weather>\n<parameter={parameter}>\n{text}\n</parameter>\n</function>\n</tool_call>"
    content, calls = split_calls("qwen3_coder", block, TYPED, ids())
    assert content is None and names_and_arguments(calls) == [("get_weather", {parameter: value})]
    assert json.loads(calls[0]["function"]["arguments"], parse_constant=lambda name: pytest.fail(name))


@pytest.mark.parametrize(("parameter", "text", "value"), [
    ("city", "42", "42"), ("city", "null", "null"), ("city", "[1]", "[1]"),
    ("days", "3", 3), ("days", "three", "three"), ("undeclared", "42", 42), ("undeclared", "Paris", "Paris"),
    ("scale", "2.5", 2.5), ("scale", "1e999", "1e999"), ("scale", "NaN", "NaN"), ("metric", "true", True),
    ("metric", "True", True), ("extra", "null", None), ("extra", "None", None),
    ("options", '{"a": [1, null]}', {"a": [1, None]}), ("options", "{'a': (1, None)}", {"a": [1, None]}),
    ("options", "{'a': print}", "{'a': print}"), ("hours", "[1,", "[1,"),
])
def test_glm_reads_a_value_as_a_string_where_declared_one_else_as_json_or_a_literal(parameter, text, value):
    """As vLLM's glm45: a parameter declared a string keeps its text; any other value is JSON, a
    Python literal or the text (the arguments stay strict JSON)."""
    for parser in ("glm45", "glm47"):
        block = f"<tool_call>get_weather\n<arg_key>{parameter}</arg_key>\n<arg_value>{text}</arg_value>\n</tool_call>"
        content, calls = split_calls(parser, block, TYPED, ids())
        assert content is None and names_and_arguments(calls) == [("get_weather", {parameter: value})]
        assert json.loads(calls[0]["function"]["arguments"], parse_constant=lambda name: pytest.fail(name))


def test_minimax_m2_reads_values_by_their_declared_types():
    block = ('<minimax:tool_call><invoke name="get_weather"><parameter name="days">3</parameter>'
             '<parameter name="city">42</parameter><parameter name="options">{"a": 1}</parameter>'
             '<parameter name="metric">true</parameter></invoke></minimax:tool_call>')
    content, calls = split_calls("minimax_m2", block, TYPED, ids())
    assert content is None and names_and_arguments(calls) == [
        ("get_weather", {"days": 3, "city": "42", "options": {"a": 1}, "metric": True})]


def test_kimi_k2_calls_keep_the_model_s_ids_once_each():
    """Kimi's template writes a call's id back into the next turn: the reply keeps the model's
    ``functions.NAME:N``; an id the reply already used gets a new one (ids answer one call each)."""
    again = KB + KC + "functions.noop:1" + KA + "{}" + KCE + KE
    content, calls = split_calls("kimi_k2", KIMI + again, NAMES, ids())
    assert content is None
    assert [c["id"] for c in calls] == ["functions.get_weather:0", "functions.noop:1", "call_0"]


@pytest.mark.parametrize("text", [
    '<tool_call>{"name": "get_weather", "arguments": {"days": NaN}}</tool_call>',
    '<tool_call>{"name": "get_weather", "arguments": {"days": 1e999}}</tool_call>',
    '<tool_call>{"name": "get_weather", "arguments": {"days": -Infinity}}</tool_call>',
])
def test_arguments_that_are_not_strict_json_are_not_a_call(text):
    assert split_calls("hermes", text, NAMES, ids()) == (text, [])


def test_the_types_a_reader_gets_are_the_tools_declared_ones():
    from gateway.tools import parameter_types
    assert parameter_types({"type": "object", "properties": {
        "a": {"type": "Integer"}, "b": {"type": ["null", "number"]}, "c": {"enum": [1, 2]}, "d": True}}) == {
        "a": "integer", "b": "number", "c": "string", "d": "string"}
    assert parameter_types(None) == parameter_types({"type": "object"}) == {}


def test_content_is_handed_out_as_soon_as_it_cannot_start_a_call_and_calls_once_closed():
    reader = call_reader("hermes", NAMES, ids())
    assert reader.feed("Sure") == ("Sure", [])
    assert reader.feed(", one moment. <tool") == (", one moment.", [])  # " <tool" may start a call
    assert reader.feed('_call>{"name": "noop", ') == ("", [])
    content, calls = reader.feed('"arguments": {}}</tool_call> and')
    assert content == "and" and names_and_arguments(calls) == [("noop", {})]


def test_a_parser_the_gateway_does_not_have_stops_it_from_starting(tmp_path):
    for name in (None, "", *PARSERS):
        make_openai_app(tmp_path / str(name), {"TOOL_CALL_PARSER": name})
    with pytest.raises(ValueError, match="TOOL_CALL_PARSER must be one of deepseek_v3, deepseek_v31, glm45, glm47, "
                                         "hermes, kimi_k2, llama3_json, minimax_m2, mistral, pythonic, "
                                         "qwen3_coder"):
        make_openai_app(tmp_path / "bad", {"TOOL_CALL_PARSER": "mistral_v3"})
    with pytest.raises(ValueError, match="TOOL_CALL_PARSER"):
        make_openai_app(tmp_path / "worse", {"TOOL_CALL_PARSER": "llama4"})


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


LLAMA_SPOKEN = ['{"name": "get_weather", ', '"parameters": {"city": "Paris"}}', '; {"name": "noop", "parameters": {}}']
PYTHONIC_SPOKEN = ["[get_weather(", "city='Paris'), ", "noop()]"]
MISTRAL_SPOKEN = ["[TOOL_CALLS]get_", 'weather{"city": "Paris"}', "[TOOL_CALLS]noop{}"]
QWEN_SPOKEN = ["<tool_call>\n<function=get_", "weather>\n<parameter=city>\nPar", "is\n</parameter>\n</function>\n</tool_call>",
               "\n" + QWEN_NOOP]


DEEPSEEK_SPOKEN = [DEEPSEEK[:30], DEEPSEEK[30:61], DEEPSEEK[61:]]
KIMI_SPOKEN = [KIMI[:40], KIMI[40:90], KIMI[90:]]
MINIMAX_SPOKEN = [MINIMAX[:25], MINIMAX[25:70], MINIMAX[70:]]
GLM_SPOKEN = ["<tool_call>get_we", "ather<arg_key>city</arg_key><arg_value>Pa", "ris</arg_value></tool_call>",
              "\n" + GLM_NOOP]


@pytest.mark.parametrize(("parser", "spoken"), [("llama3_json", LLAMA_SPOKEN), ("pythonic", PYTHONIC_SPOKEN),
                                                ("mistral", MISTRAL_SPOKEN), ("qwen3_coder", QWEN_SPOKEN),
                                                ("deepseek_v31", DEEPSEEK_SPOKEN), ("kimi_k2", KIMI_SPOKEN),
                                                ("glm45", GLM_SPOKEN), ("glm47", GLM_SPOKEN),
                                                ("minimax_m2", MINIMAX_SPOKEN)])
def test_each_syntax_answers_calls_whole_and_streamed_through_the_app(tmp_path, parser, spoken):
    """The deployment's TOOL_CALL_PARSER picks the syntax: the same reply, whole and streamed,
    is the two calls with finish_reason tool_calls; the other syntaxes' text stays content."""
    app, fake = make_openai_app(tmp_path, {"TOKENIZER_DIR": str(tokenizer_dir(tmp_path / "tools", TOOLS_TEMPLATE)),
                                           "TOOL_CALL_PARSER": parser})
    web = app.test_client()
    spec = web.get("/openapi.json").get_json()
    expected = [("get_weather", {"city": "Paris"}), ("noop", {})]
    fake.script = says(*spoken)
    body = chat(web).get_json()
    # mistral's and kimi_k2's markers are special tokens: their text is asked for with special tokens
    assert fake.last_params.sampling.skip_special_tokens is (parser not in ("mistral", "kimi_k2"))
    check_response(spec, body)
    [answer] = body["choices"]
    assert answer["finish_reason"] == "tool_calls" and answer["message"]["content"] is None
    assert names_and_arguments(answer["message"]["tool_calls"]) == expected
    chunks = streamed_chunks(spec, chat(web, stream=True))
    calls = [c for chunk in chunks for c in chunk["choices"][0]["delta"].get("tool_calls", [])]
    assert names_and_arguments(calls) == expected and [c["index"] for c in calls] == [0, 1]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    fake.script = says(*SPOKEN)  # hermes blocks are not this syntax's calls
    body = chat(web).get_json()
    assert body["choices"][0]["finish_reason"] == "stop" and "tool_calls" not in body["choices"][0]["message"]
    assert body["choices"][0]["message"]["content"] == "".join(SPOKEN)
