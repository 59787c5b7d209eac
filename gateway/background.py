"""Background responses: OpenAI's ``"background": true`` on ``POST /v1/responses``, as vLLM
offers it. The generation outlives the HTTP request; the client polls the stored response.

* The request is checked and admitted as any generation: its 4xx, 429 and 503 are its answer,
  and so are the llm model's errors before it takes the request (a prompt too long for the
  context). Then it is answered at once with the response object, ``status`` ``queued``, which
  is stored (a store is required: RESPONSES_STORE, gateway.response_store).
* The generation runs on in this worker process (:class:`BackgroundRun`), holding its in-flight
  place and its key's concurrency place as a connected client's would. The stored response is
  ``in_progress`` from its first token, then ``completed`` or ``incomplete`` with its output and
  usage, or ``failed`` with ``error`` (``code``: the error's type, ``message``).
* ``POST /v1/responses/{id}/cancel``, through any gateway sharing the store, makes a ``queued``
  or ``in_progress`` response ``cancelled`` and answers it; the run sees that within
  :data:`POLL_SECONDS` (at once in its own process) and cancels the generation in the engine.
  Cancelling a cancelled response answers it again; a finished one is a 400. ``DELETE`` of a
  running response cancels its generation too.
* The record only ever leaves ``queued`` / ``in_progress`` once: the run's result and a cancel
  are written with :meth:`ResponseStore.update`, which changes a record only from what its
  caller read, so neither overwrites the other.
* A run renews a lease in the store every :data:`POLL_SECONDS`; a response still ``queued`` or
  ``in_progress`` whose lease lapsed (:data:`LEASE_SECONDS`: its worker process was killed, or
  crashed), and stayed lapsed :data:`ORPHAN_GRACE` seconds after a read first found it so, is
  ``failed`` when it is next read, instead of staying in progress until it expires. The grace
  keeps a store outage longer than the lease from failing runs that are alive.
* On SIGTERM, runs go on for the drain's time, as open streams do (gateway.drain); then each is
  ``failed`` ("the server is shutting down") and the worker exits (gateway.worker waits for
  them).
* With ``"stream": true`` the run also encodes the Responses stream's events and keeps them in
  the store (ResponseStore.append_events), the last (``response.completed``,
  ``response.incomplete`` or ``response.failed``) once the stored response has ended. The
  request is answered with those events as they come (:class:`Follower`), and so is
  ``GET /v1/responses/{id}?stream=true&starting_after=N`` through any gateway sharing the store,
  from the event after ``N``: a client whose connection dropped resumes where it was, and its
  leaving does not end the generation (a cancel does). A follower's stream ends with the
  response's last event; a cancelled (or deleted) response's just ends.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from . import metrics
from .backend import Event, Finished, TextDelta
from .choices import gather
from .disconnect import DisconnectWatch, gevent_active, new_event
from .drain import DRAIN
from .errors import ApiError, internal_error, store_unreachable_errors, unavailable
from .response_store import ResponseStore
from .responses import ResponsesReply
from .sse import HEARTBEAT, sse_event
from .telemetry import RequestRecord

log = logging.getLogger("trident.gateway")

#: seconds between a run's looks at its record (cancelled, deleted) and renewals of its lease
POLL_SECONDS = 1.0
#: how long a run's lease lasts without renewal
LEASE_SECONDS = 6.0
#: how long after a look first found a run's lease lapsed it is taken for dead, if its lease is
#: still lapsed then: a run alive through a store outage (which its lease did not outlast)
#: renews within a poll and a store timeout or two of the store's return
ORPHAN_GRACE = 6.0
#: how long a run whose generation ended tries to store its end while the store cannot be reached
END_RETRY_SECONDS = 30.0
#: the statuses of a response whose generation has not ended
ACTIVE = ("queued", "in_progress")
#: the error of a response whose run's lease lapsed
ORPHANED = {"code": "server_error",
            "message": "The gateway process running this background response stopped before it finished; "
                       "create it again"}

#: this process's runs, by response id (they hold themselves here while they run)
RUNS: dict[str, BackgroundRun] = {}


class BackgroundRun:
    """One background response's generation, from its first events to its stored end."""

    def __init__(self, *, store: ResponseStore, owner: str, reply: ResponsesReply, items: list[dict[str, Any]],
                 generation: Any, source: Any, first: list[Event], n: int, done: Callable[[], None],
                 request_id: str, record: RequestRecord | None, stream: ResponsesReply | None = None,
                 kept: int = 0) -> None:
        """``stream``: the encoder of the stream's events, kept in the store (its first ``kept``
        already are)."""
        self.response_id = reply.id
        self._store, self._owner, self._reply, self._items = store, owner, reply, items
        self._generation, self._source, self._first, self._n = generation, source, first, n
        self._done, self._record = done, record
        self._stream = stream
        self._kept = kept  # events kept so far (the first held back's sequence number)
        self._held: list[bytes] = []  # events the store could not take yet, in order: sent again first
        self._last = b""  # the stream's last events: kept once the stored response has ended
        self._log_extra = {"request_id": request_id}
        self._abort: ApiError | None = None
        self._stopped = False  # cancelled or deleted: nothing is written
        self._started = False  # a token came: in_progress written (or tried again at the next look)
        self._released = False  # the generation closed, its places given back
        self.ended: Any = None  # set when the run is over (an Event of the hub or of threading)

    def start(self) -> None:
        RUNS[self.response_id] = self
        DRAIN.streams.add(self)
        self.ended = new_event()
        if gevent_active():  # the worker's hub: its sockets and the store's pooled connections are its
            import gevent

            gevent.spawn(self._run)
        else:
            threading.Thread(target=self._run, name=f"background-{self.response_id}", daemon=True).start()

    def abort(self, error: ApiError) -> None:
        """Any thread: end the generation; the response fails with ``error`` (the drain's end)."""
        self._abort = error
        self._generation.close()

    def stop(self) -> None:
        """Any thread: the response was cancelled (or deleted): end the generation, write nothing."""
        self._stopped = True
        self._generation.close()

    def _run(self) -> None:
        outcome = "cancelled"
        try:
            try:
                choices, finished = gather(self._events(), self._n)
            except ApiError as err:
                log.warning("background response %s failed: %s %s", self.response_id, err.status, err.message,
                            extra=self._log_extra)
                outcome = err.type
                self._end(self._reply.failed(err))
                return
            if self._abort is not None:
                outcome = self._abort.type
                self._end(self._reply.failed(self._abort))
            elif finished is not None:
                outcome = finished.finish_reason
                streamed = self._stream.final if self._stream is not None else None  # its items' ids too
                self._end(streamed if streamed is not None else self._reply.response(choices, finished))
            elif not self._stopped:
                log.error("generation ended without a final event", extra=self._log_extra)
                outcome = "server_error"
                self._end(self._reply.failed(internal_error(self._log_extra["request_id"])))
        except Exception:  # a bug: the response says it failed (not, later, that its process died)
            log.exception("background response %s failed", self.response_id, extra=self._log_extra)
            outcome = "server_error"
            self._end(self._reply.failed(internal_error(self._log_extra["request_id"])))
        finally:
            RUNS.pop(self.response_id, None)
            DRAIN.streams.discard(self)
            try:
                self._release()
            finally:
                if self._record is not None:
                    if self._record.finished is None and self._record.error is None:
                        self._record.error = outcome if outcome != "cancelled" else None
                    self._record.close()
                self.ended.set()

    def _events(self) -> Iterator[Event]:
        """The generation's events; between batches, at most every POLL_SECONDS, the lease is
        renewed and the record looked at: gone or cancelled, the events end there."""
        events: list[Event] | None = self._first
        next_look = time.monotonic() + POLL_SECONDS
        while True:
            if events and self._stream is not None:
                self._encode(events)
            if events:
                for event in events:
                    if isinstance(event, TextDelta) and not self._started:
                        self._started = True
                        self._set_in_progress()
                    yield event
                if isinstance(events[-1], Finished):
                    return
            elif events is not None:  # [] : the generation ended (closed, or without its final event)
                return
            if self._abort is not None or self._stopped:
                return
            now = time.monotonic()
            if now >= next_look:
                if not self._wanted():
                    self.stop()
                    return
                next_look = now + POLL_SECONDS
            events = self._source.next_events(max(0.0, next_look - now))

    def _encode(self, events: list[Event]) -> None:
        """The stream's events of a batch, kept; the end's held back for :meth:`_end`."""
        chunk = b"".join(self._stream(event) for event in events if isinstance(event, (TextDelta, Finished)))
        if isinstance(events[-1], Finished):
            self._last = chunk
        else:
            self.keep(chunk)

    def keep(self, chunk: bytes) -> bool:
        """Keep SSE events in the store, numbered on. Those it cannot take (unreachable) are held
        and sent again, first, with the next ones: a follower waits for them (or, at a store it
        cannot read, ends with an error to resume after) and never reads past a gap. Whether
        none is held now."""
        events = split_events(chunk)
        held = self._held
        if not held and not events:
            return True
        held += events
        try:
            self._store.append_events(self.response_id, self._kept, held)
        except Exception as exc:
            if len(held) == len(events):  # once an outage
                log.warning("background response %s: the store did not take its stream's events (%s); they "
                            "are held and sent again with the next", self.response_id, exc, extra=self._log_extra)
            return False
        if len(held) > len(events):
            log.info("background response %s: the store took the %d stream event(s) held back", self.response_id,
                     len(held) - len(events), extra=self._log_extra)
        self._kept += len(held)
        held.clear()
        return True

    def _wanted(self) -> bool:
        """Renew the lease; whether the response is still stored and neither cancelled nor ended.
        A store that cannot be reached is taken as yes: the run goes on."""
        try:
            self._store.renew_run(self.response_id, LEASE_SECONDS)
            record = self._store.get(self._owner, self.response_id)
        except Exception as exc:
            log.warning("background response %s: the store is unreachable (%s); it runs on", self.response_id, exc,
                        extra=self._log_extra)
            return True
        if record is not None and self._started and record["response"]["status"] == "queued":
            self._set_in_progress()  # its first try met a store that could not be reached
        return record is not None and record["response"]["status"] in ACTIVE

    def _set_in_progress(self) -> None:
        try:
            _moved(self._store, self._owner, self.response_id, lambda r: {**r, "status": "in_progress"},
                   since=("queued",))
        except Exception as exc:  # the end is written later; in_progress is a courtesy
            log.warning("background response %s: could not mark it in progress: %s", self.response_id, exc,
                        extra=self._log_extra)

    def _release(self) -> None:
        """Once: the generation closed, its in-flight and key places given back."""
        if not self._released:
            self._released = True
            try:
                self._generation.close()
            finally:
                self._done()

    def _end(self, response: dict[str, Any]) -> None:
        """Store the finished response, unless it was cancelled or deleted meanwhile, then keep its
        stream's last events. The generation is over: its places are given back first. A store
        that cannot be reached (a Redis restart, a failover) is tried again every POLL_SECONDS for
        up to END_RETRY_SECONDS, the run's lease renewed with each try, so that the response is
        not lost to an outage at its end (nor taken meanwhile for one whose process died)."""
        self._release()
        deadline = time.monotonic() + END_RETRY_SECONDS
        for attempt in itertools.count():
            try:
                stored = _moved(self._store, self._owner, self.response_id, lambda _: response)
                break
            except Exception as exc:
                if time.monotonic() + POLL_SECONDS > deadline:
                    log.warning("could not store background response %s: %s", self.response_id, exc,
                                extra=self._log_extra)
                    metrics.STORED_RESPONSES.labels(outcome="failed").inc()
                    return
                if attempt == 0:
                    log.warning("background response %s ended, and the store is unreachable (%s): tried again "
                                "every %g s for up to %g s", self.response_id, exc, POLL_SECONDS, END_RETRY_SECONDS,
                                extra=self._log_extra)
            time.sleep(POLL_SECONDS)
            try:
                self._store.renew_run(self.response_id, LEASE_SECONDS)
            except Exception:
                pass  # the next try says it
        if stored is not None and stored["response"] is response:
            metrics.STORED_RESPONSES.labels(outcome="stored").inc()
            if self._stream is not None:  # now a follower that reads the end finds the response ended
                last = self._stream.failed_event(response) if response["status"] == "failed" else self._last
                while not self.keep(last) and time.monotonic() + POLL_SECONDS <= deadline:
                    last = b""
                    time.sleep(POLL_SECONDS)


