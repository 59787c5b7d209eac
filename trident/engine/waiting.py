"""The engine's waiting queue: requests in the order they are admitted to the batch.

Ordered by priority (vLLM's: the lower value first; 0 by default), then by arrival: with every
priority 0, first come, first served. TensorRT-LLM's executor keeps its queue the same way
(sorted by priority, in arrival order among equals). A request only waits here for a slot (or
for its prompt's turn at the prefill budget); one admitted is never preempted for a later one of
a higher priority, as in vLLM's and TensorRT-LLM's schedulers unless they run out of KV memory,
which the CPU engine's slots cannot.
"""
from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator

from .sequence import Sequence


class WaitingQueue:
    """A list kept sorted by (priority, arrival); not thread-safe (the engine holds its lock).
    Sized by max_queue_size (a few thousand at most), so a sorted insert is cheap."""

    def __init__(self) -> None:
        self._items: list[tuple[int, int, Sequence]] = []
        self._arrivals = itertools.count()

    def append(self, seq: Sequence) -> None:
        bisect.insort(self._items, (seq.request.priority, next(self._arrivals), seq), key=lambda item: item[:2])

    def popleft(self) -> Sequence:
        return self._items.pop(0)[2]

    def discard(self, seq: Sequence) -> None:
        """Take ``seq`` out of the queue if it waits there (a cancelled request)."""
        for i, item in enumerate(self._items):
            if item[2] is seq:
                del self._items[i]
                return

    def clear(self) -> list[Sequence]:
        """Empty the queue; returns what it held, in order."""
        items, self._items = self._items, []
        return [item[2] for item in items]

    def __getitem__(self, index: int) -> Sequence:
        return self._items[index][2]

    def __iter__(self) -> Iterator[Sequence]:
        return (item[2] for item in self._items)

    def __len__(self) -> int:
        return len(self._items)
