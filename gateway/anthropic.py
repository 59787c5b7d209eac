"""``POST /v1/messages``: Anthropic's Messages API, for clients written against it (the
``anthropic`` SDK, agent tools that speak it), as vLLM and llama.cpp's server offer it.

A Messages request is the same generation as a chat completion, so it is served by the chat
path: :class:`MessagesSchema` checks the request's own shape and turns it into the body of a
``/v1/chat/completions`` request, which the chat schema then loads (chat template, tools,
guides, limits: one set of rules; its errors name the Messages fields). The reply reads the text
with the chat reply's readers (reasoning, tool calls) and writes Anthropic's shapes.

What maps to what:

* ``system`` (a string or text blocks) is a system message; a user message's ``tool_result``
  blocks are ``tool`` messages (before its text), an assistant's ``tool_use`` blocks its tool
  calls and its ``thinking`` blocks its reasoning (gateway.reasoning). A conversation that ends
  with an assistant message is continued from it (Anthropic's prefill: the chat fields'
  ``continue_final_message``).
* ``max_tokens`` (required), ``temperature`` (0 to 1), ``top_p``, ``top_k``,
  ``stop_sequences``, ``stream``; ``tools`` (``name``, ``description``, ``input_schema``) and
  ``tool_choice`` (``auto``: the model's own calls, with the deployment's TOOL_CALL_PARSER;
  ``any``: at least one call; ``tool``: that tool; ``none``; ``disable_parallel_tool_use``);
  ``output_config.format`` (a JSON schema the output follows).
* ``thinking``: ``{"type": "disabled"}`` asks the chat template not to think (Qwen3's
  ``enable_thinking``); with REASONING_PARSER the reply's thinking is a ``thinking`` block. The
  budget is not enforced: ``max_tokens`` bounds the whole reply.
* ``metadata``, ``service_tier``, ``cache_control``, ``inference_geo``, ``speed`` and
  ``output_config.effort`` are accepted and ignored; images, documents, server tools and other
  block types are 400s.

The reply: ``content`` blocks (``thinking``, ``text``, ``tool_use``), ``stop_reason``
(``end_turn``, ``max_tokens``, ``stop_sequence`` with the ``stop_sequence`` generated, or
``tool_use``) and ``usage`` (``input_tokens``, ``output_tokens``, and
``cache_read_input_tokens`` where the engine reports them). Streamed: Anthropic's named events,
``message_start`` (sent once the server took the request: its usage has the prompt's
``input_tokens``, which the llm model's admission says), then per block ``content_block_start``,
``content_block_delta``s (``text_delta``, ``thinking_delta``, ``input_json_delta``) and
``content_block_stop``, then ``message_delta`` (the stop reason and the whole usage) and
``message_stop``; a failure after the stream began is ``event: error``. Errors
are Anthropic's shape, ``{"type": "error", "error": {"type", "message", "param"}, "request_id"}``
(its error types: ``invalid_request_error``, ``authentication_error``, ``rate_limit_error``,
``overloaded_error`` for a 503...), from the key check on, and each answer carries Anthropic's
``request-id`` header (the gateway's X-Request-ID), which the SDK reads.

``POST /v1/messages/count_tokens`` answers ``{"input_tokens": n}``: the tokens of the prompt the
same request (without ``max_tokens``) renders, which its ``usage.input_tokens`` would be.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from marshmallow import ValidationError, post_load, validates_schema
from marshmallow.validate import OneOf

from .backend import Admitted, ChoiceEnd, Event, Finished, TextDelta
from .choices import Choice
from .errors import ApiError, renamed_param
from .fields import StrictBoolean, StrictInteger, StrictNumber, StrictString, _StrictField, check_fields, describe
from .ids import new_id
from .openai_fields import Anything, Nested
from .openai_replies import ChatCompletionReply
from .reasoning import Reasoning
from .schemas import StopSequences, StrictSchema, _range
from .tools import MAX_TOOLS, JsonObject, ToolChoice
from trident.contract import INT32_MAX, MAX_CHAT_MESSAGES

#: Anthropic's stop reasons for the llm model's finish reasons (a call made: tool_use)
STOP_REASONS = {"length": "max_tokens", "stop_sequence": "stop_sequence", "eos_token": "end_turn"}
#: the block types a request may hold, by role
USER_BLOCKS = ("text", "tool_result")
ASSISTANT_BLOCKS = ("text", "tool_use", "thinking", "redacted_thinking")


def _text_of(blocks: Any, where: str) -> str:
    """A string, or text blocks joined with newlines (``system``, a tool result's content)."""
    if isinstance(blocks, str):
        return blocks
    if not isinstance(blocks, list):
        raise ValidationError(f"{where} must be a string or an array of text blocks, got {describe(blocks)}")
    texts = []
    for i, block in enumerate(blocks):
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise ValidationError(f"{where}[{i}] must be a text block ({{\"type\": \"text\", \"text\": ...}}), "
                                  f"got {describe(block)}")
        unknown = sorted(set(block) - {"type", "text", "cache_control", "citations"})
        if unknown:
            raise ValidationError(f"{where}[{i}] has an unrecognized field: {unknown[0]}")
        texts.append(block["text"])
    return "\n".join(texts)


class SystemPrompt(_StrictField):
    """``system``: a string or an array of text blocks; loaded as one string."""

    expected = "a string or an array of text blocks"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, (str, list))

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        return _text_of(super()._deserialize(value, attr, data, **kwargs), self.public_name)


