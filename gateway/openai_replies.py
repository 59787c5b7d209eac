"""The bodies of the OpenAI-compatible endpoints: JSON objects, and SSE chunks for streams.

Streams are OpenAI's: ``data: <chunk>`` lines without event names, then ``data: [DONE]``, which
ends every stream, also one that failed after it began (the failure is a ``data:`` line holding
``{"error": {...}}``, the envelope's error object, which the official client raises as an
``APIError``). With ``stream_options.include_usage`` every chunk has ``"usage": null`` and one
more chunk, with empty ``choices`` and the usage, comes before ``[DONE]``; with vLLM's
``continuous_usage_stats`` too, every chunk's usage is its prompt's tokens and its choice's so
far (the llm model's num_output_tokens; its finish chunk: the choice's completion_tokens). Heartbeats are SSE
comments (gateway.sse), which SSE clients skip.

Several choices (``n``) stream interleaved, each chunk naming its choice's ``index``; each
choice's last chunk (its ``finish_reason``) comes when the generation ends. Log-probabilities
follow OpenAI's shapes (gateway.choices), in every chunk for the text it carries.
"""

from __future__ import annotations

import json
import time
from typing import Any

from .backend import Admitted, ChoiceEnd, Event, Finished, PromptLogprobs, TextDelta, TokenLogprobs
from .choices import Choice, TextOffsets, chat_logprobs, completion_logprobs, generated_ids, prompt_logprobs_object
from .errors import ApiError
from .ids import new_id
from .reasoning import Reasoning, ReasoningReader, reader_for, split_reasoning
from .tool_parsers import SyntaxReader, call_reader, split_calls
from .tools import CallReader, ToolChoice, message_calls, new_call_id

DONE = b"data: [DONE]\n\n"

#: The "llm" model's finish reasons as OpenAI's.
FINISH_REASONS = {"length": "length", "stop_sequence": "stop", "eos_token": "stop"}


def finish_reason(reason: str) -> str:
    return FINISH_REASONS.get(reason, "stop")


