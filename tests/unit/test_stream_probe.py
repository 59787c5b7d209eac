"""trident.stream_probe against an in-process gRPC server with Triton's streaming method: what the
ping sends, and each way a server can fail it (no answer, an error, no final response)."""
from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from trident import stream_probe
from trident.contract import PING_PARAMETER
from trident.triton_wire import FINAL_FLAG, deserialize, serialize


class FakeTriton:
    """``ModelStreamInfer`` answering each request as ``behaviour`` says: "pong" (the llm model's
    answer), "hang" (a stuck server), "error", "no-final" (responses that never end the request)."""

    def __init__(self, behaviour: str) -> None:
        self.behaviour = behaviour
        self.requests: list[service_pb2.ModelInferRequest] = []
        self.release = threading.Event()
        self.cancelled_after_answer: bool | None = None
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        handler = grpc.stream_stream_rpc_method_handler(
            self._stream, request_deserializer=service_pb2.ModelInferRequest.FromString,
            response_serializer=service_pb2.ModelStreamInferResponse.SerializeToString)
        self.server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler("inference.GRPCInferenceService", {"ModelStreamInfer": handler})])
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _stream(self, requests, context):
        for request in requests:
            self.requests.append(request)
            if self.behaviour == "hang":
                self.release.wait(30)
                return
            response = service_pb2.ModelStreamInferResponse()
            if self.behaviour == "error":
                response.error_message = "Stub process 'llm_0_0' is not healthy."
                yield response
                time.sleep(0.3)  # a client that drops the call now cancels it
                self.cancelled_after_answer = not context.is_active()
                continue
            infer = response.infer_response
            infer.model_name, infer.id = request.model_name, request.id
            datatype, raw = serialize(np.array([[b"triton-7:8001"]], dtype=np.object_))
            tensor = infer.outputs.add(name="server", datatype=datatype)
            tensor.shape.extend([1, 1])
            infer.raw_output_contents.append(raw)
            if self.behaviour == "pong":
                infer.parameters[FINAL_FLAG].bool_param = True
            yield response

    def close(self) -> None:
        self.release.set()
        self.server.stop(0)


@pytest.fixture
def triton(request):
    server = FakeTriton(request.param)
    yield server
    server.close()


@pytest.mark.parametrize("triton", ["pong"], indirect=True)
def test_a_ping_is_one_request_to_llm_with_its_required_inputs_and_the_ping_parameter(triton):
    assert stream_probe.ping(triton.url, timeout=5) == "triton-7:8001"
    (request,) = triton.requests
    assert request.model_name == "llm" and request.parameters[PING_PARAMETER].bool_param
    inputs = {t.name: deserialize(t.datatype, t.shape, raw) for t, raw in zip(request.inputs, request.raw_input_contents)}
    assert set(inputs) == {"text_input", "max_tokens"} and int(inputs["max_tokens"].flat[0]) == 1
    assert [o.name for o in request.outputs] == ["server"]


@pytest.mark.parametrize("triton", ["hang"], indirect=True)
def test_a_server_that_does_not_answer_fails_within_the_timeout(triton):
    started = time.monotonic()
    with pytest.raises(stream_probe.ProbeFailed, match="no answer to a stream ping"):
        stream_probe.ping(triton.url, timeout=0.5)
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("triton", ["error"], indirect=True)
def test_an_error_answer_fails_and_the_call_is_read_to_its_end(triton):
    """Not cancelled after its last response: that left Triton 2.51 counting the request as in
    flight (docs/architecture.md)."""
    with pytest.raises(stream_probe.ProbeFailed, match="not healthy"):
        stream_probe.ping(triton.url, timeout=5)
    assert triton.cancelled_after_answer is False


@pytest.mark.parametrize("triton", ["no-final"], indirect=True)
def test_a_stream_without_a_final_response_fails(triton):
    with pytest.raises(stream_probe.ProbeFailed, match="without a final response"):
        stream_probe.ping(triton.url, timeout=5)


@pytest.mark.parametrize("triton", ["pong", "hang"], indirect=True)
def test_the_command_exits_0_when_answered_and_1_when_not(triton, capsys):
    code = stream_probe.main(["--url", triton.url, "--timeout", "0.5"])
    out = capsys.readouterr()
    if triton.behaviour == "pong":
        assert code == 0 and "server triton-7:8001" in out.out
    else:
        assert code == 1 and "not live" in out.err


def test_nothing_listening_fails():
    with pytest.raises(stream_probe.ProbeFailed):
        stream_probe.ping("127.0.0.1:9", timeout=2)
