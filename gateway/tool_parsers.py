"""``tool_choice: "auto"``: the calls a model chose to make, read out of its own text.

With ``auto`` the model decides between answering and calling, in the syntax it was trained on;
the gateway reads that syntax (vLLM's ``--tool-call-parser``, llama.cpp's ``--jinja`` do the
same). The deployment names it with ``TOOL_CALL_PARSER`` (``TRIDENT_TOOL_CALL_PARSER``); without
one, ``auto`` with tools stays a 400 (gateway.tools), as vLLM answers without a parser. A call
names a function declared in ``tools``, with an object of arguments; anything else stays text.

``hermes``: each call is a JSON object ``{"name": ..., "arguments": {...}}`` between
``<tool_call>`` and ``</tool_call>``, as Hermes 2 Pro / 3, Qwen2.5 / Qwen3 and SmolLM3 write them
(their chat templates render ``tools`` and teach it). Text outside the blocks is the message's
``content``; whitespace next to a block is not part of it, and beside calls, content that is
only whitespace is null. A block whose JSON is not such an object, or names a function that is
not in ``tools``, stays text, as does a block the generation did not close.

``llama3_json``: Llama 3.1 / 3.2 / 3.3 and Llama 4 with JSON tool templates answer a call with
the JSON object itself, ``{"name": ..., "parameters": {...}}`` (``arguments`` is read too),
several separated by ``;`` (or whitespace), after the ``<|python_tag|>`` token or none (the token is special:
the text usually no longer has it). So a reply whose text begins with ``{`` is read as calls, one
object after the other; from the first object that is not such a call, the rest is ``content``.
A reply that begins otherwise is text.

``mistral``: Mistral models write ``[TOOL_CALLS]`` (a special token) before their calls: a JSON
array of ``{"name": ..., "arguments": {...}}`` (Mistral 7B Instruct v0.3's tokenizer), or the
function's name and its arguments object, ``[TOOL_CALLS]get_weather{"city": "Paris"}`` (v11
tokenizers; ``name[ARGS]{...}`` in newer ones: Ministral, Devstral), one marker per call. The
text before the first marker is ``content``; a marker followed by anything else stays text. The
token is special, so with this parser and tools the gateway asks for the text with its special
tokens (vLLM does the same).

``pythonic``: Llama 3.2 / Llama 4 with pythonic templates (and ToolACE) answer with a Python list
of calls with keyword arguments, ``[get_weather(city="Paris"), noop()]``, the whole reply; the
values are literals (strings, numbers, True/False/None, lists and dicts of them). A reply that
is not such a list is text.

``qwen3_coder``: Qwen3-Coder writes each call in a ``<tool_call>`` block (as hermes) in XML:
``<function=get_weather>``, a ``<parameter=city>`` ... ``</parameter>`` per argument (one newline
next to each end of a value is layout), ``</function>``. A value is text; the parameter's type
in the tool's schema says which JSON value it is (vLLM's qwen3_coder rules), and text that is
not one of that type stays a string. A reply that ends after ``</function>`` without
``</tool_call>`` made that call (models stop there; vLLM reads it so too).

``deepseek_v3`` and ``deepseek_v31``: DeepSeek V3 / R1 and V3.1 and newer write their calls in
one block, ``<｜tool▁calls▁begin｜>`` ... ``<｜tool▁calls▁end｜>``, each call between
``<｜tool▁call▁begin｜>`` and ``<｜tool▁call▁end｜>``: V3.1 as ``NAME<｜tool▁sep｜>{arguments}``,
V3 as ``function<｜tool▁sep｜>NAME`` and the arguments in a fenced ``json`` block. The markers are
tokens the text keeps (not special). A block is all calls or text; one the reply ends in
before ``<｜tool▁calls▁end｜>`` still made its complete calls.

``kimi_k2``: Kimi K2 writes its calls in one section, ``<|tool_calls_section_begin|>`` ...
``<|tool_calls_section_end|>``, each call ``<|tool_call_begin|>functions.NAME:N
<|tool_call_argument_begin|>{arguments}<|tool_call_end|>``; read as DeepSeek's block. The
``functions.NAME:N`` is the call's id, kept (Kimi's template writes it back in the next turn,
and the model was trained on ids of that form). The markers are special tokens: with this
parser the gateway asks for the text with its special tokens, as for ``mistral``.

``minimax_m2``: MiniMax-M2 writes its calls in ``<minimax:tool_call>`` blocks (anywhere in the
text, as hermes), one ``<invoke name="NAME">`` ... ``</invoke>`` per call, each argument a
``<parameter name="KEY">VALUE</parameter>`` (the quotes are optional; one newline next to each
end of a value is layout); a block is all calls or text. Values are read by their declared types,
as qwen3_coder's.

``glm45`` and ``glm47``: GLM-4.5 / 4.6 (``glm45``) and GLM-4.7 / 5 (``glm47``) write each call in
a ``<tool_call>`` block (as hermes): the function's name, then an ``<arg_key>KEY</arg_key>``
``<arg_value>VALUE</arg_value>`` pair per argument (4.5 puts a newline after the name and
between the pairs, 4.7 none; both are read). A value is text; a parameter declared a string
(or declared without a type) keeps it, any other is read as JSON, else as a Python literal,
else kept as text (vLLM's ``glm45`` rules, but for the untyped parameters, which vLLM reads as
JSON).

Each reader takes a choice's text as it grows (streams): it hands out content as soon as it
cannot belong to a call, and each call once it is complete (``pythonic``'s once the reply ends:
only the whole text tells). The same reader gives a whole reply, so a stream and a reply of the
same text agree.
"""

