"""OpenAI-compatible routes: ``GET /v1/models``, ``GET /v1/models/<id>``,
``POST /v1/completions``, ``POST /v1/chat/completions`` (docs/openai.md); OpenAI's
``POST /v1/responses`` (gateway.responses) and Anthropic's ``POST /v1/messages``
(gateway.anthropic), each served as the chat completion it is.

They share everything but the request schema and the body format with ``/generate``: the API
key (401), the key's rate limit (429, one budget across all generation routes), the checks of
the model (404, 403), the in-flight limit (503), the backend call, logs, and SSE with
heartbeats and cancel on disconnect (gateway.generation: start_generation, collect,
stream_response). Errors are the same envelope, which the official client maps to its
exception classes by status.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Flask, Response, current_app, g, jsonify, request

from .anthropic import CountTokensSchema, MessagesReply, MessagesSchema, error_body, messages_param
from .auth import authorize_model, require_api_key
from .chat_template import ChatTemplate
from .errors import ClientError, register_error_body
from .openai_schemas import ChatCompletionSchema, CompletionSchema, OpenAIRequest
from .openai_replies import ChatCompletionReply, CompletionReply
from .prompts import best_per_prompt, start_prompts
from .responses import ResponsesReply, ResponsesSchema, responses_param
from .ratelimit import rate_limited
from .generation import collect, start_generation, stream_response
from .json_body import read_json_object
from .schemas import load_request

bp = Blueprint("openai", __name__, url_prefix="/v1")

OWNER = "trident"


@dataclass
class OpenAIState:
    completion_schema: CompletionSchema
    chat_schema: ChatCompletionSchema
    messages_schema: MessagesSchema
    responses_schema: ResponsesSchema
    count_tokens_schema: CountTokensSchema
    served_models: tuple[str, ...]
    created: int  # "created" of every model object: when this app was built


def init_app(app: Flask) -> None:
    """Build the /v1 schemas from the app's config and register the blueprint. Call after the
    gateway's own state exists (it holds the served models)."""
    schema = app.extensions["trident"].generate_schema
    common = {
        "limits": schema.limits,
        "served_models": schema.served_models,
        "default_model": schema.default_model,
    }
    tokenizer_dir = app.config.get("TOKENIZER_DIR")
    template = ChatTemplate.from_tokenizer_dir(tokenizer_dir) if tokenizer_dir else None
    parser = app.config.get("TOOL_CALL_PARSER") or None  # names checked by gateway.config
    reasoning = app.config.get("REASONING_PARSER") or None
    app.extensions["trident.openai"] = OpenAIState(
        completion_schema=CompletionSchema(**common),
        chat_schema=ChatCompletionSchema(chat_template=template, tool_call_parser=parser, reasoning_parser=reasoning,
                                         **common),
        messages_schema=MessagesSchema(),
        responses_schema=ResponsesSchema(),
        count_tokens_schema=CountTokensSchema(),
        served_models=tuple(schema.served_models),
        created=int(time.time()),
    )
    app.register_blueprint(bp)
    register_error_body(app, MESSAGES_PATH, error_body)  # Anthropic's clients get Anthropic's errors
    app.after_request(_anthropic_request_id)


MESSAGES_PATH = "/v1/messages"


def _anthropic_request_id(response: Response) -> Response:
    """Anthropic's ``request-id`` header (its SDK's ``_request_id``) on its paths' answers."""
    if request.path.startswith(MESSAGES_PATH):
        response.headers["request-id"] = g.get("request_id") or "-"
    return response


def _state() -> OpenAIState:
    return current_app.extensions["trident.openai"]


