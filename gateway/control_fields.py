"""Fields of the output controls (issue 15), shared by ``/generate`` and ``/v1/*``: ``logit_bias``,
``response_format`` (and ``/generate``'s ``regex``, ``/v1/*``'s ``structured_outputs``), with their
limits from trident.contract.

``response_format`` is OpenAI's: ``{"type": "text"}`` (the default), ``{"type": "json_object"}``
(any JSON object) or ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...},
"strict": ..., "description": ...}}``; it loads a :class:`trident.contract.Guide` (or None for
text), which the llm model compiles with XGrammar: a schema it cannot take is a 400 naming
``response_format``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from marshmallow import ValidationError

from trident.contract import (
    INT32_MAX,
    MAX_ALLOWED_TOKEN_IDS,
    GUIDE_EBNF,
    GUIDE_JSON_SCHEMA,
    GUIDE_REGEX,
    JSON_OBJECT_SCHEMA,
    MAX_BIAS,
    MAX_GUIDE_CHARS,
    MAX_LOGIT_BIAS,
    Guide,
)

from .fields import TokenIdArray, _StrictField, describe

RESPONSE_FORMATS = ("text", "json_object", "json_schema")


class LogitBias(_StrictField):
    """OpenAI's ``logit_bias``: token id (a decimal string, as JSON keys are) -> a number between
    -100 and 100 added to that token's logit; loads ((id, bias), ...). The ids are checked
    against the model's vocabulary by the llm model."""

    expected = "an object mapping token ids to numbers"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, dict)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> tuple[tuple[int, float], ...]:
        value = super()._deserialize(value, attr, data, **kwargs)
        name = self.public_name
        if len(value) > MAX_LOGIT_BIAS:
            raise ValidationError(f"{name} must have at most {MAX_LOGIT_BIAS} entries, got {len(value)}")
        out = []
        for key, bias in value.items():
            if not (key.isascii() and key.isdigit()) or len(key) > 10:
                raise ValidationError(f"{name}: keys must be token ids (non-negative integers), got {describe(key)}")
            if isinstance(bias, bool) or not isinstance(bias, (int, float)):
                raise ValidationError(f"{name}[{key}] must be a number, got {describe(bias)}")
            if not -MAX_BIAS <= bias <= MAX_BIAS:
                raise ValidationError(f"{name}[{key}] must be between -{MAX_BIAS:g} and {MAX_BIAS:g}, got {bias}")
            out.append((int(key), float(bias)))
        return tuple(out)


class AllowedTokenIds(TokenIdArray):
    """vLLM's ``allowed_token_ids``: only these token ids can be generated; loads a tuple of ids
    (each once). The ids are checked against the model's vocabulary by the llm model."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> tuple[int, ...]:
        if isinstance(value, list):  # bounded before each id is checked
            if not value:
                raise ValidationError(f"{self.public_name} must hold at least one token id (leave it out to allow "
                                      "every token)")
            if len(value) > MAX_ALLOWED_TOKEN_IDS:
                raise ValidationError(f"{self.public_name} must have at most {MAX_ALLOWED_TOKEN_IDS} entries, "
                                      f"got {len(value)}")
        return tuple(dict.fromkeys(super()._deserialize(value, attr, data, **kwargs)))


class TruncatePromptTokens(_StrictField):
    """vLLM's ``truncate_prompt_tokens``: keep only the prompt's last k tokens (k at least 1), or
    -1: as many of them as fit the context with the tokens asked for. The model's context bounds
    k (checked by the llm model, which knows it)."""

    expected = "an integer"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> int:
        value = super()._deserialize(value, attr, data, **kwargs)
        if value != -1 and not 1 <= value <= INT32_MAX:
            raise ValidationError(f"{self.public_name} must be -1 (as many as fit the context) or a number of "
                                  f"tokens from 1, got {value}")
        return value


class ResponseFormat(_StrictField):
    """OpenAI's ``response_format``; loads a Guide, or None for plain text."""

    expected = "an object"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, dict)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Guide | None:
        value = super()._deserialize(value, attr, data, **kwargs)
        name = self.public_name
        kind = value.get("type")
        if kind not in RESPONSE_FORMATS:
            raise ValidationError(f"{name}.type must be one of {', '.join(RESPONSE_FORMATS)}, got {describe(kind)}")
        allowed = {"type", "json_schema"} if kind == "json_schema" else {"type"}
        unknown = [key for key in value if key not in allowed]
        if unknown:
            raise ValidationError(f"{name} has an unrecognized field: {unknown[0]}")
        if kind == "text":
            return None
        if kind == "json_object":
            return Guide(GUIDE_JSON_SCHEMA, JSON_OBJECT_SCHEMA)
        return Guide(GUIDE_JSON_SCHEMA, _schema_text(value.get("json_schema"), f"{name}.json_schema"))


