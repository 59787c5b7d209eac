"""Marshmallow schemas of what the gateway answers: JSON bodies, SSE event payloads and the
error envelope (shared/API.md). They document the responses in ``/openapi.json`` (gateway.openapi)
and the tests validate real responses against that document, so code and description cannot
drift apart. Request schemas live in gateway.schemas and gateway.openai_schemas.
"""

from __future__ import annotations

from marshmallow import Schema, fields
from marshmallow.validate import Equal, Length, OneOf, Range

from trident.contract import FINISH_REASONS, MAX_CHOICES
from .anthropic import ERROR_TYPES as ANTHROPIC_ERROR_TYPES
from .errors import ERROR_TYPES
from .openai_fields import MAX_PROMPTS

OPENAI_FINISH_REASONS = ("stop", "length")
#: chat also ends with "tool_calls" when the model chose to call (tool_choice "auto", gateway.tool_parsers)
CHAT_FINISH_REASONS = (*OPENAI_FINISH_REASONS, "tool_calls")


def _required(field_class: type[fields.Field], *args, **kwargs) -> fields.Field:
    return field_class(*args, required=True, **kwargs)


def _const(value: str, **kwargs) -> fields.Field:
    return fields.String(required=True, validate=OneOf([value]), **kwargs)


class ErrorObjectSchema(Schema):
    message = _required(fields.String)
    type = _required(fields.String, validate=OneOf(sorted(set(ERROR_TYPES.values()))))
    param = _required(fields.String, allow_none=True)
    code = _required(fields.Integer, validate=Range(min=400, max=599))


class ErrorSchema(Schema):
    """Every error, on every endpoint; also the data of SSE ``event: error`` (/generate) and of
    a failed /v1 stream's last ``data:`` line before ``[DONE]``."""

    error = fields.Nested(ErrorObjectSchema, required=True)


class UsageSchema(Schema):
    prompt_tokens = _required(fields.Integer, validate=Range(min=0))
    completion_tokens = _required(fields.Integer, validate=Range(min=0))
    total_tokens = _required(fields.Integer, validate=Range(min=0))


class PromptTokensDetailsSchema(Schema):
    cached_tokens = _required(fields.Integer, validate=Range(min=0))


class OpenAIUsageSchema(UsageSchema):
    """OpenAI's usage: with ``prompt_tokens_details.cached_tokens`` when the engine reports how
    many prompt tokens came from its prefix cache (the CPU engine), absent otherwise."""

    prompt_tokens_details = fields.Nested(PromptTokensDetailsSchema)


class HealthSchema(Schema):
    status = _const("ok")


class ReadySchema(Schema):
    status = _const("ready")


#: Choices one /v1/completions answer may hold: n for each of its prompts.
MAX_COMPLETION_CHOICES = MAX_CHOICES * MAX_PROMPTS


def _index(most: int = MAX_CHOICES) -> fields.Field:
    """A choice's index (several with ``n``, and on /v1/completions with several prompts)."""
    return _required(fields.Integer, validate=Range(min=0, max=most - 1))


def _choices(schema: type[Schema], *, streamed: bool = False, most: int = MAX_CHOICES) -> fields.Field:
    return _required(fields.List, fields.Nested(schema),
                     validate=Length(max=1) if streamed else Length(min=1, max=most))


class CompletionLogprobsSchema(Schema):
    """OpenAI's legacy completions ``logprobs`` (``/generate`` and ``/v1/completions``): per
    token its text, log-probability, the best alternatives with the chosen token, and where it
    starts in the choice's text. With ``echo`` the prompt's tokens come first; its first token has
    no log-probability (null, and null alternatives), as OpenAI's and vLLM's."""

    tokens = _required(fields.List, fields.String())
    token_logprobs = _required(fields.List, fields.Float(allow_none=True))
    top_logprobs = _required(fields.List, fields.Dict(keys=fields.String(), values=fields.Float(), allow_none=True))
    text_offset = _required(fields.List, fields.Integer(validate=Range(min=0)))


def _completion_logprobs() -> fields.Field:
    return fields.Nested(CompletionLogprobsSchema, required=True, allow_none=True)


class TopLogprobSchema(Schema):
    token = _required(fields.String)
    logprob = _required(fields.Float)
    bytes = _required(fields.List, fields.Integer(validate=Range(min=0, max=255)), allow_none=True)


class ChatTokenLogprobSchema(TopLogprobSchema):
    top_logprobs = _required(fields.List, fields.Nested(TopLogprobSchema))


