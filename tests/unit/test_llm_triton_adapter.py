"""model_repository/common/llm/1/model.py's Triton adapters, through a fake
triton_python_backend_utils: what they hand to the stub, and when they let go of it
(trident.stub_objects: the stub of Triton 2.51 frees objects without the GIL in two places)."""
from __future__ import annotations

import gc
import importlib.util
import sys
import time
import types
import weakref
from pathlib import Path

import numpy as np
import pytest

from trident.stub_objects import Retirement

ROOT = Path(__file__).resolve().parents[2]
MODEL_PY = ROOT / "model_repository" / "common" / "llm" / "1" / "model.py"
FINAL = 1


class Tensor:
    def __init__(self, name, array):
        self._name, self._array = name, np.asarray(array)

    def name(self):
        return self._name

    def as_numpy(self):
        return self._array


class InferenceResponse:
    def __init__(self, output_tensors=None, error=None):
        self.tensors = {t.name(): t.as_numpy() for t in output_tensors or []}
        self._error = error

    def has_error(self):
        return self._error is not None


class ResponseIterator:
    """The decoupled BLS iterator: its responses, then the end."""

    def __init__(self, responses):
        self._responses = iter(responses)

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._responses)


class InferenceRequest:
    made: list["InferenceRequest"] = []

    def __init__(self, model_name, inputs, requested_output_names, request_id=""):
        self.model_name, self.inputs, self.requested = model_name, inputs, requested_output_names
        self.iterator = None
        InferenceRequest.made.append(self)

    def exec(self, decoupled=False):
        assert decoupled
        tokens = [InferenceResponse([Tensor("output_ids", np.array([[[t]]], np.int32)),
                                     Tensor("sequence_length", np.array([[1]], np.int32))]) for t in (7, 8)]
        self.iterator = ResponseIterator(tokens + [InferenceResponse()])
        return self.iterator


def get_output_tensor_by_name(response, name):
    array = response.tensors.get(name)
    return None if array is None else Tensor(name, array)


class Sender:
    def __init__(self):
        self.sent = []

    def send(self, response=None, flags=0):
        self.sent.append((None if response is None else sorted(response.tensors), flags))

    def is_cancelled(self):
        return False


class Request:
    def __init__(self, outputs):
        self.sender = Sender()
        self._outputs = outputs

    def get_response_sender(self):
        return self.sender

    def requested_output_names(self):
        return self._outputs


@pytest.fixture
def model():
    fake = types.ModuleType("triton_python_backend_utils")
    fake.Tensor, fake.InferenceResponse, fake.InferenceRequest = Tensor, InferenceResponse, InferenceRequest
    fake.get_output_tensor_by_name = get_output_tensor_by_name
    fake.TRITONSERVER_RESPONSE_COMPLETE_FINAL = FINAL
    sys.modules["triton_python_backend_utils"] = fake
    spec = importlib.util.spec_from_file_location("llm_model_under_test", MODEL_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    now = [0.0]
    module.RETIRED = Retirement(hold=5.0, clock=lambda: now[0])
    module.clock = now
    yield module
    module.RETIRED.stop()
    del sys.modules["triton_python_backend_utils"]


def test_a_finished_engine_stream_is_let_go_only_after_the_hold(model):
    """Dropped at once, the iterator could die on the stub's utility thread, without the GIL."""
    InferenceRequest.made.clear()
    chunks = list(model.BlsEngine("tensorrt_llm").stream({"input_ids": np.array([[1]], np.int32)}, "e-1"))
    assert [c.token_ids for c in chunks] == [[7], [8], []]
    iterator = weakref.ref(InferenceRequest.made[0].iterator)
    InferenceRequest.made.clear()
    gc.collect()
    assert iterator() is not None  # held by the retirement, nothing else
    model.clock[0] += 5.1
    deadline = time.monotonic() + 5
    while iterator() is not None:
        assert time.monotonic() < deadline, "never let go"
        time.sleep(0.01)


def test_a_stop_request_stream_is_retired_too(model):
    InferenceRequest.made.clear()
    model.BlsEngine("tensorrt_llm").stop("e-2")
    iterator = weakref.ref(InferenceRequest.made[0].iterator)
    InferenceRequest.made.clear()
    gc.collect()
    assert iterator() is not None


def test_responses_carry_only_the_outputs_the_client_asked_for(model):
    """The stub would drop the rest inside send, without the GIL."""
    request = Request(["text_output"])
    adapter = model.TritonRequest(request)
    adapter.send_admission()
    adapter.send_text("Paris", n=2, index=1)
    assert request.sender.sent == [([], 0), (["text_output"], 0)]
    everything = Request(["text_output", "sequence_index", "server"])
    adapter = model.TritonRequest(everything)
    adapter.send_admission()
    adapter.send_text("Paris", n=2, index=1)
    assert everything.sender.sent == [(["server"], 0), (["sequence_index", "text_output"], 0)]