class BlockContent(_StrictField):
    """A message's ``content``: a string (one text block) or an array of content blocks; loaded
    as a list of blocks (each checked for its type's fields; the role's are checked by the
    message)."""

    expected = "a string or an array of content blocks"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, (str, list))

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> list[dict[str, Any]]:
        value = super()._deserialize(value, attr, data, **kwargs)
        if isinstance(value, str):
            return [{"type": "text", "text": value}]
        blocks = []
        for i, block in enumerate(value):
            where = f"content[{i}]"
            kind = block.get("type") if isinstance(block, dict) else None
            if kind not in (*USER_BLOCKS, *ASSISTANT_BLOCKS):
                got = f"type {describe(kind)}" if isinstance(block, dict) else describe(block)
                raise ValidationError(f"{where} must be a text, tool_use, tool_result or thinking block (images, "
                                      f"documents and server tools are not supported), got {got}")
            blocks.append(_block(block, where))
        return blocks


_BLOCK_FIELDS = {
    "text": {"text": str},
    "tool_use": {"id": str, "name": str, "input": dict},
    "tool_result": {"tool_use_id": str},
    "thinking": {"thinking": str},
    "redacted_thinking": {"data": str},
}
_OPTIONAL_FIELDS = {
    "text": ("cache_control", "citations"),
    "tool_use": ("cache_control",),
    "tool_result": ("content", "is_error", "cache_control"),
    "thinking": ("signature",),
    "redacted_thinking": (),
}


def _block(block: dict[str, Any], where: str) -> dict[str, Any]:
    kind = block["type"]
    check_fields(block, where, _BLOCK_FIELDS[kind], _OPTIONAL_FIELDS[kind])
    if kind == "tool_result":
        if block.get("is_error") is not None and not isinstance(block["is_error"], bool):
            raise ValidationError(f"{where}.is_error must be a boolean, got {describe(block['is_error'])}")
        content = block.get("content")
        return {**block, "content": "" if content is None else _text_of(content, f"{where}.content")}
    return block


