"""Choices and their log-probabilities in the shapes clients read (issue 15), shared by
``/generate`` (gateway.routes, gateway.generate_events) and ``/v1/*`` (gateway.openai_replies).

A generation with ``n`` > 1 yields text deltas tagged with their choice's ``index``; with
``logprobs`` each delta carries its tokens (gateway.backend.TokenLogprobs), whose texts
concatenate to the delta's text, so the offsets below line up with the returned text, held-back
stop sequences included.

Shapes:

* completions (``/generate``, ``/v1/completions``): OpenAI's legacy object ``{"tokens": [...],
  "token_logprobs": [...], "top_logprobs": [{token: logprob}, ...], "text_offset": [...]}``;
  ``top_logprobs[i]`` holds the ``k`` best alternatives and, as OpenAI's does, the chosen token
  (so ``logprobs: 0`` gives the chosen token alone); ``text_offset`` counts characters from the
  start of the choice's generated text.
* chat (``/v1/chat/completions``): ``{"content": [{"token", "logprob", "bytes", "top_logprobs":
  [{"token", "logprob", "bytes"}, ...]}], "refusal": null}``, ``top_logprobs`` the ``k`` best.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .backend import ChoiceEnd, Event, Finished, PromptLogprobs, TextDelta, TokenLogprobs
from .sse import sse_event


@dataclass(slots=True)
class Choice:
    """One choice of a finished, non-streaming generation."""

    index: int
    parts: list[str] = field(default_factory=list)
    pieces: list[TokenLogprobs] = field(default_factory=list)
    end: ChoiceEnd | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def finish_reason(self) -> str:
        return self.end.finish_reason if self.end is not None else "length"


def gather(events: Iterable[Event], n: int) -> tuple[list[Choice], Finished | None]:
    """Every choice's text and tokens from a generation's events, and its final event."""
    choices = [Choice(i) for i in range(n)]
    finished = None
    for event in events:
        if isinstance(event, TextDelta):
            choice = choices[event.index] if event.index < n else None
            if choice is None:
                raise ValueError(f"a text delta of choice {event.index}, but the request asked for {n}")
            choice.parts.append(event.text)
            if event.logprobs is not None:
                choice.pieces.append(event.logprobs)
        elif isinstance(event, Finished):
            finished = event
    if finished is not None:
        for end in finished.ends:
            if end.index < n:
                choices[end.index].end = end
    return choices, finished


class TextOffsets:
    """Where the next token of each choice starts in its text (streams send a piece at a time)."""

    def __init__(self) -> None:
        self._next: dict[int, int] = {}

    def take(self, index: int, tokens: tuple[str, ...]) -> list[int]:
        start = self._next.get(index, 0)
        out = []
        for token in tokens:
            out.append(start)
            start += len(token)
        self._next[index] = start
        return out


def token_id_name(token_id: int) -> str:
    """vLLM's ``return_tokens_as_token_ids`` name of a token: ``token_id:<id>``."""
    return f"token_id:{token_id}"


def _shown(piece: TokenLogprobs, as_ids: bool) -> tuple[tuple[str, ...], list[tuple[tuple[str, str, float], ...]]]:
    """A piece's tokens and alternatives ``(name, text, logprob)`` as the reply names them: by
    their texts, or (``as_ids``) by their ids' names (an alternative whose id the llm model did
    not send is left out)."""
    n = len(piece.tokens)
    top = list(piece.top) if piece.top is not None else [()] * n
    if not as_ids:
        return piece.tokens, [tuple((t, t, lp) for t, lp in row) for row in top]
    ids = piece.top_ids if piece.top_ids is not None else [()] * n
    named = [tuple((token_id_name(i), t, lp) for i, (t, lp) in zip(row_ids, row)) for row_ids, row in zip(ids, top)]
    return tuple(token_id_name(t) for t in piece.token_ids), named


