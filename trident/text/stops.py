"""Stop sequences matched on decoded text, across token boundaries.

Text is released only once it cannot be the start of a stop sequence; a match ends the
generation and nothing after it is ever released, nor the stop sequence itself unless
``include`` (vLLM's ``include_stop_str_in_output``).
"""
from __future__ import annotations

from typing import Sequence


class StopSequenceMatcher:
    def __init__(self, stop_sequences: Sequence[str] = (), *, include: bool = False):
        self._stops = [s for s in stop_sequences if s]
        self._include = include  # a matched stop sequence stays at the end of the text (vLLM's include_stop_str_in_output)
        self._longest = max((len(s) for s in self._stops), default=0)
        self._text = ""  # everything generated so far
        self._released = 0  # self._text[:_released] has been handed out
        self._floor = 0  # no stop sequence starts before this offset (min_tokens' protected text)
        self.matched: str | None = None

    def push(self, delta: str, *, match: bool = True) -> str:
        """Add generated text; return the part that is now safe to release. With ``match``
        false the text is never part of a stop sequence (the text of the first ``min_tokens``
        tokens): it is released at once, with what was held back."""
        if self.matched is not None or not delta:
            return ""
        start = max(self._floor, len(self._text) - self._longest + 1)
        self._text += delta
        if not match:
            self._floor = len(self._text)
        if not self._stops or not match:
            return self._release(len(self._text))
        hit = self._earliest_match(start)
        if hit is not None:
            return self._release(hit + (len(self.matched) if self._include and self.matched else 0))
        return self._release(len(self._text) - self._held_back())

    def flush(self) -> str:
        """Generation ended without a match: release what was held back."""
        if self.matched is not None:
            return ""
        return self._release(len(self._text))

    def _earliest_match(self, start: int) -> int | None:
        best: int | None = None
        for stop in self._stops:
            idx = self._text.find(stop, start)
            if idx != -1 and (best is None or idx < best):
                best, self.matched = idx, stop
        return best

    def _held_back(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a stop."""
        tail = self._text[max(self._floor, len(self._text) - self._longest):]
        for k in range(min(len(tail), self._longest - 1), 0, -1):
            suffix = tail[-k:]
            if any(stop.startswith(suffix) for stop in self._stops):
                return k
        return 0

    def _release(self, end: int) -> str:
        end = max(end, self._released)
        out = self._text[self._released:end]
        self._released = end
        return out