class AnthropicMessageSchema(StrictSchema):
    """One of ``messages``: ``role`` (user or assistant) and ``content``."""

    role = StrictString(required=True, allow_none=False, validate=OneOf(
        ["user", "assistant"], error="role must be user or assistant (the system prompt is the top-level system), "
                                     "got {input}"),
        error_messages={"required": "role is required", "null": "role must be a string, got null"})
    content = BlockContent(required=True, allow_none=False,
                             error_messages={"required": "content is required",
                                             "null": "content must be a string or an array of content blocks, got null"})

    @validates_schema
    def validate_blocks(self, data: Mapping[str, Any], **kwargs: Any) -> None:
        role, blocks = data.get("role"), data.get("content") or []
        allowed = USER_BLOCKS if role == "user" else ASSISTANT_BLOCKS
        for i, block in enumerate(blocks):
            if block["type"] not in allowed:
                raise ValidationError(f"content[{i}]: a {block['type']} block is not allowed in a {role} message",
                                      field_name="content")


class AnthropicToolSchema(StrictSchema):
    """One of ``tools``: a client tool (server tools, with their own ``type``, are not run here)."""

    name = StrictString(required=True, allow_none=False,
                        error_messages={"required": "name is required", "null": "name must be a string, got null"})
    description = StrictString()
    input_schema = JsonObject(required=True, allow_none=False,
                              error_messages={"required": "input_schema is required",
                                              "null": "input_schema must be an object, got null"})
    type = StrictString(validate=OneOf(["custom"], error="only client tools (type \"custom\") are supported, got "
                                                         "{input}"))
    cache_control = Anything()


class AnthropicToolChoiceSchema(StrictSchema):
    """``tool_choice``: auto, any, tool (with ``name``) or none."""

    type = StrictString(required=True, allow_none=False, validate=OneOf(
        ["auto", "any", "tool", "none"], error="type must be one of auto, any, tool, none, got {input}"),
        error_messages={"required": "type is required", "null": "type must be a string, got null"})
    name = StrictString()
    disable_parallel_tool_use = StrictBoolean()

    @validates_schema
    def validate_name(self, data: Mapping[str, Any], **kwargs: Any) -> None:
        if (data.get("type") == "tool") != (data.get("name") is not None):
            raise ValidationError('name is given with type "tool", and only then', field_name="name")


class AnthropicThinkingSchema(StrictSchema):
    """``thinking``: enabled (with its budget), adaptive or disabled."""

    type = StrictString(required=True, allow_none=False, validate=OneOf(
        ["enabled", "adaptive", "disabled"], error="type must be one of enabled, adaptive, disabled, got {input}"),
        error_messages={"required": "type is required", "null": "type must be a string, got null"})
    budget_tokens = StrictInteger(validate=_range("budget_tokens must be between {min} and {max}, got {input}",
                                                  min=1, max=INT32_MAX))
    display = Anything()


class AnthropicOutputFormatSchema(StrictSchema):
    type = StrictString(required=True, allow_none=False, validate=OneOf(
        ["json_schema"], error="type must be json_schema, got {input}"),
        error_messages={"required": "type is required", "null": "type must be a string, got null"})
    schema = JsonObject(required=True, allow_none=False,
                        error_messages={"required": "schema is required", "null": "schema must be an object, got null"})


class AnthropicOutputConfigSchema(StrictSchema):
    format = Nested(AnthropicOutputFormatSchema)
    effort = Anything()


#: chat fields whose errors name a Messages field (the first match of a prefix wins)
_PARAMS = (("stop", "stop_sequences"), ("parallel_tool_calls", "tool_choice"), ("response_format", "output_config"),
           ("messages", "messages"), ("chat_template_kwargs", "thinking"))


def messages_param(param: str | None) -> str | None:
    """The Messages field of a chat field an error names."""
    return renamed_param(param, _PARAMS, ((".function.parameters", ".input_schema"), (".function", "")))


