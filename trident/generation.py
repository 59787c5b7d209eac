"""The text-level side of one generation (one choice), independent of Triton: engine tokens in,
text out.

Incremental detokenization (no broken UTF-8, no lost spaces), stop sequences matched on text
across token boundaries and held back while they might still match, token counts, and the
finish reason (trident.contract.finish_reason, the one derivation, for both engines).

With logprobs, every released piece of text comes with the tokens it is made of
(:meth:`TextGeneration.take_tokens`), so that the tokens' texts concatenate to exactly the
returned text, stream by stream and in total:

* a token's text is what the incremental detokenizer produced for it: the tokens before the
  last one of a multi-byte character get "" and the last one the whole character;
* text is released at token boundaries only (a token whose text is partly held back, as the
  possible start of a stop sequence, waits with all of its text);
* a stop sequence cuts the text: the token it starts in keeps only its text before the stop,
  tokens after that are not returned (as the text after the stop is not).
"""
from __future__ import annotations

import dataclasses
from collections import deque
from typing import Callable, Optional, Sequence

from .contract import FINISH_EOS, FINISH_STOP, TextRequest, finish_reason
from .text import IncrementalDetokenizer, StopSequenceMatcher


@dataclasses.dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One returned token: its part of the text, id, log-probability, and the alternatives
    (text, log-probability), best first, when asked for, with their ids (``top_ids``)."""

    text: str
    id: int
    logprob: float
    top: tuple[tuple[str, float], ...] = ()
    top_ids: tuple[int, ...] = ()


@dataclasses.dataclass(slots=True)
class _Pending:
    start: int  # character offsets of its text in everything generated
    end: int
    id: int
    logprob: float
    top: tuple[tuple[str, float], ...]
    top_ids: tuple[int, ...]


class TextGeneration:
    """Turns one choice's token stream into released text, a finish reason and token counts."""

    def __init__(self, tokenizer, req: TextRequest, *, prompt_tokens: int, index: int = 0,
                 token_text: Optional[Callable[[int], str]] = None, end_ids: frozenset[int] = frozenset()):
        self.req = req
        self.index = index
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.cached_tokens: Optional[int] = None  # of prompt_tokens, from the engine's prefix cache (when reported)
        self._detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=req.sampling.skip_special_tokens)
        self._include_stop = req.sampling.include_stop_str_in_output
        self._stops = StopSequenceMatcher(req.sampling.stop, include=self._include_stop)
        self._stop_ids = frozenset(req.sampling.stop_token_ids)
        self._stop_token: Optional[int] = None  # the stop token id that ended this choice
        # The model's other end tokens (generation_config.json's, llm_service.model_end_ids): they
        # end the choice as the engine's end id does, without text or a count, finish eos_token,
        # and like it not before min_tokens tokens, and never with ignore_eos (the engine bans its
        # end id then, SamplingParams.engine_min_tokens). Before min_tokens tokens a stop_token_ids
        # token does not end the choice either (it is an ordinary token, as an end token of the
        # model is), and no stop sequence is matched in the text of those tokens, as in vLLM;
        # ignore_eos keeps both.
        self._end_ids = end_ids
        self._min_tokens = req.sampling.min_tokens
        self._ignore_eos = req.sampling.ignore_eos
        self._model_ended: Optional[int] = None  # the model's other end token that ended this choice
        self.finish_reason: Optional[str] = None
        self.ended = False  # its final response was sent (llm_service)
        # logprobs bookkeeping, only when asked for
        self.logprobs = req.sampling.logprobs is not None
        self._token_text = token_text or (lambda i: tokenizer.decode([i], skip_special_tokens=False))
        self._text = ""  # everything the detokenizer produced (before stop sequences cut it)
        self._pending: deque[_Pending] = deque()
        self._released = 0  # characters the stop matcher released
        self._sent = 0  # characters handed out with their tokens
        self._ready: list[TokenLogprob] = []
        self.cum_logprob = 0.0

    @property
    def stopped(self) -> bool:
        """A stop sequence matched, a stop token or one of the model's other end tokens came: the
        engine request (or this choice) should be stopped."""
        return self._stops.matched is not None or self._stop_token is not None or self._model_ended is not None

    @property
    def stop_reason(self) -> "str | int | None":
        """What stopped this choice (vLLM's ``stop_reason``): the stop sequence it matched, or the
        token (one of stop_token_ids, or an end token of the model's besides the engine's end id,
        which vLLM counts among the stop tokens); None when the engine's end id or the token
        budget ended it."""
        if self._stops.matched is not None:
            return self._stops.matched
        return self._stop_token if self._stop_token is not None else self._model_ended

    def _ends_model(self, token: int) -> bool:
        """``token`` (not yet counted) is one of the model's other end tokens, allowed here."""
        return token in self._end_ids and not self._ignore_eos and self.completion_tokens >= self._min_tokens

    @property
    def _past_min_tokens(self) -> bool:
        """The last counted token may end the choice (stop token, stop sequence in its text)."""
        return self.completion_tokens > self._min_tokens

    def _end_of_model(self, token: int) -> str:
        """One of the model's other end tokens came: the choice ends as at the engine's end id."""
        released = self._release_held()
        self._model_ended = token
        self.finish_reason = FINISH_EOS
        return released

    def push(self, token_ids: Sequence[int], log_probs: Optional[Sequence[float]] = None,
             top_ids: Optional[Sequence[Sequence[int]]] = None,
             top_log_probs: Optional[Sequence[Sequence[float]]] = None) -> str:
        """New engine tokens (with their log-probabilities when asked for) -> text safe to hand
        out now."""
        if self.stopped or not len(token_ids):
            return ""
        if self.logprobs:
            return self._push_aligned(token_ids, log_probs, top_ids, top_log_probs)
        out = []
        for token in token_ids:  # one at a time, so counting stops at the matching token
            if self._ends_model(token):
                out.append(self._end_of_model(token))
                break
            self.completion_tokens += 1
            free = self._past_min_tokens
            ends = free and token in self._stop_ids
            if not ends or self._include_stop:  # a stop token left out adds no text
                out.append(self._stops.push(self._detok.push([token]), match=free))
            if ends and not self.stopped:  # (a stop sequence its text completed came first)
                out.append(self._release_held(stop_token=token))
            if self.stopped:
                self.finish_reason = FINISH_STOP
                break
        return "".join(out)

    def finish(self) -> str:
        """The engine finished this choice; returns the text still held back."""
        if self.stopped:
            return ""
        return self._release_held()

    def _release_held(self, *, stop_token: Optional[int] = None) -> str:
        """The end of this choice's text (the engine finished it, or ``stop_token`` came): what
        the detokenizer and the stop matcher held back is released, up to a stop sequence it
        completes, and the finish reason set."""
        tail = self._detok.flush()
        if self.logprobs and tail:
            self._extend_last(tail)
        released = self._stops.push(tail, match=self._past_min_tokens)
        if not self.stopped:
            released += self._stops.flush()
        self._stop_token = stop_token
        self.finish_reason = finish_reason(stopped=self.stopped, completion_tokens=self.completion_tokens,
                                           max_new_tokens=self.req.sampling.max_new_tokens)
        if not self.logprobs:
            return released
        self._released += len(released)
        return self._hand_out(final=True)

    def take_tokens(self) -> list[TokenLogprob]:
        """The tokens of the text returned since the last call (empty without logprobs)."""
        ready, self._ready = self._ready, []
        return ready

    # -- logprobs: text released with its tokens ----------------------------------------------------

    def _push_aligned(self, token_ids, log_probs, top_ids, top_log_probs) -> str:
        for k, token in enumerate(token_ids):
            if self._ends_model(token):
                return self._end_of_model(token)
            self.completion_tokens += 1
            free = self._past_min_tokens
            ends = free and token in self._stop_ids
            if not ends or self._include_stop:  # a stop token left out is not returned, nor its text
                piece = self._detok.push([token])
                start = len(self._text)
                self._text += piece
                top, alternatives = (), ()
                if top_ids is not None and top_log_probs is not None:
                    alternatives = tuple(int(t) for t in top_ids[k])
                    top = tuple((self._token_text(t), float(lp)) for t, lp in zip(alternatives, top_log_probs[k]))
                logprob = float(log_probs[k]) if log_probs is not None and k < len(log_probs) else float("nan")
                self._pending.append(_Pending(start, len(self._text), int(token), logprob, top, alternatives[:len(top)]))
                self._released += len(self._stops.push(piece, match=free))
            if ends and not self.stopped:
                return self._release_held(stop_token=token)
            if self.stopped:
                self.finish_reason = FINISH_STOP
                return self._hand_out(final=True)
        return self._hand_out(final=False)

    def _extend_last(self, tail: str) -> None:
        """Text the detokenizer only gave up at the end belongs to the last token(s)."""
        self._text += tail
        if self._pending:
            self._pending[-1].end = len(self._text)

    def _hand_out(self, *, final: bool) -> str:
        """Release the text up to the last whole token the stop matcher let go (at the end: all
        of it, the token a stop sequence starts in cut at the stop)."""
        limit = self._released
        held_bytes = self._detok.pending and not final
        out_end = self._sent
        while self._pending:
            tok = self._pending[0]
            if tok.end > limit:
                if final and tok.start < limit:  # a stop sequence starts inside this token
                    tok.end = limit
                else:
                    break
            if held_bytes and tok.start == tok.end == len(self._text):
                break  # its bytes may still become a character: it waits for it
            self._pending.popleft()
            self._ready.append(TokenLogprob(self._text[tok.start:tok.end], tok.id, tok.logprob, tok.top, tok.top_ids))
            self.cum_logprob += tok.logprob
            out_end = tok.end
        if final:
            self._pending.clear()  # after a stop: never returned
        text = self._text[self._sent:out_end]
        self._sent = out_end
        return text


