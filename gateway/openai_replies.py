"""The bodies of the OpenAI-compatible endpoints: JSON objects, and SSE chunks for streams.

Streams are OpenAI's: ``data: <chunk>`` lines without event names, then ``data: [DONE]``, which
ends every stream, also one that failed after it began (the failure is a ``data:`` line holding
``{"error": {...}}``, the envelope's error object, which the official client raises as an
``APIError``). With ``stream_options.include_usage`` every chunk has ``"usage": null`` and one
more chunk, with empty ``choices`` and the usage, comes before ``[DONE]``. Heartbeats are SSE
comments (gateway.sse), which SSE clients skip.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from .backend import Event, Finished, TextDelta
from .errors import ApiError

DONE = b"data: [DONE]\n\n"

#: The "llm" model's finish reasons as OpenAI's.
FINISH_REASONS = {"length": "length", "stop_sequence": "stop", "eos_token": "stop"}


def finish_reason(finished: Finished) -> str:
    return FINISH_REASONS.get(finished.finish_reason, "stop")


def data_line(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode("utf-8")


def error_chunk(error: ApiError) -> bytes:
    return data_line({"error": error.to_dict()}) + DONE


class _Reply:
    """What every response and chunk of one request has in common."""

    object: str
    chunk_object: str
    id_prefix: str

    def __init__(self, model: str, *, include_usage: bool = False) -> None:
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.include_usage = include_usage

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    # -- JSON ----------------------------------------------------------------------------------

    def _choice(self, text: str, reason: str) -> dict[str, Any]:
        raise NotImplementedError

    def response(self, text: str, finished: Finished) -> dict[str, Any]:
        """The non-streaming response body."""
        return {
            **self._head(self.object),
            "choices": [self._choice(text, finish_reason(finished))],
            "usage": finished.usage,
        }

    # -- SSE -----------------------------------------------------------------------------------

    def _delta_choice(self, text: str | None, reason: str | None) -> dict[str, Any]:
        raise NotImplementedError

    def _chunk(self, choices: list[dict[str, Any]], usage: Any = None) -> bytes:
        chunk = {**self._head(self.chunk_object), "choices": choices}
        if self.include_usage:
            chunk["usage"] = usage
        return data_line(chunk)

    def __call__(self, event: Event) -> bytes:
        """The SSE bytes of one generation event (SSEBody's ``encode``)."""
        if isinstance(event, TextDelta):
            return self._chunk([self._delta_choice(event.text, None)]) if event.text else b""
        out = self._chunk([self._delta_choice(None, finish_reason(event))])
        if self.include_usage:
            out += self._chunk([], usage=event.usage)
        return out + DONE

    error = staticmethod(error_chunk)  # SSEBody's ``encode_error``


class CompletionReply(_Reply):
    """``/v1/completions``: ``text_completion`` objects, also for chunks (as OpenAI sends)."""

    object = "text_completion"
    chunk_object = "text_completion"
    id_prefix = "cmpl"

    def _choice(self, text: str, reason: str) -> dict[str, Any]:
        return {"text": text, "index": 0, "logprobs": None, "finish_reason": reason}

    def _delta_choice(self, text: str | None, reason: str | None) -> dict[str, Any]:
        return {"text": text or "", "index": 0, "logprobs": None, "finish_reason": reason}


class ChatCompletionReply(_Reply):
    """``/v1/chat/completions``: ``chat.completion`` and ``chat.completion.chunk``; the first
    chunk carries the assistant's role."""

    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def __init__(self, model: str, *, include_usage: bool = False) -> None:
        super().__init__(model, include_usage=include_usage)
        self._role_sent = False

    def _choice(self, text: str, reason: str) -> dict[str, Any]:
        return {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": reason,
        }

    def _delta_choice(self, text: str | None, reason: str | None) -> dict[str, Any]:
        delta: dict[str, Any] = {}
        if not self._role_sent:
            self._role_sent = True
            delta["role"] = "assistant"
            if text is None:
                text = ""
        if text is not None:
            delta["content"] = text
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
