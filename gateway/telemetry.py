"""One record per HTTP request: Prometheus metrics and one structured log line, for every route.

The app factory installs two hooks (:func:`init_app`) that count every request by endpoint and
status, time it (to the end of the stream for SSE), count rate-limit rejections (429) and write
the log line. A generation adds what only it knows through two calls, both made by
``routes.start_generation``, so every route that uses it (``/generate``, ``/v1/*``) is covered::

    note_params(params)                  # model, stream, sampling -> the log line (also on 403/503)
    generation = observe_generation(backend.generate(params, request_id=...), params)

``observe_generation`` returns a ``Generation`` that yields the same events and records, as they
pass: time to first token and inter-token latency (streams only: without streaming the "llm"
model returns the text in one piece, so both would only repeat the total latency), token counts
and how the generation ended. The in-flight gauge is kept by ``state.InFlight``.

The log line: logger ``trident.gateway.request``, message ``generation`` or ``request``, the
fields in ``record.fields``; INFO, but DEBUG for ``/healthz``, ``/readyz`` and ``/metrics``.
It is written when the response is complete (a streamed one: when its last event has been sent
or the client went away) and carries the request id, the key's *name* (never the key), model,
status, token counts and timings; the prompt and the generated text only with
``LOG_PROMPTS=true``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from flask import Flask, Response, current_app, g, request

from . import metrics
from .backend import Admitted, Event, Finished, Generation, TextDelta
from .errors import ApiError
from trident.contract import TextRequest

log = logging.getLogger("trident.gateway.request")

_PROBES = frozenset({"/healthz", "/readyz", "/health", "/metrics"})


def endpoint_label() -> str:
    """The matched route pattern without a trailing slash (``/generate/`` counts as
    ``/generate``); ``unmatched`` for unknown paths, so scanners cannot grow the label set."""
    rule = request.url_rule
    if rule is None:
        return "unmatched"
    return rule.rule.rstrip("/") or "/"


@dataclass
class RequestRecord:
    """What the metrics and the log line need to know about one request."""

    request_id: str
    method: str
    path: str
    endpoint: str
    log_prompts: bool
    started: float = field(default_factory=time.perf_counter)
    status: int | None = None
    key: str | None = None  # the key's name
    model: str | None = None
    stream: bool | None = None
    params: dict[str, Any] | None = None
    prompt: str | None = None  # only with LOG_PROMPTS
    output: list[str] | None = None  # only with LOG_PROMPTS
    generating: bool = False
    finished: Finished | None = None
    error: str | None = None  # the error type that ended a generation, also mid-stream
    ttft: float | None = None
    server: str | None = None  # the Triton that took the generation, when it said
    deferred: bool = False  # closed by whatever goes on after the response (gateway.background)
    _closed: bool = False

    def close(self) -> None:
        """Once, when the response has been sent (or the client went away)."""
        if self._closed:
            return
        self._closed = True
        duration = time.perf_counter() - self.started
        status = self.status or 500
        metrics.REQUESTS.labels(self.endpoint, str(status)).inc()
        metrics.LATENCY.labels(self.endpoint).observe(duration)
        if self.generating:
            outcome = (
                self.finished.finish_reason if self.finished else self.error or "cancelled"
            )
            metrics.GENERATIONS.labels(self.endpoint, self.model or "", outcome).inc()
        level = logging.DEBUG if self.endpoint in _PROBES else logging.INFO
        if log.isEnabledFor(level):
            message = "generation" if self.generating else "request"
            log.log(level, message, extra={"request_id": self.request_id, "fields": self.fields(duration)})

    def fields(self, duration: float) -> dict[str, Any]:
        out: dict[str, Any] = {
            "method": self.method,
            "path": self.path,
            "endpoint": self.endpoint,
            "status": self.status,
            "duration_s": round(duration, 4),
            "key": self.key,
        }
        if self.model is not None:
            out["model"] = self.model
            out["stream"] = self.stream
        if self.server is not None:
            out["server"] = self.server
        if self.generating:
            done = self.finished
            out["finish_reason"] = done.finish_reason if done else None
            out["prompt_tokens"] = done.prompt_tokens if done else None
            out["completion_tokens"] = done.completion_tokens if done else None
            if self.ttft is not None and self.stream:  # without streaming it is the whole latency
                out["ttft_s"] = round(self.ttft, 4)
            if self.error is not None or done is None:
                out["error"] = self.error or "cancelled"
        if self.params is not None:
            out["params"] = self.params
        if self.prompt is not None:
            out["prompt"] = self.prompt
        if self.output is not None:
            out["output"] = "".join(self.output)
        return out


def current_record() -> RequestRecord | None:
    return g.get("trident_record")


def adopt_request_id(request_id: str) -> None:
    """The request's id named in its body (vLLM's ``request_id``): it becomes the request's id
    (its log line, X-Request-ID, Triton's request id), unless the client sent X-Request-ID,
    which names it first (as vLLM reads the header first: gateway.app)."""
    if g.get("client_request_id"):
        return
    g.request_id = request_id
    record = current_record()
    if record is not None:
        record.request_id = request_id


def defer_record() -> RequestRecord | None:
    """The request's record, to be closed by its caller (a generation that outlives the
    response: gateway.background) instead of when the response has been sent."""
    record = current_record()
    if record is not None:
        record.deferred = True
    return record


def note_params(params: TextRequest) -> None:
    """Record the validated request (model, stream, sampling; the prompt only with LOG_PROMPTS)."""
    record = current_record()
    if record is None:
        return
    record.model, record.stream = params.model, params.stream
    prompt = params.prompt if params.prompt_ids is None else params.prompt_ids
    record.params = {"model": params.model, **prompt_sizes((prompt,)), "stream": params.stream,
                     **params.sampling.log_fields()}
    if record.log_prompts:
        record.prompt = params.prompt if params.prompt_ids is None else str(list(params.prompt_ids))


def prompt_sizes(prompts: Sequence[str | tuple[int, ...]]) -> dict[str, int]:
    """The log line's size of the prompts: their characters (``prompt_chars``), and with prompts
    of token ids, their ids (``prompt_ids``)."""
    sizes = {"prompt_chars": sum(len(p) for p in prompts if isinstance(p, str))}
    if any(not isinstance(p, str) for p in prompts):
        sizes["prompt_ids"] = sum(len(p) for p in prompts if not isinstance(p, str))
    return sizes


def observe_generation(generation: Generation, params: TextRequest) -> Generation:
    """Wrap a started generation so that its events are measured (see the module docstring)."""
    record = current_record()
    if record is None:  # outside the app's hooks (e.g. a unit test of a route helper)
        return generation
    record.generating = True
    if record.log_prompts:
        record.output = []
    return ObservedGeneration(generation, record, endpoint=record.endpoint, model=params.model)


class ObservedGeneration:
    """A ``Generation`` that yields its inner generation's events and records them."""

    def __init__(self, inner: Generation, record: RequestRecord, *, endpoint: str, model: str) -> None:
        self._inner = inner
        self._record = record
        self._stream = bool(record.stream)
        self._ttft = metrics.TTFT.labels(endpoint, model)
        self._itl = metrics.ITL.labels(endpoint, model)
        self._prompt_tokens = metrics.PROMPT_TOKENS.labels(endpoint, model)
        self._completion_tokens = metrics.COMPLETION_TOKENS.labels(endpoint, model)
        self._last: float | None = None
        self._source: Any = None

    def _observe(self, event: Event, now: float) -> None:
        record = self._record
        if isinstance(event, TextDelta):
            if event.text:
                if self._last is None:
                    record.ttft = now - record.started
                    if self._stream:
                        self._ttft.observe(record.ttft)
                elif self._stream:
                    self._itl.observe(now - self._last)
                self._last = now
            if record.output is not None:
                record.output.append(event.text)
        elif isinstance(event, Admitted):
            if event.server:
                record.server = event.server
                metrics.SERVER_GENERATIONS.labels(event.server).inc()
        elif isinstance(event, Finished):
            record.finished = event
            self._prompt_tokens.inc(event.prompt_tokens)
            self._completion_tokens.inc(event.completion_tokens)

    def _failed(self, err: BaseException) -> None:
        self._record.error = err.type if isinstance(err, ApiError) else "server_error"

    def __iter__(self) -> Iterator[Event]:
        try:
            for event in self._inner:
                self._observe(event, time.perf_counter())
                yield event
        except Exception as err:
            self._failed(err)
            raise

    def next_events(self, timeout: float | None) -> list[Event] | None:
        """As the inner generation's (or a pump over its iterator, gateway.sse.event_source):
        a batch of events that arrived together is timed together."""
        if self._source is None:
            from .sse import event_source

            self._source = event_source(self._inner)
        try:
            events = self._source.next_events(timeout)
        except Exception as err:
            self._failed(err)
            raise
        if events:
            now = time.perf_counter()
            for event in events:
                self._observe(event, now)
        return events

    def close(self) -> None:
        self._inner.close()


