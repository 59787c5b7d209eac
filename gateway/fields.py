"""Strict JSON-typed marshmallow fields, the base of every request schema (gateway.schemas,
gateway.openai_fields, gateway.control_fields): integers must be JSON integers (``1.5``, ``"3"``
and ``true`` are rejected), numbers JSON numbers, booleans real booleans, strings real strings;
``null`` means "not given". Messages name the field and say what it got."""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from typing import Any

from marshmallow import ValidationError, fields

from trident.contract import INT32_MAX


FLOAT32_MAX = 3.4028234663852886e38


def describe(value: Any) -> str:
    """A JSON value, shortly, for messages such as ``got string "3"``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {'true' if value else 'false'}"
    if isinstance(value, (int, float)):
        text = repr(value)
        text = text if len(text) <= 40 else text[:37] + "..."
        return f"integer {text}" if isinstance(value, int) else f"number {text}"
    if isinstance(value, str):
        text = json.dumps(value[:40], ensure_ascii=False)
        return f"string {text}" if len(value) <= 40 else f"string {text[:-1]}...\""
    if isinstance(value, list):
        return "array"
    return "object"


#: how an error names the value a field wanted, by its Python types (check_fields)
_WANTED = {str: "a string", dict: "an object", (str, list): "a string or an array of text parts"}


def check_fields(item: Mapping[str, Any], where: str, required: Mapping[str, type | tuple[type, ...]],
                 optional: Collection[str] = ()) -> None:
    """An object of another API's request (an Anthropic block, a Responses item): no field but
    ``type``, the ``required`` ones and the ``optional`` ones; each required one of its type.
    Raises ``ValidationError`` naming the field (``where.name``)."""
    unknown = sorted(set(item) - {"type", *required, *optional})
    if unknown:
        raise ValidationError(f"{where} has an unrecognized field: {unknown[0]}")
    for name, kinds in required.items():
        if not isinstance(item.get(name), kinds):
            raise ValidationError(f"{where}.{name} must be {_WANTED[kinds]}, got {describe(item.get(name))}")


class _StrictField(fields.Field):
    """A field that accepts one JSON type and says which one it wanted."""

    expected = "a value"

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("allow_none", True)
        super().__init__(**kwargs)

    @property
    def public_name(self) -> str:
        return self.data_key or self.name or "value"

    def fail_type(self, value: Any) -> ValidationError:
        return ValidationError(f"{self.public_name} must be {self.expected}, got {describe(value)}")

    def accepts(self, value: Any) -> bool:  # pragma: no cover - overridden
        raise NotImplementedError

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if not self.accepts(value):
            raise self.fail_type(value)
        return value


class StrictString(_StrictField):
    expected = "a string"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, str)


class StrictInteger(_StrictField):
    expected = "an integer"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)


class StrictNumber(_StrictField):
    """A JSON number (integer or not) that fits the FP32 tensor it becomes."""

    expected = "a number"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        value = super()._deserialize(value, attr, data, **kwargs)
        if abs(value) > FLOAT32_MAX:
            raise ValidationError(f"{self.public_name} is too large for a 32-bit float, got {describe(value)}")
        return value


class StrictBoolean(_StrictField):
    expected = "a boolean (true or false)"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, bool)


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_token_id(value: Any) -> bool:
    """A token id of the wire: an integer (not a boolean) from 0 to INT32_MAX."""
    return _is_id(value) and 0 <= value <= INT32_MAX


class TokenIdArray(_StrictField):
    """An array of token ids (``/detokenize``'s ``tokens``); loaded as a tuple."""

    expected = "an array of token ids"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, list)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> tuple[int, ...]:
        value = super()._deserialize(value, attr, data, **kwargs)
        for i, token in enumerate(value):
            if not is_token_id(token):
                raise ValidationError(f"{self.public_name}[{i}] must be a token id, an integer from 0 to {INT32_MAX}, "
                                      f"got {describe(token)}")
        return tuple(value)
