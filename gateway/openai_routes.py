"""OpenAI-compatible routes: ``GET /v1/models``, ``GET /v1/models/<id>``,
``POST /v1/completions``, ``POST /v1/chat/completions`` (docs/openai.md); OpenAI's
``POST /v1/responses`` (gateway.responses) and Anthropic's ``POST /v1/messages``
(gateway.anthropic), each served as the chat completion it is; the stored responses'
``GET`` / ``DELETE /v1/responses/<id>`` and ``GET /v1/responses/<id>/input_items``
(gateway.response_store), and ``POST /v1/responses/<id>/cancel`` (gateway.background).

They share everything but the request schema and the body format with ``/generate``: the API
key (401), the key's rate limit (429, one budget across all generation routes), the checks of
the model (404, 403), the in-flight limit (503), the backend call, logs, and SSE with
heartbeats and cancel on disconnect (gateway.generation: start_generation, collect,
stream_response). Errors are the same envelope, which the official client maps to its
exception classes by status.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Flask, Response, current_app, g, jsonify, request

from trident.contract import INT32_MAX

from . import background, metrics
from .anthropic import CountTokensSchema, MessagesReply, MessagesSchema, error_body, messages_param
from .auth import authorize_model, require_api_key
from .chat_template import ChatTemplate
from .errors import ClientError, ServerError, internal_error, register_error_body
from .openai_schemas import ChatCompletionSchema, CompletionSchema, OpenAIRequest
from .openai_replies import ChatCompletionReply, CompletionReply
from .prompts import best_per_prompt, start_prompts
from .response_store import ResponseStore, make_store, reachable
from .responses import (ResponsesReply, ResponsesSchema, chat_messages, fit_conversation, output_items, public_item,
                        responses_param, with_ids)
from .ratelimit import rate_limited
from .generation import collect, start_generation, stream_response
from .json_body import read_json_object
from .schemas import load_request
from .sse import event_source
from .telemetry import adopt_request_id, defer_record

bp = Blueprint("openai", __name__, url_prefix="/v1")
log = logging.getLogger("trident.gateway")

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
    response_store: ResponseStore | None = None  # RESPONSES_STORE's (None: nothing is stored)


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
        response_store=make_store(app.config),
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
    """A model card; with vLLM's and SGLang's ``root`` and ``max_model_len`` (its context, which
    clients size their requests by), the latter left out while Triton cannot say it."""
    card = {"id": name, "object": "model", "created": created, "owned_by": OWNER, "root": name}
    try:
        card["max_model_len"] = _state().chat_schema.limits(name).max_context
    except ServerError as err:
        log.info("the model card of %s has no max_model_len: %s", name, err.message)
    return card


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
    return _answer(req, CompletionReply(req.params.model, request_id=req.request_id, include_usage=req.include_usage,
                                        logprobs=req.logprobs,
                                        tokens_as_ids=req.tokens_as_ids, token_ids=req.token_ids,
                                        per_prompt=req.choices, continuous_usage=req.continuous_usage,
                                        prompt_logprobs=req.params.sampling.prompt_logprobs is not None))


@bp.post("/chat/completions")
@require_api_key
@rate_limited
def chat_completions() -> Any:
    req = load_request(_state().chat_schema, read_json_object(request))
    return _answer(req, ChatCompletionReply(req.params.model, request_id=req.request_id,
                                            include_usage=req.include_usage, logprobs=req.logprobs,
                                            tool_choice=req.tool_choice, reasoning=req.reasoning,
                                            tokens_as_ids=req.tokens_as_ids, token_ids=req.token_ids,
                                            continuous_usage=req.continuous_usage, echo=req.echo,
                                            prompt_logprobs=req.params.sampling.prompt_logprobs is not None))


@bp.post("/messages")
@require_api_key
@rate_limited
def messages() -> Any:
    req, _ = _as_chat(_state().messages_schema, messages_param)
    reply = MessagesReply(req.params.model, tool_choice=req.tool_choice, reasoning=req.reasoning)
    return _answer(req, reply)


@bp.post("/responses")
@require_api_key
@rate_limited
def responses() -> Any:
    """OpenAI's Responses API, served as the chat completion it is (gateway.responses); stored
    and continued where the deployment keeps responses (gateway.response_store)."""
    store, context, auto = _state().response_store, [], False

    def continued(body: dict[str, Any]) -> dict[str, Any]:
        """The conversation so far: the previous response's, then this input."""
        nonlocal context, auto
        echo, items = body["echo"], body.pop("input_items")
        auto = echo["truncation"] == "auto"
        previous = echo["previous_response_id"]
        if previous is not None and store is None:
            raise ClientError("previous_response_id is not supported: this server stores no responses (RESPONSES_STORE "
                              "is not set); send the whole conversation in input", param="previous_response_id")
        if previous is not None:
            record = _stored(previous, param="previous_response_id", what="Previous response")
            items = [*record["items"], *output_items(record["response"]), *items]
            body["messages"] = chat_messages(echo["instructions"], items)
        echo["store"] = store is not None and echo["store"]
        context = with_ids(items) if echo["store"] else []
        return body

    def load(body: dict[str, Any]) -> OpenAIRequest:
        """The chat request; with truncation auto, of the conversation's last turns that fit."""
        chat_schema = _state().chat_schema
        if not auto:
            return load_request(chat_schema, body)
        backend = current_app.extensions["trident"].backend

        def count(req: OpenAIRequest) -> int:  # as the llm model tokenizes the prompt
            return len(backend.tokenize(req.params.model, req.params.prompt,
                                        add_special_tokens=req.params.add_special_tokens, request_id=g.request_id))

        return fit_conversation(body, lambda chat: load_request(chat_schema, chat), count,
                                lambda req: chat_schema.limits(req.params.model).max_context)

    req, echo = _as_chat(_state().responses_schema, responses_param, continued, load)
    if echo["background"]:
        return _background(req, echo, store, context)
    keep = None
    if echo["store"]:
        owner = _owner()

        def keep(response: dict[str, Any]) -> bool:
            try:
                store.put(owner, response["id"], {"response": response, "items": context})
            except Exception as exc:  # the reply stands; it says it was not stored
                log.warning("could not store response %s: %s", response["id"], exc)
                metrics.STORED_RESPONSES.labels(outcome="failed").inc()
                return False
            metrics.STORED_RESPONSES.labels(outcome="stored").inc()
            return True

    return _answer(req, ResponsesReply(req.params.model, echo, tool_choice=req.tool_choice, reasoning=req.reasoning,
                                       logprobs=req.logprobs, keep=keep))


