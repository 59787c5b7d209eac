"""Request schemas, one per endpoint (STYLE 7), and the JSON-body reader they share.

Types are strict, as a JSON client would expect: integers must be JSON integers (``1.5``,
``"3"`` and ``true`` are rejected), numbers must be JSON numbers, booleans real JSON booleans,
strings real strings. ``null`` for an optional field means "use the default" (as in the OpenAI
API). Messages are full sentences that name the field; the first error, in the order of the
contract's fields, becomes the 400 (unknown fields first).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from marshmallow import RAISE, Schema, ValidationError, post_load, validates, validates_schema
from marshmallow.validate import Range, Regexp

from trident.contract import (
    INT32_MAX,
    INT32_MIN,
    MAX_BAD_WORDS,
    MAX_CHOICES,
    MAX_PENALTY,
    MAX_TOP_LOGPROBS,
    MAX_STOP_CHARS,
    MAX_STOP_SEQUENCES,
    UINT64_MAX,
    ModelLimits,
    SamplingParams,
    TextRequest,
    max_tokens_error,
    prompt_chars_error,
    prompt_ids_error,
    token_ids_error,
)

from .control_fields import AllowedTokenIds, LogitBias, Regex, ResponseFormat, TruncatePromptTokens, guide_of
from .errors import ClientError, PromptTooLong
from .ids import TAME_REQUEST_ID
from .fields import (  # noqa: F401 (re-exported: the schemas' field types)
    StrictBoolean,
    StrictInteger,
    StrictNumber,
    StrictString,
    TokenIdArray,
    _StrictField,
    describe,
)

def non_empty_strings(value: list, *, name: str, max_items: int, max_chars: int = MAX_STOP_CHARS) -> tuple[str, ...]:
    """A list of at most ``max_items`` non-empty strings of at most ``max_chars`` characters
    (stop sequences), as a tuple."""
    if len(value) > max_items:
        raise ValidationError(f"{name} must have at most {max_items} items, got {len(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise ValidationError(f"{name}[{i}] must be a string, got {describe(item)}")
        if not item:
            raise ValidationError(f"{name}[{i}] must be a non-empty string")
        if len(item) > max_chars:
            raise ValidationError(f"{name}[{i}] must be at most {max_chars} characters, got {len(item)}")
    return tuple(value)


class StopSequences(_StrictField):
    expected = "an array of strings"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, list)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> tuple[str, ...]:
        return non_empty_strings(super()._deserialize(value, attr, data, **kwargs), name=self.public_name,
                                 max_items=MAX_STOP_SEQUENCES)


#: bad words one request may name: each is banned as written and after a space (two sequences)
MAX_REQUEST_BAD_WORDS = MAX_BAD_WORDS // 2


class BadWords(_StrictField):
    """vLLM's ``bad_words``: words the output never contains, each banned as its token sequence
    at the start of a word and after a space (:func:`spaced_variants`)."""

    expected = "an array of strings"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, list)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> tuple[str, ...]:
        words = non_empty_strings(super()._deserialize(value, attr, data, **kwargs), name=self.public_name,
                                  max_items=MAX_REQUEST_BAD_WORDS, max_chars=MAX_STOP_CHARS - 1)
        for i, word in enumerate(words):
            if not word.strip():
                raise ValidationError(f"{self.public_name}[{i}] must have a character other than whitespace")
        return words


def spaced_variants(words: Sequence[str]) -> tuple[str, ...]:
    """The bad words to send the engine for words a request names: each without its leading
    whitespace and after one space, as vLLM bans them (BPE tokenizers spell a word differently
    at the start of the text and inside it), without repeats."""
    out: list[str] = []
    for word in words:
        for variant in (word.lstrip(), " " + word.lstrip()):
            if variant not in out:
                out.append(variant)
    return tuple(out)


def reject_conflicting_alias(data: Mapping[str, Any], name: str, alias: str, message: str) -> None:
    """A field and its alias both given, with different values: a 400 naming the alias.
    message is formatted with old (the alias's value) and new (the field's)."""
    new, old = data.get(name), data.get(alias)
    if new is not None and old is not None and new != old:
        raise ValidationError(message.format(old=old, new=new), field_name=alias)


def priority_field() -> StrictInteger:
    """vLLM's ``priority``: the engine admits waiting requests the lower values first, then in
    arrival order (0 by default; CPU engine, trident.engine.waiting)."""
    return StrictInteger(validate=_range("priority must be between {min} and {max}, got {input}", min=INT32_MIN,
                                         max=INT32_MAX))


def request_id_field() -> StrictString:
    """vLLM's ``request_id``: 1 to 128 of the characters a client's X-Request-ID may have."""
    return StrictString(validate=Regexp(TAME_REQUEST_ID, error="request_id must be 1 to 128 of A-Z a-z 0-9 and "
                                                              "._:/+=@-, got {input!r}"))


def _range(message: str, **kwargs: Any) -> Range:
    return Range(error=message, **kwargs)


def _penalty(name: str) -> Range:
    return _range(f"{name} must be between -{MAX_PENALTY:g} and {MAX_PENALTY:g}, got {{input}}",
                  min=-MAX_PENALTY, max=MAX_PENALTY)


class StrictSchema(Schema):
    """Unknown fields raise; :meth:`first_error` turns a failed load into the one 400."""

    class Meta:
        unknown = RAISE

    # -- errors ------------------------------------------------------------------------------

    def first_error(self, err: ValidationError) -> ClientError:
        """The 400 for a failed load: unknown fields first, then fields in contract order."""
        messages = err.messages if isinstance(err.messages, dict) else {"_schema": err.messages}
        known = set(self.load_fields)
        unknown = [name for name in messages if name not in known and name != "_schema"]
        if isinstance(err.data, Mapping):  # marshmallow finds them in set order: use the body's
            order = {name: i for i, name in enumerate(err.data)}
            unknown.sort(key=lambda name: order.get(name, len(order)))
        if unknown:
            plural = "s" if len(unknown) > 1 else ""
            return ClientError(
                f"Unrecognized request argument{plural} supplied: {', '.join(unknown)}", param=unknown[0]
            )
        for name in self.load_fields:
            if name in messages:
                return ClientError(_first_message(messages[name]), param=name)
        return ClientError(_first_message(messages.get("_schema", "invalid request")))


class ModelSchema(StrictSchema):
    """A generation endpoint's schema: it knows the served models and, through ``limits``, each
    one's limits (read from Triton: trident.contract.ModelLimits, whose one source is the
    repository build). Fields named in ``token_fields`` are checked against the model's
    ``max_new_tokens``."""

    token_fields: tuple[str, ...] = ()

    def __init__(
        self,
        *,
        limits: Callable[[str], ModelLimits],
        served_models: Sequence[str],
        default_model: str,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.limits = limits
        self.served_models = tuple(served_models)
        self.default_model = default_model

    def requested_model(self, data: Mapping[str, Any]) -> str:
        """The model the request names (or the default); 404 when it is not served."""
        model = data.get("model")
        if model is None:
            return self.default_model
        if model not in self.served_models:
            served = ", ".join(self.served_models)
            raise ClientError(
                f"The model '{model}' does not exist or is not served here (served: {served})",
                status=404,
                param="model",
            )
        return model

    def check_prompt_length(self, prompt: str, model: str, param: str) -> None:
        """A 400 before the prompt crosses to Triton when it cannot fit the model's context."""
        limit = self.limits(model).max_prompt_chars
        if limit and len(prompt) > limit:
            raise PromptTooLong(prompt_chars_error(len(prompt), limit, param), param=param)

    def check_prompt(self, prompt: str | tuple[int, ...], model: str, max_new_tokens: int, param: str,
                     truncated: bool = False) -> None:
        """:meth:`check_prompt_length` for a text; for token ids, a 400 when one is not a token of
        the model or they cannot fit its context with ``max_new_tokens`` (unless ``truncated``:
        truncate_prompt_tokens keeps only their last ones, and the llm model checks what is left)."""
        if isinstance(prompt, str):
            self.check_prompt_length(prompt, model, param)
            return
        limits = self.limits(model)
        trouble = (token_ids_error(prompt, limits.vocab_size, param) if truncated
                   else prompt_ids_error(prompt, max_new_tokens, limits, param))
        if trouble is not None:
            raise ClientError(trouble, param=param)

    #: the smallest token budget any request may ask for (the minimum /openapi.json gives)
    least_token_budget = 1

    def least_tokens(self, data: Mapping[str, Any]) -> int:
        """The smallest token budget this request may ask for."""
        return self.least_token_budget

    @validates_schema(skip_on_field_errors=False)
    def validate_token_limits(self, data: Mapping[str, Any], **kwargs: Any) -> None:
        values = [(name, data.get(name)) for name in self.token_fields if isinstance(data.get(name), int)]
        if not values:
            return
        model = data.get("model") or self.default_model
        if model not in self.served_models:
            return  # the 404 comes from post_load, after every field error
        limit = self.limits(model).max_new_tokens
        least = self.least_tokens(data)
        for name, value in values:
            if not least <= value <= limit:
                raise ValidationError(max_tokens_error(value, limit, name, echo=self.least_token_budget == 0),
                                      field_name=name)


