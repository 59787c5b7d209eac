"""Triton Python-backend adapter: TensorRT-LLM-style tensors in, trident's CPU engine underneath.

Thin on purpose: parsing lives in trident.engine.triton_io (unit-tested without Triton), batching
in trident.engine.Engine. execute() only queues work and never blocks; responses are sent through
each request's decoupled response sender by one sender thread, in the order the engine produced
them: a send costs ~0.8 ms of IPC, so sending from the engine thread took ~20 % of every decode
step at batch 32 (measured); from its own thread it overlaps the next step's compute.
"""
from __future__ import annotations

import json
import logging
import queue
import sys
import threading

import triton_python_backend_utils as pb_utils

from trident.contract import SERVER_ERROR
from trident.engine_tensors import CPU_ENGINE_INPUTS, ENGINE_INPUTS
from trident.engine import (
    Engine,
    EngineConfig,
    EngineError,
    GenerationOutput,
    error_message,
    is_stop_request,
    request_from_tensors,
    response_arrays,
)
from trident.engine.triton_io import METRICS
from trident.stub_objects import requested_only

log = logging.getLogger("trident.engine.triton")

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
INPUTS = (*ENGINE_INPUTS, *CPU_ENGINE_INPUTS)


def _param(params: dict, key: str, default: str) -> str:
    value = params.get(key, {}).get("string_value", "")
    return value if value != "" else default


def _send_error(sender, message: str) -> None:
    try:
        sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)), flags=FINAL)
    except Exception:  # the client may already be gone; nothing else to tell it
        log.exception("could not send error response: %s", message)


def _send_output(sender, out: GenerationOutput, requested=None) -> None:
    if out.error is not None:
        _send_error(sender, error_message(out.error_type, out.error, out.error_param))
        return
    # Only what the request asked for: the stub would drop the rest without the GIL (trident.stub_objects).
    tensors = [pb_utils.Tensor(name, array) for name, array in requested_only(response_arrays(out), requested).items()]
    sender.send(pb_utils.InferenceResponse(output_tensors=tensors), flags=FINAL if out.finished else 0)


def _configure_logging() -> None:
    # The stub's stderr ends up in Triton's log; without a handler INFO lines (cancellations) vanish.
    logger = logging.getLogger("trident.engine")
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


class EngineMetrics:
    """Copies Engine.stats() into Triton custom metrics a few times a second."""

    def __init__(self, engine, *, interval: float = 0.1):
        self.engine = engine
        self.interval = interval
        self._stop = threading.Event()
        self._metrics = []
        for name, kind, description, key in METRICS:
            family = pb_utils.MetricFamily(name=name, description=description,
                                           kind=getattr(pb_utils.MetricFamily, kind))
            self._metrics.append((kind, key, family, family.Metric(labels={"model": "tensorrt_llm"})))
        self._last = {key: 0 for _, key, _, _ in self._metrics}
        self._thread = threading.Thread(target=self._run, name="engine-metrics", daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(self.interval):
            try:
                self.update()
            except Exception:
                log.exception("engine metrics update failed")

    def update(self):
        stats = self.engine.stats()
        for kind, key, _family, metric in self._metrics:
            value = stats.get(key, 0)
            if kind == "COUNTER":
                if value > self._last[key]:
                    metric.increment(value - self._last[key])
            else:
                metric.set(value)
            self._last[key] = value

    def close(self):
        self._stop.set()
        self._thread.join(timeout=1)


class ResponseSender:
    """One thread that sends engine outputs in FIFO order (so per request too)."""

    def __init__(self):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="engine-responses", daemon=True)
        self._thread.start()

    def put(self, sender, out: GenerationOutput, requested=None) -> None:
        self._queue.put((sender, out, requested))

    def _run(self):
        while (item := self._queue.get()) is not None:
            sender, out, requested = item
            try:
                _send_output(sender, out, requested)
            except Exception:  # the client is gone; the engine notices through is_cancelled
                log.exception("could not send a response for request %s", out.request_id)

    def close(self, timeout: float = 10.0) -> None:
        """Send what is queued (the engine's final outputs included), then stop."""
        self._queue.put(None)
        self._thread.join(timeout)


class TritonPythonModel:
    def initialize(self, args):
        _configure_logging()
        params = json.loads(args["model_config"]).get("parameters", {})
        num_threads = int(_param(params, "num_threads", "0"))
        config = EngineConfig(
            checkpoint_dir=_param(params, "checkpoint_dir", ""),
            max_batch_size=int(_param(params, "max_batch_size", "32")),
            max_seq_len=int(_param(params, "max_seq_len", "2048")),
            dtype=_param(params, "dtype", "bfloat16"),
            weight_dtype=_param(params, "weight_dtype", "auto"),
            num_threads=num_threads or None,
            max_queue_size=int(_param(params, "max_queue_size", "256")),
            xgrammar_tokenizer_info_path=_param(params, "xgrammar_tokenizer_info_path", ""),
            guide_cache_mb=int(_param(params, "guide_cache_mb", str(EngineConfig.guide_cache_mb))),
        )
        self.exclude_input = _param(params, "exclude_input_in_output", "true").lower() == "true"
        if not config.checkpoint_dir:
            raise ValueError("config.pbtxt parameter checkpoint_dir is required")
        self.engine = Engine(config)
        self.responses = ResponseSender()
        self.engine.start()
        self.metrics = EngineMetrics(self.engine)
        log.info("tensorrt_llm (CPU engine) ready: %s", self.engine.config)  # after any fallback

    def execute(self, requests):
        for request in requests:
            self._handle(request)
        return None  # decoupled: every answer goes through the response sender

    def _handle(self, request) -> None:
        sender = request.get_response_sender()
        try:
            tensors = {}
            for name in INPUTS:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    tensors[name] = tensor.as_numpy()
            if is_stop_request(tensors):
                if request.request_id():
                    self.engine.cancel(request.request_id())
                elif (trouble := self.engine.health()) is not None:  # the stream probe's ping
                    log.error("stop ping: %s", trouble)
                    _send_error(sender, error_message(SERVER_ERROR, trouble))
                    return
                sender.send(flags=FINAL)
                return
            generation = request_from_tensors(request.request_id(), tensors, exclude_input=self.exclude_input)
            generation.is_cancelled = sender.is_cancelled
            requested = frozenset(request.requested_output_names())
            self.engine.submit(generation, lambda out: self.responses.put(sender, out, requested))
        except EngineError as e:  # invalid request, queue full, engine stopped
            _send_error(sender, error_message(e.error_type, str(e), e.param))
        except Exception as e:  # never let one request take the model down
            log.exception("failed to handle request %r", request.request_id())
            _send_error(sender, error_message(SERVER_ERROR, f"{type(e).__name__}: {e}"))

    def finalize(self):
        if getattr(self, "metrics", None) is not None:
            self.metrics.close()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.stop()
        if getattr(self, "responses", None) is not None:
            self.responses.close()