class ChatLogprobsSchema(Schema):
    content = _required(fields.List, fields.Nested(ChatTokenLogprobSchema), allow_none=True)
    refusal = fields.Raw(validate=Equal(None), allow_none=True)


def _chat_logprobs() -> fields.Field:
    return fields.Nested(ChatLogprobsSchema, required=True, allow_none=True)


# -- /generate ----------------------------------------------------------------------------------


class GenerateChoiceSchema(Schema):
    text = _required(fields.String)
    index = _index()
    logprobs = _completion_logprobs()
    finish_reason = _required(fields.String, validate=OneOf(FINISH_REASONS))


class GenerateResponseSchema(Schema):
    id = _required(fields.String)
    object = _const("text_completion")
    created = _required(fields.Integer)
    model = _required(fields.String)
    choices = _choices(GenerateChoiceSchema)
    usage = fields.Nested(UsageSchema, required=True)


class GenerateTokenEventSchema(Schema):
    """``event: token``; ``index`` with ``n`` > 1, ``logprobs`` when asked for."""

    text = _required(fields.String)
    index = fields.Integer(validate=Range(min=0, max=MAX_CHOICES - 1))
    logprobs = fields.Nested(CompletionLogprobsSchema)


class ChoiceEndSchema(Schema):
    index = _index()
    finish_reason = _required(fields.String, validate=OneOf(FINISH_REASONS))
    completion_tokens = _required(fields.Integer, validate=Range(min=0))


class GenerateDoneEventSchema(Schema):
    """``event: done``, the last event of a stream that succeeded."""

    finish_reason = _required(fields.String, validate=OneOf(FINISH_REASONS))
    usage = fields.Nested(UsageSchema, required=True)
    choices = fields.List(fields.Nested(ChoiceEndSchema), validate=Length(min=2, max=MAX_CHOICES))


# -- /v1 ----------------------------------------------------------------------------------------


class TokenizeResponseSchema(Schema):
    count = _required(fields.Integer, validate=Range(min=0))
    max_model_len = _required(fields.Integer, validate=Range(min=1))
    tokens = _required(fields.List, fields.Integer(validate=Range(min=0)))
    token_strs = fields.List(fields.String())  # with return_token_strs: each id's piece of the vocabulary


class DetokenizeResponseSchema(Schema):
    prompt = _required(fields.String)


class ModelSchema(Schema):
    id = _required(fields.String)
    object = _const("model")
    created = _required(fields.Integer)
    owned_by = _required(fields.String)
    root = fields.String()  # vLLM's and SGLang's: the model it serves (its own id here)
    max_model_len = fields.Integer(validate=Range(min=1))  # vLLM's: the context, prompt and output together


class ModelListSchema(Schema):
    object = _const("list")
    data = _required(fields.List, fields.Nested(ModelSchema))


class StopReason(fields.Field):
    """vLLM's ``stop_reason``: the stop sequence a choice matched (a string), the stop token's id
    (an integer), or null."""


def _stop_reason() -> fields.Field:
    return StopReason(allow_none=True)


def _token_ids() -> fields.Field:
    """vLLM's ``return_token_ids``: token ids (null where they did not come)."""
    return fields.List(fields.Integer(validate=Range(min=0)), allow_none=True)


class PromptLogprobSchema(Schema):
    """One token at a prompt position (vLLM's prompt_logprobs): -9999.0 stands for -inf."""

    logprob = _required(fields.Float)
    rank = _required(fields.Integer, validate=Range(min=1))  # 1: the most likely there
    decoded_token = _required(fields.String)  # the token decoded alone


def _prompt_logprobs() -> fields.Field:
    """vLLM's ``prompt_logprobs``: null for the first token, then per token an object from token
    id to PromptLogprob (the prompt's token, then the k best)."""
    return fields.List(fields.Dict(keys=fields.String(), values=fields.Nested(PromptLogprobSchema), allow_none=True),
                       allow_none=True)


class CompletionChoiceSchema(Schema):
    text = _required(fields.String)
    index = _index(MAX_COMPLETION_CHOICES)
    logprobs = _completion_logprobs()
    finish_reason = _required(fields.String, validate=OneOf(OPENAI_FINISH_REASONS))
    prompt_token_ids = _token_ids()  # with return_token_ids: the choice's prompt's ids
    token_ids = _token_ids()  # with return_token_ids: the choice's generated ids
    prompt_logprobs = _prompt_logprobs()  # with prompt_logprobs: the choice's prompt's
    stop_reason = _stop_reason()  # in a choice that ended (vLLM's)


