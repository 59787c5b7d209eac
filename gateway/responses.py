"""``POST /v1/responses``: OpenAI's Responses API, stateless, for the clients that speak it (the
``openai`` client's ``responses``, the OpenAI Agents SDK, coding agents), as vLLM offers it
(llama.cpp's server does not, yet).

A Responses request is the same generation as a chat completion, so it is served by the chat
path, as gateway.anthropic serves Anthropic's: :class:`ResponsesSchema` checks the request's own
shape and builds the body of a ``/v1/chat/completions`` request, which the chat schema loads
(template, tools, guides, limits: one set of rules; its errors name the Responses fields). The
reply reads the text with the chat reply's readers (reasoning, tool calls) and writes the
Responses shapes.

What maps to what:

* ``input``: a string (one user message) or items: messages (``role`` user, system, developer or
  assistant; ``content`` a string or ``input_text`` / ``output_text`` parts), ``function_call``
  (an assistant's call: merged into the assistant turn before it, as chat templates expect),
  ``function_call_output`` (a ``tool`` message) and ``reasoning`` (its text goes to the next
  assistant turn's ``reasoning``). ``instructions`` is a system message first. Images, files,
  ``item_reference`` and other item types are 400s.
* ``max_output_tokens``, ``temperature``, ``top_p``, ``stream``; ``tools`` (``function`` tools:
  ``name``, ``description``, ``parameters``, ``strict``), ``tool_choice`` (``auto``, ``none``,
  ``required``, ``{"type": "function", "name": ...}``), ``parallel_tool_calls``;
  ``text.format`` (``text``, ``json_object``, ``json_schema``: chat's ``response_format``);
  ``include: ["message.output_text.logprobs"]`` and ``top_logprobs`` (chat's ``logprobs`` and
  ``top_logprobs``, in the ``output_text``).
* Stored responses (gateway.response_store) where the deployment sets RESPONSES_STORE:
  ``store`` (default true there) keeps the response and its conversation, and
  ``previous_response_id`` continues one (its input items, then its output, then this
  ``input``). Without a store nothing is stored: ``store`` is answered false and
  ``previous_response_id`` is a 400 (send the whole conversation in ``input``).
  ``conversation`` and ``prompt`` are 400s; ``metadata`` (echoed), the rest of ``include``,
  ``reasoning``, ``user``, ``service_tier``, ``prompt_cache_key`` and ``safety_identifier`` are
  accepted and ignored.
* ``truncation``: "disabled" (the default; a conversation over the context is the llm model's
  400) or "auto": :func:`fit_conversation` drops its oldest turns until it fits (echoed).

The reply: a ``response`` with ``output`` items (``reasoning`` where REASONING_PARSER read some,
the ``message`` with its ``output_text``, the ``function_call``s), ``status`` ``completed`` or
``incomplete`` (``incomplete_details.reason`` ``max_output_tokens``) and ``usage``. Streamed:
``response.created``, ``response.in_progress``, then per item ``response.output_item.added``,
its part's ``response.content_part.added``, the ``response.output_text.delta``s (or
``response.reasoning_text.delta``s, or a call's ``response.function_call_arguments.delta``),
their ``.done`` events and ``response.output_item.done``; last ``response.completed`` (or
``response.incomplete``) with the whole response. Each event has its ``sequence_number``; a
failure after the stream began is an ``error`` event.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import Any

from marshmallow import ValidationError, post_load, validates_schema
from marshmallow.validate import OneOf

from .backend import Admitted, Event, Finished, TextDelta
from .choices import Choice
from .errors import ApiError, ClientError, PromptTooLong, renamed_param
from .fields import StrictBoolean, StrictInteger, StrictNumber, StrictString, _StrictField, check_fields, describe
from .ids import new_id
from .openai_fields import Anything, Empty, Nested, joined_text
from .openai_replies import ChatCompletionReply
from .reasoning import Reasoning
from .schemas import StrictSchema, _range, priority_field, request_id_field
from .tools import MAX_TOOLS, JsonObject, ToolChoice
from trident.contract import INT32_MAX, MAX_CHAT_MESSAGES, MAX_TOP_LOGPROBS

#: the roles of input messages, as the chat template's (``developer`` is OpenAI's newer system)
ROLES = {"user": "user", "system": "system", "developer": "system", "assistant": "assistant"}
#: what ``include`` names to have logprobs in the message's ``output_text``
LOGPROBS_INCLUDE = "message.output_text.logprobs"
#: ``truncation``'s values: "disabled" (the default: a conversation that does not fit is a 400)
TRUNCATIONS = ("auto", "disabled")
#: tokens a tokenizer may add to a text beyond one per UTF-8 byte (BOS, EOS, a leading space):
#: a prompt of fewer bytes than the context less this and max_tokens fits without counting
TOKENIZER_SLACK = 8
#: the text parts a message's content may hold, and their fields beside type and text
TEXT_PARTS, PART_FIELDS = ("input_text", "output_text"), ("annotations", "logprobs")
#: stream events, in the order a stream sends them (the document lists them)
EVENTS = ("response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
          "response.output_text.delta", "response.output_text.done", "response.reasoning_text.delta",
          "response.reasoning_text.done", "response.function_call_arguments.delta",
          "response.function_call_arguments.done", "response.content_part.done", "response.output_item.done",
          "response.completed", "response.incomplete", "response.failed", "error")


def _item(item: Any, where: str) -> dict[str, Any]:
    """One input item, checked, as ``{"type": ..., ...}`` with its text read."""
    if not isinstance(item, dict):
        raise ValidationError(f"{where} must be an object, got {describe(item)}")
    kind = item.get("type", "message" if "role" in item else None)
    if kind == "message":
        check_fields(item, where, {"role": str, "content": (str, list)}, ("id", "status", "phase"))
        if item["role"] not in ROLES:
            raise ValidationError(f"{where}.role must be one of user, system, developer, assistant, got "
                                  f"{describe(item['role'])}")
        text = joined_text(item["content"], f"{where}.content", TEXT_PARTS, PART_FIELDS)
        return {"type": "message", "role": ROLES[item["role"]], "text": text}
    if kind == "function_call":
        check_fields(item, where, {"call_id": str, "name": str, "arguments": str}, ("id", "status", "namespace"))
        return {"type": kind, "call_id": item["call_id"], "name": item["name"], "arguments": item["arguments"]}
    if kind == "function_call_output":
        check_fields(item, where, {"call_id": str, "output": (str, list)}, ("id", "status"))
        output = joined_text(item["output"], f"{where}.output", TEXT_PARTS, PART_FIELDS)
        return {"type": kind, "call_id": item["call_id"], "output": output}
    if kind == "reasoning":
        check_fields(item, where, {}, ("id", "summary", "content", "encrypted_content", "status"))
        texts = [joined_text(item.get(key) or [], f"{where}.{key}", (part,))
                 for key, part in (("content", "reasoning_text"), ("summary", "summary_text"))]
        return {"type": kind, "text": texts[0] or texts[1]}
    got = f"type {describe(kind)}" if kind is not None else "an item without a type or role"
    raise ValidationError(f"{where} must be a message, function_call, function_call_output or reasoning item "
                          f"(no item_reference; no images or files), got {got}")


class ResponseInput(_StrictField):
    """``input``: a string (one user message) or an array of items; loaded as the checked items."""

    expected = "a string or an array of input items"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, (str, list))

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> list[dict[str, Any]]:
        value = super()._deserialize(value, attr, data, **kwargs)
        if isinstance(value, str):
            return [{"type": "message", "role": "user", "text": value}]
        if not value:
            raise ValidationError("input must not be empty")
        if len(value) > MAX_CHAT_MESSAGES:
            raise ValidationError(f"input must have at most {MAX_CHAT_MESSAGES} items, got {len(value)}")
        return [_item(item, f"input[{i}]") for i, item in enumerate(value)]


class ResponseToolSchema(StrictSchema):
    """One of ``tools``: a function tool (OpenAI's hosted tools are not run here)."""

    type = StrictString(required=True, allow_none=False, validate=OneOf(
        ["function"], error="only function tools are supported (hosted tools such as web_search are not run "
                            "here), got type {input}"),
        error_messages={"required": "type is required", "null": "type must be a string, got null"})
    name = StrictString(required=True, allow_none=False,
                        error_messages={"required": "name is required", "null": "name must be a string, got null"})
    description = StrictString()
    parameters = JsonObject()
    strict = StrictBoolean()


class ToolChoiceValue(_StrictField):
    """``tool_choice``: auto, none, required, or ``{"type": "function", "name": ...}``; loaded as
    chat's ``tool_choice``."""

    expected = 'one of "auto", "none", "required" or {"type": "function", "name": ...}'

    def accepts(self, value: Any) -> bool:
        return isinstance(value, (str, dict))

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        value = super()._deserialize(value, attr, data, **kwargs)
        if value in ("auto", "none", "required"):
            return value
        if isinstance(value, dict) and value.get("type") == "function" and isinstance(value.get("name"), str) \
                and set(value) == {"type", "name"}:
            return {"type": "function", "function": {"name": value["name"]}}
        raise ValidationError(f"tool_choice must be {self.expected}, got {describe(value)}")


class TextFormatSchema(StrictSchema):
    """``text.format``: text, json_object, or json_schema (``name``, ``schema``, ``strict``)."""

    type = StrictString(required=True, allow_none=False, validate=OneOf(
        ["text", "json_object", "json_schema"], error="type must be one of text, json_object, json_schema, got "
                                                      "{input}"),
        error_messages={"required": "type is required", "null": "type must be a string, got null"})
    name = StrictString()
    schema = JsonObject()
    strict = StrictBoolean()
    description = StrictString()

    @validates_schema
    def validate_schema(self, data: Mapping[str, Any], **kwargs: Any) -> None:
        if data.get("type") == "json_schema" and data.get("schema") is None:
            raise ValidationError("schema is required with type json_schema", field_name="schema")


class TextConfigSchema(StrictSchema):
    format = Nested(TextFormatSchema)
    verbosity = Anything()


#: chat fields whose errors name a Responses field (the first match of a prefix wins)
_PARAMS = (("max_tokens", "max_output_tokens"), ("messages", "input"), ("response_format", "text"),
           ("parallel_tool_calls", "parallel_tool_calls"))


def responses_param(param: str | None) -> str | None:
    """The Responses field of a chat field an error names."""
    return renamed_param(param, _PARAMS)


class ResponsesSchema(StrictSchema):
    """``POST /v1/responses``: the request's own checks, then the chat completion it is
    (:meth:`chat_body`)."""

    model = StrictString()
    input = ResponseInput(required=True, allow_none=False,
                          error_messages={"required": "input is required",
                                          "null": "input must be a string or an array of input items, got null"})
    instructions = StrictString()
    max_output_tokens = StrictInteger(validate=_range("max_output_tokens must be between {min} and {max}, got {input}",
                                                      min=1, max=INT32_MAX))
    temperature = StrictNumber(validate=_range("temperature must be between {min} and {max}, got {input}", min=0,
                                               max=2))
    top_p = StrictNumber(validate=_range("top_p must be greater than {min} and at most {max}, got {input}", min=0,
                                         max=1, min_inclusive=False))
    stream = StrictBoolean()
    tools = Nested(ResponseToolSchema, many=True, max_items=MAX_TOOLS)
    tool_choice = ToolChoiceValue()
    parallel_tool_calls = StrictBoolean()
    text = Nested(TextConfigSchema)
    top_logprobs = StrictInteger(validate=_range("top_logprobs must be between {min} and {max}, got {input}", min=0,
                                                 max=MAX_TOP_LOGPROBS))
    include = Anything()  # "message.output_text.logprobs" asks for logprobs; the rest is ignored
    priority = priority_field()  # vLLM's: the engine admits waiting requests the lower values first
    request_id = request_id_field()  # vLLM's: the request's id (logs, Triton); not the response's here
    # Stored responses (gateway.response_store): the route looks the previous one up.
    previous_response_id = StrictString()
    store = StrictBoolean()
    conversation = Empty("conversation is not supported: this server keeps no conversation objects; send the whole "
                         "conversation in input, or continue a stored response with previous_response_id")
    prompt = Empty("prompt (a stored prompt template) is not supported: send instructions and input")
    background = StrictBoolean()  # run on after the answer (gateway.background); needs a store
    # Accepted and ignored: they do not change what is generated here.
    metadata = Anything()
    reasoning = Anything()
    # "auto": the oldest turns are dropped where the conversation would not fit (fit_conversation)
    truncation = StrictString(validate=OneOf(TRUNCATIONS, error="truncation must be auto or disabled, got {input}"))
    user = Anything()
    service_tier = Anything()
    prompt_cache_key = Anything()
    prompt_cache_retention = Anything()
    safety_identifier = Anything()
    stream_options = Anything()

    @post_load
    def chat_body(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        """The /v1/chat/completions body this request is (and, under ``echo``, what the response
        object repeats of the request)."""
        body: dict[str, Any] = {"messages": chat_messages(data.get("instructions"), data["input"]),
                                "input_items": data["input"]}
        for ours, chat in (("model", "model"), ("stream", "stream"), ("temperature", "temperature"),
                           ("top_p", "top_p"), ("max_output_tokens", "max_tokens"),
                           ("parallel_tool_calls", "parallel_tool_calls"), ("tool_choice", "tool_choice"),
                           ("priority", "priority"), ("request_id", "request_id")):
            if data.get(ours) is not None:
                body[chat] = data[ours]
        if data.get("tools"):
            body["tools"] = [{"type": "function", "function": {k: v for k, v in tool.items() if k != "type"}}
                             for tool in data["tools"]]
        include = data.get("include")
        if (isinstance(include, list) and LOGPROBS_INCLUDE in include) or data.get("top_logprobs"):
            body["logprobs"] = True  # chat's: every generated token's log-probability
            if data.get("top_logprobs"):
                body["top_logprobs"] = data["top_logprobs"]
        text_format = (data.get("text") or {}).get("format")
        if text_format is not None and text_format["type"] != "text":
            if text_format["type"] == "json_object":
                body["response_format"] = {"type": "json_object"}
            else:
                schema = {k: text_format[k] for k in ("name", "schema", "strict", "description") if k in text_format}
                body["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", **schema}}
        given = {k: v for k, v in data.items() if v is not None}
        if isinstance(given.get("tool_choice"), dict):  # echoed as the request gave it
            given["tool_choice"] = {"type": "function", "name": given["tool_choice"]["function"]["name"]}
        body["echo"] = {"instructions": given.get("instructions"), "max_output_tokens": given.get("max_output_tokens"),
                        "temperature": given.get("temperature"), "top_p": given.get("top_p"),
                        "tool_choice": given.get("tool_choice", "auto"), "tools": given.get("tools", []),
                        "parallel_tool_calls": given.get("parallel_tool_calls", True),
                        "text": {"format": text_format or {"type": "text"}}, "top_logprobs": given.get("top_logprobs"),
                        "metadata": given["metadata"] if isinstance(given.get("metadata"), dict) else {},
                        "previous_response_id": given.get("previous_response_id"), "store": given.get("store", True),
                        "background": given.get("background", False),
                        "truncation": given.get("truncation", "disabled")}
        return body


def fit_conversation(body: dict[str, Any], load: Callable[[dict[str, Any]], Any], count: Callable[[Any], int],
                     max_context: Callable[[Any], int]) -> Any:
    """``truncation: "auto"``: the chat request (what ``load`` makes of a chat body) of the
    conversation in ``body`` with as few of its oldest turns dropped as make it fit the model's
    context with its ``max_tokens`` (``count`` and ``max_context``: a request's prompt tokens and
    its model's context; found by a binary search over the turns). The leading system messages
    (``instructions``, system and developer items) stay; what is kept of the rest starts at a
    user message, so no call's output is left without the call, and holds at most
    MAX_CHAT_MESSAGES messages (a long chain of stored responses may have more). A 400 naming
    ``messages`` when the last turn alone does not fit."""
    messages = body["messages"]
    head = next((i for i, message in enumerate(messages) if message["role"] != "system"), len(messages))
    cuts = [head, *(i for i in range(head + 1, len(messages)) if messages[i]["role"] == "user")]
    cuts = [cut for cut in cuts if head + len(messages) - cut <= MAX_CHAT_MESSAGES] or cuts[-1:]
    tried: dict[int, tuple[Any, str | None]] = {}

    def attempt(j: int) -> tuple[Any, str | None]:
        """The request keeping the turns from ``cuts[j]`` on, and why it does not fit (None: it does)."""
        if j not in tried:
            try:
                req = load({**body, "messages": messages[:head] + messages[cuts[j]:]})
            except PromptTooLong as err:
                tried[j] = (None, err.message)
            else:
                budget, context = req.params.sampling.engine_tokens, max_context(req)
                tokens = 0
                if len(req.params.prompt.encode()) + TOKENIZER_SLACK + budget > context:
                    tokens = count(req)
                trouble = None if tokens + budget <= context else (
                    f"its prompt has {tokens} tokens and max_output_tokens is {budget}: together {tokens + budget}, "
                    f"over the model's context of {context} tokens")
                tried[j] = (req, trouble)
        return tried[j]

    last = len(cuts) - 1
    req, trouble = attempt(0)
    if trouble is None:
        return req
    req, trouble = attempt(last)
    if trouble is not None:
        raise ClientError(f"the conversation does not fit the model's context even with truncation auto, which "
                          f"keeps the system messages and the last turn: {trouble}", param="messages")
    low, high = 0, last  # attempt(low) does not fit, attempt(high) does
    while high - low > 1:
        middle = (low + high) // 2
        if attempt(middle)[1] is None:
            high = middle
        else:
            low = middle
    return attempt(high)[0]


def chat_messages(instructions: str | None, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chat messages of a request's instructions (a system turn first) and input items."""
    messages = [{"role": "system", "content": instructions}] if instructions else []
    return messages + _chat_messages(items)


def _chat_messages(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chat messages of the input items: an assistant's calls join its turn; reasoning goes
    to the next assistant turn."""
    messages: list[dict[str, Any]] = []
    thoughts: list[str] = []

    def assistant(text: str) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if thoughts:
            message["reasoning"] = "\n".join(thoughts)
            thoughts.clear()
        messages.append(message)
        return message

    for item in items:
        kind = item["type"]
        if kind == "message":
            if item["role"] == "assistant":
                assistant(item["text"])
            else:
                messages.append({"role": item["role"], "content": item["text"]})
        elif kind == "function_call":
            last = messages[-1] if messages and messages[-1]["role"] == "assistant" and not thoughts else None
            turn = last if last is not None else assistant("")
            turn.setdefault("tool_calls", []).append(
                {"id": item["call_id"], "type": "function", "function": {"name": item["name"],
                                                                         "arguments": item["arguments"]}})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})
        elif item["text"]:  # reasoning
            thoughts.append(item["text"])
    return messages


class ResponsesReply:
    """The JSON answer and the SSE events of one Responses request. The text goes through a chat
    reply (its reasoning and tool-call readers) and its pieces become output items."""

    def __init__(self, model: str, echo: Mapping[str, Any], *, tool_choice: ToolChoice | None = None,
                 reasoning: Reasoning | None = None, logprobs: int | None = None,
                 keep: Callable[[dict[str, Any]], bool] | None = None) -> None:
        self._given = (model, dict(echo), tool_choice, reasoning, logprobs)
        self.id = f"resp_{new_id()}"
        self._keep = keep  # stores the finished response (echo's store true); False: it could not
        self.model = model
        self.created_at = int(time.time())
        self._echo = dict(echo)
        self._chat = ChatCompletionReply(model, tool_choice=tool_choice, reasoning=reasoning, logprobs=logprobs)
        self._logprobs: list[dict[str, Any]] = []  # streamed tokens' log-probabilities not handed out yet
        self._sequence = 0
        self._started = False
        self._items: list[dict[str, Any]] = []  # the output so far
        self._open: dict[str, Any] | None = None  # the item being streamed (its index: _open_at)
        self._open_at = 0
        self.final: dict[str, Any] | None = None  # the response a stream ended with

    def twin(self) -> ResponsesReply:
        """A reply of this one's response (its id, its creation time) with none of its output yet:
        a streamed background response's events are encoded apart from its stored response."""
        model, echo, tool_choice, reasoning, logprobs = self._given
        twin = ResponsesReply(model, echo, tool_choice=tool_choice, reasoning=reasoning, logprobs=logprobs)
        twin.id, twin.created_at = self.id, self.created_at
        return twin

    # -- JSON -----------------------------------------------------------------------------------

    def response(self, choices: list[Choice], finished: Finished) -> dict[str, Any]:
        choice = choices[0]
        answer = self._chat._choice(choice)
        message = answer["message"]
        if message.get("reasoning"):
            self._items.append(_reasoning_item(message["reasoning"]))
        if message.get("content"):
            self._items.append(_message_item(message["content"]))
            if answer["logprobs"] is not None:  # as chat's: every generated token
                self._items[-1]["content"][0]["logprobs"] = answer["logprobs"]["content"]
        for call in message.get("tool_calls") or ():
            self._items.append(_call_item(call["id"], call["function"]["name"], call["function"]["arguments"]))
        if self._items:
            self._items[-1]["status"] = _status(self._items[-1], cut=choice.finish_reason == "length")
        return self._kept(self._response(choice.finish_reason, finished))

    def queued(self) -> dict[str, Any]:
        """The response object of a background request just taken (gateway.background)."""
        return {**self._response(None, None), "status": "queued"}

    def failed(self, error: ApiError) -> dict[str, Any]:
        """The response object of a background request whose generation failed."""
        return {**self._response(None, None), "status": "failed",
                "error": {"code": error.type, "message": error.message}}

    def _kept(self, response: dict[str, Any]) -> dict[str, Any]:
        """The finished response, stored where asked (``store`` false where that failed)."""
        if self._keep is not None and not self._keep(response):
            response["store"] = False
        return response

    def _response(self, reason: str | None, finished: Finished | None) -> dict[str, Any]:
        """The response object: in progress (no ``reason``), completed or incomplete."""
        incomplete = reason == "length"
        status = "in_progress" if reason is None else "incomplete" if incomplete else "completed"
        out = {"id": self.id, "object": "response", "created_at": self.created_at, "status": status,
               "model": self.model, "output": list(self._items), "error": None,
               "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
               "usage": _usage(finished) if finished is not None else None, **self._echo}
        if reason is not None and not incomplete:
            out["completed_at"] = int(time.time())
        return out

    # -- SSE ------------------------------------------------------------------------------------

    def admitted(self, event: Admitted) -> bytes:
        """The stream's start once the server took the request (SSEBody's ``encode_admitted``)."""
        return self._start()

    def __call__(self, event: Event) -> bytes:
        """The SSE bytes of one generation event (SSEBody's ``encode``)."""
        out = [self._start()]
        if isinstance(event, TextDelta):
            if event.index == 0 and (event.text or event.logprobs is not None):
                delta = self._chat._delta_choice(0, event.text, None, event.logprobs)
                if delta is not None:
                    if delta["logprobs"] is not None:
                        self._logprobs += delta["logprobs"]["content"]
                    out.extend(self._pieces(delta["delta"]))
            return b"".join(out)
        reason = event.ends[0].finish_reason
        delta = self._chat._delta_choice(0, None, "stop")
        if delta is not None:
            out.extend(self._pieces(delta["delta"]))
        out.extend(self._close(cut=reason == "length"))
        final = self.final = self._kept(self._response(reason, event))
        out.append(self._event("response.incomplete" if final["status"] == "incomplete" else "response.completed",
                               response=final))
        return b"".join(out)

    def failed_event(self, response: dict[str, Any]) -> bytes:
        """``response.failed``: a background response's stream ends with its failed response."""
        return self._start() + self._event("response.failed", response=response)

    def error(self, error: ApiError) -> bytes:
        """A failure after the stream began (SSEBody's ``encode_error``)."""
        return self._start() + self._event("error", code=error.type, message=error.message, param=error.param)

    def _start(self) -> bytes:
        if self._started:
            return b""
        self._started = True
        started = self._response(None, None)
        return self._event("response.created", response=started) + self._event("response.in_progress",
                                                                              response=started)

    def _pieces(self, delta: Mapping[str, Any]) -> list[bytes]:
        """A chat delta's pieces as output item events."""
        out: list[bytes] = []
        if delta.get("reasoning"):
            out += self._text_piece("reasoning", delta["reasoning"])
        if delta.get("content"):
            out += self._text_piece("message", delta["content"])
        for call in delta.get("tool_calls") or ():
            function = call.get("function") or {}
            if "id" in call:  # a call's first piece
                out += self._close()
                item = _call_item(call["id"], function.get("name", ""), "", status="in_progress")
                out.append(self._event("response.output_item.added", output_index=len(self._items), item=item))
                self._items.append(item)
                self._open, self._open_at = item, len(self._items) - 1
            if function.get("arguments") and self._open is not None and self._open["type"] == "function_call":
                self._open["arguments"] += function["arguments"]
                out.append(self._event("response.function_call_arguments.delta", item_id=self._open["id"],
                                       output_index=self._open_at, delta=function["arguments"]))
        return out

    def _text_piece(self, kind: str, text: str) -> list[bytes]:
        """The next text of a reasoning or message item, opening the item first."""
        out: list[bytes] = []
        if self._open is None or self._open["type"] != kind:
            out += self._close()
            item = _reasoning_item("", status="in_progress") if kind == "reasoning" else \
                _message_item("", status="in_progress")
            part = item["content"][0]
            index = len(self._items)
            out.append(self._event("response.output_item.added", output_index=index,
                                   item={**item, "content": []}))
            out.append(self._event("response.content_part.added", item_id=item["id"], output_index=index,
                                   content_index=0, part=part))
            self._items.append(item)
            self._open, self._open_at = item, index
        self._open["content"][0]["text"] += text
        name = "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
        extra = {}
        if kind == "message":  # the tokens' log-probabilities so far (thinking's too, as chat's)
            extra["logprobs"], self._logprobs = self._logprobs, []
            self._open["content"][0]["logprobs"] += extra["logprobs"]
        out.append(self._event(name, item_id=self._open["id"], output_index=self._open_at, content_index=0,
                               delta=text, **extra))
        return out

    def _close(self, *, cut: bool = False) -> list[bytes]:
        """The ``.done`` events of the item being streamed (``cut``: max_output_tokens ended it)."""
        item, self._open = self._open, None
        if item is None:
            return []
        index = self._open_at
        item["status"] = _status(item, cut=cut)
        out = []
        if item["type"] == "function_call":
            out.append(self._event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                   name=item["name"], arguments=item["arguments"]))
        else:
            part = item["content"][0]
            name = "response.reasoning_text.done" if item["type"] == "reasoning" else "response.output_text.done"
            extra = {}
            if item["type"] == "message":  # all of its tokens' log-probabilities
                part["logprobs"] += self._logprobs
                self._logprobs = []
                extra["logprobs"] = part["logprobs"]
            out.append(self._event(name, item_id=item["id"], output_index=index, content_index=0, text=part["text"],
                                   **extra))
            out.append(self._event("response.content_part.done", item_id=item["id"], output_index=index,
                                   content_index=0, part=part))
        out.append(self._event("response.output_item.done", output_index=index, item=item))
        return out

    def _event(self, event: str, **data: Any) -> bytes:
        body = {"type": event, "sequence_number": self._sequence, **data}
        self._sequence += 1
        return f"event: {event}\ndata: {json.dumps(body, ensure_ascii=False)}\n\n".encode("utf-8")


def _status(item: Mapping[str, Any], *, cut: bool) -> str:
    """The status of the last item when the generation ended: ``incomplete`` when
    max_output_tokens cut it (text; a call whose arguments are not whole JSON: a named
    function's, whose arguments are the whole output), else ``completed``."""
    if not cut:
        return "completed"
    if item["type"] == "function_call":
        try:
            json.loads(item["arguments"])
            return "completed"  # a whole call: the cut came after it
        except ValueError:
            return "incomplete"
    return "incomplete"


def _message_item(text: str, *, status: str = "completed") -> dict[str, Any]:
    return {"type": "message", "id": f"msg_{new_id()}", "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def _reasoning_item(text: str, *, status: str = "completed") -> dict[str, Any]:
    return {"type": "reasoning", "id": f"rs_{new_id()}", "status": status, "summary": [],
            "content": [{"type": "reasoning_text", "text": text}]}


def _call_item(call_id: str, name: str, arguments: str, *, status: str = "completed") -> dict[str, Any]:
    return {"type": "function_call", "id": f"fc_{new_id()}", "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}


#: the id prefix of each kind of stored input item
_ITEM_IDS = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}


def with_ids(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Checked input items, each with an ``id`` (a stored response's items are listed by id)."""
    return [item if item.get("id") else {**item, "id": f"{_ITEM_IDS[item['type']]}_{new_id()}"} for item in items]


def output_items(response: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A stored response's output as checked input items (with their ids): what a request
    that continues it sends again."""
    return [{**_item(item, "output"), "id": item["id"]} for item in response["output"]]


def public_item(item: Mapping[str, Any]) -> dict[str, Any]:
    """A checked input item in the Responses API's shape (``GET .../input_items``)."""
    kind, out = item["type"], {"type": item["type"], "id": item["id"]}
    if kind == "message":
        part = "output_text" if item["role"] == "assistant" else "input_text"
        return {**out, "status": "completed", "role": item["role"], "content": [{"type": part, "text": item["text"]}]}
    if kind == "function_call":
        return {**out, "status": "completed", "call_id": item["call_id"], "name": item["name"],
                "arguments": item["arguments"]}
    if kind == "function_call_output":
        return {**out, "status": "completed", "call_id": item["call_id"], "output": item["output"]}
    return {**out, "summary": [], "content": [{"type": "reasoning_text", "text": item["text"]}]}


def _usage(finished: Finished) -> dict[str, Any]:
    return {"input_tokens": finished.prompt_tokens,
            "input_tokens_details": {"cached_tokens": finished.cached_tokens or 0},
            "output_tokens": finished.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": finished.prompt_tokens + finished.completion_tokens}


__all__ = ["EVENTS", "ResponseInput", "ResponsesReply", "ResponsesSchema", "chat_messages", "output_items",
           "public_item", "responses_param", "with_ids"]
