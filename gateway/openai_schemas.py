"""Request schemas of the OpenAI-compatible endpoints (STYLE 7), loading one TextRequest.

``POST /v1/completions`` and ``POST /v1/chat/completions`` take OpenAI's request bodies. The
policy for OpenAI's fields (docs/openai.md says the same for users):

* mapped: ``model``, ``max_tokens`` (chat: also ``max_completion_tokens``), ``temperature``,
  ``top_p``, ``stop`` (a string or up to 16 strings), ``seed`` (any 64-bit integer; a negative
  one is taken modulo 2**64), ``stream``, ``stream_options.include_usage``, ``n`` (up to 16),
  ``best_of`` (completions, not streamed: the ``n`` of ``best_of`` choices with the highest sum
  of log-probabilities), ``presence_penalty`` and ``frequency_penalty`` (-2..2), ``logit_bias``,
  ``logprobs`` (completions: 0..20 alternatives; chat: a boolean, with ``top_logprobs`` 0..20),
  ``response_format`` (``text``, ``json_object``, ``json_schema``: XGrammar constrains the
  output), ``tools``, ``tool_choice`` and ``parallel_tool_calls`` (chat: forced calls, through
  the same constraint, gateway.tools; ``auto`` where the deployment names the model's call
  syntax, gateway.tool_parsers); and, as vLLM does, the extensions ``top_k``,
  ``repetition_penalty``, ``min_p``, ``min_tokens``, ``ignore_eos`` (``extra_body`` in the
  official client; the engines get ``ignore_eos`` as ``min_tokens`` = ``max_tokens``), ``stop_token_ids``,
  ``include_stop_str_in_output``, ``skip_special_tokens``, ``allowed_token_ids``,
  ``truncate_prompt_tokens`` and ``structured_outputs``
  (``json``, ``regex``, ``choice``, ``grammar`` or ``json_object``: the same constraint as
  ``response_format``, gateway.control_fields); ``add_special_tokens`` (whether the prompt's
  text gets the tokenizer's special tokens, a BOS: by default yes on completions, no on chat,
  whose template renders its own, as vLLM); ``prompt_logprobs`` (0..20, not streamed: each
  prompt token's log-probability and rank with the k best tokens at its position, in vLLM's
  shape); ``cache_salt`` (the prompt's K/V reused only by requests with the same salt, CPU engine);
  ``priority`` (waiting requests admitted to the engine the lower values first, CPU engine);
* ``echo`` (completions): the prompt in front of each choice's text, with ``logprobs`` its
  tokens first in the log-probabilities (the first with null), as vLLM's; with ``max_tokens`` 0
  the prompt alone, scored (OpenAI's legacy API and vLLM take 0 only with echo);
* accepted only at their neutral value, else a 400 that says so: ``suffix`` (""),
  ``functions`` ([]), ``function_call`` ("none"/"auto"), ``modalities`` (["text"]),
  ``audio``/``prediction``/``web_search_options`` (null);
* accepted and ignored (they do not change the output): ``user``, ``metadata``, ``store``,
  ``service_tier``, ``reasoning_effort``, ``verbosity``,
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
import dataclasses
from dataclasses import dataclass
from typing import Any

from marshmallow import ValidationError, post_load, validates_schema
from marshmallow.validate import Length, OneOf

from .chat_template import ChatTemplate
from .errors import ServerError
from .openai_fields import (
    Anything,
    ChatTemplateKwargs,
    Empty,
    MessageContent,
    Nested,
    Prompt,
    StringOrStrings,
    TokenIdArray,
    TokenIds,
)
from trident.contract import (INT32_MAX, MAX_CACHE_SALT_CHARS, MAX_CHAT_MESSAGES, MAX_CHOICES, MAX_TOP_LOGPROBS,
                              UINT64_MAX, TextRequest)

from .control_fields import AllowedTokenIds, LogitBias, ResponseFormat, StructuredOutputs, TruncatePromptTokens
from .reasoning import KEEP_SPECIAL_TOKENS as REASONING_KEEPS_SPECIAL, Reasoning
from .tool_parsers import KEEP_SPECIAL_TOKENS
from .tools import (
    MAX_TOOLS,
    ToolCallSchema,
    ToolChoice,
    ToolChoiceField,
    ToolSchema,
    check_unique_names,
    tool_choice_of,
    tool_guide,
)

from .schemas import (
    BadWords,
    ModelSchema,
    StrictBoolean,
    StrictInteger,
    StrictNumber,
    StrictSchema,
    StrictString,
    _penalty,
    _range,
    check_min_tokens,
    priority_field,
    request_id_field,
    reject_conflicting_alias,
    sampling_params,
)

COMPLETIONS_DEFAULT_MAX_TOKENS = 16
CHAT_DEFAULT_MAX_TOKENS = 512
INT64_MIN = -(2**63)
#: the llm model's names of fields (in its errors) as both endpoints name them
PARAM_NAMES = {"max_new_tokens": "max_tokens", "stop_sequences": "stop", "guided_decoding_guide": "response_format",
               "guided_decoding_guide_type": "response_format"}
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass(frozen=True, slots=True)
class OpenAIRequest:
    """A validated ``/v1`` request: the generation, and how to answer it."""

    params: TextRequest
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage
    choices: int = 1  # n: the choices answered (best_of may generate more: params.sampling.n)
    logprobs: int | None = None  # the alternatives the reply shows per token; None: no logprobs
    param_names: Mapping[str, str] = dataclasses.field(default_factory=dict)  # gateway.errors.public_param
    # /v1/completions with an array of prompts: all of them (params holds the first); else ()
    prompts: tuple[str | TokenIds, ...] = ()
    # /v1/chat/completions: the call the request forces (gateway.tools), answered as tool_calls
    tool_choice: ToolChoice | None = None
    # /v1/chat/completions: how the model's thinking is read out of the text (gateway.reasoning)
    reasoning: Reasoning | None = None
    # vLLM's return_tokens_as_token_ids: the logprobs' tokens named "token_id:<id>"
    tokens_as_ids: bool = False
    # vLLM's return_token_ids: the prompt's and every choice's token ids in the reply
    token_ids: bool = False
    # vLLM's stream_options.continuous_usage_stats (with include_usage): every chunk's usage so far
    continuous_usage: bool = False
    # /v1/chat/completions, vLLM's echo: the last message's text, in front of each choice's
    # content, when that message has the reply's role (gateway.openai_schemas); None: nothing echoed
    echo: str | None = None
    # vLLM's request_id: the request's id (gateway.telemetry.adopt_request_id) and its reply's
    request_id: str | None = None


# -- nested objects -----------------------------------------------------------------------------


class StreamOptionsSchema(StrictSchema):
    """``stream_options``; only with ``"stream": true``."""

    include_usage = StrictBoolean()
    # vLLM's: with include_usage, every chunk's usage so far (its choice's tokens)
    continuous_usage_stats = StrictBoolean()
    include_obfuscation = StrictBoolean()  # accepted and ignored: chunks carry no padding here


class ChatMessageSchema(StrictSchema):
    """One of ``messages``. Assistant messages returned by an earlier response may be sent back
    as they are: their null ``refusal``, their ``tool_calls`` (then ``content`` may be null),
    ... are accepted; a tool's result is a ``tool`` message naming its call (gateway.tools)."""

    role = StrictString(
        required=True,
        allow_none=False,
        validate=OneOf(CHAT_ROLES, error="role must be one of " + ", ".join(CHAT_ROLES) + ", got {input}"),
        error_messages={"required": "role is required", "null": "role must be a string, got null"},
    )
    content = MessageContent()
    name = StrictString()
    refusal = Empty("refusals are not supported")
    tool_calls = Nested(ToolCallSchema, many=True, max_items=MAX_TOOLS)
    function_call = Empty("function calls (OpenAI's deprecated form) are not supported: send tool_calls")
    tool_call_id = StrictString()
    audio = Empty("audio is not supported")
    annotations = Empty("annotations are not supported")
    # an assistant's thinking, as a reply with REASONING_PARSER gives it back (gateway.reasoning)
    reasoning = StrictString()
    reasoning_content = StrictString()

    @validates_schema(pass_original=True)
    def validate_role_fields(self, data: Mapping[str, Any], original: Any, **kwargs: Any) -> None:
        role = data.get("role")
        if data.get("tool_calls") and role != "assistant":
            raise ValidationError("tool_calls are only allowed in assistant messages", field_name="tool_calls")
        for name in ("reasoning", "reasoning_content"):
            if data.get(name) is not None and role != "assistant":
                raise ValidationError(f"{name} is only allowed in assistant messages", field_name=name)
        if None not in (data.get("reasoning"), data.get("reasoning_content")) and \
                data["reasoning"] != data["reasoning_content"]:
            raise ValidationError("reasoning and reasoning_content are the same field (vLLM's and DeepSeek's names): "
                                  "send one of them", field_name="reasoning_content")
        if role == "tool" and data.get("tool_call_id") is None:
            raise ValidationError("tool_call_id is required in tool messages: the id of the call answered",
                                  field_name="tool_call_id")
        if role != "tool" and data.get("tool_call_id") is not None:
            raise ValidationError("tool_call_id is only allowed in tool messages", field_name="tool_call_id")
        if data.get("content") is None and not (role == "assistant" and data.get("tool_calls")):
            # the same messages as when content was a required, non-null field
            raise ValidationError("content is required" if "content" not in original
                                  else "content must be a string or an array of text parts, got null",
                                  field_name="content")

    @post_load
    def to_template(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        """What the chat template sees: role (``developer`` is the newer name of ``system``),
        content and, when given, name, tool calls, the id of the call a tool answers and an
        assistant's thinking (under both names: Qwen3's and DeepSeek's templates read
        ``reasoning_content``)."""
        # an assistant's calls without text: content "" (as vLLM gives it), which templates that
        # concatenate content can render
        content = data.get("content")
        message = {"role": "system" if data["role"] == "developer" else data["role"],
                   "content": "" if content is None else content}
        for key in ("name", "tool_calls", "tool_call_id"):
            if data.get(key):
                message[key] = data[key]
        thought = data.get("reasoning") if data.get("reasoning") is not None else data.get("reasoning_content")
        if thought is not None:
            message["reasoning"] = message["reasoning_content"] = thought
        return message


# -- the two request schemas --------------------------------------------------------------------


class _OpenAISchema(ModelSchema):
    """Fields both endpoints share; built once per app, like GenerateSchema."""

    default_max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS
    token_fields = ("max_tokens",)
    param_names: Mapping[str, str] = {}  # the endpoint's own names of the llm model's fields
    # vLLM's add_special_tokens default: a completion's prompt gets the tokenizer's special tokens
    # (a BOS), a chat template's rendering has its own
    adds_special_tokens = True

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
    n = StrictInteger(validate=_range("n must be between {min} and {max}, got {input}", min=1, max=MAX_CHOICES))
    stop = StringOrStrings()
    seed = StrictInteger(
        validate=_range("seed must be between {min} and {max}, got {input}", min=INT64_MIN, max=UINT64_MAX)
    )
    stream = StrictBoolean()
    stream_options = Nested(StreamOptionsSchema)
    frequency_penalty = StrictNumber(validate=_penalty("frequency_penalty"))
    presence_penalty = StrictNumber(validate=_penalty("presence_penalty"))
    logit_bias = LogitBias()
    response_format = ResponseFormat()
    structured_outputs = StructuredOutputs()  # vLLM's: json, regex, choice, grammar or json_object
    user = Anything()
    # Extensions (vLLM has the same): sampling knobs of /generate.
    top_k = StrictInteger(validate=_range("top_k must be between {min} and {max}, got {input}", min=0, max=INT32_MAX))
    repetition_penalty = StrictNumber(
        validate=_range("repetition_penalty must be greater than {min}, got {input}", min=0, min_inclusive=False)
    )
    min_p = StrictNumber(validate=_range("min_p must be between {min} and {max}, got {input}", min=0, max=1))
    min_tokens = StrictInteger(validate=_range("min_tokens must be between {min} and {max}, got {input}",
                                               min=0, max=INT32_MAX))
    # vLLM's, SGLang's and llama.cpp's: generate through the end token, up to max_tokens (benchmark
    # clients send it: vLLM's bench with --ignore-eos, SGLang's bench_serving by default).
    ignore_eos = StrictBoolean()
    # vLLM's: token ids that stop a choice as a stop sequence does; the stop kept in the text
    stop_token_ids = TokenIdArray()
    include_stop_str_in_output = StrictBoolean()
    # vLLM's: false keeps the tokenizer's special tokens in the text
    skip_special_tokens = StrictBoolean()
    # vLLM's: words never generated (as written and after a space)
    bad_words = BadWords()
    # vLLM's: only these token ids are generated; only the prompt's last k tokens are kept
    allowed_token_ids = AllowedTokenIds()
    truncate_prompt_tokens = TruncatePromptTokens()
    # vLLM's: with logprobs, tokens named "token_id:<id>" (a token that is no whole character is
    # then told apart from others)
    return_tokens_as_token_ids = StrictBoolean()
    # vLLM's: the prompt's ids (prompt_token_ids) and each choice's generated ids (token_ids)
    return_token_ids = StrictBoolean()
    # vLLM's: whether the prompt's text is tokenized with the tokenizer's special tokens
    add_special_tokens = StrictBoolean()
    # vLLM's: the prompt's K/V are reused only by requests with the same salt (CPU engine)
    cache_salt = StrictString(validate=Length(min=1, max=MAX_CACHE_SALT_CHARS,
                                              error="cache_salt must be a non-empty string of at most {max} characters"))
    # vLLM's: the engine admits waiting requests the lower values first (CPU engine)
    priority = priority_field()
    # vLLM's: the request's id (logs, Triton) and its reply's (chatcmpl-<request_id>)
    request_id = request_id_field()
    # vLLM's: each prompt token's log-probability and rank, with the k best tokens at its
    # position (not streamed, as vLLM's)
    prompt_logprobs = StrictInteger(
        validate=_range("prompt_logprobs must be between {min} and {max}, got {input}", min=0, max=MAX_TOP_LOGPROBS))

    @validates_schema
    def validate_prompt_logprobs(self, data: Mapping[str, Any], **kwargs: Any) -> None:
        if data.get("prompt_logprobs") is not None and data.get("stream"):
            raise ValidationError('prompt_logprobs are not available with "stream": true (as vLLM\'s): send the '
                                  "request without streaming", field_name="prompt_logprobs")

    @validates_schema
    def validate_return_token_ids(self, data: Mapping[str, Any], **kwargs: Any) -> None:
        if data.get("return_token_ids") and data.get("echo"):
            raise ValidationError("return_token_ids cannot be used with echo: prompt_token_ids are the prompt's "
                                  "ids (leave echo out)", field_name="return_token_ids")

    @validates_schema
    def validate_structured_outputs(self, data: Mapping[str, Any], **kwargs: Any) -> None:
        if data.get("structured_outputs") is not None and data.get("response_format") is not None:
            raise ValidationError("give either structured_outputs or a JSON response_format, not both",
                                  field_name="structured_outputs")

    @validates_schema
    def validate_stream_options(self, data: Mapping[str, Any], **kwargs: Any) -> None:
        if data.get("stream_options") is not None and not data.get("stream"):
            raise ValidationError(
                'stream_options is only allowed with "stream": true', field_name="stream_options"
            )

    def _request(self, data: dict[str, Any], *, prompt: str | TokenIds, model: str, max_tokens: int | None,
                 prompt_param: str = "prompt", logprobs: int | None = None) -> OpenAIRequest:
        """``logprobs``: the alternatives per token the reply shows (None: no logprobs)."""
        if max_tokens is None:  # the endpoint's own default (OpenAI's), within the model's limit
            max_tokens = min(self.default_max_tokens, self.limits(model).max_new_tokens)
        truncated = data.get("truncate_prompt_tokens") is not None
        # the engine makes one token at least
        self.check_prompt(prompt, model, max(max_tokens, 1), prompt_param, truncated)
        check_min_tokens(data, max_tokens, "max_tokens")
        choices = data.get("n") or 1
        generated = data.get("best_of") or choices
        guide = data.get("response_format") or data.get("structured_outputs")
        token_ids = bool(data.get("return_token_ids"))
        fields = {**data, "max_tokens": max_tokens, "n": generated, "guide": guide,
                  # best_of ranks the choices by their sum of log-probabilities, and return_token_ids
                  # reads the generated ids from the tokens: the engine must report them
                  "logprobs": 0 if logprobs is None and (generated > choices or token_ids) else logprobs}
        if data.get("seed") is not None:
            fields["seed"] = data["seed"] % (UINT64_MAX + 1)  # int64 seeds of OpenAI, as uint64
        sampling = sampling_params(fields, max_new_tokens="max_tokens", stop="stop", echo="echo")
        stream = bool(data.get("stream"))
        options = data.get("stream_options") or {}
        include_usage = stream and bool(options.get("include_usage"))
        continuous = include_usage and bool(options.get("continuous_usage_stats"))
        special = data.get("add_special_tokens")
        params = TextRequest(prompt="", sampling=sampling, stream=stream, model=model, return_prompt_token_ids=token_ids,
                             return_num_output_tokens=continuous,
                             add_special_tokens=self.adds_special_tokens if special is None else special
                             ).with_prompt(prompt)
        # the llm model's "prompt" (a prompt over the context) is chat's messages
        names = {**PARAM_NAMES, "prompt": prompt_param, **self.param_names, "n": "best_of" if generated > choices else "n"}
        if data.get("structured_outputs") is not None:  # the guide's errors name the field it came from
            names.update(guided_decoding_guide="structured_outputs", guided_decoding_guide_type="structured_outputs")
        return OpenAIRequest(params=params,
                             include_usage=include_usage, continuous_usage=continuous, choices=choices,
                             logprobs=logprobs, param_names=names,
                             tokens_as_ids=bool(data.get("return_tokens_as_token_ids")), token_ids=token_ids,
                             request_id=data.get("request_id"))


class CompletionSchema(_OpenAISchema):
    """``POST /v1/completions``."""

    prompt = Prompt(
        required=True,
        allow_none=False,
        error_messages={"required": "prompt is required", "null": "prompt must be a string, got null"},
    )
    suffix = Empty("suffix is not supported")
    echo = StrictBoolean()  # the prompt in front of each choice's text (with logprobs: its tokens too)
    best_of = StrictInteger(
        validate=_range("best_of must be between {min} and {max}, got {input}", min=1, max=MAX_CHOICES))
    logprobs = StrictInteger(
        validate=_range("logprobs must be between {min} and {max}, got {input}", min=0, max=MAX_TOP_LOGPROBS))

    least_token_budget = 0

    def least_tokens(self, data: Mapping[str, Any]) -> int:
        # echo with max_tokens 0 scores the prompt alone (OpenAI's legacy API, vLLM): nothing generated
        return 0 if data.get("echo") is True else 1

    @validates_schema
    def validate_best_of(self, data: Mapping[str, Any], **kwargs: Any) -> None:
        best_of, n = data.get("best_of"), data.get("n") or 1
        if not isinstance(best_of, int) or isinstance(best_of, bool):
            return
        if best_of < n:
            raise ValidationError(f"best_of ({best_of}) must be at least n ({n})", field_name="best_of")
        if best_of > n and data.get("stream"):
            raise ValidationError("best_of cannot be used with stream: the best choices are known only at the end",
                                  field_name="best_of")

    @post_load
    def make_request(self, data: dict[str, Any], **kwargs: Any) -> OpenAIRequest:
        prompts = data["prompt"]
        model = self.requested_model(data)
        req = self._request(data, prompt=prompts[0], model=model, max_tokens=data.get("max_tokens"),
                            logprobs=data.get("logprobs"))
        for prompt in prompts[1:]:
            self.check_prompt(prompt, model, req.params.sampling.engine_tokens, "prompt",
                              req.params.sampling.truncate_prompt_tokens is not None)
        return dataclasses.replace(req, prompts=prompts) if len(prompts) > 1 else req


def render_options(data: Mapping[str, Any]) -> dict[str, Any]:
    """A chat request's options for ChatTemplate.render (vLLM's fields): the assistant's turn
    header unless ``add_generation_prompt`` is false or the final message is continued
    (``continue_final_message``, which cannot go with an explicit ``add_generation_prompt``
    true), and ``chat_template_kwargs``."""
    continued = data.get("continue_final_message") is True
    header = data.get("add_generation_prompt")
    if continued and header is True:
        raise ValidationError("continue_final_message and add_generation_prompt cannot both be true: the final "
                              "message is continued, not answered (leave add_generation_prompt out)",
                              field_name="continue_final_message")
    return {"add_generation_prompt": not continued if header is None else header,
            "continue_final_message": continued, "variables": data.get("chat_template_kwargs") or None}


class ChatCompletionSchema(_OpenAISchema):
    """``POST /v1/chat/completions``: ``messages`` become the prompt through the model's chat
    template (``chat_template``; None when the deployment has none: a 501)."""

    default_max_tokens = CHAT_DEFAULT_MAX_TOKENS
    token_fields = ("max_tokens", "max_completion_tokens")
    adds_special_tokens = False  # the template renders the BOS it wants (vLLM's default for chat)
    param_names = {"logprobs": "top_logprobs"}  # the llm refuses alternatives, which top_logprobs asks for

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
    logprobs = StrictBoolean()
    top_logprobs = StrictInteger(
        validate=_range("top_logprobs must be between {min} and {max}, got {input}", min=0, max=MAX_TOP_LOGPROBS))
    tools = Nested(ToolSchema, many=True, max_items=MAX_TOOLS)
    tool_choice = ToolChoiceField()
    functions = Empty("functions (OpenAI's deprecated form of tools) are not supported: send tools")
    function_call = Empty("function_call (OpenAI's deprecated form of tool_choice) is not supported: send tool_choice",
                          neutral=("none", "auto"))
    modalities = Empty("only text output is supported", neutral=(["text"],))
    audio = Empty("audio output is not supported")
    prediction = Empty("predicted outputs are not supported")
    web_search_options = Empty("web search is not supported")
    # Accepted and ignored: they do not change what is generated.
    metadata = Anything()
    store = Anything()
    service_tier = Anything()
    parallel_tool_calls = StrictBoolean()  # false: a required call is one call
    reasoning_effort = Anything()
    verbosity = Anything()
    # vLLM's: how the chat template renders the conversation (gateway.chat_template)
    add_generation_prompt = StrictBoolean()
    continue_final_message = StrictBoolean()
    chat_template_kwargs = ChatTemplateKwargs()
    prompt_cache_key = Anything()
    prompt_cache_retention = Anything()
    safety_identifier = Anything()
    include_reasoning = StrictBoolean()  # vLLM's: false leaves the reasoning out (gateway.reasoning)
    # vLLM's: each choice's content starts with the last message's when that message has the
    # reply's role (the assistant's, or any without a generation prompt): the whole message
    echo = StrictBoolean()

    def __init__(self, *, chat_template: ChatTemplate | None, tool_call_parser: str | None = None,
                 reasoning_parser: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.chat_template = chat_template
        self.tool_call_parser = tool_call_parser  # tool_choice "auto" reads the model's calls (gateway.tool_parsers)
        self.reasoning_parser = reasoning_parser  # replies' reasoning is read from the text (gateway.reasoning)

    @validates_schema
    def validate_max_tokens_alias(self, data: Mapping[str, Any], **kwargs: Any) -> None:
        reject_conflicting_alias(
            data, "max_completion_tokens", "max_tokens",
            "max_tokens and max_completion_tokens were both given, with different values ({old} and "
            "{new}): send only max_completion_tokens",
        )

    @validates_schema
    def validate_top_logprobs(self, data: Mapping[str, Any], **kwargs: Any) -> None:
        if data.get("top_logprobs") and not data.get("logprobs"):
            raise ValidationError('top_logprobs needs "logprobs": true', field_name="top_logprobs")

    @validates_schema
    def validate_render_options(self, data: Mapping[str, Any], **kwargs: Any) -> None:
        render_options(data)

    @validates_schema
    def validate_tools(self, data: Mapping[str, Any], **kwargs: Any) -> None:
        check_unique_names(data.get("tools") or ())
        forced = tool_choice_of(data.get("tools"), data.get("tool_choice"), self.tool_call_parser)
        if forced is not None and forced.mode != "auto" and data.get("echo"):
            raise ValidationError("echo cannot be used when tool_choice forces a call: the reply has no content to "
                                  "put the last message in front of", field_name="echo")
        for name in ("response_format", "structured_outputs"):
            if forced is not None and forced.mode != "auto" and data.get(name) is not None:
                what = '"required"' if forced.mode == "required" else "a named function"
                raise ValidationError(f"{name} cannot be used when tool_choice forces a call ({what}): the "
                                      "call's arguments already follow the function's parameters", field_name=name)

    @post_load
    def make_request(self, data: dict[str, Any], **kwargs: Any) -> OpenAIRequest:
        model = self.requested_model(data)
        tools = data.get("tools") or None
        forced = tool_choice_of(tools, data.get("tool_choice"), self.tool_call_parser)
        if forced is not None and forced.mode == "auto":  # the model chooses; its calls are read from its text
            forced = dataclasses.replace(forced, parallel=data.get("parallel_tool_calls") is not False)
            if forced.parser in KEEP_SPECIAL_TOKENS:  # its calls begin with a special token
                data = {**data, "skip_special_tokens": False}
        elif forced is not None:
            guide = tool_guide(tools, forced, parallel=data.get("parallel_tool_calls") is not False)
            data = {**data, "response_format": guide}
        if self.chat_template is None:
            raise ServerError(
                "Chat completions are not available: this gateway has no chat template configured "
                "(TOKENIZER_DIR); use /v1/completions",
                status=501,
            )
        if self.reasoning_parser in REASONING_KEEPS_SPECIAL:  # its thinking tags are special tokens
            data = {**data, "skip_special_tokens": False}
        options = render_options(data)
        prompt = self.chat_template.render(data["messages"], tools=tools, **options)
        max_tokens = data.get("max_completion_tokens")
        if max_tokens is None:
            max_tokens = data.get("max_tokens")
        logprobs = (data.get("top_logprobs") or 0) if data.get("logprobs") else None
        # chat's echo is the reply's (the last message's text), not the llm model's (the prompt's):
        # vLLM's rule, the last message when its role is the reply's, which is the assistant's after
        # a generation prompt and the last message's own without one (its text is continued)
        last = data["messages"][-1]
        replies_as_last = last["role"] == "assistant" or not options["add_generation_prompt"]
        echoed = last["content"] if data.get("echo") and replies_as_last and last["content"] else None
        req = self._request({**data, "echo": None}, prompt=prompt, model=model, max_tokens=max_tokens,
                            prompt_param="messages", logprobs=logprobs)
        if echoed is not None:
            req = dataclasses.replace(req, echo=echoed)
        if self.reasoning_parser and req.params.sampling.guide is None:  # a guide constrains from the first token
            variables = data.get("chat_template_kwargs") or {}
            req = dataclasses.replace(req, reasoning=Reasoning(
                self.reasoning_parser, thinking=variables.get("enable_thinking") is not False,
                include=data.get("include_reasoning") is not False))
        if forced is None:
            return req
        if forced.mode == "auto":
            return dataclasses.replace(req, tool_choice=forced)
        # errors of the guide (XGrammar cannot take a function's parameters) name tools
        names = {**req.param_names, "guided_decoding_guide": "tools", "guided_decoding_guide_type": "tools"}
        return dataclasses.replace(req, tool_choice=forced, param_names=names)


__all__ = [
    "CHAT_DEFAULT_MAX_TOKENS",
    "COMPLETIONS_DEFAULT_MAX_TOKENS",
    "ChatCompletionSchema",
    "ChatMessageSchema",
    "CompletionSchema",
    "OpenAIRequest",
    "render_options",
]
