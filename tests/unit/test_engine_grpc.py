"""trident.engine_grpc: the llm model's engine client over Triton's gRPC endpoint, against an
in-process gRPC server that answers like the engine model (TensorRT-LLM's tensors)."""
from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest
from gateway_fakes import add_outputs
from tritonclient.grpc import service_pb2, service_pb2_grpc

from trident.contract import ENGINE_GRPC_ENV
from trident.engine_grpc import DEFAULT_URL, GrpcEngine, engine_url, plain_token_ids
from trident.engine_tensors import OUTPUT_IDS, OUTPUT_LOG_PROBS, SEQUENCE_INDEX, SEQUENCE_LENGTH
from trident.error_tags import SERVER_ERROR, UNAVAILABLE, parse_error
from trident.triton_wire import EMPTY_FINAL, FINAL_FLAG, deserialize


def engine_response(*, final=False, error="", **arrays):
    response = service_pb2.ModelStreamInferResponse(error_message=error)
    infer = response.infer_response
    infer.parameters[FINAL_FLAG].bool_param = final
    add_outputs(infer, arrays)
    return response


def tokens(*ids):
    return {OUTPUT_IDS: np.array([[list(ids)]], dtype=np.int32), SEQUENCE_LENGTH: np.array([[len(ids)]], dtype=np.int32)}


