"""``/v1/completions`` with an array of prompts: one generation per prompt, answered as one.

Each prompt is a generation of its own (gateway.generation.start_generation: its own in-flight
place, its own place among the key's open generations), all started at once so that the engine
runs them together. :class:`PromptsGeneration` reads them concurrently and yields their events
as they come, the choices of prompt ``i`` numbered ``i * n .. i * n + n - 1`` (OpenAI's and
vLLM's numbering), so ``collect`` and ``stream_response`` answer it as any generation:

* admission once every prompt's generation is admitted (a prompt refused then, e.g. too long for
  the context, fails the whole request with its HTTP status, before any 200);
* one final event at the end, its usage summed over the prompts;
* ``close()`` closes them all (a client that leaves cancels every prompt's generation).
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence

from flask import has_app_context

from trident.contract import TextRequest

from .backend import ADMITTED, Admitted, Event, Finished, Generation, TextDelta
from .choices import Choice
from .disconnect import gevent_active
from .generation import start_generation
from .openai_replies import best
from .telemetry import current_record, prompt_sizes


class _End:
    pass


@dataclasses.dataclass(frozen=True, slots=True)
class _Failed:
    error: BaseException


class PromptsGeneration:
    """Several generations of ``n`` choices each as one of ``n * len(generations)`` choices."""

    def __init__(self, generations: Sequence[Generation], n: int) -> None:
        self._generations = list(generations)
        self._n = n
        self._closed = False
        self._done = False
        self._error: BaseException | None = None
        self._heard: set[int] = set()  # generations admitted
        self._held: list[Event] = []  # their text until every prompt is admitted
        self._finals: dict[int, Finished] = {}
        self._prompt_ids: dict[int, tuple[int, ...]] = {}  # each prompt's ids, from its admission
        self._prompt_counts: dict[int, int] = {}  # each prompt's token count, from its admission
        self._ended = 0
        # The request's log record (taken here, in the request's context): each prompt's
        # generation records its own final event in it; the request's line gets their sum.
        self._record = current_record() if has_app_context() else None
        # One reader per generation: greenlets in the gateway's gevent workers (the Triton
        # backend's generations wait on the hub), threads elsewhere (in-process tests).
        if gevent_active():
            import gevent
            import gevent.queue

            self._queue = gevent.queue.Queue()
            for i, generation in enumerate(self._generations):
                gevent.spawn(self._read, i, generation)
        else:
            self._queue = queue.Queue()
            for i, generation in enumerate(self._generations):
                threading.Thread(target=self._read, args=(i, generation), name="trident-prompt", daemon=True).start()

    def _read(self, i: int, generation: Generation) -> None:
        try:
            for event in generation:
                self._queue.put((i, event))
        except BaseException as exc:  # handed to the reader
            self._queue.put((i, _Failed(exc)))
        else:
            self._queue.put((i, _End()))

    def next_events(self, timeout: float | None) -> list[Event] | None:
        """Every event available, waiting up to ``timeout`` for the first (None on timeout), []
        at the end; a failure is raised after the events before it (gateway.sse's protocol)."""
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        if self._done:
            return []
        deadline = None if timeout is None else time.monotonic() + timeout
        out: list[Event] = []
        while not self._done:
            try:
                if out:
                    i, item = self._queue.get_nowait()
                else:
                    wait = None if deadline is None else max(0.0, deadline - time.monotonic())
                    i, item = self._queue.get(timeout=wait)
            except queue.Empty:  # gevent.queue raises the same class
                return out or None
            try:
                out.extend(self._take(i, item))
            except BaseException as exc:
                if not out:
                    raise
                self._error = exc  # raised on the next call, after these are sent
                return out
        return out

    def __iter__(self) -> Iterator[Event]:
        while events := self.next_events(None):
            yield from events

    def _take(self, i: int, item: Event | _End | _Failed) -> list[Event]:
        """The events one reader's item releases."""
        count = len(self._generations)
        if isinstance(item, _Failed):
            if self._closed:  # the client left: how its generations ended no longer matters
                self._done = True
                return []
            self.close()  # one prompt failed: so does the request, and the others stop
            raise item.error
        if isinstance(item, _End):
            self._ended += 1
            if self._ended < count:
                return []
            self._done = True
            if self._closed or len(self._finals) < count:
                return []  # closed (the client left), or a generation ended without its final event
            finished = self._finished([self._finals[k] for k in range(count)])
            if self._record is not None:
                self._record.finished = finished
            return [finished]
        admitted_before = len(self._heard) == count
        self._heard.add(i)  # any event of a generation says it was admitted
        if isinstance(item, Admitted) and item.prompt_token_ids is not None:
            self._prompt_ids[i] = item.prompt_token_ids[0]
        if isinstance(item, Admitted) and item.prompt_tokens is not None:
            self._prompt_counts[i] = item.prompt_tokens
        if isinstance(item, Finished):
            self._finals[i] = item
        elif isinstance(item, TextDelta):
            self._held.append(dataclasses.replace(item, index=item.index + i * self._n))
        if len(self._heard) < count:
            return []
        out: list[Event] = [] if admitted_before else [self._admitted()]
        out.extend(self._held)
        self._held.clear()
        return out

    def _admitted(self) -> Admitted:
        """The admission of every prompt: with each prompt's ids and token count, when they came
        for all."""
        count = len(self._generations)
        ids, counts = self._prompt_ids, self._prompt_counts
        if len(ids) < count and len(counts) < count:
            return ADMITTED
        return Admitted(prompt_token_ids=tuple(ids[k] for k in range(count)) if len(ids) == count else None,
                        prompts_tokens=tuple(counts[k] for k in range(count)) if len(counts) == count else None)

    def _finished(self, finals: list[Finished]) -> Finished:
        ends = tuple(dataclasses.replace(end, index=end.index + i * self._n)
                     for i, final in enumerate(finals) for end in final.ends)
        cached = [f.cached_tokens for f in finals if f.cached_tokens is not None]
        ids = [f.prompt_token_ids for f in finals]
        scored = [f.prompt_logprobs for f in finals]
        return Finished(finish_reason=finals[0].finish_reason, prompt_tokens=sum(f.prompt_tokens for f in finals),
                        completion_tokens=sum(f.completion_tokens for f in finals), choices=ends,
                        cached_tokens=sum(cached) if len(cached) == len(finals) else None,
                        prompt_token_ids=tuple(i[0] for i in ids) if all(i is not None for i in ids) else None,
                        prompt_logprobs=tuple(p[0] for p in scored) if all(p is not None for p in scored) else None)

    def close(self) -> None:
        self._closed = True
        for generation in self._generations:
            generation.close()


def start_prompts(params: TextRequest, prompts: Sequence[str | tuple[int, ...]]) -> tuple[PromptsGeneration, Callable[[], None]]:
    """Start one generation per prompt (``params`` with each prompt in turn); when one cannot
    start (its key's bound, the in-flight cap, the backend), those already started are closed,
    their places given back, and the error raised."""
    started: list[tuple[Generation, Callable[[], None]]] = []
    try:
        for prompt in prompts:
            started.append(start_generation(params.with_prompt(prompt)))
    except BaseException:
        for generation, done in started:
            generation.close()
            done()
        raise

    record = current_record()
    if record is not None and record.params is not None:  # the log line: how many, all their characters or ids
        record.params = {**record.params, "prompts": len(prompts), **prompt_sizes(prompts)}

    def done() -> None:  # once, when the request is over (collect, stream_response)
        for _, release in started:
            release()

    return PromptsGeneration([generation for generation, _ in started], params.sampling.n), done


def best_per_prompt(choices: list[Choice], prompts: int, generated: int, answered: int) -> list[Choice]:
    """``best`` within each prompt's ``generated`` choices, numbered ``answered`` to a prompt."""
    out: list[Choice] = []
    for i in range(prompts):
        own = [Choice(c.index - i * generated, c.parts, c.pieces, c.end)
               for c in choices[i * generated:(i + 1) * generated]]
        out.extend(Choice(c.index + i * answered, c.parts, c.pieces, c.end) for c in best(own, answered))
    return out