def _background(req: OpenAIRequest, echo: dict[str, Any], store: ResponseStore | None,
                context: list[dict[str, Any]]) -> Any:
    """``"background": true`` (gateway.background): admitted here, answered ``queued``, run on."""
    if store is None:
        raise ClientError("background is not supported: this server stores no responses (RESPONSES_STORE is not "
                          "set), and a background response is read from the store", param="background")
    if not echo["store"]:
        raise ClientError("background responses must be stored: leave store true (or unset)", param="background")
    g.param_names = req.param_names
    if req.request_id is not None:
        adopt_request_id(req.request_id)
    reply = ResponsesReply(req.params.model, echo, tool_choice=req.tool_choice, reasoning=req.reasoning,
                           logprobs=req.logprobs)
    encoder = reply.twin() if req.params.stream else None  # the stream's events, kept in the store
    kept: list[bytes] = []
    # Streamed from the llm model (not one piece at the end): its first token marks it in progress.
    generation, done = start_generation(dataclasses.replace(req.params, stream=True))
    source = event_source(generation)
    try:
        first = None
        while first is None:  # the admission: errors before it are this request's status
            first = source.next_events(current_app.extensions["trident"].heartbeat_interval)
        if not first:
            log.error("generation ended without a final event")
            raise internal_error(g.request_id)
        queued = reply.queued()
        owner = _owner()
        stored = {"response": queued, "items": context}
        if encoder is not None:
            stored["streamed"] = True
        reachable(store.put, _retry_after(), owner, reply.id, stored)
        reachable(store.renew_run, _retry_after(), reply.id, background.LEASE_SECONDS)
        if encoder is not None:
            kept = background.split_events(encoder.admitted(first[0]))
            reachable(store.append_events, _retry_after(), reply.id, 0, kept)
    except BaseException:
        generation.close()
        done()
        raise
    record = defer_record()  # the request's log line and outcome: at the run's end
    if record is not None:
        record.status, record.key = 200, g.api_key.name
    background.BackgroundRun(store=store, owner=owner, reply=reply, items=context, generation=generation,
                             source=source, first=first, n=req.params.sampling.n, done=done,
                             request_id=g.request_id, record=record, stream=encoder, kept=len(kept)).start()
    if encoder is None:
        return queued
    return _follow(store, owner, reply.id, -1)


