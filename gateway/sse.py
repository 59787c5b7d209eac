"""Server-sent events of ``POST /generate`` with ``"stream": true`` (shared/API.md).

The route validates the request, starts the generation and reads its FIRST event before it
returns (STYLE 4): the admission (``backend.ADMITTED``: Triton's "llm" model validated and queued
the request) or, from a backend that does not send one, the first text. Anything that fails
before that is still a proper HTTP status. The rest goes through :class:`SSEBody`, the WSGI
body: an SSE comment at once when the first event was the admission (so the status line and
headers leave while the request waits for the engine), ``event: token`` per delta, one
``event: done``, or ``event: error`` (the envelope's error object) when the generation fails
after the stream began; then the stream ends. While it waits for the next event it sends an SSE
comment (``: keep-alive``) every heartbeat interval, so idle timeouts of clients and proxies do
not fire. A client that went away is noticed by gateway.disconnect (or, failing that, on the
next write); the body then closes the generation, which cancels it on the server.
"""

from __future__ import annotations

import json
import logging
from json.encoder import encode_basestring
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

from .backend import Admitted, Event, Finished, Generation, TextDelta
from .disconnect import DisconnectWatch
from .drain import DRAIN
from .errors import ApiError, internal_error

log = logging.getLogger("trident.gateway")

HEARTBEAT = b": keep-alive\n\n"


def sse_event(name: str, data: dict[str, Any]) -> bytes:
    """One SSE event; ``json.dumps`` escapes newlines, so ``data`` is always one line."""
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode("utf-8")


_TOKEN_HEAD = b'event: token\ndata: {"text": '


def event_bytes(event: Event) -> bytes:
    if isinstance(event, TextDelta):  # the hot path: the same bytes as sse_event, without the encoder
        return _TOKEN_HEAD + encode_basestring(event.text).encode("utf-8") + b"}\n\n"
    return sse_event("done", {"finish_reason": event.finish_reason, "usage": event.usage})


def error_bytes(error: ApiError) -> bytes:
    return sse_event("error", {"error": error.to_dict()})


class _End:
    """The events ran out."""


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class EventPump:
    """For a generation that is only an iterator (a fake backend in tests): reads it on a helper
    thread into a queue and offers the ``next_events`` of a generation that has one (the Triton
    backend's reads its relay directly, gateway.triton_relay)."""

    def __init__(self, events: Iterator[Event]) -> None:
        self._queue: queue.Queue[Event | _End | _Failed] = queue.Queue()
        self._done = False
        self._thread = threading.Thread(target=self._run, args=(events,), name="trident-sse-pump", daemon=True)
        self._thread.start()

    def _run(self, events: Iterator[Event]) -> None:
        try:
            for event in events:
                self._queue.put(event)
        except BaseException as exc:  # handed to the reader, who decides
            self._queue.put(_Failed(exc))
        else:
            self._queue.put(_End())

    def next_events(self, timeout: float | None) -> list[Event] | None:
        """Every event available, waiting up to ``timeout`` for the first; None on timeout; []
        at the end; re-raises a failure (after the events before it)."""
        if self._done:
            return []
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        events: list[Event] = []
        while True:
            if isinstance(item, _Failed):
                self._done = True
                if events:
                    self._queue.put(item)  # raised on the next call, after these are sent
                    self._done = False
                    return events
                raise item.error
            if isinstance(item, _End):
                self._done = True
                return events
            events.append(item)
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return events


def event_source(generation: Generation) -> Any:
    """What has ``next_events``: the generation itself, or a pump over its iterator."""
    return generation if hasattr(generation, "next_events") else EventPump(iter(generation))