class CompletionResponseSchema(Schema):
    id = _required(fields.String)
    object = _const("text_completion")
    created = _required(fields.Integer)
    model = _required(fields.String)
    choices = _choices(CompletionChoiceSchema, most=MAX_COMPLETION_CHOICES)
    usage = fields.Nested(OpenAIUsageSchema, required=True)


class CompletionChunkChoiceSchema(Schema):
    text = _required(fields.String)
    index = _index(MAX_COMPLETION_CHOICES)
    logprobs = _completion_logprobs()
    finish_reason = _required(fields.String, allow_none=True, validate=OneOf(OPENAI_FINISH_REASONS))
    prompt_token_ids = _token_ids()  # with return_token_ids: in the choice's first chunk
    token_ids = _token_ids()  # with return_token_ids: this chunk's generated ids
    stop_reason = _stop_reason()  # in a choice's finish chunk (vLLM's)


class CompletionChunkSchema(Schema):
    """One ``data:`` line of a /v1/completions stream. ``usage`` is there only with
    ``stream_options.include_usage``: null, except in the last chunk, whose ``choices`` is empty."""

    id = _required(fields.String)
    object = _const("text_completion")
    created = _required(fields.Integer)
    model = _required(fields.String)
    choices = _choices(CompletionChunkChoiceSchema, streamed=True)
    usage = fields.Nested(OpenAIUsageSchema, allow_none=True)


class CalledFunctionSchema(Schema):
    name = _required(fields.String)
    arguments = _required(fields.String)  # JSON text


class ReplyToolCallSchema(Schema):
    """A call of a function, when the request forced one (``tool_choice``, gateway.tools)."""

    id = _required(fields.String)
    type = _const("function")
    function = fields.Nested(CalledFunctionSchema, required=True)


class AssistantMessageSchema(Schema):
    """``content`` is null when the reply is forced ``tool_calls``; with ``auto``, the text beside
    the calls, or null when there is none."""

    role = _const("assistant")
    content = _required(fields.String, allow_none=True)
    tool_calls = fields.List(fields.Nested(ReplyToolCallSchema))
    # with REASONING_PARSER (gateway.reasoning): the thinking, under vLLM's name and DeepSeek's
    reasoning = fields.String(allow_none=True)
    reasoning_content = fields.String(allow_none=True)


class ChatChoiceSchema(Schema):
    index = _index()
    message = fields.Nested(AssistantMessageSchema, required=True)
    logprobs = _chat_logprobs()
    finish_reason = _required(fields.String, validate=OneOf(CHAT_FINISH_REASONS))
    token_ids = _token_ids()  # with return_token_ids: the choice's generated ids
    stop_reason = _stop_reason()  # in a choice that ended (vLLM's)


class ChatCompletionResponseSchema(Schema):
    id = _required(fields.String)
    object = _const("chat.completion")
    created = _required(fields.Integer)
    model = _required(fields.String)
    prompt_token_ids = _token_ids()  # with return_token_ids: the conversation's ids
    prompt_logprobs = _prompt_logprobs()  # with prompt_logprobs: the conversation's
    choices = _choices(ChatChoiceSchema)
    usage = fields.Nested(OpenAIUsageSchema, required=True)


class DeltaFunctionSchema(Schema):
    name = fields.String()  # in the call's first delta
    arguments = fields.String()  # the next piece of the JSON text


class DeltaToolCallSchema(Schema):
    """A piece of a call: its first has ``id``, ``type`` and the function's ``name``."""

    index = _required(fields.Integer, validate=Range(min=0))  # the call's, within its choice
    id = fields.String()
    type = fields.String(validate=OneOf(["function"]))
    function = fields.Nested(DeltaFunctionSchema)


class ChatDeltaSchema(Schema):
    """The first delta has ``role``; the last (with ``finish_reason``) is empty, or with
    ``tool_choice`` "auto" carries the text held back to its end. With a forced tool call,
    ``content`` is null and ``tool_calls`` carries the calls' pieces; with "auto", ``content``
    the text and ``tool_calls`` each call once it is complete."""

    role = fields.String(validate=OneOf(["assistant"]))
    content = fields.String(allow_none=True)
    tool_calls = fields.List(fields.Nested(DeltaToolCallSchema))
    reasoning = fields.String()  # the next piece of the thinking (gateway.reasoning)
    reasoning_content = fields.String()