def _schema_text(spec: Any, path: str) -> str:
    if not isinstance(spec, Mapping):
        raise ValidationError(f"{path} must be an object with the schema, got {describe(spec)}")
    unknown = [key for key in spec if key not in ("name", "schema", "strict", "description")]
    if unknown:
        raise ValidationError(f"{path} has an unrecognized field: {unknown[0]}")
    for key, kind in (("name", str), ("description", str), ("strict", bool)):
        if spec.get(key) is not None and not isinstance(spec[key], kind):
            raise ValidationError(f"{path}.{key} must be a {'boolean' if kind is bool else 'string'}, "
                                  f"got {describe(spec[key])}")
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise ValidationError(f"{path}.schema must be a JSON schema (an object), got {describe(schema)}")
    return _bounded(json.dumps(schema, ensure_ascii=False), f"{path}.schema", " as JSON")


class Regex(_StrictField):
    """``/generate``'s ``regex`` (an extension, as vLLM's ``guided_regex``): the output matches it."""

    expected = "a string"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, str)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Guide:
        value = super()._deserialize(value, attr, data, **kwargs)
        if not value:
            raise ValidationError(f"{self.public_name} must be a non-empty string")
        return Guide(GUIDE_REGEX, _bounded(value, self.public_name))


#: vLLM's ``structured_outputs`` constraints (one per request) and what each loads
STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object")
#: at most this many strings in ``structured_outputs.choice``
MAX_CHOICES_OF_CHOICE = 1024


class StructuredOutputs(_StrictField):
    """vLLM's ``structured_outputs`` extension on ``/v1/*`` (``extra_body`` in the official
    client): one of ``json`` (a JSON schema, an object or its text), ``regex``, ``choice`` (the
    output is exactly one of these strings), ``grammar`` (XGrammar's EBNF, as vLLM's xgrammar
    backend and TensorRT-LLM take it) or ``json_object: true``; loads a Guide."""

    expected = "an object"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, dict)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Guide:
        value = super()._deserialize(value, attr, data, **kwargs)
        name = self.public_name
        unknown = [key for key in value if key not in STRUCTURED_KINDS]
        if unknown:
            raise ValidationError(f"{name} has an unrecognized field: {unknown[0]} (supported: "
                                  f"{', '.join(STRUCTURED_KINDS)})")
        # not given: absent, null, or json_object false (``in (None, False)`` would take 0 and 0.0 as false)
        given = [key for key in STRUCTURED_KINDS if value.get(key) is not None and value.get(key) is not False]
        if len(given) != 1:
            raise ValidationError(f"{name} must give exactly one of {', '.join(STRUCTURED_KINDS)}, got "
                                  f"{len(given)}")
        kind = given[0]
        spec = value[kind]
        path = f"{name}.{kind}"
        if kind == "json_object":
            if spec is not True:
                raise ValidationError(f"{path} must be true, got {describe(spec)}")
            return Guide(GUIDE_JSON_SCHEMA, JSON_OBJECT_SCHEMA)
        if kind == "json":
            if isinstance(spec, str):
                try:
                    spec = json.loads(spec)
                except ValueError:
                    raise ValidationError(f"{path} must be a JSON schema (an object, or its JSON text)") from None
            if not isinstance(spec, dict):
                raise ValidationError(f"{path} must be a JSON schema (an object, or its JSON text), got "
                                      f"{describe(spec)}")
            return Guide(GUIDE_JSON_SCHEMA, _bounded(json.dumps(spec, ensure_ascii=False), path, _AS_SENT))
        if kind == "choice":
            if (not isinstance(spec, list) or not spec or len(spec) > MAX_CHOICES_OF_CHOICE
                    or not all(isinstance(c, str) and c for c in spec)):
                raise ValidationError(f"{path} must be an array of 1 to {MAX_CHOICES_OF_CHOICE} non-empty strings")
            # an EBNF alternation of string literals: JSON's escapes are XGrammar's too
            return Guide(GUIDE_EBNF, _bounded("root ::= " + " | ".join(json.dumps(c, ensure_ascii=False)
                                                                        for c in spec), path, _AS_SENT))
        if not isinstance(spec, str) or not spec:
            raise ValidationError(f"{path} must be a non-empty string, got {describe(spec)}")
        return Guide(GUIDE_REGEX if kind == "regex" else GUIDE_EBNF, _bounded(spec, path, _AS_SENT))