def _follow(store: ResponseStore, owner: str, response_id: str, after: int) -> Response:
    """The SSE response of a streamed background response's events after ``after``."""
    body = background.Follower(store, owner, response_id, after,
                               heartbeat_interval=current_app.extensions["trident"].heartbeat_interval,
                               request_id=g.request_id, environ=request.environ)
    return Response(body, status=200, mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@bp.get("/responses/<response_id>")
@require_api_key
def retrieve_response(response_id: str) -> Any:
    """A stored response, as it stands (a background one: queued, in progress, or its end); with
    ``stream=true`` a streamed background response's events, after ``starting_after``."""
    stream = request.args.get("stream", "false").lower()
    if stream not in ("true", "1", "false", "0"):
        raise ClientError(f"stream must be true or false, got {request.args['stream']!r}", param="stream")
    after = request.args.get("starting_after")
    if after is not None and not (after.isascii() and after.isdigit() and int(after) <= INT32_MAX):
        raise ClientError(f"starting_after must be a sequence number (an integer from 0 to {INT32_MAX}), got "
                          f"{after!r}", param="starting_after")
    record = _settled(response_id)
    if stream in ("false", "0"):
        return record["response"]
    if not record.get("streamed"):
        raise ClientError(f"Response {response_id!r} has no stream to follow: only a response created with "
                          "background and stream true keeps its events", param="stream")
    return _follow(_state().response_store, _owner(), response_id, -1 if after is None else int(after))


@bp.post("/responses/<response_id>/cancel")
@require_api_key
def cancel_response(response_id: str) -> Any:
    """Cancel a background response that is queued or in progress (gateway.background)."""
    _settled(response_id)  # an orphaned run's response is failed, not cancelled
    store = _state().response_store
    record = reachable(background.cancel, _retry_after(), store, _owner(), response_id)
    if record is None:
        raise _not_found(response_id, store)
    response = record["response"]
    if response["status"] == "cancelled":
        return response
    if not response.get("background"):
        raise ClientError("Cannot cancel a synchronous response.", param="response_id")
    raise ClientError(f"Cannot cancel a response that is already {response['status']}.", param="response_id")


@bp.delete("/responses/<response_id>")
@require_api_key
def delete_response(response_id: str) -> Any:
    """Forget a stored response (the ones that continued it keep their own copy); a background
    one still running is cancelled (its run sees the record gone)."""
    store = _state().response_store
    if store is None or not reachable(store.delete, _retry_after(), _owner(), response_id):
        raise _not_found(response_id, store)
    background.stop_here(response_id)
    return {"id": response_id, "object": "response", "deleted": True}


@bp.get("/responses/<response_id>/input_items")
@require_api_key
def list_input_items(response_id: str) -> Any:
    """The input items a stored response answered: the whole conversation before its output,
    ``limit`` (1-100, default 20) at a time, ``order`` desc (newest first, the default) or asc,
    ``after`` an item's id."""
    limit_text, order, after = request.args.get("limit", "20"), request.args.get("order", "desc"), request.args.get("after")
    if not limit_text.isdigit() or not 1 <= int(limit_text) <= 100:
        raise ClientError(f"limit must be an integer between 1 and 100, got {limit_text!r}", param="limit")
    if order not in ("asc", "desc"):
        raise ClientError(f"order must be asc or desc, got {order!r}", param="order")
    items = [public_item(item) for item in _stored(response_id)["items"]]
    if order == "desc":
        items.reverse()
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise ClientError(f"after names no input item of response {response_id!r}: {after!r}", param="after")
        items = items[ids.index(after) + 1:]
    page = items[:int(limit_text)]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(items) > len(page)}