class ChatChunkChoiceSchema(Schema):
    index = _index()
    delta = fields.Nested(ChatDeltaSchema, required=True)
    logprobs = _chat_logprobs()
    finish_reason = _required(fields.String, allow_none=True, validate=OneOf(CHAT_FINISH_REASONS))
    token_ids = _token_ids()  # with return_token_ids: this chunk's generated ids
    stop_reason = _stop_reason()  # in a choice's finish chunk (vLLM's)


class ChatCompletionChunkSchema(Schema):
    """One ``data:`` line of a /v1/chat/completions stream; ``usage`` as in CompletionChunk;
    ``prompt_token_ids`` (return_token_ids) in each choice's first chunk."""

    id = _required(fields.String)
    object = _const("chat.completion.chunk")
    created = _required(fields.Integer)
    model = _required(fields.String)
    prompt_token_ids = _token_ids()
    choices = _choices(ChatChunkChoiceSchema, streamed=True)
    usage = fields.Nested(OpenAIUsageSchema, allow_none=True)


# -- /v1/messages (Anthropic's Messages API, gateway.anthropic) ---------------------------------

ANTHROPIC_STOP_REASONS = ("end_turn", "max_tokens", "stop_sequence", "tool_use")
ANTHROPIC_BLOCKS = ("text", "thinking", "tool_use")


class AnthropicUsageSchema(Schema):
    input_tokens = _required(fields.Integer, validate=Range(min=0))
    output_tokens = _required(fields.Integer, validate=Range(min=0))
    cache_read_input_tokens = fields.Integer(validate=Range(min=0))  # where the engine reports them


class AnthropicBlockSchema(Schema):
    """A content block: ``text`` (``text``), ``thinking`` (``thinking``, an empty ``signature``)
    or ``tool_use`` (``id``, ``name``, ``input``)."""

    type = _required(fields.String, validate=OneOf(ANTHROPIC_BLOCKS))
    text = fields.String()
    thinking = fields.String()
    signature = fields.String()
    id = fields.String()
    name = fields.String()
    input = fields.Dict()


class AnthropicMessageResponseSchema(Schema):
    id = _required(fields.String)
    type = _const("message")
    role = _const("assistant")
    model = _required(fields.String)
    content = _required(fields.List, fields.Nested(AnthropicBlockSchema))
    stop_reason = _required(fields.String, validate=OneOf(ANTHROPIC_STOP_REASONS))
    stop_sequence = _required(fields.String, allow_none=True)
    usage = fields.Nested(AnthropicUsageSchema, required=True)


class AnthropicStartedMessageSchema(AnthropicMessageResponseSchema):
    """The message of ``message_start``: no content and no stop reason yet."""

    stop_reason = _required(fields.String, allow_none=True, validate=OneOf(ANTHROPIC_STOP_REASONS))


class AnthropicMessageStartSchema(Schema):
    type = _const("message_start")
    message = fields.Nested(AnthropicStartedMessageSchema, required=True)


class AnthropicBlockStartSchema(Schema):
    type = _const("content_block_start")
    index = _required(fields.Integer, validate=Range(min=0))
    content_block = fields.Nested(AnthropicBlockSchema, required=True)


class AnthropicBlockDeltaBodySchema(Schema):
    """``text_delta`` (``text``), ``thinking_delta`` (``thinking``) or ``input_json_delta``
    (``partial_json``: the next piece of the call's input, as JSON text)."""

    type = _required(fields.String, validate=OneOf(["text_delta", "thinking_delta", "input_json_delta"]))
    text = fields.String()
    thinking = fields.String()
    partial_json = fields.String()


class AnthropicBlockDeltaSchema(Schema):
    type = _const("content_block_delta")
    index = _required(fields.Integer, validate=Range(min=0))
    delta = fields.Nested(AnthropicBlockDeltaBodySchema, required=True)


class AnthropicBlockStopSchema(Schema):
    type = _const("content_block_stop")
    index = _required(fields.Integer, validate=Range(min=0))


class AnthropicStopSchema(Schema):
    stop_reason = _required(fields.String, validate=OneOf(ANTHROPIC_STOP_REASONS))
    stop_sequence = _required(fields.String, allow_none=True)


class AnthropicMessageDeltaSchema(Schema):
    type = _const("message_delta")
    delta = fields.Nested(AnthropicStopSchema, required=True)
    usage = fields.Nested(AnthropicUsageSchema, required=True)