_AS_SENT = " as the engine gets it"


def _bounded(text: str, path: str, measured: str = "") -> str:
    """A guide's text within MAX_GUIDE_CHARS (``measured`` says how it was counted), else the 400."""
    if len(text) > MAX_GUIDE_CHARS:
        raise ValidationError(f"{path} must be at most {MAX_GUIDE_CHARS} characters{measured}, got {len(text)}")
    return text


def guide_of(data: Mapping[str, Any]) -> Guide | None:
    """The request's guide: ``response_format`` or ``regex`` (400 when both constrain)."""
    fmt, regex = data.get("response_format"), data.get("regex")
    if fmt is not None and regex is not None:
        raise ValidationError("give either regex or a JSON response_format, not both", field_name="regex")
    return fmt or regex


#: OpenAPI properties of these fields (gateway.openapi)
def openapi_properties(field: Any) -> dict[str, Any] | None:
    nullable = ["null"] if field.allow_none else []
    if isinstance(field, LogitBias):
        return {"type": ["object", *nullable], "maxProperties": MAX_LOGIT_BIAS,
                "propertyNames": {"pattern": "^[0-9]{1,10}$"},
                "additionalProperties": {"type": "number", "minimum": -MAX_BIAS, "maximum": MAX_BIAS}}
    if isinstance(field, ResponseFormat):
        simple = {"type": "object", "properties": {"type": {"enum": ["text", "json_object"]}},
                  "required": ["type"], "additionalProperties": False}
        spec = {"type": "object", "properties": {"name": {"type": ["string", "null"]}, "description": {"type": ["string", "null"]},
                                                 "strict": {"type": ["boolean", "null"]}, "schema": {"type": "object"}},
                "required": ["schema"], "additionalProperties": False}
        schema = {"type": "object", "properties": {"type": {"enum": ["json_schema"]}, "json_schema": spec},
                  "required": ["type", "json_schema"], "additionalProperties": False}
        return {"anyOf": [simple, schema]}
    if isinstance(field, Regex):
        return {"type": ["string", *nullable], "minLength": 1, "maxLength": MAX_GUIDE_CHARS}
    if isinstance(field, AllowedTokenIds):
        return {"type": ["array", *nullable], "minItems": 1, "maxItems": MAX_ALLOWED_TOKEN_IDS,
                "items": {"type": "integer", "minimum": 0, "maximum": INT32_MAX}}
    if isinstance(field, TruncatePromptTokens):
        return {"anyOf": [{"const": -1}, {"type": "integer", "minimum": 1, "maximum": INT32_MAX}]}
    if isinstance(field, StructuredOutputs):
        text = {"type": "string", "minLength": 1}
        kinds = {"json": {"anyOf": [{"type": "object"}, text]}, "regex": text, "grammar": text,
                 "choice": {"type": "array", "minItems": 1, "maxItems": MAX_CHOICES_OF_CHOICE, "items": text},
                 "json_object": {"const": True}}
        # the other kinds may be given as null (not given), json_object also as false
        absent = {kind: {"enum": [False, None]} if kind == "json_object" else {"type": "null"} for kind in kinds}
        one = [{"type": "object", "properties": {**absent, kind: kinds[kind]}, "required": [kind],
                "additionalProperties": False} for kind in STRUCTURED_KINDS]
        return {"anyOf": one}
    return None
