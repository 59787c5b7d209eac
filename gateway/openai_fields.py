"""Marshmallow fields of the OpenAI-compatible request schemas (gateway.openai_schemas): JSON
types OpenAI accepts in one field (a string or an array), nested objects whose errors name their
path (``messages[1].role ...``), and fields accepted only at a neutral value."""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from typing import Any

from marshmallow import ValidationError

from trident.contract import INT32_MAX, MAX_STOP_CHARS, MAX_STOP_SEQUENCES

from .chat_template import MAX_TEMPLATE_KWARGS, RESERVED_VARIABLES
from .fields import TokenIdArray, _is_id, is_token_id  # noqa: F401 (re-exported)
from .schemas import StrictSchema, _StrictField, describe, non_empty_strings


class Anything(_StrictField):
    """Any JSON value; for fields that are accepted and ignored."""

    def accepts(self, value: Any) -> bool:
        return True


def _same(value: Any, neutral: Any) -> bool:
    """JSON equality: 0 == 0.0, but false is not 0."""
    return value == neutral and isinstance(value, bool) == isinstance(neutral, bool)


class Empty(_StrictField):
    """A field that OpenAI has and the gateway does not support: only null, or an empty value
    (``{}``, ``[]``, ``""``) or one of ``neutral`` is accepted."""

    def __init__(self, unsupported: str, *, neutral: Sequence[Any] = (), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.unsupported = unsupported
        self.neutral = tuple(neutral)

    def accepts(self, value: Any) -> bool:
        return True

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if value in ({}, [], "") or any(_same(value, n) for n in self.neutral):
            return None
        name = self.public_name
        raise ValidationError(self.unsupported if self.unsupported.startswith(name) else f"{name}: {self.unsupported}")


class StringOrStrings(_StrictField):
    """``stop``: a string, or an array of at most ``max_items`` non-empty strings; loads a tuple."""

    expected = "a string or an array of strings"

    def __init__(self, *, max_items: int = MAX_STOP_SEQUENCES, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_items = max_items

    def accepts(self, value: Any) -> bool:
        return isinstance(value, (str, list))

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> tuple[str, ...]:
        value = super()._deserialize(value, attr, data, **kwargs)
        name = self.public_name
        if isinstance(value, str):
            if not value:
                raise ValidationError(f"{name} must be a non-empty string")
            if len(value) > MAX_STOP_CHARS:
                raise ValidationError(f"{name} must be at most {MAX_STOP_CHARS} characters, got {len(value)}")
            return (value,)
        return non_empty_strings(value, name=name, max_items=self.max_items)


#: Prompts one ``/v1/completions`` request may hold (an array of strings, or of arrays of token
#: ids): each is a generation of its own, with its own in-flight place and a place among its key's
#: open generations.
MAX_PROMPTS = 32

#: A prompt of token ids, used as given (trident.contract.TextRequest.prompt_ids).
TokenIds = tuple[int, ...]


class Prompt(_StrictField):
    """``prompt`` of /v1/completions, in OpenAI's four forms: a non-empty string, an array of 1 to
    :data:`MAX_PROMPTS` of them, an array of token ids (one prompt), or an array of 1 to
    :data:`MAX_PROMPTS` arrays of token ids. Loaded as a tuple of prompts, each a string or a
    tuple of ids (whether the ids are the model's, and fit its context, is checked later)."""

    expected = "a string"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, (str, list))

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> tuple[str | TokenIds, ...]:
        value = super()._deserialize(value, attr, data, **kwargs)
        if isinstance(value, str):
            value = [value]
        elif value and all(_is_id(item) for item in value):
            value = [value]  # [1, 2, 3]: one prompt of token ids
        if not 1 <= len(value) <= MAX_PROMPTS:
            raise ValidationError(f"prompt must hold 1 to {MAX_PROMPTS} prompts, got an array of {len(value)}")
        kind = str if isinstance(value[0], str) else list
        prompts: list[str | TokenIds] = []
        for i, item in enumerate(value):
            where = "" if len(value) == 1 else f"[{i}]"
            if not isinstance(item, kind):
                raise ValidationError("prompt must be a string, an array of strings, an array of token ids or an "
                                      f"array of arrays of token ids, got an array holding {describe(item)}")
            if not item:
                raise ValidationError(f"prompt{where} must be a non-empty " + ("string" if kind is str else "array of token ids"))
            if kind is str:
                prompts.append(item)
                continue
            for token in item:
                if not is_token_id(token):
                    raise ValidationError(f"prompt{where} must hold token ids, integers from 0 to {INT32_MAX}, "
                                          f"got {describe(token)}")
            prompts.append(tuple(item))
        return tuple(prompts)


class Nested(_StrictField):
    """An object (or, with ``many``, an array of objects) loaded with ``schema``; errors name the
    path, e.g. ``messages[1].role must be one of ...``."""

    def __init__(self, schema: type[StrictSchema], *, many: bool = False, min_items: int = 0,
                 max_items: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.schema_class = schema
        self.many = many
        self.min_items = min_items
        self.max_items = max_items
        self.expected = "an array of objects" if many else "an object"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, list) if self.many else isinstance(value, dict)

    def _load_one(self, value: Any, path: str) -> Any:
        if not isinstance(value, dict):
            raise ValidationError(f"{path} must be an object, got {describe(value)}")
        schema = self.schema_class()
        try:
            return schema.load(value)
        except ValidationError as err:
            error = schema.first_error(err)
            if error.message.startswith("Unrecognized request argument"):
                raise ValidationError(f"{path} has an unrecognized field: {error.param}") from None
            inner = error.param or ""
            message = error.message
            if inner and message.startswith(inner):
                raise ValidationError(f"{path}.{message}") from None
            raise ValidationError(f"{path}: {message}") from None

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        value = super()._deserialize(value, attr, data, **kwargs)
        name = self.public_name
        if not self.many:
            return self._load_one(value, name)
        if len(value) < self.min_items:
            raise ValidationError(f"{name} must have at least {self.min_items} item{'s' if self.min_items > 1 else ''}")
        if self.max_items is not None and len(value) > self.max_items:
            raise ValidationError(f"{name} must have at most {self.max_items} items, got {len(value)}")
        return [self._load_one(item, f"{name}[{i}]") for i, item in enumerate(value)]


class MessageContent(_StrictField):
    """A message's ``content``: a string, or an array of text parts (joined with newlines, as
    vLLM does)."""

    expected = "a string or an array of text parts"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, (str, list))

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        return joined_text(super()._deserialize(value, attr, data, **kwargs), "content")