def data_line(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode("utf-8")


def error_chunk(error: ApiError) -> bytes:
    return data_line({"error": error.to_dict()}) + DONE


def best(choices: list[Choice], n: int) -> list[Choice]:
    """``best_of``: the ``n`` choices with the highest sum of log-probabilities, best first,
    numbered again from 0; all of them, as they are, when there are no more than ``n``."""
    if len(choices) <= n:
        return choices

    def score(choice: Choice) -> float:
        end = choice.end
        return end.cum_logprob if end is not None and end.cum_logprob is not None else float("-inf")

    ranked = sorted(choices, key=score, reverse=True)[:n]
    return [Choice(i, c.parts, c.pieces, c.end) for i, c in enumerate(ranked)]


class _Reply:
    """What every response and chunk of one request has in common. ``logprobs``: the
    alternatives per token the request asked for (None: no logprobs in the reply)."""

    object: str
    chunk_object: str
    id_prefix: str

    def __init__(self, model: str, *, include_usage: bool = False, logprobs: int | None = None,
                 tokens_as_ids: bool = False, token_ids: bool = False, per_prompt: int = 1,
                 continuous_usage: bool = False, prompt_logprobs: bool = False, request_id: str | None = None) -> None:
        self.id = f"{self.id_prefix}-{request_id or new_id()}"  # vLLM's: chatcmpl-<request_id>
        self.created = int(time.time())
        self.model = model
        self.include_usage = include_usage
        self.logprobs = logprobs
        self.tokens_as_ids = tokens_as_ids  # vLLM's return_tokens_as_token_ids
        # vLLM's return_token_ids: the prompt's ids (each prompt's: ``per_prompt`` choices each)
        # and every choice's generated ids
        self.token_ids = token_ids
        self.per_prompt = per_prompt
        self._prompt_ids: tuple[tuple[int, ...], ...] | None = None
        # vLLM's prompt_logprobs (not streamed): each prompt's tokens with their log-probabilities
        self.prompt_logprobs = prompt_logprobs
        self._prompt_scores: tuple[PromptLogprobs, ...] | None = None
        self._prompt_objects: dict[int, list[dict[str, dict[str, Any]] | None]] = {}  # each prompt's, shown
        # vLLM's continuous_usage_stats: each chunk's usage, its choice's tokens so far
        self.continuous_usage = continuous_usage
        self._prompt_counts: tuple[int, ...] = ()  # each prompt's tokens (the admission says)
        self._generated: dict[int, int] = {}  # each streamed choice's tokens so far

    def admitted(self, event: Admitted) -> bytes:
        """SSEBody's ``encode_admitted``: no bytes; the prompts' ids and token counts noted for
        the chunks."""
        self._prompt_ids = event.prompt_token_ids
        if event.prompts_tokens is not None:
            self._prompt_counts = event.prompts_tokens
        elif event.prompt_tokens is not None:
            self._prompt_counts = (event.prompt_tokens,)
        return b""

    def _usage_so_far(self, index: int, completion_tokens: int | None = None) -> dict[str, int] | None:
        """A chunk's usage under continuous_usage_stats (None without): its prompt's tokens and
        its choice's so far (``completion_tokens`` at its end)."""
        if not self.continuous_usage:
            return None
        prompt = self._prompt_of(index)
        prompt_tokens = self._prompt_counts[prompt] if prompt < len(self._prompt_counts) else 0
        done = self._generated.get(index, 0) if completion_tokens is None else completion_tokens
        return {"prompt_tokens": prompt_tokens, "completion_tokens": done, "total_tokens": prompt_tokens + done}

    def _prompt_of(self, index: int) -> int:
        """Which prompt choice ``index`` answers (``per_prompt`` choices each)."""
        return index // self.per_prompt

    def _prompt_ids_of(self, index: int) -> list[int] | None:
        """The ids of the prompt of choice ``index`` (None: they did not come)."""
        prompt = self._prompt_of(index)
        if self._prompt_ids is None or prompt >= len(self._prompt_ids):
            return None
        return list(self._prompt_ids[prompt])

    def _prompt_logprobs_of(self, index: int) -> list[dict[str, dict[str, Any]] | None] | None:
        """vLLM's prompt_logprobs of the prompt of choice ``index`` (None: they did not come);
        built once per prompt, however many choices show it."""
        prompt = self._prompt_of(index)
        if self._prompt_scores is None or prompt >= len(self._prompt_scores):
            return None
        if prompt not in self._prompt_objects:
            self._prompt_objects[prompt] = prompt_logprobs_object(self._prompt_scores[prompt])
        return self._prompt_objects[prompt]

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    # -- JSON ----------------------------------------------------------------------------------

    def _choice(self, choice: Choice) -> dict[str, Any]:
        raise NotImplementedError

    def response(self, choices: list[Choice], finished: Finished) -> dict[str, Any]:
        """The non-streaming response body; usage counts every generated token (best_of's too)."""
        self._prompt_ids = finished.prompt_token_ids
        self._prompt_scores = finished.prompt_logprobs
        return {**self._head(self.object), "choices": [self._stopped(self._choice(c), c.end) for c in choices],
                "usage": finished.openai_usage}

    @staticmethod
    def _stopped(choice: dict[str, Any], end: ChoiceEnd | None) -> dict[str, Any]:
        """vLLM's ``stop_reason`` in a choice that ended: the stop sequence it matched or the stop
        token's id; null when the model's end token or max_tokens ended it."""
        choice["stop_reason"] = None if end is None else end.stop
        return choice

    # -- SSE -----------------------------------------------------------------------------------

    def _delta_choice(self, index: int, text: str | None, reason: str | None,
                      logprobs: TokenLogprobs | None = None) -> dict[str, Any] | None:
        """One choice of a chunk; None when this text has nothing to show yet."""
        raise NotImplementedError

    def _chunk(self, choices: list[dict[str, Any]], usage: Any = None, **extra: Any) -> bytes:
        chunk = {**self._head(self.chunk_object), **extra, "choices": choices}
        if self.include_usage:
            chunk["usage"] = usage
        return data_line(chunk)

    def __call__(self, event: Event) -> bytes:
        """The SSE bytes of one generation event (SSEBody's ``encode``)."""
        if isinstance(event, TextDelta):
            if event.tokens:
                self._generated[event.index] = self._generated.get(event.index, 0) + event.tokens
            if not event.text and event.logprobs is None:
                return b""
            choice = self._delta_choice(event.index, event.text, None, event.logprobs)
            return b"" if choice is None else self._chunk([choice], usage=self._usage_so_far(event.index))
        out = b"".join(self._chunk([self._stopped(self._delta_choice(end.index, None, finish_reason(end.finish_reason)),
                                                  end)],
                                   usage=self._usage_so_far(end.index, end.completion_tokens))
                       for end in event.ends)
        if self.include_usage:
            out += self._chunk([], usage=event.openai_usage)
        return out + DONE

    error = staticmethod(error_chunk)  # SSEBody's ``encode_error``


class CompletionReply(_Reply):
    """``/v1/completions``: ``text_completion`` objects, also for chunks (as OpenAI sends)."""

    object = "text_completion"
    chunk_object = "text_completion"
    id_prefix = "cmpl"

    def __init__(self, model: str, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self._offsets = TextOffsets()
        self._ids_sent: set[int] = set()  # streamed choices whose prompt ids went out (return_token_ids)

    def _choice(self, choice: Choice) -> dict[str, Any]:
        logprobs = completion_logprobs(choice.pieces, as_ids=self.tokens_as_ids) if self.logprobs is not None else None
        out = {"text": choice.text, "index": choice.index, "logprobs": logprobs,
               "finish_reason": finish_reason(choice.finish_reason)}
        if self.token_ids:
            out["prompt_token_ids"] = self._prompt_ids_of(choice.index)
            out["token_ids"] = generated_ids(choice.pieces)
        if self.prompt_logprobs:
            out["prompt_logprobs"] = self._prompt_logprobs_of(choice.index)
        return out

    def _delta_choice(self, index: int, text: str | None, reason: str | None,
                      logprobs: TokenLogprobs | None = None) -> dict[str, Any]:
        shown = None
        if self.logprobs is not None and reason is None:
            pieces = [logprobs] if logprobs is not None else []
            shown = completion_logprobs(pieces, self._offsets.take(index, logprobs.tokens) if pieces else [],
                                        as_ids=self.tokens_as_ids)
        out = {"text": text or "", "index": index, "logprobs": shown, "finish_reason": reason}
        if self.token_ids:  # vLLM's: the prompt's ids in each choice's first chunk, each chunk its own ids
            out["prompt_token_ids"] = self._first_ids(index)
            out["token_ids"] = list(logprobs.token_ids) if logprobs is not None else []
        return out

    def _first_ids(self, index: int) -> list[int] | None:
        """A stream's prompt ids for choice ``index``'s first chunk (None after it)."""
        if index in self._ids_sent:
            return None
        self._ids_sent.add(index)
        return self._prompt_ids_of(index)


class ChatCompletionReply(_Reply):
    """``/v1/chat/completions``: ``chat.completion`` and ``chat.completion.chunk``; the first
    chunk of each choice carries the assistant's role. With a forced tool call (``tool_choice``,
    gateway.tools) the text is the calls: ``content`` is null and ``tool_calls`` holds them; a
    stream sends a named function's arguments as they come (the first chunk with the call's id
    and name), and ``required``'s calls each once it is complete. With ``auto`` the text is read
    for the calls the model wrote (gateway.tool_parsers): ``content`` is the rest, each call is
    sent once complete and the finish reason is ``tool_calls`` when it called. With ``reasoning``
    the thinking is read out of the text first (gateway.reasoning): ``reasoning`` (and
    ``reasoning_content``) hold it, and only the rest is content, read for calls. With ``echo``
    (vLLM's: the text of the last message, when it has the reply's role: gateway.openai_schemas)
    each choice's content starts with it, streamed in the choice's first chunk."""

    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def __init__(self, model: str, *, tool_choice: ToolChoice | None = None, reasoning: Reasoning | None = None,
                 echo: str | None = None, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self.echo = echo
        self._role_sent: set[int] = set()
        self.tool_choice = tool_choice
        self.reasoning = reasoning
        self._thoughts: dict[int, ReasoningReader] = {}  # a stream's reasoning, per choice
        self._readers: dict[int, CallReader] = {}  # a stream's calls, per choice
        self._autos: dict[int, SyntaxReader] = {}  # the same with "auto"

    def _choice(self, choice: Choice) -> dict[str, Any]:
        reason = finish_reason(choice.finish_reason)
        text: str | None = choice.text
        thought = None
        if self.reasoning is not None and self.reasoning.thinking:
            thought, text = split_reasoning(text, self.reasoning.parser)
        if self.tool_choice is None:
            message = {"role": "assistant", "content": text}
        elif self.tool_choice.mode == "auto":
            content, calls = split_calls(self.tool_choice.parser, text, self.tool_choice.names, new_call_id,
                                         most=self._most_calls) if text is not None else (None, [])
            message = {"role": "assistant", "content": content}
            if calls:
                message["tool_calls"] = calls
                reason = _called(reason)
        else:
            message = {"role": "assistant", "content": None, "tool_calls": message_calls(self.tool_choice, choice.text)}
        if self.echo:
            message["content"] = self.echo + (message["content"] or "")
        if self.reasoning is not None and self.reasoning.include:
            message["reasoning"] = message["reasoning_content"] = thought
        out = {
            "index": choice.index,
            "message": message,
            "logprobs": chat_logprobs(choice.pieces, as_ids=self.tokens_as_ids) if self.logprobs is not None else None,
            "finish_reason": reason,
        }
        if self.token_ids:
            out["token_ids"] = generated_ids(choice.pieces)
        return out

    def _prompt_of(self, index: int) -> int:
        return 0  # one conversation, whatever the choice

    def response(self, choices: list[Choice], finished: Finished) -> dict[str, Any]:
        out = super().response(choices, finished)
        if self.token_ids:  # vLLM's: the conversation's ids beside the choices
            out["prompt_token_ids"] = self._prompt_ids_of(0)
        if self.prompt_logprobs:  # vLLM's: beside the choices too
            out["prompt_logprobs"] = self._prompt_logprobs_of(0)
        return out

    @property
    def _most_calls(self) -> int | None:
        return None if self.tool_choice is None or self.tool_choice.parallel else 1

    def _delta_choice(self, index: int, text: str | None, reason: str | None,
                      logprobs: TokenLogprobs | None = None) -> dict[str, Any] | None:
        delta: dict[str, Any] = {}
        first = index not in self._role_sent
        if first:
            self._role_sent.add(index)
            delta["role"] = "assistant"
        if self.reasoning is not None and self.reasoning.thinking:
            thought, text = self._reason(index, text, final=reason is not None)
            if thought and self.reasoning.include:
                delta["reasoning"] = delta["reasoning_content"] = thought
        if self.tool_choice is not None and self.tool_choice.mode == "auto":
            reason = self._auto_delta(delta, index, text, reason, first)
        elif self.tool_choice is not None:
            delta.update(self._call_delta(index, text, first))
        elif text is not None or first:
            delta["content"] = text or ""
        if first and self.echo:
            delta["content"] = self.echo + (delta.get("content") or "")
        if reason is None and not first and not delta and logprobs is None:
            return None  # text of a call not complete yet
        shown = None
        if self.logprobs is not None and reason is None:
            shown = chat_logprobs([logprobs] if logprobs is not None else [], as_ids=self.tokens_as_ids)
        out = {"index": index, "delta": delta, "logprobs": shown, "finish_reason": reason}
        if self.token_ids:  # vLLM's: each chunk its own ids
            out["token_ids"] = list(logprobs.token_ids) if logprobs is not None else []
        return out

    def _chunk(self, choices: list[dict[str, Any]], usage: Any = None, **extra: Any) -> bytes:
        """vLLM's return_token_ids: the conversation's ids in each choice's first chunk, the one
        with the role."""
        if self.token_ids and choices and "role" in choices[0]["delta"]:
            ids = self._prompt_ids_of(0)
            if ids is not None:
                extra["prompt_token_ids"] = ids
        return super()._chunk(choices, usage, **extra)

    def _reason(self, index: int, text: str | None, *, final: bool) -> tuple[str, str | None]:
        """A streamed choice's reasoning and content (None: none yet) in this text; at its end,
        also what was held back."""
        reader = self._thoughts.get(index)
        if reader is None:
            reader = self._thoughts[index] = reader_for(self.reasoning.parser)
        thought, content = reader.feed(text) if text else ("", "")
        if final:
            tail_thought, tail_content = reader.finish()
            thought, content = thought + tail_thought, content + tail_content
        return thought, content or None

    def _auto_delta(self, delta: dict[str, Any], index: int, text: str | None, reason: str | None,
                    first: bool) -> str | None:
        """``auto``: the content that is final and the calls completed so far go into ``delta``;
        at the choice's end, what was held back, and ``tool_calls`` as the finish reason when it
        called (and was not cut by max_tokens)."""
        reader = self._autos.get(index)
        if reader is None:
            reader = self._autos[index] = call_reader(self.tool_choice.parser, self.tool_choice.names, new_call_id,
                                                      most=self._most_calls)
        content, calls = reader.feed(text) if text else ("", [])
        if reason is not None:
            tail, more = reader.finish()
            content, calls = content + tail, calls + more
            if reader.calls:
                reason = _called(reason)
        if content or first:
            delta["content"] = content
        if calls:
            delta["tool_calls"] = calls
        return reason

    def _call_delta(self, index: int, text: str | None, first: bool) -> dict[str, Any]:
        """The ``tool_calls`` (and, first, the null ``content``) of a streamed choice."""
        reader = self._readers.get(index)
        if reader is None:
            reader = self._readers[index] = CallReader(self.tool_choice)
        delta: dict[str, Any] = {"content": None} if first else {}
        if self.tool_choice.mode == "function":
            if first:
                delta["tool_calls"] = [reader.call(self.tool_choice.name or "", text or "")]
            elif text:
                delta["tool_calls"] = [{"index": 0, "function": {"arguments": text}}]
        elif text:
            calls = reader.feed(text)
            if calls:
                delta["tool_calls"] = calls
        return delta


def _called(reason: str) -> str:
    """A choice's finish reason once the model called a function: ``tool_calls``, as OpenAI's and
    vLLM's, unless max_tokens cut it."""
    return "tool_calls" if reason == "stop" else reason