class MessagesSchema(StrictSchema):
    """``POST /v1/messages``: the request's own checks, then the chat completion it is
    (:meth:`chat_body`)."""

    model = StrictString()
    max_tokens = StrictInteger(required=True, allow_none=False,
                               error_messages={"required": "max_tokens is required",
                                               "null": "max_tokens must be an integer, got null"})
    messages = Nested(AnthropicMessageSchema, many=True, min_items=1, max_items=MAX_CHAT_MESSAGES, required=True,
                      allow_none=False, error_messages={"required": "messages is required",
                                                        "null": "messages must be an array, got null"})
    system = SystemPrompt()
    stop_sequences = StopSequences()
    stream = StrictBoolean()
    temperature = StrictNumber(validate=_range("temperature must be between {min} and {max}, got {input}", min=0,
                                               max=1))
    top_p = StrictNumber(validate=_range("top_p must be greater than {min} and at most {max}, got {input}", min=0,
                                         max=1, min_inclusive=False))
    top_k = StrictInteger(validate=_range("top_k must be between {min} and {max}, got {input}", min=0,
                                          max=INT32_MAX))
    tools = Nested(AnthropicToolSchema, many=True, max_items=MAX_TOOLS)
    tool_choice = Nested(AnthropicToolChoiceSchema)
    thinking = Nested(AnthropicThinkingSchema)
    output_config = Nested(AnthropicOutputConfigSchema)
    # Accepted and ignored: they do not change what is generated here.
    metadata = Anything()
    service_tier = Anything()
    cache_control = Anything()
    inference_geo = Anything()
    speed = Anything()

    @validates_schema
    def validate_tool_choice(self, data: Mapping[str, Any], **kwargs: Any) -> None:
        choice = data.get("tool_choice")
        if choice is not None and choice.get("type") == "tool":
            names = [tool["name"] for tool in data.get("tools") or ()]
            if choice.get("name") not in names:
                raise ValidationError(f"tool_choice names tool {json.dumps(choice.get('name'))}, which is not in "
                                      "tools", field_name="tool_choice")

    @post_load
    def chat_body(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        """The /v1/chat/completions body this request is."""
        messages: list[dict[str, Any]] = []
        if data.get("system"):
            messages.append({"role": "system", "content": data["system"]})
        for message in data["messages"]:
            messages.extend(_chat_messages(message))
        last = data["messages"][-1]
        body: dict[str, Any] = {"messages": messages, "max_tokens": data.get("max_tokens", 1)}  # count_tokens: 1
        if last["role"] == "assistant" and not any(b["type"] == "tool_use" for b in last["content"]):
            body["continue_final_message"] = True  # prefill: the reply continues it
        for name in ("model", "stream", "temperature", "top_p", "top_k"):
            if data.get(name) is not None:
                body[name] = data[name]
        if data.get("stop_sequences"):  # the llm model says which one ended the text (ChoiceEnd.stop)
            body["stop"] = list(data["stop_sequences"])
        if data.get("tools"):
            body["tools"] = [{"type": "function", "function": {
                "name": tool["name"], "parameters": tool["input_schema"],
                **({"description": tool["description"]} if tool.get("description") is not None else {})}}
                for tool in data["tools"]]
        choice = data.get("tool_choice")
        if choice is not None:
            body["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}.get(choice["type"]) or {
                "type": "function", "function": {"name": choice["name"]}}
            if choice.get("disable_parallel_tool_use"):
                body["parallel_tool_calls"] = False
        if (data.get("thinking") or {}).get("type") == "disabled":
            body["chat_template_kwargs"] = {"enable_thinking": False}
        output_format = (data.get("output_config") or {}).get("format")
        if output_format is not None:
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "output",
                                                                             "schema": output_format["schema"]}}
        return body


class CountTokensSchema(MessagesSchema):
    """``POST /v1/messages/count_tokens``: a Messages request without ``max_tokens``; its prompt is
    counted, nothing is generated."""

    class Meta:
        exclude = ("max_tokens",)