class GenerateSchema(ModelSchema):
    """``POST /generate``: fields in the order of shared/API.md; loads a TextRequest.

    Built once per app with ``limits`` (the served model's: the upper bound of
    ``max_new_tokens``), ``served_models`` (public names; another name is a 404) and
    ``default_model``. Defaults are SamplingParams' (trident.contract), the only ones.
    """

    token_fields = ("max_new_tokens", "max_length")

    prompt = StrictString(
        required=True,
        allow_none=False,
        error_messages={"required": "prompt is required", "null": "prompt must be a string, got null"},
    )
    model = StrictString()
    max_new_tokens = StrictInteger()
    temperature = StrictNumber(
        validate=_range("temperature must be between {min} and {max}, got {input}", min=0, max=2)
    )
    top_p = StrictNumber(
        validate=_range(
            "top_p must be greater than {min} and at most {max}, got {input}", min=0, max=1, min_inclusive=False
        )
    )
    top_k = StrictInteger(validate=_range("top_k must be between {min} and {max}, got {input}", min=0, max=INT32_MAX))
    repetition_penalty = StrictNumber(
        validate=_range("repetition_penalty must be greater than {min}, got {input}", min=0, min_inclusive=False)
    )
    stop_sequences = StopSequences()
    stream = StrictBoolean()
    seed = StrictInteger(validate=_range("seed must be between {min} and {max}, got {input}", min=0, max=UINT64_MAX))
    # Older alias of max_new_tokens (TGI / early HF pipelines); see validate_max_length_alias.
    max_length = StrictInteger()
    # Output controls (docs/api.md); the fields are gateway.control_fields' and OpenAI's.
    n = StrictInteger(validate=_range("n must be between {min} and {max}, got {input}", min=1, max=MAX_CHOICES))
    logprobs = StrictInteger(
        validate=_range("logprobs must be between {min} and {max}, got {input}", min=0, max=MAX_TOP_LOGPROBS)
    )
    presence_penalty = StrictNumber(validate=_penalty("presence_penalty"))
    frequency_penalty = StrictNumber(validate=_penalty("frequency_penalty"))
    min_tokens = StrictInteger(validate=_range("min_tokens must be between {min} and {max}, got {input}",
                                               min=0, max=INT32_MAX))
    min_p = StrictNumber(validate=_range("min_p must be between {min} and {max}, got {input}", min=0, max=1))
    logit_bias = LogitBias()
    response_format = ResponseFormat()
    regex = Regex()
    # vLLM's, as on /v1/*: token ids that stop a choice, the stop kept in the text, special tokens kept
    stop_token_ids = TokenIdArray()
    include_stop_str_in_output = StrictBoolean()
    skip_special_tokens = StrictBoolean()
    bad_words = BadWords()  # vLLM's: words never generated
    ignore_eos = StrictBoolean()  # vLLM's: the end tokens do not end the text
    allowed_token_ids = AllowedTokenIds()  # vLLM's: only these tokens are generated
    truncate_prompt_tokens = TruncatePromptTokens()  # vLLM's: only the prompt's last k tokens
    priority = priority_field()  # vLLM's: the engine admits waiting requests the lower values first

    @validates("prompt")
    def validate_prompt(self, value: str, data_key: str) -> None:
        if not value:
            raise ValidationError(f"{data_key} must be a non-empty string")

    @validates_schema
    def validate_max_length_alias(self, data: Mapping[str, Any], **kwargs: Any) -> None:
        reject_conflicting_alias(
            data, "max_new_tokens", "max_length",
            "max_length is an alias of max_new_tokens; both were given with different values "
            "({old} and {new}): send only max_new_tokens",
        )

    @post_load
    def make_params(self, data: dict[str, Any], **kwargs: Any) -> TextRequest:
        model = self.requested_model(data)
        self.check_prompt_length(data["prompt"], model, "prompt")
        if data.get("max_new_tokens") is None:
            data["max_new_tokens"] = data.get("max_length")
        data["guide"] = guide_of(data)
        return TextRequest(prompt=data["prompt"], sampling=sampling_params(data), stream=bool(data.get("stream")),
                           model=model)

    @validates_schema
    def validate_min_tokens(self, data: Mapping[str, Any], **kwargs: Any) -> None:
        check_min_tokens(data, data.get("max_new_tokens") or data.get("max_length"))


