"""Tool calls on ``/v1/chat/completions`` (OpenAI's ``tools`` and ``tool_choice``), made with
constrained decoding, as vLLM does without a model-specific tool parser:

* ``tool_choice: {"type": "function", "function": {"name": N}}`` (a named function): the output
  is constrained (XGrammar, the guide ``response_format`` also uses) to the JSON of N's
  ``parameters``; the reply has one call of N whose ``arguments`` is that text;
* ``tool_choice: "required"``: the output is constrained to a JSON array of one or more
  ``{"name": ..., "parameters": {...}}`` objects, each a declared function with its own
  parameters (at most one with ``parallel_tool_calls: false``); the reply has one call per
  element, ``arguments`` the element's parameters as the model wrote them (streamed as they
  come);
* ``"none"``: no call; the tools still reach the chat template, as with OpenAI and vLLM;
* ``"auto"`` (OpenAI's default when tools are given): the output is free and the calls the model
  wrote in its own syntax are read from it, where the deployment names that syntax
  (``TOOL_CALL_PARSER``, gateway.tool_parsers); without one, a 400 that says what to send
  instead (vLLM answers the same without ``--tool-call-parser``).

Every form gives the tools to the chat template (``tools``, as transformers does); a template
that ignores them shows the model the functions only through the constraint. In the reply,
``content`` is null, ``tool_calls`` holds the calls and ``finish_reason`` is the generation's
(``stop``, or ``length`` when ``max_tokens`` cut it), as vLLM and OpenAI answer a forced call.
A call that a cut left incomplete has the arguments generated so far (``finish_reason`` says
why), named or ``required``.

Messages may carry an earlier turn's calls (an assistant message's ``tool_calls``, its content
then optional) and their results (``role: "tool"`` with ``tool_call_id``); the template gets
each call's ``arguments`` decoded from JSON, as templates expect (transformers, vLLM).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from marshmallow import ValidationError, post_load
from marshmallow.validate import OneOf, Regexp

from trident.contract import GUIDE_JSON_SCHEMA, MAX_GUIDE_CHARS, Guide

from .fields import StrictBoolean, StrictString, _StrictField, describe
from .ids import new_id
from .openai_fields import Nested
from .schemas import StrictSchema
from .tool_parsers import JsonValueEnd

#: At most this many tools in one request (OpenAI's limit).
MAX_TOOLS = 128
#: A function's name, as OpenAI allows it.
FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
#: The parameters of a function declared without any: it takes none.
NO_PARAMETERS = {"type": "object", "properties": {}}
CHOICES = ("none", "auto", "required")


class JsonObject(_StrictField):
    """Any JSON object (a function's ``parameters``, a JSON schema)."""

    expected = "an object"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, dict)


def _required_string(name: str, **kwargs: Any) -> StrictString:
    return StrictString(required=True, allow_none=False, **kwargs,
                        error_messages={"required": f"{name} is required", "null": f"{name} must be a string, got null"})


def _function_type() -> StrictString:
    """``type``: only "function"."""
    return _required_string("type", validate=OneOf(["function"], error="type must be \"function\", got {input}"))


def _required_object(schema: type[StrictSchema], name: str) -> Nested:
    return Nested(schema, required=True, allow_none=False,
                  error_messages={"required": f"{name} is required", "null": f"{name} must be an object, got null"})


class FunctionSchema(StrictSchema):
    """``tools[i].function``: a function the model may call."""

    name = _required_string("name", validate=Regexp(
        FUNCTION_NAME, error="name must be 1 to 64 letters, digits, underscores or dashes, got {input}"))
    description = StrictString()
    parameters = JsonObject()
    strict = StrictBoolean()


