"""model_repository/cpu/tensorrt_llm/1/model.py driven through a fake triton_python_backend_utils."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from pb_fakes import FINAL, Tensor, load_model, unload
from testkit import model_dir

from trident.engine import QueueFullError
from trident.engine_tensors import CONTEXT_LOG_PROB_RANKS, CONTEXT_LOG_PROBS, CONTEXT_OUTPUTS, CONTEXT_TOP_LOG_PROB_IDS

ROOT = Path(__file__).resolve().parents[2]
CKPT = model_dir()
MODEL_PY = ROOT / "model_repository" / "cpu" / "tensorrt_llm" / "1" / "model.py"
pytestmark = pytest.mark.skipif(not (CKPT / "model.safetensors").is_file(), reason=f"no checkpoint in {CKPT}")


class Sender:
    def __init__(self):
        self.sent = []  # (response | None, flags)
        self.closed = threading.Event()
        self.cancelled = False

    def send(self, response=None, flags=0):
        assert not self.closed.is_set(), "response after the final flag"
        self.sent.append((response, flags))
        if flags & FINAL:
            self.closed.set()

    def is_cancelled(self):
        return self.cancelled

    def wait(self):
        assert self.closed.wait(60), "no final response"
        return self.sent

    def tokens(self):
        return [t for r, _ in self.sent if r is not None for t in r.output_tensors["output_ids"].reshape(-1)]


class Request:
    def __init__(self, request_id="", outputs=(), **tensors):
        self._id = request_id
        self.tensors = {k: Tensor(k, v) for k, v in tensors.items()}
        self.sender = Sender()
        self.outputs = list(outputs)  # Triton names every output when the client named none

    def request_id(self):
        return self._id

    def requested_output_names(self):
        return self.outputs

    def get_response_sender(self):
        return self.sender


class MetricFamily:
    COUNTER, GAUGE = "counter", "gauge"
    families = {}

    def __init__(self, name, description, kind):
        self.name, self.kind = name, kind
        MetricFamily.families[name] = self

    def Metric(self, labels):
        self.metric = Metric()
        return self.metric


class Metric:
    def __init__(self):
        self.value = 0

    def increment(self, by):
        self.value += by

    def set(self, value):
        self.value = value


def metric(name):
    return MetricFamily.families[name].metric.value


def get_input_tensor_by_name(request, name):
    if "explode" in request.tensors:  # a backend failure the adapter cannot foresee
        raise RuntimeError("unreachable")
    return request.tensors.get(name)


@pytest.fixture(scope="module")
def model():
    module = load_model(MODEL_PY, "tensorrt_llm_cpu_model", get_input_tensor_by_name=get_input_tensor_by_name,
                        MetricFamily=MetricFamily)
    params = {"checkpoint_dir": str(CKPT), "max_batch_size": "4", "max_seq_len": "64", "dtype": "float32",
              "num_threads": "0", "max_queue_size": "8"}
    instance = module.TritonPythonModel()
    instance.initialize({"model_config": json.dumps(
        {"parameters": {k: {"string_value": v} for k, v in params.items()}})})
    yield instance
    instance.finalize()
    unload()


def prompt(request_id="", n=6, **extra):
    ids = np.array([[504, 3575, 282, 4649, 314]], dtype=np.int32)  # "The capital of France is"
    return Request(request_id, input_ids=ids, input_lengths=np.array([[5]], dtype=np.int32),
                   request_output_len=np.array([[n]], dtype=np.int32), **extra)


def test_non_streaming_one_final_response(model):
    req = prompt(end_id=np.array([[2]], dtype=np.int32))
    assert model.execute([req]) is None
    (response, flags), = req.sender.wait()
    assert flags == FINAL and response.error is None
    assert response.output_tensors["output_ids"].shape == (1, 1, 6)
    assert response.output_tensors["output_ids"].dtype == np.int32
    assert response.output_tensors["sequence_length"].tolist() == [[6]]


def test_only_the_requested_outputs_are_sent(model):
    """The stub of Triton 2.51 would drop the others itself, without the GIL (trident.stub_objects)."""
    req = prompt(outputs=["output_ids"])
    model.execute([req])
    (response, _), = req.sender.wait()
    assert list(response.output_tensors) == ["output_ids"]
    everything = prompt(outputs=["output_ids", "sequence_length"])
    model.execute([everything])
    (response, _), = everything.sender.wait()
    assert sorted(response.output_tensors) == ["output_ids", "sequence_length"]


def test_context_logprobs_come_on_the_first_response_when_requested(model):
    outputs = ["output_ids", "sequence_length", *CONTEXT_OUTPUTS]
    context = dict(streaming=np.array([[True]]), num_context_log_probs=np.array([[2]], dtype=np.int32))
    req = prompt(n=3, outputs=outputs, **context)
    model.execute([req])
    sent = [r.output_tensors for r, _ in req.sender.wait() if r is not None]
    assert len(sent) == 3 and sorted(sent[0]) == sorted(outputs)
    assert all(sorted(t) == ["output_ids", "sequence_length"] for t in sent[1:])
    assert sent[0][CONTEXT_LOG_PROBS].shape == (1, 1, 5) and np.isnan(sent[0][CONTEXT_LOG_PROBS][0, 0, 0])
    assert sent[0][CONTEXT_TOP_LOG_PROB_IDS].shape == (1, 1, 5, 2)
    assert (sent[0][CONTEXT_LOG_PROBS][0, 0, 1:] < 0).all()
    assert sent[0][CONTEXT_LOG_PROB_RANKS].shape == (1, 1, 5) and sent[0][CONTEXT_LOG_PROB_RANKS][0, 0, 0] == 0
    assert (sent[0][CONTEXT_LOG_PROB_RANKS][0, 0, 1:] >= 1).all()
    unasked = prompt(n=3, outputs=["output_ids"], **context)  # requested_only: never unasked
    model.execute([unasked])
    assert all(list(r.output_tensors) == ["output_ids"] for r, _ in unasked.sender.wait() if r is not None)


def test_streaming_then_stop_request_cancels(model):
    first = threading.Event()
    running = prompt("req-7", n=40, streaming=np.array([[True]]))
    send = running.sender.send

    def send_and_signal(response=None, flags=0):
        send(response, flags)
        first.set()

    running.sender.send = send_and_signal
    model.execute([running])
    assert first.wait(60)
    stop = prompt("req-7", stop=np.array([[True]]))
    model.execute([stop])
    assert stop.sender.wait() == [(None, FINAL)]
    sent = running.sender.wait()
    assert all(r.output_tensors["output_ids"].shape[-1] <= 1 for r, _ in sent)
    assert 1 <= len(running.sender.tokens()) < 40


def test_the_probes_stop_ping_fails_while_the_loop_is_stuck_or_gone(model, monkeypatch):
    """trident.stream_probe's stop ping (no request id) is answered at once, ahead of the loop:
    with an error while the loop holds requests and has made no progress past the stall limit
    (a hang in a turn, or a loop that never woke up for them), or when its thread has ended, so
    that the probe fails and Triton is restarted."""
    from trident.engine import engine as engine_module

    ping = lambda: prompt("", stop=np.array([[True]]))  # noqa: E731
    healthy = ping()
    model.execute([healthy])
    assert healthy.sender.wait() == [(None, FINAL)]
    monkeypatch.setattr(engine_module, "STALL_LIMIT", 0.3)
    gate, blocked = threading.Event(), threading.Event()
    step = model.engine._step

    def stuck_step():  # the loop's next decode step hangs until the gate opens
        blocked.set()
        assert gate.wait(30)
        step()

    monkeypatch.setattr(model.engine, "_step", stuck_step)
    try:
        running = prompt(n=4, streaming=np.array([[True]]))
        model.execute([running])
        assert blocked.wait(30)
        quick = ping()  # within the limit: a busy turn, not a stuck one
        model.execute([quick])
        assert quick.sender.wait() == [(None, FINAL)]
        time.sleep(0.5)
        stuck = ping()
        model.execute([stuck])
        (response, flags), = stuck.sender.wait()
        assert flags == FINAL and "[server_error] the engine's loop has made no progress for" in response.error.message(), \
            response.error
        assert "with 1 request(s) waiting or running" in response.error.message()
    finally:
        gate.set()
    assert running.sender.wait()[-1][1] == FINAL
    monkeypatch.setattr(model.engine, "_step", step)
    time.sleep(0.5)  # idle now: no request held, however long since the last turn
    after = ping()
    model.execute([after])
    assert after.sender.wait() == [(None, FINAL)]
    # A lost wake-up: the loop waits on, with a request queued
    with monkeypatch.context() as lost:
        lost.setattr(model.engine._cond, "notify_all", lambda: None)
        waiting = prompt(n=2)
        model.execute([waiting])
        time.sleep(0.5)
        unheard = ping()
        model.execute([unheard])
        (response, flags), = unheard.sender.wait()
        assert flags == FINAL and "made no progress for" in response.error.message(), response.error.message()
    with model.engine._cond:
        model.engine._cond.notify_all()
    assert waiting.sender.wait()[-1] == (waiting.sender.sent[-1][0], FINAL) and waiting.sender.sent[-1][0].error is None
    ended = threading.Thread(target=lambda: None)
    ended.start()
    ended.join()
    monkeypatch.setattr(model.engine, "_thread", ended)  # the loop's thread died (a BaseException)
    dead = ping()
    model.execute([dead])
    (response, flags), = dead.sender.wait()
    assert flags == FINAL and "the engine's loop thread has ended" in response.error.message()


def test_client_cancellation_is_polled(model):
    model.metrics.update()
    cancelled = metric("trident_engine_requests_cancelled_total")
    req = prompt(n=40, streaming=np.array([[True]]))
    req.sender.cancelled = True
    model.execute([req])
    assert len(req.sender.wait()) == 1 and req.sender.tokens() == []
    model.metrics.update()
    assert metric("trident_engine_requests_cancelled_total") == cancelled + 1
    assert metric("trident_engine_active_requests") == 0


def test_engine_counters_are_published_as_metrics(model):
    model.metrics.update()
    before = metric("trident_engine_generated_tokens_total")
    req = prompt(n=6)
    model.execute([req])
    req.sender.wait()
    model.metrics.update()
    assert metric("trident_engine_generated_tokens_total") == before + len(req.sender.tokens())
    assert MetricFamily.families["trident_engine_active_requests"].kind == MetricFamily.GAUGE


@pytest.mark.parametrize(
    "request_, prefix, text",
    [
        (Request(input_ids=np.array([[1, 2]], dtype=np.int32)), "[invalid_request_error] ", "required"),
        (prompt(n=100), "[invalid_request_error] ", "max_seq_len"),
        (Request(explode=np.zeros(1)), "[server_error] ", "unreachable"),
    ],
)
def test_errors_are_final_triton_errors(model, request_, prefix, text):
    model.execute([request_])  # must not raise
    (response, flags), = request_.sender.wait()
    assert flags == FINAL and response.error.message().startswith(prefix) and text in response.error.message()


def test_queue_full_maps_to_service_unavailable(model, monkeypatch):
    def full(request, on_output):
        raise QueueFullError("engine queue is full")

    monkeypatch.setattr(model.engine, "submit", full)
    req = prompt()
    model.execute([req])
    (response, flags), = req.sender.wait()
    assert flags == FINAL and response.error.message() == "[service_unavailable] engine queue is full"