from __future__ import annotations

import ast
import json
import math
from collections.abc import Callable, Collection, Mapping
from typing import Any

#: The parsers a deployment may name (TOOL_CALL_PARSER; gateway.config refuses another name).
PARSERS = ("deepseek_v3", "deepseek_v31", "glm45", "glm47", "hermes", "kimi_k2", "llama3_json", "minimax_m2", "mistral",
           "pythonic", "qwen3_coder")
#: Parsers whose call marker is a special token: the text must keep special tokens.
KEEP_SPECIAL_TOKENS = frozenset({"kimi_k2", "mistral"})

HERMES_OPEN = "<tool_call>"
HERMES_CLOSE = "</tool_call>"
DEEPSEEK_CALLS, DEEPSEEK_CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
DEEPSEEK_CALL, DEEPSEEK_CALL_END, DEEPSEEK_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
KIMI_CALLS, KIMI_CALLS_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
KIMI_CALL, KIMI_ARGUMENTS, KIMI_CALL_END = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"
MINIMAX_CALLS, MINIMAX_CALLS_END = "<minimax:tool_call>", "</minimax:tool_call>"
MINIMAX_INVOKE, MINIMAX_INVOKE_END = "<invoke name=", "</invoke>"
MINIMAX_PARAMETER, MINIMAX_PARAMETER_END = "<parameter name=", "</parameter>"
GLM_KEY, GLM_KEY_END, GLM_VALUE, GLM_VALUE_END = "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>"
MISTRAL_CALLS = "[TOOL_CALLS]"
MISTRAL_ARGS = "[ARGS]"
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")  # OpenAI's function names
QWEN_FUNCTION, QWEN_FUNCTION_END = "<function=", "</function>"
QWEN_PARAMETER, QWEN_PARAMETER_END = "<parameter=", "</parameter>"
#: parameter types whose text is the value (vLLM's qwen3_coder list)
STRING_TYPES = frozenset({"string", "str", "text", "varchar", "char", "enum"})
PYTHON_TAG = "<|python_tag|>"  # Llama 3's token before a call (special: usually not in the text)
_SPACE = " \t\r\n"
_NOT_JSON = object()