def _model_object(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": OWNER}


@bp.get("/models")
@require_api_key
def list_models() -> Any:
    """The served models this key may use."""
    state = _state()
    data = [_model_object(m, state.created) for m in state.served_models if g.api_key.may_use(m)]
    return {"object": "list", "data": data}


@bp.get("/models/<path:model>")
@require_api_key
def retrieve_model(model: str) -> Any:
    """One served model: 404 when it is not served, 403 when this key may not use it."""
    state = _state()
    if model not in state.served_models:
        raise ClientError(f"The model '{model}' does not exist or is not served here", status=404, param="model")
    authorize_model(g.api_key, model)
    return _model_object(model, state.created)


@bp.post("/completions")
@require_api_key
@rate_limited
def completions() -> Any:
    req = load_request(_state().completion_schema, read_json_object(request))
    return _answer(req, CompletionReply(req.params.model, include_usage=req.include_usage, logprobs=req.logprobs))


@bp.post("/chat/completions")
@require_api_key
@rate_limited
def chat_completions() -> Any:
    req = load_request(_state().chat_schema, read_json_object(request))
    return _answer(req, ChatCompletionReply(req.params.model, include_usage=req.include_usage, logprobs=req.logprobs,
                                            tool_choice=req.tool_choice, reasoning=req.reasoning))


@bp.post("/messages")
@require_api_key
@rate_limited
def messages() -> Any:
    req, _ = _as_chat(_state().messages_schema, messages_param)
    reply = MessagesReply(req.params.model, tool_choice=req.tool_choice, reasoning=req.reasoning,
                          stops=req.params.sampling.stop)
    return _answer(req, reply)


@bp.post("/responses")
@require_api_key
@rate_limited
def responses() -> Any:
    """OpenAI's Responses API, served as the chat completion it is (gateway.responses)."""
    req, echo = _as_chat(_state().responses_schema, responses_param)
    return _answer(req, ResponsesReply(req.params.model, echo, tool_choice=req.tool_choice, reasoning=req.reasoning,
                                       logprobs=req.logprobs))


@bp.post("/messages/count_tokens")
@require_api_key
@rate_limited
def count_message_tokens() -> Any:
    """Anthropic's token count: the tokens of the prompt a Messages request renders."""
    req, _ = _as_chat(_state().count_tokens_schema, messages_param)
    authorize_model(g.api_key, req.params.model)
    backend = current_app.extensions["trident"].backend
    ids = backend.tokenize(req.params.model, req.params.prompt, add_special_tokens=False, request_id=g.request_id)
    return {"input_tokens": len(ids)}


def _as_chat(schema: MessagesSchema | ResponsesSchema,
             public: Callable[[str | None], str | None]) -> tuple[OpenAIRequest, dict[str, Any]]:
    """The chat completion another API's request is (its schema builds the chat body), and what
    its reply repeats of the request (the body's ``echo``, if any); its errors, now and from the
    llm model, name that API's fields (``public``)."""
    body = load_request(schema, read_json_object(request))
    echo = body.pop("echo", {})
    try:
        req = load_request(_state().chat_schema, body)
    except ClientError as err:
        err.param = public(err.param)
        raise
    names = {name: public(field) or field for name, field in req.param_names.items()}
    return dataclasses.replace(req, param_names=names), echo


def _answer(req: OpenAIRequest, reply: CompletionReply | ChatCompletionReply | MessagesReply | ResponsesReply) -> Any:
    """Start the generation and answer it, as JSON or SSE, in ``reply``'s shapes."""
    params = req.params
    g.param_names = req.param_names
    if req.prompts:  # /v1/completions with several prompts (gateway.prompts)
        generation, done = start_prompts(params, req.prompts)
    else:
        generation, done = start_generation(params)
    if params.stream:
        admitted = reply.admitted if isinstance(reply, (MessagesReply, ResponsesReply)) else None
        return stream_response(generation, done, encode=reply, encode_error=reply.error, encode_admitted=admitted)
    prompts = len(req.prompts) or 1
    choices, finished = collect(generation, done, params.sampling.n * prompts)
    return jsonify(reply.response(best_per_prompt(choices, prompts, params.sampling.n, req.choices), finished))