class AnthropicMessageStopSchema(Schema):
    type = _const("message_stop")


class AnthropicErrorBodySchema(Schema):
    type = _required(fields.String, validate=OneOf(sorted(set(ANTHROPIC_ERROR_TYPES.values()) | {"api_error"})))
    message = _required(fields.String)
    param = fields.String(metadata={"description": "The request's field the error is about, where there is one "
                                                   "(the gateway's addition)."})


class AnthropicErrorResponseSchema(Schema):
    """An error on /v1/messages*: Anthropic's shape."""

    type = _const("error")
    error = fields.Nested(AnthropicErrorBodySchema, required=True)
    request_id = _required(fields.String, metadata={"description": "The request's id (also its request-id and "
                                                                   "X-Request-ID headers)."})


class AnthropicErrorEventSchema(Schema):
    type = _const("error")
    error = fields.Nested(AnthropicErrorBodySchema, required=True)


class AnthropicTokenCountSchema(Schema):
    input_tokens = _required(fields.Integer, validate=Range(min=0))


# -- /v1/responses (OpenAI's Responses API, gateway.responses) -----------------------------------

RESPONSE_STATUSES = ("in_progress", "completed", "incomplete")
#: a response's own statuses: its items', and a background response's (gateway.background)
RESPONSE_OBJECT_STATUSES = (*RESPONSE_STATUSES, "queued", "failed", "cancelled")


class ResponsesPartSchema(Schema):
    """A part of an item's content: ``output_text`` (a message's) or ``reasoning_text``."""

    type = _required(fields.String, validate=OneOf(["output_text", "reasoning_text"]))
    text = _required(fields.String)
    annotations = fields.List(fields.Dict())
    logprobs = fields.List(fields.Dict())


class ResponsesItemSchema(Schema):
    """An output item: a ``message`` (``role``, ``content``), a ``reasoning`` (``summary``,
    ``content``) or a ``function_call`` (``call_id``, ``name``, ``arguments``)."""

    type = _required(fields.String, validate=OneOf(["message", "reasoning", "function_call"]))
    id = _required(fields.String)
    status = _required(fields.String, validate=OneOf(RESPONSE_STATUSES))
    role = fields.String(validate=OneOf(["assistant"]))
    content = fields.List(fields.Nested(ResponsesPartSchema))
    summary = fields.List(fields.Dict())
    call_id = fields.String()
    name = fields.String()
    arguments = fields.String()


class ResponsesInputDetailsSchema(Schema):
    cached_tokens = _required(fields.Integer, validate=Range(min=0))


class ResponsesOutputDetailsSchema(Schema):
    reasoning_tokens = _required(fields.Integer, validate=Range(min=0))


class ResponsesUsageSchema(Schema):
    input_tokens = _required(fields.Integer, validate=Range(min=0))
    input_tokens_details = fields.Nested(ResponsesInputDetailsSchema, required=True)
    output_tokens = _required(fields.Integer, validate=Range(min=0))
    output_tokens_details = fields.Nested(ResponsesOutputDetailsSchema, required=True)
    total_tokens = _required(fields.Integer, validate=Range(min=0))


class ResponsesIncompleteSchema(Schema):
    reason = _required(fields.String, validate=OneOf(["max_output_tokens"]))


class ResponsesResponseSchema(Schema):
    """The response object: what was generated, and what the request asked for."""

    id = _required(fields.String)
    object = _const("response")
    created_at = _required(fields.Integer)
    completed_at = fields.Integer()
    status = _required(fields.String, validate=OneOf(RESPONSE_OBJECT_STATUSES))
    model = _required(fields.String)
    output = _required(fields.List, fields.Nested(ResponsesItemSchema))
    error = fields.Dict(required=True, allow_none=True)
    incomplete_details = fields.Nested(ResponsesIncompleteSchema, required=True, allow_none=True)
    usage = fields.Nested(ResponsesUsageSchema, required=True, allow_none=True)
    store = fields.Boolean()
    background = fields.Boolean()
    instructions = fields.String(allow_none=True)
    max_output_tokens = fields.Integer(allow_none=True)
    temperature = fields.Float(allow_none=True)
    top_p = fields.Float(allow_none=True)
    top_logprobs = fields.Integer(allow_none=True)
    tool_choice = fields.Raw()
    tools = fields.List(fields.Dict())
    parallel_tool_calls = fields.Boolean()
    text = fields.Dict()
    metadata = fields.Dict()
    previous_response_id = fields.String(allow_none=True)
    truncation = fields.String(validate=OneOf(["auto", "disabled"]))