class SyntaxReader:
    """One choice's text, split into content and calls as it comes.

    ``feed(text)`` returns ``(content, calls)``: the content that is final now, and the calls
    completed, each ``{"index", "id", "type", "function": {"name", "arguments"}}`` numbered from
    0 (``new_id`` names them); ``finish()`` the same for the end of the text (what was held
    back). ``calls`` counts the calls read (also those left out by ``most``)."""

    def __init__(self, names: Collection[str], new_id: Callable[[], str], *, most: int | None = None) -> None:
        self._names = frozenset(names)
        # each function's declared parameter types, where ``names`` maps names to them (qwen3_coder reads them)
        self._types: Mapping[str, Mapping[str, str]] = names if isinstance(names, Mapping) else {}
        self._most = most  # calls beyond this many are left out (parallel_tool_calls: false keeps one)
        self._new_id = new_id
        self.calls = 0

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        raise NotImplementedError

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        raise NotImplementedError

    def _call(self, value: Any) -> dict[str, Any] | None:
        """``{"name", "arguments" or "parameters"}`` of a declared function as a call, else None."""
        parsed = self._parse(value)
        return None if parsed is None else self._make(*parsed)

    def _parse(self, value: Any) -> tuple[str, dict[str, Any]] | None:
        """The function's name and arguments of such an object, or None."""
        if not isinstance(value, dict) or value.get("name") not in self._names:
            return None
        arguments = value.get("arguments", value.get("parameters", {}))
        if isinstance(arguments, str):  # some models write the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return None
        if not isinstance(arguments, dict):
            return None
        return value["name"], arguments

    def _make(self, name: str, arguments: dict[str, Any], call_id: str | None = None) -> dict[str, Any]:
        call = {"index": self.calls, "id": call_id or self._new_id(), "type": "function",
                "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}
        self.calls += 1
        return call

    def _kept(self, call: dict[str, Any]) -> bool:
        return self._most is None or call["index"] < self._most


class HermesCalls(SyntaxReader):
    """``hermes``: calls in ``<tool_call>`` blocks anywhere in the text."""

    OPEN, CLOSE = HERMES_OPEN, HERMES_CLOSE  # a block's markers
    #: a block the text ends in without its closing marker is read as calls too
    UNCLOSED_CALLS = False

    def __init__(self, names: Collection[str], new_id: Callable[[], str], *, most: int | None = None) -> None:
        super().__init__(names, new_id, most=most)
        self._buf = ""  # text not handed out yet
        self._inside = False  # _buf is the inside of an open block
        self._searched = 0  # inside a block: where the search for its end goes on
        self._after_block = False  # skip the whitespace that follows a block
        self._space = ""  # the whitespace before the open block: content, unless the block is a call

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        self._buf += text
        content: list[str] = []
        calls: list[dict[str, Any]] = []
        while self._buf:
            if self._inside:
                end = self._buf.find(self.CLOSE, self._searched)
                if end < 0:
                    self._searched = max(0, len(self._buf) - len(self.CLOSE) + 1)
                    break
                body, self._buf = self._buf[:end], self._buf[end + len(self.CLOSE):]
                self._inside, self._searched = False, 0
                made = self._block_calls(body)
                if made is None:  # not calls of declared functions: the block stays text
                    content.append(self._space + self.OPEN + body + self.CLOSE)
                    self._after_block = False
                else:
                    calls.extend(call for call in made if self._kept(call))
                    self._after_block = True
                continue
            if self._after_block:
                self._buf = self._buf.lstrip(_SPACE)
                if not self._buf:
                    break
                self._after_block = False
            piece, space, self._buf, found = _until_marker(self._buf, self.OPEN)
            content.append(piece)
            if not found:
                break
            self._space, self._inside = space, True
        return "".join(content), calls

    def _block_calls(self, body: str) -> list[dict[str, Any]] | None:
        """The calls a block's inside writes, or None (the block stays text)."""
        call = self._call(_json(body))
        return None if call is None else [call]

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """The end of the text: what is held back is content (an unclosed block too, unless the
        syntax's calls close themselves: ``UNCLOSED_CALLS``)."""
        if self._inside and self.UNCLOSED_CALLS and (made := self._block_calls(self._buf)) is not None:
            self._buf, self._inside = "", False
            return "", [call for call in made if self._kept(call)]
        tail = (self._space + self.OPEN if self._inside else "") + self._buf
        if self._after_block:
            tail = tail.lstrip(_SPACE)
        self._buf, self._inside = "", False
        return tail, []


class Qwen3CoderCalls(HermesCalls):
    """``qwen3_coder``: calls in ``<tool_call>`` blocks, as hermes, each written in XML:
    ``<function=NAME>``, its ``<parameter=KEY>value</parameter>``s, ``</function>``. The function
    element closes the call: a reply that ends after it without ``</tool_call>`` (models do
    stop there) made the call, as vLLM reads it."""

    UNCLOSED_CALLS = True

    def _block_calls(self, body: str) -> list[dict[str, Any]] | None:
        parsed = _xml_call(body.strip(_SPACE))
        if parsed is None or parsed[0] not in self._names:
            return None
        name, raw = parsed
        types = self._types.get(name) or {}
        return [self._make(name, {key: _typed(value, types.get(key)) for key, value in raw.items()})]


class DeepSeekCalls(HermesCalls):
    """``deepseek_v31``: DeepSeek's calls block, ``<｜tool▁calls▁begin｜>``, a
    ``<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{arguments}<｜tool▁call▁end｜>`` per call,
    ``<｜tool▁calls▁end｜>``; all the block's calls or none of them (it stays text). Each call
    closes itself: a reply that ends before the block's end made its calls (vLLM reads so)."""

    OPEN, CLOSE = DEEPSEEK_CALLS, DEEPSEEK_CALLS_END
    UNCLOSED_CALLS = True
    FENCED = False  # deepseek_v3: "function<｜tool▁sep｜>NAME\n```json\n{arguments}\n```"

    def _block_calls(self, body: str) -> list[dict[str, Any]] | None:
        parsed = []
        for call in _elements(body, DEEPSEEK_CALL, DEEPSEEK_CALL_END) or ():
            name, sep, arguments = call.partition(DEEPSEEK_SEP)
            if self.FENCED:
                kind, name = name, arguments
                name, _, arguments = name.partition("\n")
                fence = arguments.strip(_SPACE)
                if kind != "function" or not fence.startswith("```json") or not fence.endswith("```") or len(fence) < 10:
                    return None
                arguments = fence[len("```json"):-len("```")]
            one = self._parse({"name": name, "arguments": _json(arguments)}) if sep else None
            if one is None:
                return None
            parsed.append(one)
        return [self._make(*one) for one in parsed] if parsed else None


class DeepSeekV3Calls(DeepSeekCalls):
    """``deepseek_v3``: as deepseek_v31, each call written ``function<｜tool▁sep｜>NAME``, a
    newline, and its arguments in a fenced ``json`` block."""

    FENCED = True


class KimiK2Calls(HermesCalls):
    """``kimi_k2``: Kimi K2's calls section, ``<|tool_calls_section_begin|>``, a
    ``<|tool_call_begin|>functions.NAME:N<|tool_call_argument_begin|>{arguments}<|tool_call_end|>``
    per call (whitespace between the parts is layout), ``<|tool_calls_section_end|>``; all the
    section's calls or none (it stays text), each closing itself, as deepseek_v31. A call's
    ``functions.NAME:N`` (or ``NAME:N``) is its id, unless the reply used it already."""

    OPEN, CLOSE = KIMI_CALLS, KIMI_CALLS_END
    UNCLOSED_CALLS = True

    def __init__(self, names: Collection[str], new_id: Callable[[], str], *, most: int | None = None) -> None:
        super().__init__(names, new_id, most=most)
        self._ids: set[str] = set()  # the model's ids this reply used

    def _block_calls(self, body: str) -> list[dict[str, Any]] | None:
        parsed = []
        for call in _elements(body, KIMI_CALL, KIMI_CALL_END) or ():
            call_id, sep, arguments = call.partition(KIMI_ARGUMENTS)
            call_id = call_id.strip(_SPACE)
            head, colon, number = call_id.rpartition(":")
            name = head[len("functions."):] if head.startswith("functions.") else head
            if not sep or not colon or not number.isdigit() or not number.isascii():
                return None
            one = self._parse({"name": name, "arguments": _json(arguments)})
            if one is None:
                return None
            parsed.append((*one, call_id))
        if not parsed:
            return None
        calls = []
        for name, arguments, call_id in parsed:
            calls.append(self._make(name, arguments, None if call_id in self._ids else call_id))
            self._ids.add(call_id)
        return calls


class MiniMaxM2Calls(HermesCalls):
    """``minimax_m2``: ``<minimax:tool_call>`` blocks of ``<invoke name="NAME">`` elements, each
    with its ``<parameter name="KEY">VALUE</parameter>``s; all the block's calls or none (it stays
    text). Values are read by their parameters' declared types (:func:`_typed`)."""

    OPEN, CLOSE = MINIMAX_CALLS, MINIMAX_CALLS_END

    def _block_calls(self, body: str) -> list[dict[str, Any]] | None:
        parsed = []
        for invoke in _elements(body, MINIMAX_INVOKE, MINIMAX_INVOKE_END) or ():
            name, head, inside = invoke.partition(">")
            name = _unquoted(name)
            arguments = _minimax_parameters(inside) if head else None
            if name not in self._names or arguments is None:
                return None
            types = self._types.get(name) or {}
            parsed.append((name, {key: _typed(value, types.get(key)) for key, value in arguments.items()}))
        return [self._make(name, arguments) for name, arguments in parsed] if parsed else None


def _unquoted(text: str) -> str:
    text = text.strip(_SPACE)
    return text[1:-1] if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'" else text


def _minimax_parameters(text: str) -> dict[str, str] | None:
    """``<parameter name="KEY">VALUE</parameter>``s (whitespace between them) as each key's text
    (one newline next to each end of a value is layout), or None."""
    parameters = _elements(text, MINIMAX_PARAMETER, MINIMAX_PARAMETER_END, empty=True)
    if parameters is None:
        return None
    values: dict[str, str] = {}
    for parameter in parameters:
        key, head, value = parameter.partition(">")
        key = _unquoted(key)
        if not head or not key or "<" in key:
            return None
        value = value[1:] if value.startswith("\n") else value
        values[key] = value[:-1] if value.endswith("\n") else value
    return values


def _elements(text: str, opening: str, closing: str, *, empty: bool = False) -> list[str] | None:
    """The insides of the ``opening`` ... ``closing`` elements a text is made of (whitespace
    between and around them); None for any other text, or for none at all unless ``empty``."""
    rest, insides = text.strip(_SPACE), []
    while rest:
        end = rest.find(closing)
        if not rest.startswith(opening) or end < 0:
            return None
        insides.append(rest[len(opening):end])
        rest = rest[end + len(closing):].lstrip(_SPACE)
    return insides if insides or empty else None


class GlmCalls(HermesCalls):
    """``glm45`` / ``glm47``: calls in ``<tool_call>`` blocks, as hermes, each the function's
    name and an ``<arg_key>KEY</arg_key><arg_value>VALUE</arg_value>`` pair per argument
    (whitespace around the parts is layout). A value is read by its parameter's declared type
    (:func:`_glm_typed`)."""

    def _block_calls(self, body: str) -> list[dict[str, Any]] | None:
        body = body.strip(_SPACE)
        start = body.find(GLM_KEY)
        name, rest = (body, "") if start < 0 else (body[:start], body[start:])
        name = name.strip(_SPACE)
        if name not in self._names:
            return None
        types = self._types.get(name) or {}
        arguments: dict[str, Any] = {}
        while rest:
            key_end = rest.find(GLM_KEY_END)
            if not rest.startswith(GLM_KEY) or key_end < 0:
                return None
            key = rest[len(GLM_KEY):key_end].strip(_SPACE)
            rest = rest[key_end + len(GLM_KEY_END):].lstrip(_SPACE)
            value_end = rest.find(GLM_VALUE_END)
            if not key or not rest.startswith(GLM_VALUE) or value_end < 0:
                return None
            arguments[key] = _glm_typed(rest[len(GLM_VALUE):value_end].strip(_SPACE), types.get(key))
            rest = rest[value_end + len(GLM_VALUE_END):].lstrip(_SPACE)
        return [self._make(name, arguments)]


def _glm_typed(value: str, kind: str | None) -> Any:
    """A GLM argument's text as its value, by vLLM's glm45 rules: a parameter declared a string
    keeps the text; any other is the text read as JSON, else as a Python literal, else the text
    (strict JSON either way: no NaN, no Python objects)."""
    if kind in STRING_TYPES:
        return value
    if (read := _json(value, _NOT_JSON)) is not _NOT_JSON:
        return read
    return _python_literal(value, value)


def _xml_call(text: str) -> tuple[str, dict[str, str]] | None:
    """``<function=NAME>`` + parameters + ``</function>`` as the name and each parameter's text
    (one newline next to each end of a value is the layout, not the value); None for any other
    text. A parameter's ``</parameter>`` may be missing before the next one or the end."""
    if not text.startswith(QWEN_FUNCTION) or not text.endswith(QWEN_FUNCTION_END):
        return None
    text = text[len(QWEN_FUNCTION):-len(QWEN_FUNCTION_END)]
    head = text.find(">")
    name = text[:head]
    if head <= 0 or "\n" in name or "<" in name:
        return None
    rest, values = text[head + 1:].lstrip(_SPACE), {}
    while rest:
        if not rest.startswith(QWEN_PARAMETER):
            return None
        rest = rest[len(QWEN_PARAMETER):]
        head = rest.find(">")
        key = rest[:head]
        if head <= 0 or "\n" in key or "<" in key:
            return None
        rest = rest[head + 1:]
        close, following = rest.find(QWEN_PARAMETER_END), rest.find(QWEN_PARAMETER)
        if close >= 0 and (following < 0 or close < following):
            value, rest = rest[:close], rest[close + len(QWEN_PARAMETER_END):]
        elif following >= 0:
            value, rest = rest[:following], rest[following:]
        else:
            value, rest = rest, ""
        value = value[1:] if value.startswith("\n") else value
        values[key] = value[:-1] if value.endswith("\n") else value
        rest = rest.lstrip(_SPACE)
    return name, values


def _typed(value: str, kind: str | None) -> Any:
    """A parameter's text as the JSON value its declared type (gateway.tools.parameter_types)
    asks for, as vLLM's qwen3_coder reads it: ``null`` is null; a string type (or an undeclared
    parameter) keeps the text; an integer, a number, a boolean, an object or an array is read
    as one where the text is one (a number that is a whole number as an integer; an object or
    array also as a Python literal), and is kept as text where it is not."""
    if value.lower() == "null":
        return None
    if kind is None or kind in STRING_TYPES:
        return value
    try:
        if kind.startswith(("int", "uint", "long", "short", "unsigned")):
            return int(value)
        if kind.startswith(("num", "float", "double")):
            number = float(value)
            if not math.isfinite(number):
                return value
            return int(number) if number.is_integer() else number
    except ValueError:
        return value
    if kind in ("boolean", "bool", "binary"):
        return {"true": True, "false": False}.get(value.strip(_SPACE).lower(), value)
    read = _json(value) if kind in ("object", "array", "arr") or kind.startswith(("dict", "list")) else None
    return _python_literal(value.strip(_SPACE), value) if read is None else read


def _python_literal(text: str, default: Any) -> Any:
    """The JSON value a text writes as a Python literal (:func:`_literal`), or ``default``."""
    try:
        return _literal(ast.parse(text, mode="eval").body)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return default


class Llama3JsonCalls(SyntaxReader):
    """``llama3_json``: a reply that begins with ``{`` (after whitespace and ``<|python_tag|>``)
    is calls, JSON objects separated by ``;`` or whitespace; the rest from the first object that is not a call
    is content. Any other reply is text, handed out as it comes."""

    def __init__(self, names: Collection[str], new_id: Callable[[], str], *, most: int | None = None) -> None:
        super().__init__(names, new_id, most=most)
        self._buf = ""  # text not handed out yet
        self._state = "start"  # start (nothing but whitespace yet), object, between (calls), text
        self._object = JsonValueEnd()

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        self._buf += text
        content: list[str] = []
        calls: list[dict[str, Any]] = []
        while self._buf:
            if self._state == "text":
                content.append(self._buf)
                self._buf = ""
            elif self._state == "start":
                rest = self._buf.lstrip(_SPACE)
                if rest.startswith(PYTHON_TAG):
                    self._buf = rest[len(PYTHON_TAG):]
                    continue
                if not rest or (PYTHON_TAG.startswith(rest)):
                    break  # whitespace, or the start of the tag: not known yet
                if rest[0] == "{":
                    self._buf, self._state = rest, "object"
                else:
                    self._state = "text"
            elif self._state == "between":  # after a call: whitespace, maybe ";", whitespace, "{"
                rest = self._buf.lstrip(_SPACE)
                if rest.startswith(";"):
                    rest = rest[1:].lstrip(_SPACE)
                if not rest:
                    break  # the next call may follow
                self._buf, self._state = rest, "object" if rest[0] == "{" else "text"
            else:  # "object": _buf begins with one
                end = self._object.scan(self._buf)
                if end < 0:
                    break
                call = self._call(_json(self._buf[:end]))
                self._object = JsonValueEnd()
                if call is None:  # not a call: this and the rest are text
                    self._state = "text"
                    continue
                if self._kept(call):
                    calls.append(call)
                self._buf, self._state = self._buf[end:], "between"
        return "".join(content), calls

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """The end of the text: an object never closed is content; so is a reply of whitespace
        only (what follows the calls, separators and whitespace, is not)."""
        tail = "" if self._state == "between" else self._buf
        self._buf, self._state = "", "text"
        return tail, []


class MistralCalls(SyntaxReader):
    """``mistral``: calls after ``[TOOL_CALLS]`` markers, as a JSON array or as ``name{...}`` /
    ``name[ARGS]{...}``; a marker followed by anything else stays text."""

    def __init__(self, names: Collection[str], new_id: Callable[[], str], *, most: int | None = None) -> None:
        super().__init__(names, new_id, most=most)
        self._buf = ""  # text not read yet
        self._state = "text"  # text, marker (after one), array, name, args
        self._raw = ""  # the text from the marker on: content if it is not a call
        self._space = ""  # the whitespace before the marker: content, unless calls follow
        self._name = ""
        self._object = JsonValueEnd()
        self._after_call = False  # skip the whitespace that follows calls

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        self._buf += text
        content: list[str] = []
        calls: list[dict[str, Any]] = []
        while self._buf:
            state = self._state
            if state == "text":
                if self._after_call:
                    self._buf = self._buf.lstrip(_SPACE)
                    if not self._buf:
                        break
                    self._after_call = False
                piece, space, self._buf, found = _until_marker(self._buf, MISTRAL_CALLS)
                content.append(piece)
                if not found:
                    break
                self._space, self._raw, self._state = space, MISTRAL_CALLS, "marker"
                continue
            if state == "marker":
                rest = self._buf.lstrip(_SPACE)
                self._raw += self._buf[:len(self._buf) - len(rest)]
                self._buf = rest
                if not rest:
                    break
                if rest[0] == "[":
                    self._state, self._object = "array", JsonValueEnd()
                elif rest[0] in _NAME_CHARS:
                    self._state, self._name = "name", ""
                else:
                    content.append(self._not_a_call())
            elif state == "name":
                size = next((i for i, char in enumerate(self._buf) if char not in _NAME_CHARS), len(self._buf))
                self._name += self._buf[:size]
                self._raw += self._buf[:size]
                self._buf = self._buf[size:]
                if self._buf.startswith(MISTRAL_ARGS):
                    self._raw += MISTRAL_ARGS
                    self._buf = self._buf[len(MISTRAL_ARGS):]
                if self._buf.startswith("{"):
                    self._state, self._object = "args", JsonValueEnd()
                elif self._buf and not MISTRAL_ARGS.startswith(self._buf[:len(MISTRAL_ARGS)]):
                    content.append(self._not_a_call())
                else:
                    break  # more of the name, or of [ARGS], may follow
            else:  # "array" or "args": _buf begins with its JSON
                end = self._object.scan(self._buf)
                if end < 0:
                    break
                body, self._buf = self._buf[:end], self._buf[end:]
                self._raw += body
                value = _json(body)
                if state == "args":
                    value = [{"name": self._name, "arguments": value}]
                parsed = [self._parse(item) for item in value] if isinstance(value, list) and value else [None]
                if None in parsed:
                    content.append(self._not_a_call())
                    continue
                calls.extend(call for call in (self._make(*p) for p in parsed) if self._kept(call))
                self._state, self._raw, self._space, self._after_call = "text", "", "", True
        return "".join(content), calls

    def _not_a_call(self) -> str:
        """The marker and what followed it are text; reading goes on after them."""
        raw, self._raw, self._state = self._space + self._raw, "", "text"
        self._space = ""
        return raw

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """The end of the text: what is held back is content (a call never completed too)."""
        if self._state == "text":
            tail = self._buf.lstrip(_SPACE) if self._after_call else self._buf
        else:
            tail = self._space + self._raw + self._buf
        self._buf, self._raw, self._space, self._state = "", "", "", "text"
        return tail, []


class JsonValueEnd:
    """Where the JSON value that starts at ``start`` of a growing text ends: an object or array
    at its closing bracket (brackets counted outside strings), a string at its closing quote, a
    number or literal before the character that follows it. ``scan`` goes on from where the
    last call stopped."""

    def __init__(self, start: int = 0) -> None:
        self._at, self._depth, self._string, self._escaped = start, 0, False, False
        self._kind = ""  # the value's first character: { [ " or another (a number, a literal)

    def scan(self, text: str) -> int:
        """The index after the value's end, or -1 while it goes on."""
        for i in range(self._at, len(text)):
            char = text[i]
            if not self._kind:
                self._kind = char
                self._depth, self._string = int(char in "{["), char == '"'
                continue
            if self._string:
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == '"':
                    self._string = False
                    if self._kind == '"':
                        return i + 1
            elif self._kind not in '{["':
                if char in ",}]" or char in _SPACE:
                    return i
            elif char == '"':
                self._string = True
            elif char in "{[":
                self._depth += 1
            elif char in "}]":
                self._depth -= 1
                if self._depth == 0:
                    return i + 1
        self._at = len(text)
        return -1


class PythonicCalls(SyntaxReader):
    """``pythonic``: a reply that begins with ``[`` is held to its end and read as a list of
    calls; any other reply is text, handed out as it comes."""

    def __init__(self, names: Collection[str], new_id: Callable[[], str], *, most: int | None = None) -> None:
        super().__init__(names, new_id, most=most)
        self._buf = ""
        self._state = "start"  # start, list (held to the end), text

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        self._buf += text
        if self._state == "start":
            rest = self._buf.lstrip(_SPACE)
            if not rest:
                return "", []
            self._state = "list" if rest[0] == "[" else "text"
        if self._state == "text":
            out, self._buf = self._buf, ""
            return out, []
        return "", []

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        text, self._buf, state, self._state = self._buf, "", self._state, "text"
        if state != "list":
            return text, []
        values = _python_calls(text.strip(_SPACE))
        calls = [self._call(value) for value in values] if values is not None else []
        if not calls or None in calls:
            self.calls = 0
            return text, []
        return "", [call for call in calls if self._kept(call)]


def _python_calls(text: str) -> list[dict[str, Any]] | None:
    """``[f(a=1), g()]`` as ``[{"name": "f", "arguments": {"a": 1}}, ...]``; None for any other
    text (positional arguments, values that are not literals, ``**kwargs``, a syntax error)."""
    try:
        tree = ast.parse(text, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    if not isinstance(tree, ast.List) or not tree.elts:
        return None
    calls = []
    for node in tree.elts:
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
            return None
        arguments = {}
        for keyword in node.keywords:
            if keyword.arg is None:
                return None
            try:
                arguments[keyword.arg] = _literal(keyword.value)
            except ValueError:
                return None
        calls.append({"name": node.func.id, "arguments": arguments})
    return calls


def _literal(node: ast.expr) -> Any:
    """A JSON value written as a Python literal (string, number, True/False/None, list, dict with
    string keys); ValueError for anything else."""
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):  # -1, -2.5
        value = _literal(node.operand)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError("only a number is negated")
        return -value
    if isinstance(node, ast.Constant):
        value = node.value
        if value is None or isinstance(value, (str, bool, int)) or (isinstance(value, float) and math.isfinite(value)):
            return value
        raise ValueError("not a JSON value")
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(item) for item in node.elts]
    if isinstance(node, ast.Dict):
        if not all(isinstance(key, ast.Constant) and isinstance(key.value, str) for key in node.keys):
            raise ValueError("a dict's keys must be strings")
        return {key.value: _literal(value) for key, value in zip(node.keys, node.values)}  # type: ignore[union-attr]
    raise ValueError("not a literal")


