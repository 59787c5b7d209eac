"""model_repository/common/llm/1/model.py's Triton adapters, through a fake
triton_python_backend_utils: what they hand to the stub, and when they let go of it
(trident.stub_objects: the stub of Triton 2.51 frees objects without the GIL in two places)."""
from __future__ import annotations

import gc
import time
import weakref
from pathlib import Path

import numpy as np
import pytest

from pb_fakes import InferenceResponse, Tensor, load_model, unload

from trident.stub_objects import Retirement

ROOT = Path(__file__).resolve().parents[2]
MODEL_PY = ROOT / "model_repository" / "common" / "llm" / "1" / "model.py"


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
    array = response.output_tensors.get(name)
    return None if array is None else Tensor(name, array)


class Sender:
    def __init__(self):
        self.sent = []

    def send(self, response=None, flags=0):
        self.sent.append((None if response is None else sorted(response.output_tensors), flags))

    def is_cancelled(self):
        return False


class Request:
    def __init__(self, outputs, parameters="{}"):
        self.sender = Sender()
        self._outputs = outputs
        self._parameters = parameters

    def get_response_sender(self):
        return self.sender

    def parameters(self):
        return self._parameters

    def requested_output_names(self):
        return self._outputs


@pytest.fixture
def model():
    module = load_model(MODEL_PY, "llm_model_under_test", InferenceRequest=InferenceRequest,
                        get_output_tensor_by_name=get_output_tensor_by_name)
    yield module
    unload()


@pytest.fixture
def clock():
    return [0.0]


@pytest.fixture
def engine(model, clock):
    """BlsEngine with a retirement whose clock the test moves."""
    retired = Retirement(hold=5.0, clock=lambda: clock[0])
    yield model.BlsEngine("tensorrt_llm", retired)
    retired.stop()


def test_a_finished_engine_stream_is_let_go_only_after_the_hold(engine, clock):
    """Dropped at once, the iterator could die on the stub's utility thread, without the GIL."""
    InferenceRequest.made.clear()
    chunks = list(engine.stream({"input_ids": np.array([[1]], np.int32)}, "e-1"))
    assert [c.token_ids for c in chunks] == [[7], [8], []]
    iterator = weakref.ref(InferenceRequest.made[0].iterator)
    InferenceRequest.made.clear()
    gc.collect()
    assert iterator() is not None  # held by the retirement, nothing else
    clock[0] += 5.1
    deadline = time.monotonic() + 5
    while iterator() is not None:
        assert time.monotonic() < deadline, "never let go"
        time.sleep(0.01)


def test_a_stop_request_stream_is_retired_too(engine):
    InferenceRequest.made.clear()
    engine.stop("e-2")
    iterator = weakref.ref(InferenceRequest.made[0].iterator)
    InferenceRequest.made.clear()
    gc.collect()
    assert iterator() is not None


def test_responses_carry_only_the_outputs_the_client_asked_for(model):
    """The stub would drop the rest inside send, without the GIL."""
    request = Request(["text_output"])
    adapter = model.TritonRequest(request)
    adapter.send_admission(5)
    adapter.send_text("Paris", n=2, index=1)
    assert request.sender.sent == [([], 0), (["text_output"], 0)]
    everything = Request(["text_output", "sequence_index", "server", "prompt_tokens"])
    adapter = model.TritonRequest(everything)
    adapter.send_admission(5)
    adapter.send_text("Paris", n=2, index=1)
    assert everything.sender.sent == [(["prompt_tokens", "server"], 0), (["sequence_index", "text_output"], 0)]
    adapter.send_admission(2, [17, 42])  # return_prompt_token_ids
    assert everything.sender.sent[-1] == (["prompt_tokens", "server"], 0)  # not asked for: dropped
    ids = Request(["prompt_tokens", "prompt_token_ids"])
    model.TritonRequest(ids).send_admission(2, [17, 42])
    assert ids.sender.sent == [(["prompt_token_ids", "prompt_tokens"], 0)]


def test_a_ping_is_read_from_its_bool_parameter_and_answered_with_one_final_response(model):
    """trident.stream_probe sends trident_ping as a bool parameter (Triton hands the parameters
    to the stub as JSON); the pong names the server and is the request's final response."""
    ping = model.TritonRequest(Request(["server"], '{"trident_ping": true, "triton_enable_empty_final_response": true}'))
    assert ping.pings() and ping.cancels() is None
    ping.send_pong()
    assert ping._sender.sent == [(["server"], model.FINAL)]
    for parameters in ('{}', '{"trident_ping": "yes"}', '{"trident_ping": false}', "not json"):
        assert not model.TritonRequest(Request(["server"], parameters)).pings()


def test_tokenize_and_detokenize_requests_are_read_from_their_bool_parameters(model):
    """The gateway's /tokenize and /detokenize: one final response holding the outputs."""
    tokenize = model.TritonRequest(Request(["output_token_ids", "prompt_tokens"], '{"trident_tokenize": true}'))
    assert tokenize.tokenizer_call() == "tokenize" and tokenize.adds_special_tokens() and not tokenize.pings()
    tokenize.send_outputs({"text_output": np.array([[b""]], dtype=object),
                           "output_token_ids": np.array([[3, 4]], dtype=np.int32),
                           "prompt_tokens": np.array([[2]], dtype=np.int32)})
    assert tokenize._sender.sent == [(["output_token_ids", "prompt_tokens"], model.FINAL)]
    plain = model.TritonRequest(Request([], '{"trident_tokenize": true, "trident_add_special_tokens": false}'))
    assert plain.tokenizer_call() == "tokenize" and not plain.adds_special_tokens()
    assert model.TritonRequest(Request([], '{"trident_detokenize": true}')).tokenizer_call() == "detokenize"
    for parameters in ('{}', '{"trident_tokenize": "yes"}', '{"trident_detokenize": false}', "not json"):
        assert model.TritonRequest(Request([], parameters)).tokenizer_call() is None


def test_a_pong_names_the_instance_that_answered(model, monkeypatch):
    """trident.stream_probe pings until every instance of llm has answered."""
    monkeypatch.setitem(model.INSTANCE, "name", "llm_0_1")  # set by initialize from model_instance_name
    request = Request(["server", "instance"], '{"trident_ping": true}')
    responses = []
    request.sender.send = lambda response=None, flags=0: responses.append((response, flags))
    model.TritonRequest(request).send_pong()
    ((response, flags),) = responses
    assert flags == model.FINAL and response.output_tensors["instance"].flat[0] == b"llm_0_1"


def test_instances_share_a_cancel_board_only_when_there_are_several(model, monkeypatch, tmp_path):
    """config.pbtxt's instance_group count (build_repository.py --llm-instances): with more than
    one instance, each builds the board in the same directory (trident.cancel_board)."""
    from trident.cancel_board import CANCEL_DIR_ENV

    monkeypatch.setenv(CANCEL_DIR_ENV, str(tmp_path / "board"))
    assert model._cancel_board({"name": "llm", "instance_group": [{"count": 1, "kind": "KIND_CPU"}]}) is None
    assert model._cancel_board({"name": "llm"}) is None
    board = model._cancel_board({"name": "llm", "instance_group": [{"count": 2, "kind": "KIND_CPU"}]})
    assert board is not None and board.directory == tmp_path / "board" and board.directory.is_dir()
    # A directory that cannot be made: the model still loads, without the board.
    (tmp_path / "file").write_text("")
    monkeypatch.setenv(CANCEL_DIR_ENV, str(tmp_path / "file" / "board"))
    assert model._cancel_board({"name": "llm", "instance_group": [{"count": 2}]}) is None