def _chat_messages(message: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The chat messages of one Messages message."""
    blocks = message["content"]
    texts = [b["text"] for b in blocks if b["type"] == "text"]
    if message["role"] == "user":
        out = [{"role": "tool", "tool_call_id": b["tool_use_id"], "content": b["content"]}
               for b in blocks if b["type"] == "tool_result"]
        if texts or not out:
            out.append({"role": "user", "content": "\n".join(texts)})
        return out
    reply: dict[str, Any] = {"role": "assistant", "content": "\n".join(texts)}
    calls = [{"id": b["id"], "type": "function", "function": {"name": b["name"], "arguments": json.dumps(b["input"])}}
             for b in blocks if b["type"] == "tool_use"]
    if calls:
        reply["tool_calls"] = calls
    thoughts = [b["thinking"] for b in blocks if b["type"] == "thinking"]
    if thoughts:
        reply["reasoning"] = "\n".join(thoughts)
    return [reply]


class MessagesReply:
    """The JSON answer and the SSE events of one Messages request. The text goes through a chat
    reply (its reasoning and tool-call readers) and its pieces become content blocks."""

    def __init__(self, model: str, *, tool_choice: ToolChoice | None = None, reasoning: Reasoning | None = None) -> None:
        self.id = f"msg_{new_id()}"
        self.model = model
        self._chat = ChatCompletionReply(model, tool_choice=tool_choice, reasoning=reasoning)
        self._started = False
        self._open: tuple[int, str] | None = None  # the block being streamed: its index and type
        self._blocks = 0
        self._called = False

    # -- the stop sequence ------------------------------------------------------------------------

    @staticmethod
    def _stop_sequence(end: ChoiceEnd | None) -> str | None:
        """The stop sequence that ended the text, as the llm model says (ChoiceEnd.stop; a stop
        token of the model's own is none)."""
        return end.stop if end is not None and isinstance(end.stop, str) else None

    def _stop_reason(self, reason: str, stop: str | None) -> str:
        if self._called and reason != "length":
            return "tool_use"
        if reason == "stop_sequence" and stop is None:
            return "end_turn"  # a stop token of the model's own
        return STOP_REASONS.get(reason, "end_turn")

    # -- JSON -----------------------------------------------------------------------------------

    def response(self, choices: list[Choice], finished: Finished) -> dict[str, Any]:
        choice = choices[0]
        stop = self._stop_sequence(choice.end)
        message = self._chat._choice(choice)["message"]
        content: list[dict[str, Any]] = []
        if message.get("reasoning"):
            content.append({"type": "thinking", "thinking": message["reasoning"], "signature": ""})
        if message.get("content"):
            content.append({"type": "text", "text": message["content"]})
        for call in message.get("tool_calls") or ():
            content.append({"type": "tool_use", "id": call["id"], "name": call["function"]["name"],
                            "input": _input(call["function"]["arguments"])})
            self._called = True
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": content,
                "stop_reason": self._stop_reason(choice.finish_reason, stop), "stop_sequence": stop,
                "usage": _usage(finished)}

    # -- SSE ------------------------------------------------------------------------------------

    def __call__(self, event: Event) -> bytes:
        """The SSE bytes of one generation event (SSEBody's ``encode``)."""
        out = [] if self._started else [self._start()]
        if isinstance(event, TextDelta):
            if event.index == 0 and event.text:
                delta = self._chat._delta_choice(0, event.text, None)
                if delta is not None:
                    out.extend(self._events(delta["delta"]))
            return b"".join(out)
        reason, stop = event.ends[0].finish_reason, self._stop_sequence(event.ends[0])
        delta = self._chat._delta_choice(0, None, "stop")
        if delta is not None:
            out.extend(self._events(delta["delta"]))
        out.extend(self._close())
        out.append(_event("message_delta", {
            "delta": {"stop_reason": self._stop_reason(reason, stop), "stop_sequence": stop},
            "usage": _usage(event)}))
        out.append(_event("message_stop", {}))
        return b"".join(out)

    def error(self, error: ApiError) -> bytes:
        """A failure after the stream began (SSEBody's ``encode_error``)."""
        return (b"" if self._started else self._start()) + _event("error", {"error": error_object(error)})

    def admitted(self, event: Admitted) -> bytes:
        """The stream's start once the server took the request (SSEBody's ``encode_admitted``):
        ``message_start`` with the prompt's token count, which the admission says."""
        return b"" if self._started else self._start(event.prompt_tokens or 0)

    def _start(self, input_tokens: int = 0) -> bytes:
        self._started = True
        return _event("message_start", {"message": {
            "id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": input_tokens, "output_tokens": 0}}})

    def _events(self, delta: Mapping[str, Any]) -> list[bytes]:
        """A chat delta's pieces as content block events."""
        out: list[bytes] = []
        if delta.get("reasoning"):
            out += self._block("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            out.append(self._delta({"type": "thinking_delta", "thinking": delta["reasoning"]}))
        if delta.get("content"):
            out += self._block("text", {"type": "text", "text": ""})
            out.append(self._delta({"type": "text_delta", "text": delta["content"]}))
        for call in delta.get("tool_calls") or ():
            function = call.get("function") or {}
            if "id" in call:  # a call's first piece
                out += self._block("tool_use", {"type": "tool_use", "id": call["id"], "name": function.get("name", ""),
                                                "input": {}}, new=True)
                self._called = True
            if function.get("arguments"):
                out.append(self._delta({"type": "input_json_delta", "partial_json": function["arguments"]}))
        return out

    def _block(self, kind: str, block: dict[str, Any], *, new: bool = False) -> list[bytes]:
        """Open a block of this kind unless one is open (``new``: always a new one)."""
        if self._open is not None and self._open[1] == kind and not new:
            return []
        out = self._close()
        self._open = (self._blocks, kind)
        self._blocks += 1
        out.append(_event("content_block_start", {"index": self._open[0], "content_block": block}))
        return out

    def _delta(self, delta: dict[str, Any]) -> bytes:
        assert self._open is not None
        return _event("content_block_delta", {"index": self._open[0], "delta": delta})

    def _close(self) -> list[bytes]:
        if self._open is None:
            return []
        index, self._open = self._open[0], None
        return [_event("content_block_stop", {"index": index})]


#: Anthropic's error ``type`` by status; other 4xx are ``invalid_request_error``, other 5xx ``api_error``
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
               503: "overloaded_error", 504: "timeout_error"}