def _start_request() -> None:
    g.trident_record = RequestRecord(
        request_id=g.get("request_id") or "-",
        method=request.method,
        path=request.path,
        endpoint=endpoint_label(),
        log_prompts=bool(current_app.config.get("LOG_PROMPTS")),
    )


def _end_request(response: Response) -> Response:
    record = current_record()
    if record is None:
        return response
    record.status = response.status_code
    key = g.get("api_key")
    record.key = key.name if key is not None else None
    if response.status_code == 429:
        metrics.RATE_LIMITED.labels(record.endpoint, record.key or "").inc()
    if record.deferred and response.status_code == 200:  # its generation goes on: closed at its end
        return response
    if response.is_streamed:  # sent after this hook: the record is closed with the response
        response.call_on_close(record.close)
    else:  # the body is complete here; only the network send is left
        record.close()
    return response


def init_app(app: Flask) -> None:
    """Install the hooks and ``GET /metrics``. Call after the request-id hook and before
    ``limiter.init_app`` (its 429s are recorded too)."""
    app.before_request(_start_request)
    app.after_request(_end_request)
    app.add_url_rule("/metrics", "metrics", metrics.metrics_view, methods=["GET"])


# -- logs -------------------------------------------------------------------------------------


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, pid, request id, message, the record's
    ``fields`` (``extra={"fields": {...}}``) and a traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "pid": os.getpid(),
            "request_id": getattr(record, "request_id", "-"),
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """The human format: ``time level logger [request id] message {fields}``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            text += " " + json.dumps(fields, ensure_ascii=False, default=str)
        return text


def formatter(kind: str) -> logging.Formatter:
    if kind == "json":
        return JsonFormatter()
    if kind == "text":
        return TextFormatter()
    raise ValueError(f"gateway config LOG_FORMAT must be 'json' or 'text', got {kind!r}")
