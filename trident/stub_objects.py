"""Keeping Python objects alive past Triton 2.51's Python-backend stub, which can free them
without the GIL.

The stub that runs our models (python_backend r24.10, in the pytriton 0.7.0 wheel) destroys
C++ tensors that own NumPy arrays on threads that do not hold the GIL in two places; freeing a
Python object there races every Python thread of the process and corrupts its heap (seen as
``malloc(): unaligned fastbin chunk detected``, ``malloc_consolidate(): invalid chunk size`` and
``pybind11_object_dealloc(): Tried to deallocate unregistered instance!`` aborting the ``llm``
stub under concurrent streams). Upstream fixed it in r24.12 (PbTensor's destructor takes the GIL,
python_backend PR #390); until the wheel has that, the adapters avoid both places:

1. **A finished decoupled BLS response iterator.** When the iterator returns its final
   response it queues a cleanup message; the stub's utility thread then erases the iterator
   from its map. If the model's thread dropped its own reference first, that erase destroys the
   iterator, with every response it kept and their NumPy arrays, on the utility thread.
   :class:`Retirement` keeps each finished iterator referenced for a few seconds and lets it go
   on a Python thread, so the last reference is always dropped with the GIL. The utility thread
   handles a cleanup within milliseconds (one IPC round trip, behind any queued
   ``is_cancelled`` polls); the hold is seconds.

2. **Outputs the caller did not ask for.** ``ResponseSender.send`` releases the GIL and then
   removes (destroys) the tensors of a response that the request did not request.
   :func:`requested_only` drops them before the response is built, in Python.
"""
from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any, TypeVar

#: Seconds a finished BLS response iterator stays referenced (see the module docstring).
HOLD_SECONDS = 5.0

V = TypeVar("V")


class Retirement:
    """Objects kept for ``hold`` seconds, then released by this object's own thread (a Python
    thread: the release happens with the GIL). ``keep`` is cheap and thread-safe."""

    def __init__(self, hold: float = HOLD_SECONDS, *, clock: Callable[[], float] = time.monotonic,
                 name: str = "trident-retirement") -> None:
        self.hold = hold
        self._clock = clock
        self._items: collections.deque[tuple[float, Any]] = collections.deque()
        self._cond = threading.Condition()
        self._stopped = False
        self.released = 0  # objects let go so far (for tests and logs)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def keep(self, obj: Any) -> None:
        with self._cond:
            self._items.append((self._clock() + self.hold, obj))
            if len(self._items) == 1:
                self._cond.notify()

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._items and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    return
                wait = self._items[0][0] - self._clock()
                if wait > 0:
                    self._cond.wait(min(wait, 1.0))
                    continue
                due = []
                now = self._clock()
                while self._items and self._items[0][0] <= now:
                    due.append(self._items.popleft()[1])
            self.released += len(due)
            del due  # here: a Python thread, holding the GIL

    def stop(self) -> None:
        """Stop the thread; what is still kept is released with this object."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=5)


def requested_only(arrays: Mapping[str, V], requested: Collection[str] | None) -> dict[str, V]:
    """The arrays the request asked for (all of them when ``requested`` is None or empty: Triton
    fills a request that names no outputs with every output of the model)."""
    if not requested:
        return dict(arrays)
    return {name: value for name, value in arrays.items() if name in requested}
