"""Prometheus metrics of the gateway, and ``GET /metrics`` (no key).

Every metric is defined once, here, at import; routes never touch them directly: request
counts and latency are recorded for every route by ``gateway.telemetry``'s request hooks,
generation timings and tokens by ``telemetry.observe_generation``, the in-flight gauge by
``state.InFlight``.

Under gunicorn each worker is its own process, so counters live in prometheus-client's
multiprocess mode: ``PROMETHEUS_MULTIPROC_DIR`` names a folder of per-process files that
``/metrics`` sums on every scrape, whichever worker answers it. ``gateway.gunicorn_conf``
creates that folder (or empties a given one) before any worker starts, and folds each exited
worker's files into archives (gateway.metrics_files), which is why a scrape reads them under a
shared lock. The variable has to be set before prometheus_client is imported, which is why it is the
gunicorn config's job and not the app's. Without it (tests, one process) the default registry is
served.
"""

from __future__ import annotations

import os

from flask import Response
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import generate_latest, multiprocess

from gateway import metrics_files

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# The classic text format every Prometheus (and other scraper) reads; our names need nothing newer.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Buckets in seconds: a 135M model on CPU gives a token every ~20-50 ms, a GPU every few ms;
# whole generations run from well under a second to minutes.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5)

REQUESTS = Counter(
    "trident_gateway_requests",
    "HTTP requests answered, by endpoint (route pattern, 'unmatched' for unknown paths) and status.",
    ["endpoint", "status"],
)
LATENCY = Histogram(
    "trident_gateway_request_duration_seconds",
    "Time from a request's arrival to the end of its response (the last SSE event for streams).",
    ["endpoint"],
    buckets=_LATENCY_BUCKETS,
)
TTFT = Histogram(
    "trident_gateway_time_to_first_token_seconds",
    "Streaming generations: time from the request's arrival to the first generated text.",
    ["endpoint", "model"],
    buckets=_TTFT_BUCKETS,
)
ITL = Histogram(
    "trident_gateway_inter_token_latency_seconds",
    "Streaming generations: time between consecutive chunks of generated text (usually one token; "
    "up to the llm model's stream_interval tokens).",
    ["endpoint", "model"],
    buckets=_ITL_BUCKETS,
)
PROMPT_TOKENS = Counter(
    "trident_gateway_prompt_tokens", "Prompt tokens of finished generations.", ["endpoint", "model"]
)
COMPLETION_TOKENS = Counter(
    "trident_gateway_completion_tokens", "Generated tokens of finished generations.", ["endpoint", "model"]
)
GENERATIONS = Counter(
    "trident_gateway_generations",
    "Generations that ended, by finish_reason ('length', 'stop_sequence', 'eos_token'), or by the "
    "error type or 'cancelled' (client went away) when they did not finish.",
    ["endpoint", "model", "outcome"],
)
SERVER_GENERATIONS = Counter(
    "trident_gateway_server_generations",
    "Generations by the Triton server that took them (its TRIDENT_SERVER_ID, host:port by default): "
    "how the gateway's load spreads over several Tritons.",
    ["server"],
)
IN_FLIGHT = Gauge(
    "trident_gateway_in_flight_requests",
    "Generations running now, summed over the gateway's worker processes.",
    multiprocess_mode="livesum",
)
STORED_RESPONSES = Counter(
    "trident_gateway_stored_responses",
    "Finished /v1/responses responses asked to be kept (RESPONSES_STORE), by outcome: 'stored', or "
    "'failed' when the store could not take one (the reply then says store false).",
    ["outcome"],
)
RATE_LIMITED = Counter(
    "trident_gateway_rate_limited_requests",
    "Requests refused with 429 because the API key's rate limit was exceeded.",
    ["endpoint", "key"],
)


def _multiproc_dir() -> str:
    return os.environ.get(MULTIPROC_ENV) or os.environ.get(MULTIPROC_ENV.lower()) or ""


def multiprocess_mode() -> bool:
    return bool(_multiproc_dir())


def render() -> bytes:
    """The Prometheus text exposition of this gateway (every worker's numbers, summed)."""
    if multiprocess_mode():
        folder = _multiproc_dir()
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=folder)
        # The files are read in generate_latest; never while the master folds a dead worker's.
        with metrics_files.folder_lock(folder, exclusive=False):
            return generate_latest(registry)
    return generate_latest(REGISTRY)


def metrics_view() -> Response:
    """``GET /metrics``: no key, never rate-limited."""
    return Response(render(), status=200, mimetype=None, content_type=CONTENT_TYPE)
