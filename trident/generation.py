"""The text-level side of one generation, independent of Triton: engine tokens in, text out.

Incremental detokenization (no broken UTF-8, no lost spaces), stop sequences matched on text
across token boundaries and held back while they might still match, token counts, and the
finish reason (trident.contract.finish_reason, the one derivation, for both engines).
"""
from __future__ import annotations

from typing import Optional, Sequence

from .contract import FINISH_STOP, TextRequest, finish_reason
from .text import IncrementalDetokenizer, StopSequenceMatcher


class TextGeneration:
    """Turns the engine's token stream into released text, a finish reason and token counts."""

    def __init__(self, tokenizer, req: TextRequest, *, prompt_tokens: int):
        self.req = req
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self._detok = IncrementalDetokenizer(tokenizer)
        self._stops = StopSequenceMatcher(req.sampling.stop)
        self.finish_reason: Optional[str] = None

    @property
    def stopped(self) -> bool:
        """A stop sequence matched: the engine request should be stopped."""
        return self._stops.matched is not None

    def push(self, token_ids: Sequence[int]) -> str:
        """New engine tokens -> text safe to hand out now."""
        if self.stopped or not len(token_ids):
            return ""
        out = []
        for token in token_ids:  # one at a time, so counting stops at the matching token
            self.completion_tokens += 1
            out.append(self._stops.push(self._detok.push([token])))
            if self.stopped:
                self.finish_reason = FINISH_STOP
                break
        return "".join(out)

    def finish(self) -> str:
        """The engine finished this request; returns the text still held back."""
        if self.stopped:
            return ""
        tail = self._stops.push(self._detok.flush())
        if not self.stopped:
            tail += self._stops.flush()
        self.finish_reason = finish_reason(stopped=self.stopped, completion_tokens=self.completion_tokens,
                                           max_new_tokens=self.req.sampling.max_new_tokens)
        return tail