def _moved(store: ResponseStore, owner: str, response_id: str, change: Callable[[dict[str, Any]], dict[str, Any]],
           *, since: tuple[str, ...] = ACTIVE) -> dict[str, Any] | None:
    """Atomically (ResponseStore.update): the stored response becomes ``change(response)`` if
    its status is one of ``since``. The record as it now stands; None when it is gone."""
    def moved(record: dict[str, Any]) -> dict[str, Any] | None:
        if record["response"]["status"] not in since:
            return None
        return {**record, "response": change(record["response"])}

    return store.update(owner, response_id, moved)


def settled(store: ResponseStore, owner: str, response_id: str, record: dict[str, Any]) -> dict[str, Any] | None:
    """The record as it stands: one still queued or in progress whose run's lease lapsed, and was
    still lapsed ORPHAN_GRACE seconds after a look first found it so, is failed (and stored so).
    None when it is gone."""
    if record["response"]["status"] not in ACTIVE or not store.run_lapsed(response_id, ORPHAN_GRACE):
        return record
    return _moved(store, owner, response_id, lambda r: {**r, "status": "failed", "error": dict(ORPHANED)})


def cancel(store: ResponseStore, owner: str, response_id: str) -> dict[str, Any] | None:
    """Cancel a queued or in-progress response: its record as it now stands (``cancelled``, or
    the status it already had), None when there is none."""
    record = _moved(store, owner, response_id, lambda r: {**r, "status": "cancelled"})
    if record is not None and record["response"]["status"] == "cancelled":
        stop_here(response_id)
    return record