class SSEBody:
    """The iterable WSGI body of one streaming response.

    When the last event has been sent, or on ``close()`` (called by the WSGI server when the
    response ends, also after a client disconnect, and also if the body was never iterated), the
    generation is closed, which cancels it on the server if it still runs, and ``on_close`` is
    called, once.
    """

    def __init__(
        self,
        first: list[Event],
        generation: Generation,
        source: Any,
        *,
        heartbeat_interval: float,
        request_id: str,
        on_close: Callable[[], None],
        encode: Callable[[Event], bytes] = event_bytes,
        encode_error: Callable[[ApiError], bytes] = error_bytes,
        encode_admitted: Callable[[Admitted], bytes] | None = None,
        environ: dict[str, Any] | None = None,
    ) -> None:
        """``encode`` turns each text or final event into the bytes sent and ``encode_error`` a
        failure after the stream began; the defaults are ``/generate``'s events (the
        OpenAI-compatible routes pass their own, gateway.openai_replies). ``encode_admitted``
        (optional) gives the bytes sent after the admission's heartbeat (Anthropic's
        ``message_start``, gateway.anthropic). ``environ`` (the WSGI environ) lets the body
        watch the client's connection (gateway.disconnect)."""
        self._generation = generation
        self._encode = encode
        self._encode_admitted = encode_admitted
        self._encode_error = encode_error
        self._heartbeat = heartbeat_interval
        self._request_id = request_id
        self._log_extra = {"request_id": request_id}  # the body runs outside the request context
        self._on_close = on_close
        self._cleaned_up = False
        self._environ = environ
        self._watch: DisconnectWatch | None = None
        self._abort: ApiError | None = None
        self._chunks = self._run(first, source)

    def __iter__(self) -> SSEBody:
        return self

    def __next__(self) -> bytes:
        return next(self._chunks)

    def _encode_batch(self, events: list[Event]) -> tuple[bytes, bool]:
        """All events of one batch as one chunk (one socket write), and whether the last was
        the final one."""
        parts = []
        for event in events:
            if isinstance(event, Admitted):
                parts.append(HEARTBEAT)  # the status line and headers leave with it
                if self._encode_admitted is not None:
                    parts.append(self._encode_admitted(event))
            else:
                parts.append(self._encode(event))
        return b"".join(parts), bool(events) and isinstance(events[-1], Finished)

    def abort(self, error: ApiError) -> None:
        """Any thread: end the stream with ``error`` as its last event (the drain's deadline)."""
        self._abort = error
        self._generation.close()  # wakes the body; its generation ends

    def _client_gone(self) -> None:
        log.info("client went away; cancelling the generation", extra=self._log_extra)
        self._generation.close()

    def _run(self, first: list[Event], source: Any) -> Iterator[bytes]:
        try:
            DRAIN.streams.add(self)
            chunk, done = self._encode_batch(first)
            yield chunk
            if done:
                return
            if self._environ is not None:
                self._watch = DisconnectWatch.start(self._environ, self._client_gone)
            while True:
                try:
                    events = source.next_events(self._heartbeat)
                except ApiError as err:
                    log.warning("stream failed: %s %s", err.status, err.message, extra=self._log_extra)
                    yield self._encode_error(err)
                    return
                except Exception:
                    log.exception("stream failed", extra=self._log_extra)
                    yield self._encode_error(internal_error(self._request_id))
                    return
                if self._watch is not None and self._watch.gone:
                    return  # nobody to write to; the generation is closed
                if self._abort is not None:
                    yield self._encode_error(self._abort)
                    return
                if events is None:
                    yield HEARTBEAT
                elif not events:
                    log.error("generation ended without a final event", extra=self._log_extra)
                    yield self._encode_error(internal_error(self._request_id))
                    return
                else:
                    chunk, done = self._encode_batch(events)
                    yield chunk
                    if done:
                        return
        finally:  # the stream ended, or the client went away (GeneratorExit)
            self._finish()

    def _finish(self) -> None:
        if self._cleaned_up:
            return
        self._cleaned_up = True
        DRAIN.streams.discard(self)
        if self._watch is not None:
            self._watch.stop()
        try:
            self._generation.close()
        finally:
            self._on_close()

    def close(self) -> None:
        try:
            self._chunks.close()
        finally:
            self._finish()  # also when the body was never iterated