def check_min_tokens(data: Mapping[str, Any], max_tokens: int | None, name: str = "max_new_tokens") -> None:
    min_tokens = data.get("min_tokens")
    limit = max_tokens if max_tokens is not None else SamplingParams.max_new_tokens
    if isinstance(min_tokens, int) and isinstance(limit, int) and min_tokens > limit:
        raise ValidationError(f"min_tokens ({min_tokens}) must be at most {name} ({limit})", field_name="min_tokens")


#: SamplingParams fields a request sets under the same name
_SAME_NAME = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "n", "min_tokens",
              "presence_penalty", "frequency_penalty", "min_p", "logit_bias", "logprobs", "guide", "stop_token_ids",
              "include_stop_str_in_output", "skip_special_tokens", "bad_words", "ignore_eos", "allowed_token_ids",
              "truncate_prompt_tokens", "prompt_logprobs", "cache_salt", "priority")
_FLOATS = ("temperature", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "min_p")


def sampling_params(data: Mapping[str, Any], **renamed: str) -> SamplingParams:
    """SamplingParams from validated fields; absent or null ones keep the contract's defaults.
    ``renamed`` maps a SamplingParams field to the request's name for it (``stop="stop"``)."""
    names = {**{name: name for name in _SAME_NAME}, "stop": "stop_sequences", **renamed}
    values = {field: data.get(key) for field, key in names.items() if data.get(key) is not None}
    for name in _FLOATS:
        if name in values:
            values[name] = float(values[name])
    if "bad_words" in values:
        values["bad_words"] = spaced_variants(values["bad_words"])
    return SamplingParams(**values)


def _first_message(messages: Any) -> str:
    while isinstance(messages, (list, dict)):
        if not messages:
            return "invalid request"
        messages = messages[0] if isinstance(messages, list) else next(iter(messages.values()))
    return str(messages)


def load_request(schema: StrictSchema, body: dict[str, Any]) -> Any:
    """What ``schema`` loads from a request body (a TextRequest, an OpenAIRequest, ...); the one
    400 of :meth:`StrictSchema.first_error` when it does not load."""
    try:
        return schema.load(body)
    except ValidationError as err:
        raise schema.first_error(err) from None