def _json(text: str, default: Any = None) -> Any:
    """The JSON value of a text, or ``default`` (NaN, Infinity and numbers too large for a float,
    such as 1e999, are not JSON: json.dumps would write them back as invalid JSON)."""
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    except (ValueError, RecursionError):
        return default


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{text} is out of a float's range")
    return number


def _until_marker(text: str, marker: str) -> tuple[str, str, str, bool]:
    """Text read up to a call's ``marker``: ``(content, space, rest, found)``. Found: the content
    before it (without the whitespace next to it, ``space``: content only if no call follows)
    and the text after it. Not found: the content that can no longer be the marker's start, nor
    whitespace before one, and the rest, held back."""
    start = text.find(marker)
    if start >= 0:
        before = text[:start]
        content = before.rstrip(_SPACE)
        return content, before[len(content):], text[start + len(marker):], True
    keep = len(text) - partial_start(text, marker)
    keep = len(text[:keep].rstrip(_SPACE))
    return text[:keep], "", text[keep:], False


def partial_start(text: str, token: str) -> int:
    """How many of ``text``'s last characters are the start of ``token`` (0: none)."""
    for size in range(min(len(text), len(token) - 1), 0, -1):
        if token.startswith(text[-size:]):
            return size
    return 0


_READERS: dict[str, type[SyntaxReader]] = {"hermes": HermesCalls, "llama3_json": Llama3JsonCalls,
                                         "mistral": MistralCalls, "pythonic": PythonicCalls,
                                         "qwen3_coder": Qwen3CoderCalls, "deepseek_v3": DeepSeekV3Calls,
                                         "deepseek_v31": DeepSeekCalls, "kimi_k2": KimiK2Calls, "glm45": GlmCalls,
                                         "glm47": GlmCalls, "minimax_m2": MiniMaxM2Calls}