def split_events(chunk: bytes) -> list[bytes]:
    """SSE events one by one (a JSON data line has no blank line in it)."""
    return [event + b"\n\n" for event in chunk.split(b"\n\n") if event]


#: the events that end a stream
_LAST = tuple(f"event: {name}\n".encode() for name in ("response.completed", "response.incomplete",
                                                         "response.failed"))


class Follower:
    """The SSE body of a client following a streamed background response's kept events: those
    numbered after ``after``, then each as the run keeps it, until the last. While none comes it
    sends a heartbeat every ``heartbeat_interval``, and at most every POLL_SECONDS it looks at the
    record: a response that ended without its last event kept (its process died: failed) gets it
    from the record; a cancelled or deleted one's stream ends. The client's leaving ends only
    this stream."""

    def __init__(self, store: ResponseStore, owner: str, response_id: str, after: int, *,
                 heartbeat_interval: float, request_id: str, environ: dict[str, Any] | None) -> None:
        self._store, self._owner, self.response_id = store, owner, response_id
        self._heartbeat, self._environ = heartbeat_interval, environ
        self._log_extra = {"request_id": request_id}
        self._abort: ApiError | None = None
        self._gone = False
        self._watch: DisconnectWatch | None = None
        self._chunks = self._run(after)

    def __iter__(self) -> Follower:
        return self

    def __next__(self) -> bytes:
        return next(self._chunks)

    def abort(self, error: ApiError) -> None:
        """The drain's deadline: the stream ends with ``error`` (the client resumes elsewhere)."""
        self._abort = error

    def _client_gone(self) -> None:
        self._gone = True

    def _run(self, after: int) -> Iterator[bytes]:
        DRAIN.streams.add(self)
        if self._environ is not None:
            self._watch = DisconnectWatch.start(self._environ, self._client_gone)
        try:
            quiet = time.monotonic()
            while not self._gone:
                if self._abort is not None:
                    yield self._error(self._abort, after)
                    return
                try:
                    events = self._store.read_events(self.response_id, after, POLL_SECONDS) or self._ended(after)
                except store_unreachable_errors() as exc:
                    log.warning("background response %s: the store is unreachable (%s); its stream ends",
                                self.response_id, exc, extra=self._log_extra)
                    yield self._error(unavailable("The response store is unreachable; resume the stream shortly",
                                                  1), after)
                    return
                if events is None:  # it runs on, nothing new
                    if time.monotonic() - quiet >= self._heartbeat:
                        quiet = time.monotonic()
                        yield HEARTBEAT
                    continue
                if not events:
                    return
                after, quiet = events[-1][0], time.monotonic()
                yield b"".join(event for _, event in events)
                if events[-1][1].startswith(_LAST):
                    return
        finally:
            self._finish()

    @staticmethod
    def _error(error: ApiError, after: int) -> bytes:
        """An error event that ends the stream, numbered as the last event sent: resuming after it
        loses none."""
        return sse_event("error", {"type": "error", "sequence_number": max(after, 0), "code": error.type,
                                   "message": error.message, "param": None})

    def _ended(self, after: int) -> list[tuple[int, bytes]] | None:
        """None while the response runs; else its events left to send (none: the stream ends)."""
        record = self._store.get(self._owner, self.response_id)
        record = None if record is None else settled(self._store, self._owner, self.response_id, record)
        if record is not None and record["response"]["status"] in ACTIVE:
            return None
        if record is None or record["response"]["status"] == "cancelled":
            return self._store.read_events(self.response_id, after, 0)
        events = self._store.read_events(self.response_id, after, POLL_SECONDS)  # its run keeps its end next
        if events and events[-1][1].startswith(_LAST):
            return events
        last = self._store.last_event(self.response_id)
        if last is not None and last[1].startswith(_LAST):  # the client asked for events after the end
            return events
        response = record["response"]  # ended, its last event not kept: its process died (or the store failed it)
        name = {"completed": "response.completed", "incomplete": "response.incomplete"}.get(response["status"],
                                                                                           "response.failed")
        number = max(after, last[0] if last is not None else -1) + 1
        log.info("background response %s ended without its last stream event; sent from the record",
                 self.response_id, extra=self._log_extra)
        return [*events, (number, sse_event(name, {"type": name, "sequence_number": number, "response": response}))]

    def _finish(self) -> None:
        DRAIN.streams.discard(self)
        if self._watch is not None:
            self._watch.stop()
            self._watch = None

    def close(self) -> None:
        try:
            self._chunks.close()
        finally:
            self._finish()


def stop_here(response_id: str) -> None:
    """End the response's generation now if this process runs it (a cancel or a delete); the
    run of another process sees its record at its next look."""
    run = RUNS.get(response_id)
    if run is not None:
        run.stop()


__all__ = ["ACTIVE", "BackgroundRun", "END_RETRY_SECONDS", "Follower", "LEASE_SECONDS", "ORPHAN_GRACE", "ORPHANED",
           "POLL_SECONDS", "RUNS", "cancel", "settled", "split_events", "stop_here"]