class FakeEngine(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Records every request; answers each with ``script(request)`` (a list of responses, or an
    exception code to abort with). A script item ``"wait"`` blocks until the call is cancelled;
    ``"linger"`` keeps the call open for 0.3 s and notes a cancellation in that time."""

    def __init__(self, script):
        self.script = script
        self.requests: list[service_pb2.ModelInferRequest] = []
        self.cancelled = threading.Event()

    def ModelStreamInfer(self, request_iterator, context):
        done = threading.Event()  # the script ran to its end: the call was not cut short
        context.add_callback(lambda: None if done.is_set() else self.cancelled.set())
        for request in request_iterator:
            self.requests.append(request)
            for item in self.script(request):
                if item in ("wait", "linger"):
                    deadline = time.monotonic() + (60 if item == "wait" else 0.3)
                    while context.is_active() and time.monotonic() < deadline:
                        time.sleep(0.01)
                    if not context.is_active():
                        return
                    continue
                if isinstance(item, grpc.StatusCode):
                    done.set()
                    context.abort(item, "engine went away")
                yield item
        done.set()


@pytest.fixture
def serve():
    servers = []

    def start(script):
        servicer = FakeEngine(script)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return servicer, GrpcEngine("tensorrt_llm", f"127.0.0.1:{port}", stop_timeout=5)

    yield start
    for server in servers:
        server.stop(0)


def inputs_of(request):
    return {t.name: deserialize(t.datatype, t.shape, raw) for t, raw in zip(request.inputs, request.raw_input_contents)}


def test_a_stream_sends_one_engine_request_and_reads_tokens_up_to_the_final_flag(serve):
    fake, engine = serve(lambda r: [engine_response(**tokens(5)), engine_response(**tokens(6, 7)),
                                    engine_response(final=True), engine_response(**tokens(99))])
    sent = {"input_ids": np.array([[1, 2, 3]], dtype=np.int32), "streaming": np.array([[True]]),
            "temperature": np.array([[0.5]], dtype=np.float32)}
    chunks = list(engine.stream(sent, "1234", (OUTPUT_IDS, SEQUENCE_LENGTH, OUTPUT_LOG_PROBS)))
    assert [list(c.token_ids) for c in chunks] == [[5], [6, 7]]  # the final flag ends it: no 99
    assert not any(c.final for c in chunks)  # an empty final response makes no chunk
    assert all(c.error is None for c in chunks)
    (request,) = fake.requests
    assert request.model_name == "tensorrt_llm" and request.id == "1234"
    assert request.parameters[EMPTY_FINAL].bool_param
    assert [o.name for o in request.outputs] == [OUTPUT_IDS, SEQUENCE_LENGTH, OUTPUT_LOG_PROBS]
    got = inputs_of(request)
    assert set(got) == set(sent)
    for name, array in sent.items():
        assert got[name].dtype == array.dtype and np.array_equal(got[name], array)


def test_tokens_in_the_final_response_come_in_a_final_chunk(serve):
    _, engine = serve(lambda r: [engine_response(**tokens(5)), engine_response(**tokens(6), final=True)])
    chunks = list(engine.stream({"input_ids": np.array([[1]], dtype=np.int32)}, "7"))
    assert [(list(c.token_ids), c.final) for c in chunks] == [([5], False), ([6], True)]


def test_log_probs_and_the_choice_index_are_read(serve):
    arrays = {**tokens(4, 8), OUTPUT_LOG_PROBS: np.array([[[-0.5, -1.5]]], dtype=np.float32),
              SEQUENCE_INDEX: np.array([[2]], dtype=np.int32)}
    _, engine = serve(lambda r: [engine_response(final=True, **arrays)])
    (chunk,) = engine.stream({"input_ids": np.array([[1]], dtype=np.int32)}, "7")
    assert list(chunk.token_ids) == [4, 8] and chunk.log_probs == [-0.5, -1.5] and chunk.sequence_index == 2


def test_an_engine_error_is_passed_on_unchanged(serve):
    _, engine = serve(lambda r: [engine_response(error="[service_unavailable] queue full", final=True)])
    stream = engine.stream({"input_ids": np.array([[1]], dtype=np.int32)}, "8")
    assert next(stream).error == "[service_unavailable] queue full"


@pytest.mark.parametrize(("code", "kind"), [(grpc.StatusCode.UNAVAILABLE, UNAVAILABLE),
                                            (grpc.StatusCode.INTERNAL, SERVER_ERROR)])
def test_a_broken_call_ends_the_stream_with_a_tagged_error(serve, code, kind):
    _, engine = serve(lambda r: [engine_response(**tokens(5)), code])
    chunks = list(engine.stream({"input_ids": np.array([[1]], dtype=np.int32)}, "9"))
    assert list(chunks[0].token_ids) == [5]
    assert parse_error(chunks[1].error).kind == kind and len(chunks) == 2


def test_an_unreachable_engine_is_unavailable():
    engine = GrpcEngine("tensorrt_llm", "127.0.0.1:1")
    (chunk,) = engine.stream({"input_ids": np.array([[1]], dtype=np.int32)}, "10")
    assert parse_error(chunk.error).kind == UNAVAILABLE
    engine.close()


def test_leaving_a_stream_early_cancels_the_engine_call(serve):
    fake, engine = serve(lambda r: [engine_response(**tokens(5)), "wait"])
    stream = engine.stream({"input_ids": np.array([[1]], dtype=np.int32)}, "11")
    assert list(next(stream).token_ids) == [5]
    stream.close()
    assert fake.cancelled.wait(5)


def test_a_finished_stream_is_read_to_its_end_not_cancelled(serve):
    """Triton 2.51 kept an engine request counted as in flight when its call was cancelled after
    the final response: the engine model then could not unload at shutdown."""
    fake, engine = serve(lambda r: [engine_response(final=True, **tokens(5)), "linger"])
    assert [list(c.token_ids) for c in engine.stream({"input_ids": np.array([[1]], dtype=np.int32)}, "13")] == [[5]]
    assert not fake.cancelled.is_set()


def test_a_caller_that_stops_at_a_final_error_does_not_cancel_the_call(serve):
    fake, engine = serve(lambda r: [engine_response(error="[server_error] boom", final=True), "linger"])
    stream = engine.stream({"input_ids": np.array([[1]], dtype=np.int32)}, "14")
    assert next(stream).error == "[server_error] boom"
    stream.close()  # as LlmService does: an error chunk ends the request
    time.sleep(0.4)
    assert not fake.cancelled.is_set()


def test_stop_sends_the_engine_stop_request_with_the_same_id(serve):
    fake, engine = serve(lambda r: [engine_response(**tokens(0)), engine_response(final=True)])
    engine.stop("12")
    (request,) = fake.requests
    assert request.id == "12" and [o.name for o in request.outputs] == [OUTPUT_IDS]
    assert inputs_of(request)["stop"].dtype == np.bool_ and bool(inputs_of(request)["stop"].flat[0])


def test_the_url_comes_from_the_launchers_environment():
    assert engine_url({ENGINE_GRPC_ENV: "127.0.0.1:9101"}) == "127.0.0.1:9101"
    assert engine_url({}) == DEFAULT_URL


def test_plain_token_ids_reads_only_plain_responses():
    """The numpy-free read of the common response gives what read_response gives, and leaves
    every other response to it (log-probabilities, a choice's index, an unexpected type)."""
    from trident.engine_tensors import read_response
    from trident.triton_wire import output_arrays

    for ids in ((7,), (1, -2, 49151), ()):
        infer = engine_response(**tokens(*ids)).infer_response
        assert plain_token_ids(infer) == list(ids) == read_response(output_arrays(infer).get).token_ids
    only_ids = engine_response(**{OUTPUT_IDS: np.array([[[5, 6]]], dtype=np.int32)}).infer_response
    assert plain_token_ids(only_ids) == [5, 6]
    for others in ({OUTPUT_LOG_PROBS: np.array([[[-0.5]]], dtype=np.float32)},
                   {SEQUENCE_INDEX: np.array([[1]], dtype=np.int32)}):
        assert plain_token_ids(engine_response(**tokens(9), **others).infer_response) is None
    wide = engine_response(**{OUTPUT_IDS: np.array([[[5]]], dtype=np.int64)}).infer_response
    assert plain_token_ids(wide) is None
    assert plain_token_ids(engine_response(final=True).infer_response) is None