def prompt_tokens(tokenizer, ids: Sequence[int], log_probs: Sequence[float],
                  top_ids: Optional[Sequence[Sequence[int]]] = None,
                  top_log_probs: Optional[Sequence[Sequence[float]]] = None, *,
                  token_text: Optional[Callable[[int], str]] = None) -> list[TokenLogprob]:
    """The prompt's tokens as echo returns them: each with its part of the prompt's text
    (special tokens included; the parts concatenate to the decoded prompt), its
    log-probability (NaN for the first token, which has none) and its alternatives (an id
    below 0 is none)."""
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=False)
    text_of = token_text or (lambda i: tokenizer.decode([i], skip_special_tokens=False))
    out: list[TokenLogprob] = []
    for k, token in enumerate(ids):
        top: tuple[tuple[str, float], ...] = ()
        alternatives: tuple[int, ...] = ()
        if top_ids is not None and top_log_probs is not None:
            kept = [(int(t), float(lp)) for t, lp in zip(top_ids[k], top_log_probs[k]) if t >= 0]
            top, alternatives = tuple((text_of(t), lp) for t, lp in kept), tuple(t for t, _ in kept)
        logprob = float(log_probs[k]) if k < len(log_probs) else float("nan")
        out.append(TokenLogprob(detok.push([token]), int(token), logprob, top, alternatives))
    tail = detok.flush()
    if tail and out:
        out[-1] = dataclasses.replace(out[-1], text=out[-1].text + tail)
    return out