class ResponsesInputPartSchema(Schema):
    """A part of a stored input message: ``input_text``, ``output_text`` (an assistant's) or a
    reasoning item's ``reasoning_text``."""

    type = _required(fields.String, validate=OneOf(["input_text", "output_text", "reasoning_text"]))
    text = _required(fields.String)


class ResponsesInputItemSchema(Schema):
    """A stored input item: a ``message``, a ``function_call``, its ``function_call_output`` or a
    ``reasoning`` item."""

    type = _required(fields.String, validate=OneOf(["message", "function_call", "function_call_output", "reasoning"]))
    id = _required(fields.String)
    status = fields.String(validate=OneOf(["completed"]))
    role = fields.String(validate=OneOf(["user", "system", "assistant"]))
    content = fields.List(fields.Nested(ResponsesInputPartSchema))
    summary = fields.List(fields.Dict())
    call_id = fields.String()
    name = fields.String()
    arguments = fields.String()
    output = fields.String()


class ResponsesInputItemListSchema(Schema):
    """A page of a stored response's input items."""

    object = _const("list")
    data = _required(fields.List, fields.Nested(ResponsesInputItemSchema))
    first_id = fields.String(required=True, allow_none=True)
    last_id = fields.String(required=True, allow_none=True)
    has_more = _required(fields.Boolean)


class ResponsesDeletedSchema(Schema):
    id = _required(fields.String)
    object = _const("response")
    deleted = _required(fields.Boolean)


class _ResponsesEventSchema(Schema):
    sequence_number = _required(fields.Integer, validate=Range(min=0))


class ResponsesLifecycleEventSchema(_ResponsesEventSchema):
    """``response.created``, ``response.in_progress``, ``response.completed``,
    ``response.incomplete``, ``response.failed`` (a background response's): the response as it
    stands."""

    type = _required(fields.String, validate=OneOf(["response.created", "response.in_progress",
                                                    "response.completed", "response.incomplete",
                                                    "response.failed"]))
    response = fields.Nested(ResponsesResponseSchema, required=True)


class ResponsesItemEventSchema(_ResponsesEventSchema):
    type = _required(fields.String, validate=OneOf(["response.output_item.added", "response.output_item.done"]))
    output_index = _required(fields.Integer, validate=Range(min=0))
    item = fields.Nested(ResponsesItemSchema, required=True)


class _ResponsesItemPieceSchema(_ResponsesEventSchema):
    """An event about an output item: its id and its index in ``output``."""

    item_id = _required(fields.String)
    output_index = _required(fields.Integer, validate=Range(min=0))


class _ResponsesPartPieceSchema(_ResponsesItemPieceSchema):
    """An event about a part of an item's content: also the part's index."""

    content_index = _required(fields.Integer, validate=Range(min=0))


class ResponsesPartEventSchema(_ResponsesPartPieceSchema):
    type = _required(fields.String, validate=OneOf(["response.content_part.added", "response.content_part.done"]))
    part = fields.Nested(ResponsesPartSchema, required=True)


class ResponsesTextDeltaEventSchema(_ResponsesPartPieceSchema):
    type = _required(fields.String, validate=OneOf(["response.output_text.delta", "response.reasoning_text.delta"]))
    delta = _required(fields.String)
    logprobs = fields.List(fields.Dict())


class ResponsesTextDoneEventSchema(_ResponsesPartPieceSchema):
    type = _required(fields.String, validate=OneOf(["response.output_text.done", "response.reasoning_text.done"]))
    text = _required(fields.String)
    logprobs = fields.List(fields.Dict())


class ResponsesArgumentsDeltaEventSchema(_ResponsesItemPieceSchema):
    type = _const("response.function_call_arguments.delta")
    delta = _required(fields.String)


class ResponsesArgumentsDoneEventSchema(_ResponsesItemPieceSchema):
    type = _const("response.function_call_arguments.done")
    name = _required(fields.String)
    arguments = _required(fields.String)


class ResponsesErrorEventSchema(_ResponsesEventSchema):
    """A failure after the stream began: the error's type (``code``), message and field."""

    type = _const("error")
    code = _required(fields.String, allow_none=True)
    message = _required(fields.String)
    param = _required(fields.String, allow_none=True)