def error_object(error: ApiError) -> dict[str, Any]:
    """An error as Anthropic's error object: its ``type`` and ``message``, and the field it names
    (``param``, the gateway's, where there is one: Anthropic's objects may carry more fields)."""
    kind = ERROR_TYPES.get(error.status) or ("invalid_request_error" if error.status < 500 else "api_error")
    out = {"type": kind, "message": error.message}
    if error.param is not None:
        out["param"] = error.param
    return out


def error_body(error: ApiError, request_id: str) -> dict[str, Any]:
    """The body of an error answered on Anthropic's paths, in Anthropic's shape (gateway.errors'
    ``register_error_body``)."""
    return {"type": "error", "error": error_object(error), "request_id": request_id}


def _event(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps({'type': name, **data}, ensure_ascii=False)}\n\n".encode("utf-8")


def _input(arguments: str) -> dict[str, Any]:
    """A call's arguments as the tool_use block's input (a cut-off call's: what parses, else {})."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _usage(finished: Finished) -> dict[str, int]:
    usage = {"input_tokens": finished.prompt_tokens, "output_tokens": finished.completion_tokens}
    if finished.cached_tokens is not None:
        usage["cache_read_input_tokens"] = finished.cached_tokens
    return usage


__all__ = ["ERROR_TYPES", "BlockContent", "CountTokensSchema", "MessagesReply", "MessagesSchema", "SystemPrompt",
           "error_body", "error_object", "messages_param"]