def _owner() -> str:
    """Whose stored responses a request sees: its API key's."""
    key = g.get("api_key")
    return key.name if key is not None else ""


def _retry_after() -> int:
    return current_app.extensions["trident"].retry_after


def _stored(response_id: str, *, param: str = "response_id", what: str = "Response") -> dict[str, Any]:
    """The record of a stored response of this key; a 404 when there is none (or the store is off)."""
    store = _state().response_store
    record = None if store is None else reachable(store.get, _retry_after(), _owner(), response_id)
    if record is None:
        raise _not_found(response_id, store, param=param, what=what)
    return record


def _settled(response_id: str) -> dict[str, Any]:
    """A stored response's record as it stands (gateway.background.settled); a 404 when there is none."""
    record = reachable(background.settled, _retry_after(), _state().response_store, _owner(), response_id,
                       _stored(response_id))
    if record is None:
        raise _not_found(response_id, _state().response_store)
    return record


def _not_found(response_id: str, store: ResponseStore | None, *, param: str = "response_id",
               what: str = "Response") -> ClientError:
    off = "" if store is not None else " (this server stores no responses: RESPONSES_STORE is not set)"
    return ClientError(f"{what} with id {response_id!r} not found{off}", status=404, param=param)


@bp.post("/messages/count_tokens")
@require_api_key
@rate_limited
def count_message_tokens() -> Any:
    """Anthropic's token count: the tokens of the prompt a Messages request renders."""
    req, _ = _as_chat(_state().count_tokens_schema, messages_param)
    authorize_model(g.api_key, req.params.model)
    backend = current_app.extensions["trident"].backend
    ids = backend.tokenize(req.params.model, req.params.prompt, add_special_tokens=req.params.add_special_tokens,
                           request_id=g.request_id)  # as the llm model tokenizes the prompt
    return {"input_tokens": len(ids)}


def _as_chat(schema: MessagesSchema | ResponsesSchema, public: Callable[[str | None], str | None],
             adjust: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
             load: Callable[[dict[str, Any]], OpenAIRequest] | None = None) -> tuple[OpenAIRequest, dict[str, Any]]:
    """The chat completion another API's request is (its schema builds the chat body, which
    ``adjust`` may change, and ``load`` loads instead of the chat schema), and what its reply
    repeats of the request (the body's ``echo``, if any); its errors, now and from the llm model,
    name that API's fields (``public``)."""
    body = load_request(schema, read_json_object(request))
    if adjust is not None:
        body = adjust(body)
    echo = body.pop("echo", {})
    try:
        req = load_request(_state().chat_schema, body) if load is None else load(body)
    except ClientError as err:
        err.param = public(err.param)
        raise
    names = {name: public(field) or field for name, field in req.param_names.items()}
    return dataclasses.replace(req, param_names=names), echo


def _answer(req: OpenAIRequest, reply: CompletionReply | ChatCompletionReply | MessagesReply | ResponsesReply) -> Any:
    """Start the generation and answer it, as JSON or SSE, in ``reply``'s shapes."""
    params = req.params
    g.param_names = req.param_names
    if req.request_id is not None:
        adopt_request_id(req.request_id)
    if req.prompts:  # /v1/completions with several prompts (gateway.prompts)
        generation, done = start_prompts(params, req.prompts)
    else:
        generation, done = start_generation(params)
    if params.stream:
        admitted = reply.admitted  # the Messages and Responses streams start there; the others note ids
        return stream_response(generation, done, encode=reply, encode_error=reply.error, encode_admitted=admitted)
    prompts = len(req.prompts) or 1
    choices, finished = collect(generation, done, params.sampling.n * prompts)
    return jsonify(reply.response(best_per_prompt(choices, prompts, params.sampling.n, req.choices), finished))