def call_reader(parser: str, names: Collection[str], new_id: Callable[[], str], *,
                most: int | None = None) -> SyntaxReader:
    """The reader of one choice's text in the syntax ``parser`` names (one of PARSERS)."""
    return _READERS[parser](names, new_id, most=most)


def split_calls(parser: str, text: str, names: Collection[str], new_id: Callable[[], str], *,
                most: int | None = None) -> tuple[str | None, list[dict[str, Any]]]:
    """A whole reply's content and calls (without ``index``); with calls, content that is only
    whitespace is None."""
    reader = call_reader(parser, names, new_id, most=most)
    content, calls = reader.feed(text)
    tail, more = reader.finish()
    content, calls = content + tail, calls + more
    calls = [{k: v for k, v in c.items() if k != "index"} for c in calls]
    if calls and not content.strip(_SPACE):
        return None, calls
    return content, calls


__all__ = ["KEEP_SPECIAL_TOKENS", "PARSERS", "DeepSeekCalls", "JsonValueEnd", "DeepSeekV3Calls", "GlmCalls", "HermesCalls", "KimiK2Calls",
           "Llama3JsonCalls", "MiniMaxM2Calls", "MistralCalls", "PythonicCalls",
           "Qwen3CoderCalls", "SyntaxReader", "call_reader", "partial_start", "split_calls"]