def joined_text(value: Any, where: str, kinds: Sequence[str] = ("text",), extra: Collection[str] = ()) -> str:
    """A string, or an array of text parts (``type`` one of ``kinds``, a string ``text``, no other
    field but ``extra``) joined with newlines, as vLLM joins a message's parts: chat's content,
    the Responses API's (gateway.responses). Raises ``ValidationError`` naming the part."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise ValidationError(f"{where} must be a string or an array of text parts, got {describe(value)}")
    shape = " or ".join(json.dumps(kind) for kind in kinds)
    texts = []
    for i, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in kinds:
            got = f"type {describe(kind)}" if isinstance(part, dict) else describe(part)
            raise ValidationError(f"{where}[{i}] must be a text part ({{\"type\": {shape}, \"text\": ...}}): "
                                  f"only text content is supported, got {got}")
        if not isinstance(part.get("text"), str):
            raise ValidationError(f"{where}[{i}].text must be a string, got {describe(part.get('text'))}")
        unknown = sorted(set(part) - {"type", "text", *extra})
        if unknown:
            raise ValidationError(f"{where}[{i}] has an unrecognized field: {unknown[0]}")
        texts.append(part["text"])
    return "\n".join(texts)


class ChatTemplateKwargs(_StrictField):
    """``chat_template_kwargs`` (vLLM's): more variables for the model's chat template, such as
    Qwen3's ``enable_thinking``; a template that does not use one ignores it. The variables the
    gateway sets itself (``messages``, ``tools``, the special tokens...) are refused: they have
    fields of their own."""

    expected = "an object"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, dict)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> dict[str, Any]:
        value = super()._deserialize(value, attr, data, **kwargs)
        if len(value) > MAX_TEMPLATE_KWARGS:
            raise ValidationError(f"{self.public_name} must have at most {MAX_TEMPLATE_KWARGS} entries, got {len(value)}")
        for name in value:
            if name in RESERVED_VARIABLES:
                raise ValidationError(f"{self.public_name}.{name} is set by the gateway and cannot be given here"
                                      + (f": send {name} in the request itself" if name in ("messages", "tools",
                                                                                             "add_generation_prompt")
                                         else ""))
        return value