class ToolSchema(StrictSchema):
    """One of ``tools``: ``{"type": "function", "function": {...}}``; loads the function's dict."""

    type = _function_type()
    function = _required_object(FunctionSchema, "function")

    @post_load
    def to_tool(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        function = {k: v for k, v in data["function"].items() if v is not None}
        return {"type": "function", "function": function}


class FunctionCallSchema(StrictSchema):
    """An earlier call's ``function``: its name and its arguments (a JSON text)."""

    name = _required_string("name")
    arguments = _required_string("arguments")


class ToolCallSchema(StrictSchema):
    """One of an assistant message's ``tool_calls``, as a reply gave it; loads what the chat
    template sees: the arguments decoded when they are a JSON object."""

    id = _required_string("id")
    type = _function_type()
    function = _required_object(FunctionCallSchema, "function")

    @post_load
    def to_template(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        arguments: Any = data["function"]["arguments"]
        try:
            decoded = json.loads(arguments)
        except ValueError:
            decoded = None
        if isinstance(decoded, dict):
            arguments = decoded
        return {"id": data["id"], "type": "function",
                "function": {"name": data["function"]["name"], "arguments": arguments}}


@dataclass(frozen=True, slots=True)
class ToolChoice:
    """``tool_choice``: ``mode`` is "none", "auto", "required" or "function" (with ``name``);
    for "auto", ``names`` are the declared functions, which the model may call, each with its
    parameters' declared types (:func:`parameter_types`)."""

    mode: str
    name: str | None = None
    names: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    parallel: bool = True  # "auto": false keeps the first call only
    parser: str | None = None  # "auto": the syntax the model writes its calls in (gateway.tool_parsers)


class ToolChoiceField(_StrictField):
    """``tool_choice``: "none", "auto", "required" or ``{"type": "function", "function":
    {"name": ...}}``; loads a :class:`ToolChoice`."""

    expected = 'one of "none", "auto", "required" or {"type": "function", "function": {"name": ...}}'

    def accepts(self, value: Any) -> bool:
        return isinstance(value, (str, dict))

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> ToolChoice:
        value = super()._deserialize(value, attr, data, **kwargs)
        name = self.public_name
        if isinstance(value, str):
            if value not in CHOICES:
                raise ValidationError(f"{name} must be {self.expected}, got {describe(value)}")
            return ToolChoice(value)
        unknown = sorted(set(value) - {"type", "function"})
        if unknown:
            raise ValidationError(f"{name} has an unrecognized field: {unknown[0]}")
        if value.get("type") != "function":
            raise ValidationError(f"{name}.type must be \"function\", got {describe(value.get('type'))}")
        function = value.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ValidationError(f"{name}.function must be an object with the function's name, got "
                                  f"{describe(function if not isinstance(function, dict) else function.get('name'))}")
        unknown = sorted(set(function) - {"name"})
        if unknown:
            raise ValidationError(f"{name}.function has an unrecognized field: {unknown[0]}")
        return ToolChoice("function", function["name"])


def tool_choice_of(tools: Sequence[Mapping[str, Any]] | None, choice: ToolChoice | None,
                   parser: str | None = None) -> ToolChoice | None:
    """The call a request forces (``required`` or a named function), ``auto`` when the model
    chooses (only where the deployment has a ``parser`` of its calls, gateway.tool_parsers), or
    None for plain text. Raises ``ValidationError`` (naming ``tool_choice``) for a choice that
    cannot be served."""
    if not tools:
        if choice is not None and choice.mode in ("required", "function"):
            raise ValidationError("tool_choice needs tools: give the functions the model may call in tools",
                                  field_name="tool_choice")
        return None
    mode = choice.mode if choice is not None else "auto"
    if mode == "none":
        return None
    names = [tool["function"]["name"] for tool in tools]
    if mode == "auto":
        if parser:
            return ToolChoice("auto", names={tool["function"]["name"]: parameter_types(tool["function"].get("parameters"))
                                             for tool in tools}, parser=parser)
        raise ValidationError(
            'tool_choice "auto" (the default when tools are given) is not supported: this deployment names no '
            "parser of the model's own tool-call syntax (TOOL_CALL_PARSER). Send \"required\", a named function "
            '({"type": "function", "function": {"name": ...}}) or "none"', field_name="tool_choice")
    if mode == "function" and choice is not None and choice.name not in names:
        raise ValidationError(f"tool_choice names function {json.dumps(choice.name)}, which is not in tools",
                              field_name="tool_choice")
    return ToolChoice(mode, choice.name if choice is not None else None)


def parameter_types(parameters: Any) -> dict[str, str]:
    """The declared type of each property of a function's parameters schema, lower-cased (of
    ``["integer", "null"]``, the first that is not null; "string" where none is declared)."""
    properties = parameters.get("properties") if isinstance(parameters, Mapping) else None
    if not isinstance(properties, Mapping):
        return {}
    types = {}
    for key, schema in properties.items():
        kind = schema.get("type") if isinstance(schema, Mapping) else None
        if isinstance(kind, list):
            kind = next((k for k in kind if isinstance(k, str) and k != "null"), None)
        types[key] = kind.strip().lower() if isinstance(kind, str) else "string"
    return types


def check_unique_names(tools: Sequence[Mapping[str, Any]]) -> None:
    seen = set()
    for i, tool in enumerate(tools):
        name = tool["function"]["name"]
        if name in seen:
            raise ValidationError(f"tools[{i}].function.name {json.dumps(name)} is declared twice", field_name="tools")
        seen.add(name)


#: JSON Schema keywords that only annotate (they constrain nothing): left out of the guide, so
#: that functions described at length still fit MAX_GUIDE_CHARS.
ANNOTATIONS = frozenset({"description", "title", "examples", "$comment", "deprecated", "readOnly", "writeOnly"})
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMAS = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames",
            "unevaluatedItems", "unevaluatedProperties", "additionalItems")


def constraint(schema: Any) -> Any:
    """``schema`` without its annotations (:data:`ANNOTATIONS`), keywords only: a property
    named "description" stays, and values (``enum``, ``const``, ``default``) are kept as given."""
    if not isinstance(schema, Mapping):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in ANNOTATIONS:
            continue
        if key in _SCHEMA_MAPS and isinstance(value, Mapping):
            out[key] = {name: constraint(sub) for name, sub in value.items()}
        elif key in _SCHEMA_LISTS and isinstance(value, list):
            out[key] = [constraint(sub) for sub in value]
        elif key in _SCHEMAS:
            out[key] = [constraint(sub) for sub in value] if isinstance(value, list) else constraint(value)
        else:
            out[key] = value
    return out


def _parameters(tool: Mapping[str, Any]) -> Any:
    return constraint(tool["function"].get("parameters") or NO_PARAMETERS)


def tool_guide(tools: Sequence[Mapping[str, Any]], choice: ToolChoice, *, parallel: bool = True) -> Guide:
    """The JSON schema the output must match for a forced call (see the module's docstring),
    without the parameters' annotations (descriptions reach the model through the template)."""
    if choice.mode == "function":
        schema = next(_parameters(tool) for tool in tools if tool["function"]["name"] == choice.name)
    else:
        calls = [{"type": "object",
                  "properties": {"name": {"type": "string", "enum": [tool["function"]["name"]]},
                                 "parameters": _parameters(tool)},
                  "required": ["name", "parameters"]}
                 for tool in tools]
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        if not parallel:
            schema["maxItems"] = 1
    text = json.dumps(schema, ensure_ascii=False)
    if len(text) > MAX_GUIDE_CHARS:
        raise ValidationError(f"the schema of the tools' calls must be at most {MAX_GUIDE_CHARS} characters as JSON, "
                              f"got {len(text)}: declare fewer or smaller functions", field_name="tools")
    return Guide(GUIDE_JSON_SCHEMA, text)


def new_call_id() -> str:
    return f"call_{new_id()[:24]}"


#: the start of an element of ``required``'s array, up to its arguments: the name first (the
#: guide's schema lists it first, and XGrammar writes the properties in that order)
_ELEMENT_HEAD = re.compile(r'\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"parameters"\s*:\s*')


class CallReader:
    """The calls of one choice's output, read as it grows: for a named function, the output is
    the arguments of one call; for ``required``, each element of the JSON array is a call,
    handed out as it comes: its name once the element reaches its ``parameters``, then the
    parameters' text piece by piece (the constraint makes it valid JSON; a generation cut in
    the middle leaves the arguments written so far, as for a named function)."""

    _decoder = json.JSONDecoder()

    def __init__(self, choice: ToolChoice) -> None:
        self.choice = choice
        self._text = ""
        self._pos = 0  # where reading goes on
        self._state = "start"  # start (before "["), between (elements), head, arguments, tail, closed
        self._value = JsonValueEnd()  # the end of the arguments being streamed
        self.calls = 0  # calls handed out so far

    def feed(self, text: str) -> list[dict[str, Any]]:
        """The pieces of calls ``text`` adds (``required``): a call's first piece is
        ``{"index", "id", "type", "function": {"name", "arguments"}}`` (numbered from 0 in the
        order they come), a later one ``{"index", "function": {"arguments"}}`` with the next
        text of its arguments."""
        self._text += text
        out: list[dict[str, Any]] = []
        while self._state != "closed":
            if self._state == "arguments":
                end = self._value.scan(self._text)
                piece = self._text[self._pos:len(self._text) if end < 0 else end]
                if piece:
                    out.append({"index": self.calls - 1, "function": {"arguments": piece}})
                if end < 0:
                    self._pos = len(self._text)
                    break
                self._pos, self._state = end, "tail"
                continue
            start = _skip_space(self._text, self._pos)
            if start >= len(self._text):
                break
            char = self._text[start]
            if self._state == "start":
                # not an array: nothing to read (the constraint makes it one)
                self._state, self._pos = ("between", start + 1) if char == "[" else ("closed", start)
            elif self._state == "between":
                if char not in ",{":  # "]", or not an array of calls: the end
                    self._state = "closed"
                elif char == ",":
                    self._pos = start + 1
                else:
                    self._state, self._pos = "head", start  # _pos stays at the element's start until its head is read
            elif self._state == "head":
                if not self._head(out):
                    break
            else:  # tail: the element's closing brace
                self._state, self._pos = ("between", start + 1) if char == "}" else ("closed", start)
        return out

    def _head(self, out: list[dict[str, Any]]) -> bool:
        """Read an element's name (its first piece out); False: more text is needed."""
        head = _ELEMENT_HEAD.match(self._text, self._pos)
        if head is not None and head.end() < len(self._text):
            out.append(self.call(json.loads(head.group(1)), ""))
            self._pos, self._state, self._value = head.end(), "arguments", JsonValueEnd(head.end())
            return True
        if "}" not in self._text[self._pos:]:
            return False
        try:  # another order of the keys: the element whole, once complete
            value, end = self._decoder.raw_decode(self._text, self._pos)
        except ValueError:
            return False
        self._pos, self._state = end, "between"
        if isinstance(value, dict) and isinstance(value.get("name"), str) and "parameters" in value:
            out.append(self.call(value["name"], json.dumps(value["parameters"], ensure_ascii=False)))
        return True

    def call(self, name: str, arguments: str) -> dict[str, Any]:
        call = {"index": self.calls, "id": new_call_id(), "type": "function",
                "function": {"name": name, "arguments": arguments}}
        self.calls += 1
        return call


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def message_calls(choice: ToolChoice, text: str) -> list[dict[str, Any]]:
    """A finished choice's calls, as a non-streaming reply gives them: the pieces a stream
    hands out, joined."""
    reader = CallReader(choice)
    if choice.mode == "function":
        pieces = [reader.call(choice.name or "", text)]
    else:
        pieces = reader.feed(text)
    calls: list[dict[str, Any]] = []
    for piece in pieces:
        if "id" in piece:  # a call's first piece; a message's calls have no index
            calls.append({"id": piece["id"], "type": piece["type"], "function": dict(piece["function"])})
        else:
            calls[piece["index"]]["function"]["arguments"] += piece["function"]["arguments"]
    return calls


__all__ = [
    "MAX_TOOLS",
    "CallReader",
    "JsonObject",
    "ToolCallSchema",
    "ToolChoice",
    "ToolChoiceField",
    "ToolSchema",
    "check_unique_names",
    "message_calls",
    "tool_choice_of",
    "tool_guide",
]