def completion_logprobs(pieces: Iterable[TokenLogprobs], offsets: list[int] | None = None,
                        start: int = 0, *, as_ids: bool = False) -> dict[str, Any]:
    """OpenAI's legacy completions ``logprobs`` object of the given pieces (one choice's, in
    order). ``offsets``: the tokens' text offsets when the caller tracks them (streams), else
    they count from ``start`` (over the tokens' texts, also when ``as_ids`` names them by id)."""
    tokens: list[str] = []
    texts: list[str] = []
    token_logprobs: list[float | None] = []
    top: list[dict[str, float] | None] = []
    for piece in pieces:
        names, alternatives = _shown(piece, as_ids)
        tokens.extend(names)
        texts.extend(piece.tokens)
        for token, logprob, best_of in zip(names, piece.logprobs, alternatives):
            if logprob != logprob:  # NaN: an echoed prompt's first token, which has no log-probability
                token_logprobs.append(None)
                top.append(None)
                continue
            token_logprobs.append(logprob)
            best = {name: lp for name, _, lp in best_of}
            best.setdefault(token, logprob)  # the chosen token is always there, as OpenAI's
            top.append(best)
    if offsets is None:
        offsets = []
        for text in texts:
            offsets.append(start)
            start += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def generated_ids(pieces: Iterable[TokenLogprobs]) -> list[int]:
    """The ids of one choice's generated tokens (vLLM's ``return_token_ids``)."""
    return [token for piece in pieces for token in piece.token_ids]


#: What vLLM's prompt_logprobs show for a log-probability of -inf (JSON has no infinity)
PROMPT_LOGPROB_FLOOR = -9999.0


def prompt_logprobs_object(prompt: PromptLogprobs) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's ``prompt_logprobs`` of one prompt: null for its first token, which has none, then
    per token an object from token id to ``logprob``, ``rank`` and ``decoded_token`` (the token
    decoded alone): the prompt's token first, with its rank in the vocabulary, then the best
    alternatives, ranks 1 to k (the prompt's token keeps its place when it is one of them)."""
    tokens = prompt.tokens
    top = tokens.top or ()
    top_ids = tokens.top_ids or ()
    out: list[dict[str, dict[str, Any]] | None] = [None] if tokens.tokens else []
    for i in range(1, len(tokens.tokens)):
        entry = {str(tokens.token_ids[i]): _prompt_entry(tokens.logprobs[i], prompt.ranks[i], tokens.tokens[i])}
        if i < len(top) and i < len(top_ids):
            for rank, (token_id, (text, logprob)) in enumerate(zip(top_ids[i], top[i]), start=1):
                entry[str(token_id)] = _prompt_entry(logprob, rank, text)
        out.append(entry)
    return out


def _prompt_entry(logprob: float, rank: int, text: str) -> dict[str, Any]:
    return {"logprob": PROMPT_LOGPROB_FLOOR if logprob == float("-inf") else logprob, "rank": rank,
            "decoded_token": text}


def _utf8(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def chat_logprobs(pieces: Iterable[TokenLogprobs], *, as_ids: bool = False) -> dict[str, Any]:
    """OpenAI's chat ``logprobs`` object of the given pieces (``as_ids``: tokens named by id;
    ``bytes`` stay their texts')."""
    content = []
    for piece in pieces:
        names, alternatives = _shown(piece, as_ids)
        for token, text, logprob, best in zip(names, piece.tokens, piece.logprobs, alternatives):
            content.append({
                "token": token, "logprob": logprob, "bytes": _utf8(text),
                "top_logprobs": [{"token": name, "logprob": lp, "bytes": _utf8(t)} for name, t, lp in best],
            })
    return {"content": content, "refusal": None}


class GenerateEvents:
    """``/generate``'s SSE encoder when a request has several choices or logprobs (a plain one
    keeps gateway.sse.event_bytes): a ``token`` event names its choice (``index``, with ``n`` >
    1) and carries its tokens' ``logprobs`` (the completions shape, offsets running over the
    choice's text); ``done`` also says how each choice ended (``choices``, with ``n`` > 1)."""

    def __init__(self, n: int, logprobs: bool) -> None:
        self.n = n
        self.logprobs = logprobs
        self.offsets = TextOffsets()

    def __call__(self, event: Event) -> bytes:
        if isinstance(event, TextDelta):
            data: dict[str, Any] = {"text": event.text}
            if self.n > 1:
                data["index"] = event.index
            if self.logprobs:
                pieces = [event.logprobs] if event.logprobs is not None else []
                offsets = self.offsets.take(event.index, event.logprobs.tokens) if pieces else []
                data["logprobs"] = completion_logprobs(pieces, offsets)
            return sse_event("token", data)
        data = {"finish_reason": event.finish_reason, "usage": event.usage}
        if self.n > 1:
            data["choices"] = [{"index": end.index, "finish_reason": end.finish_reason,
                                "completion_tokens": end.completion_tokens} for end in event.ends]
        return sse_event("done", data)
