"""Request schemas of the OpenAI-compatible endpoints (STYLE 7), loading one TextRequest.

``POST /v1/completions`` and ``POST /v1/chat/completions`` take OpenAI's request bodies. The
policy for OpenAI's fields (docs/openai.md says the same for users):

* mapped: ``model``, ``max_tokens`` (chat: also ``max_completion_tokens``), ``temperature``,
  ``top_p``, ``stop`` (a string or up to 16 strings), ``seed`` (any 64-bit integer; a negative
  one is taken modulo 2**64), ``stream``, ``stream_options.include_usage``; and, as vLLM does, the
  extensions ``top_k`` and ``repetition_penalty`` (``extra_body`` in the official client);
* accepted only at their neutral value, else a 400 that says so: ``n`` and ``best_of`` (1),
  ``frequency_penalty`` and ``presence_penalty`` (0), ``logprobs`` (null/false),
  ``top_logprobs`` (0), ``logit_bias`` ({}), ``echo`` (false), ``suffix`` (""),
  ``response_format`` ({"type": "text"}), ``tools``/``functions`` ([]), ``tool_choice``/
  ``function_call`` ("none"/"auto"), ``modalities`` (["text"]), ``audio``/``prediction``/
  ``web_search_options`` (null);
* accepted and ignored (they do not change the output): ``user``, ``metadata``, ``store``,
  ``service_tier``, ``parallel_tool_calls``, ``reasoning_effort``, ``verbosity``,
  ``prompt_cache_key``, ``prompt_cache_retention``, ``safety_identifier``;
* anything else is a 400 naming the field, as OpenAI's own API answers
  (``Unrecognized request argument supplied: ...``). The official client sends only the fields
  its caller passed (checked in tests/unit/test_gateway_openai_client.py), so this refuses only
  what a caller asked for and would not get.

``null`` means "not given", as everywhere in the gateway. Defaults: ``max_tokens`` is 16 for
completions (OpenAI's default) and 512 for chat (OpenAI's is "the rest of the context", which the
gateway cannot know without tokenizing; prompt + max_tokens must fit the model's context).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from marshmallow import ValidationError, post_load, validates_schema
from marshmallow.validate import OneOf

from .chat_template import ChatTemplate
from .errors import ServerError
from .openai_fields import Anything, Empty, MessageContent, Nested, Prompt, StringOrStrings, _only
from trident.contract import INT32_MAX, MAX_CHAT_MESSAGES, UINT64_MAX, TextRequest

from .schemas import (
    ModelSchema,
    StrictBoolean,
    StrictInteger,
    StrictNumber,
    StrictSchema,
    StrictString,
    _range,
    reject_conflicting_alias,
    sampling_params,
)

COMPLETIONS_DEFAULT_MAX_TOKENS = 16
CHAT_DEFAULT_MAX_TOKENS = 512
INT64_MIN = -(2**63)
CHAT_ROLES = ("system", "developer", "user", "assistant")


@dataclass(frozen=True, slots=True)
class OpenAIRequest:
    """A validated ``/v1`` request: the generation, and how to answer it."""

    params: TextRequest
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage


# -- nested objects -----------------------------------------------------------------------------


class StreamOptionsSchema(StrictSchema):
    """``stream_options``; only with ``"stream": true``."""

    include_usage = StrictBoolean()
    include_obfuscation = StrictBoolean()  # accepted and ignored: chunks carry no padding here


class ResponseFormatSchema(StrictSchema):
    """``response_format``: only plain text output is supported."""

    type = StrictString(
        required=True,
        allow_none=False,
        validate=_only("text", 'type must be "text": JSON output modes are not supported, got {input}'),
        error_messages={"required": "type is required"},
    )


class ChatMessageSchema(StrictSchema):
    """One of ``messages``. Assistant messages returned by an earlier response may be sent back
    as they are: their null ``refusal``, ``tool_calls``, ... are accepted."""

    role = StrictString(
        required=True,
        allow_none=False,
        validate=OneOf(CHAT_ROLES, error="role must be one of " + ", ".join(CHAT_ROLES) + ", got {input}"),
        error_messages={"required": "role is required", "null": "role must be a string, got null"},
    )
    content = MessageContent(
        required=True,
        allow_none=False,
        error_messages={"required": "content is required",
                        "null": "content must be a string or an array of text parts, got null"},
    )
    name = StrictString()
    refusal = Empty("refusals are not supported")
    tool_calls = Empty("tool calls are not supported")
    function_call = Empty("function calls are not supported")
    tool_call_id = Empty("tool messages are not supported")
    audio = Empty("audio is not supported")
    annotations = Empty("annotations are not supported")

    @post_load
    def to_template(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        """What the chat template sees: role (``developer`` is the newer name of ``system``),
        content and, when given, name."""
        message = {"role": "system" if data["role"] == "developer" else data["role"], "content": data["content"]}
        if data.get("name") is not None:
            message["name"] = data["name"]
        return message


# -- the two request schemas --------------------------------------------------------------------


class _OpenAISchema(ModelSchema):
    """Fields both endpoints share; built once per app, like GenerateSchema."""

    default_max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS
    token_fields = ("max_tokens",)

    model = StrictString()
    max_tokens = StrictInteger()
    temperature = StrictNumber(
        validate=_range("temperature must be between {min} and {max}, got {input}", min=0, max=2)
    )
    top_p = StrictNumber(
        validate=_range(
            "top_p must be greater than {min} and at most {max}, got {input}", min=0, max=1, min_inclusive=False
        )
    )
    n = StrictInteger(validate=_only(1, "n must be 1: one choice per request is supported, got {input}"))
    stop = StringOrStrings()
    seed = StrictInteger(
        validate=_range("seed must be between {min} and {max}, got {input}", min=INT64_MIN, max=UINT64_MAX)
    )
    stream = StrictBoolean()
    stream_options = Nested(StreamOptionsSchema)
    frequency_penalty = StrictNumber(
        validate=_only(0, "frequency_penalty is not supported (use repetition_penalty): only 0 is accepted, "
                          "got {input}")
    )
    presence_penalty = StrictNumber(
        validate=_only(0, "presence_penalty is not supported (use repetition_penalty): only 0 is accepted, "
                          "got {input}")
    )
    logit_bias = Empty("logit_bias is not supported")
    user = Anything()
    # Extensions (vLLM has the same): sampling knobs of /generate.
    top_k = StrictInteger(validate=_range("top_k must be between {min} and {max}, got {input}", min=0, max=INT32_MAX))
    repetition_penalty = StrictNumber(
        validate=_range("repetition_penalty must be greater than {min}, got {input}", min=0, min_inclusive=False)
    )

    @validates_schema
    def validate_stream_options(self, data: Mapping[str, Any], **kwargs: Any) -> None:
        if data.get("stream_options") is not None and not data.get("stream"):
            raise ValidationError(
                'stream_options is only allowed with "stream": true', field_name="stream_options"
            )

    def _request(self, data: dict[str, Any], *, prompt: str, model: str, max_tokens: int | None,
                 prompt_param: str = "prompt") -> OpenAIRequest:
        self.check_prompt_length(prompt, model, prompt_param)
        if max_tokens is None:  # the endpoint's own default (OpenAI's), within the model's limit
            max_tokens = min(self.default_max_tokens, self.limits(model).max_new_tokens)
        fields = {**data, "max_tokens": max_tokens}
        if data.get("seed") is not None:
            fields["seed"] = data["seed"] % (UINT64_MAX + 1)  # int64 seeds of OpenAI, as uint64
        sampling = sampling_params(fields, max_new_tokens="max_tokens", stop="stop")
        stream = bool(data.get("stream"))
        options = data.get("stream_options") or {}
        return OpenAIRequest(params=TextRequest(prompt=prompt, sampling=sampling, stream=stream, model=model),
                             include_usage=stream and bool(options.get("include_usage")))


class CompletionSchema(_OpenAISchema):
    """``POST /v1/completions``."""

    prompt = Prompt(
        required=True,
        allow_none=False,
        error_messages={"required": "prompt is required", "null": "prompt must be a string, got null"},
    )
    suffix = Empty("suffix is not supported")
    echo = StrictBoolean(validate=_only(False, "echo is not supported: only false is accepted"))
    best_of = StrictInteger(validate=_only(1, "best_of must be 1: one choice per request is supported, got {input}"))
    logprobs = Empty("logprobs are not supported", neutral=(0,))

    @post_load
    def make_request(self, data: dict[str, Any], **kwargs: Any) -> OpenAIRequest:
        return self._request(data, prompt=data["prompt"], model=self.requested_model(data),
                             max_tokens=data.get("max_tokens"))


class ChatCompletionSchema(_OpenAISchema):
    """``POST /v1/chat/completions``: ``messages`` become the prompt through the model's chat
    template (``chat_template``; None when the deployment has none: a 501)."""

    default_max_tokens = CHAT_DEFAULT_MAX_TOKENS
    token_fields = ("max_tokens", "max_completion_tokens")

    messages = Nested(
        ChatMessageSchema,
        many=True,
        min_items=1,
        max_items=MAX_CHAT_MESSAGES,
        required=True,
        allow_none=False,
        error_messages={"required": "messages is required", "null": "messages must be an array, got null"},
    )
    max_completion_tokens = StrictInteger()
    logprobs = Empty("logprobs are not supported", neutral=(False,))
    top_logprobs = Empty("top_logprobs are not supported", neutral=(0,))
    response_format = Nested(ResponseFormatSchema)
    tools = Empty("tools are not supported")
    tool_choice = Empty("tools are not supported", neutral=("none", "auto"))
    functions = Empty("functions are not supported")
    function_call = Empty("functions are not supported", neutral=("none", "auto"))
    modalities = Empty("only text output is supported", neutral=(["text"],))
    audio = Empty("audio output is not supported")
    prediction = Empty("predicted outputs are not supported")
    web_search_options = Empty("web search is not supported")
    # Accepted and ignored: they do not change what is generated.
    metadata = Anything()
    store = Anything()
    service_tier = Anything()
    parallel_tool_calls = Anything()
    reasoning_effort = Anything()
    verbosity = Anything()
    prompt_cache_key = Anything()
    prompt_cache_retention = Anything()
    safety_identifier = Anything()

    def __init__(self, *, chat_template: ChatTemplate | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.chat_template = chat_template

    @validates_schema
    def validate_max_tokens_alias(self, data: Mapping[str, Any], **kwargs: Any) -> None:
        reject_conflicting_alias(
            data, "max_completion_tokens", "max_tokens",
            "max_tokens and max_completion_tokens were both given, with different values ({old} and "
            "{new}): send only max_completion_tokens",
        )

    @post_load
    def make_request(self, data: dict[str, Any], **kwargs: Any) -> OpenAIRequest:
        model = self.requested_model(data)
        if self.chat_template is None:
            raise ServerError(
                "Chat completions are not available: this gateway has no chat template configured "
                "(TOKENIZER_DIR); use /v1/completions",
                status=501,
            )
        prompt = self.chat_template.render(data["messages"], add_generation_prompt=True)
        max_tokens = data.get("max_completion_tokens")
        if max_tokens is None:
            max_tokens = data.get("max_tokens")
        return self._request(data, prompt=prompt, model=model, max_tokens=max_tokens, prompt_param="messages")


def load_openai(schema: _OpenAISchema, body: dict[str, Any]) -> OpenAIRequest:
    try:
        return schema.load(body)
    except ValidationError as err:
        raise schema.first_error(err) from None


__all__ = [
    "CHAT_DEFAULT_MAX_TOKENS",
    "COMPLETIONS_DEFAULT_MAX_TOKENS",
    "ChatCompletionSchema",
    "ChatMessageSchema",
    "CompletionSchema",
    "OpenAIRequest",
    "load_openai",
]
