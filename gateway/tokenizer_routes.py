"""``POST /tokenize`` and ``POST /detokenize``: the served model's tokenizer, with the request
and response bodies of vLLM's and SGLang's routes of those names.

The ids come from the Triton ``llm`` model (trident.contract TOKENIZE_PARAMETER), whose
tokenizer every prompt goes through: they are exactly the ids a prompt of that text is given,
which /v1/completions takes back as a prompt of token ids. Chat ``messages`` are rendered with
the model's chat template first, as /v1/chat/completions renders them. Both calls are quick
(``llm`` answers them on its accepting thread, never at the engine): they count against the
key's rate limit, not against the in-flight generations.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Flask, current_app, g, request
from marshmallow import ValidationError, post_load, validates, validates_schema

from trident.contract import MAX_CHAT_MESSAGES, token_ids_error

from .auth import authorize_model, require_api_key
from .chat_template import ChatTemplate
from .errors import ClientError, ServerError
from .fields import StrictBoolean, StrictString
from .json_body import read_json_object
from .openai_fields import ChatTemplateKwargs, Nested, TokenIdArray
from .openai_schemas import ChatCompletionSchema, ChatMessageSchema, CompletionSchema, render_options
from .ratelimit import rate_limited
from .schemas import ModelSchema, load_request
from .tools import MAX_TOOLS, ToolSchema

bp = Blueprint("tokenizer", __name__)


@dataclass(frozen=True, slots=True)
class TokenizeRequest:
    model: str
    text: str = ""
    add_special_tokens: bool = True
    token_strs: bool = False  # vLLM's return_token_strs


@dataclass(frozen=True, slots=True)
class DetokenizeRequest:
    model: str
    tokens: tuple[int, ...] = ()


class TokenizeSchema(ModelSchema):
    """``prompt`` (special tokens added unless ``add_special_tokens`` is false), or chat
    ``messages`` (rendered as /v1/chat/completions renders them: the generation prompt unless
    ``add_generation_prompt`` is false, ``continue_final_message``, ``chat_template_kwargs``,
    ``tools``; no special tokens added unless asked): vLLM's two request forms."""

    model = StrictString()
    prompt = StrictString()
    messages = Nested(ChatMessageSchema, many=True, min_items=1, max_items=MAX_CHAT_MESSAGES)
    add_special_tokens = StrictBoolean()
    add_generation_prompt = StrictBoolean()
    continue_final_message = StrictBoolean()
    chat_template_kwargs = ChatTemplateKwargs()
    tools = Nested(ToolSchema, many=True, max_items=MAX_TOOLS)
    return_token_strs = StrictBoolean()  # vLLM's: each id's piece of the vocabulary too (token_strs)

    def __init__(self, *, chat_template: ChatTemplate | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.chat_template = chat_template

    @validates("prompt")
    def validate_prompt(self, value: str | None, data_key: str) -> None:
        if value is not None and not value:  # as /generate's (the document's minLength)
            raise ValidationError(f"{data_key} must be a non-empty string")

    @validates_schema
    def validate_one_input(self, data: Mapping[str, Any], **kwargs: Any) -> None:
        # null means "not given", as everywhere
        prompt, messages = data.get("prompt") is not None, data.get("messages") is not None
        if prompt == messages:
            raise ValidationError("give either prompt or messages", field_name="prompt")
        for name in ("add_generation_prompt", "continue_final_message", "chat_template_kwargs"):
            if data.get(name) is not None and not messages:
                raise ValidationError(f"{name} goes with messages", field_name=name)
        render_options(data)
        if data.get("tools") and not messages:
            raise ValidationError("tools go with messages", field_name="tools")

    @post_load
    def make_request(self, data: dict[str, Any], **kwargs: Any) -> TokenizeRequest:
        model = self.requested_model(data)
        if data.get("messages") is not None:
            if self.chat_template is None:
                raise ServerError("Tokenizing messages needs the chat template, which this gateway lacks "
                                  "(TOKENIZER_DIR); send prompt", status=501)
            text = self.chat_template.render(data["messages"], tools=data.get("tools"), **render_options(data))
            special, param = _given(data, "add_special_tokens", ChatCompletionSchema.adds_special_tokens), "messages"
        else:
            text, param = data["prompt"], "prompt"
            special = _given(data, "add_special_tokens", CompletionSchema.adds_special_tokens)
        self.check_prompt_length(text, model, param)
        return TokenizeRequest(model=model, text=text, add_special_tokens=special,
                               token_strs=bool(data.get("return_token_strs")))


def _given(data: Mapping[str, Any], name: str, default: bool) -> bool:
    value = data.get(name)
    return default if value is None else value


class DetokenizeSchema(ModelSchema):
    """``tokens``: ids of the model's vocabulary, at most its context."""

    model = StrictString()
    tokens = TokenIdArray(required=True, allow_none=False,
                          error_messages={"required": "tokens is required", "null": "tokens must be an array, got null"})

    @post_load
    def make_request(self, data: dict[str, Any], **kwargs: Any) -> DetokenizeRequest:
        model = self.requested_model(data)
        tokens, limits = data["tokens"], self.limits(model)
        if len(tokens) > limits.max_context:
            raise ClientError(f"tokens holds {len(tokens)} ids, more than the model's context of "
                              f"{limits.max_context}", param="tokens")
        trouble = token_ids_error(tokens, limits.vocab_size, param="tokens")
        if trouble is not None:
            raise ClientError(trouble, param="tokens")
        return DetokenizeRequest(model=model, tokens=tokens)


@dataclass(frozen=True)
class TokenizerState:
    tokenize_schema: TokenizeSchema
    detokenize_schema: DetokenizeSchema


def init_app(app: Flask) -> None:
    """Build the schemas (after gateway.openai_routes: they share its chat template) and register
    the routes."""
    schema = app.extensions["trident"].generate_schema
    common = {"limits": schema.limits, "served_models": schema.served_models, "default_model": schema.default_model}
    app.extensions["trident.tokenizer"] = TokenizerState(
        tokenize_schema=TokenizeSchema(chat_template=app.extensions["trident.openai"].chat_schema.chat_template,
                                       **common),
        detokenize_schema=DetokenizeSchema(**common),
    )
    app.register_blueprint(bp)


@bp.post("/tokenize")
@require_api_key
@rate_limited
def tokenize() -> Any:
    """The ids of ``prompt`` (or of the rendered ``messages``): ``tokens``, their ``count`` and
    the model's context, ``max_model_len``; with ``return_token_strs``, ``token_strs``: each id's
    piece of the vocabulary (the tokenizer's own spelling, e.g. byte-level BPE's "Ġ" for a space)."""
    state = current_app.extensions["trident.tokenizer"]
    req = load_request(state.tokenize_schema, read_json_object(request))
    authorize_model(g.api_key, req.model)
    backend = current_app.extensions["trident"].backend
    if req.token_strs:
        ids, pieces = backend.tokenize_pieces(req.model, req.text, add_special_tokens=req.add_special_tokens,
                                              request_id=g.request_id)
    else:
        ids, pieces = backend.tokenize(req.model, req.text, add_special_tokens=req.add_special_tokens,
                                       request_id=g.request_id), None
    out = {"count": len(ids), "max_model_len": state.tokenize_schema.limits(req.model).max_context, "tokens": ids}
    if pieces is not None:
        out["token_strs"] = pieces
    return out


@bp.post("/detokenize")
@require_api_key
@rate_limited
def detokenize() -> Any:
    """The text of ``tokens`` (special tokens included): ``prompt``."""
    state = current_app.extensions["trident.tokenizer"]
    req = load_request(state.detokenize_schema, read_json_object(request))
    authorize_model(g.api_key, req.model)
    backend = current_app.extensions["trident"].backend
    return {"prompt": backend.detokenize(req.model, list(req.tokens), request_id=g.request_id)}
