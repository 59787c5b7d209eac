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
    answer), "hang" (a stuck server), "error", "no-final" (responses that never end the request),
    "one-hung-of-two" (pong and error in turn: Triton handing requests in turn to two instances,
    one with a stub the Python backend finds unhealthy), "one-blocked-of-two" (every pong from
    the first instance: the other's execute blocks, so it takes no request); ``ModelConfig``
    naming ``instances`` instances, whose pongs name them in turn. The engine model
    ``tensorrt_llm`` (``llm``'s ``engine_model`` when ``engine_backend`` is set) answers a stop
    request as ``engine`` says: "final" (the CPU engine), or "dead" (its stub died). The
    ``preprocessing`` model is missing (NOT_FOUND) unless ``preprocessing_backend`` is set; it
    answers as ``preprocessing`` says ("final" or "dead")."""

    def __init__(self, behaviour: str, instances: int = 1) -> None:
        self.behaviour = behaviour
        self.instances = instances
        self.groups = [(instances, [])]  # the config's instance groups: count, GPUs (count on each)
        self.engine_backend: str | None = None  # None: llm's config names no engine model
        self.engine = "final"
        self.preprocessing_backend: str | None = None  # None: the repository has no preprocessing model
        self.preprocessing = "final"
        self.requests: list[service_pb2.ModelInferRequest] = []
        self.release = threading.Event()
        self.cancelled_after_answer: bool | None = None
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        handler = grpc.stream_stream_rpc_method_handler(
            self._stream, request_deserializer=service_pb2.ModelInferRequest.FromString,
            response_serializer=service_pb2.ModelStreamInferResponse.SerializeToString)
        config = grpc.unary_unary_rpc_method_handler(
            self._config, request_deserializer=service_pb2.ModelConfigRequest.FromString,
            response_serializer=service_pb2.ModelConfigResponse.SerializeToString)
        self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            "inference.GRPCInferenceService", {"ModelStreamInfer": handler, "ModelConfig": config})])
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _config(self, request, context):
        response = service_pb2.ModelConfigResponse()
        response.config.name = request.name
        if request.name == "preprocessing":
            if self.preprocessing_backend is None:
                context.abort(grpc.StatusCode.NOT_FOUND, "Request for unknown model: 'preprocessing' is not found")
            response.config.backend = self.preprocessing_backend
            response.config.instance_group.add(name="preprocessing_0", count=2)
            return response
        if request.name == "tensorrt_llm":
            response.config.backend = self.engine_backend
            response.config.instance_group.add(name="tensorrt_llm_0", count=1)
            return response
        response.config.backend = "python"
        if self.engine_backend is not None:
            response.config.parameters["engine_model"].string_value = "tensorrt_llm"
        for i, (count, gpus) in enumerate(self.groups):
            response.config.instance_group.add(name=f"{request.name}_{i}", count=count, gpus=gpus)
        return response

    def _stream(self, requests, context):
        for request in requests:
            self.requests.append(request)
            if request.model_name in ("tensorrt_llm", "preprocessing"):
                response = service_pb2.ModelStreamInferResponse()
                how = self.engine if request.model_name == "tensorrt_llm" else self.preprocessing
                if how == "dead":  # what Triton answers after a second for a dead stub
                    response.error_message = f"Stub process '{request.model_name}_0_0' is not healthy."
                else:
                    response.infer_response.model_name = request.model_name
                    response.infer_response.parameters[FINAL_FLAG].bool_param = True
                yield response
                continue
            if self.behaviour == "hang":
                self.release.wait(30)
                return
            response = service_pb2.ModelStreamInferResponse()
            if self.behaviour == "error" or (self.behaviour == "one-hung-of-two" and len(self.requests) % 2 == 0):
                response.error_message = f"Stub process 'llm_0_{int(self.behaviour != 'error')}' is not healthy."
                yield response
                time.sleep(0.3)  # a client that drops the call now cancels it
                self.cancelled_after_answer = not context.is_active()
                continue
            infer = response.infer_response
            infer.model_name, infer.id = request.model_name, request.id
            turn = 0 if self.behaviour == "one-blocked-of-two" else (len(self.requests) - 1) % self.instances
            for name, value in (("server", b"triton-7:8001"), ("instance", b"llm_0_%d" % turn)):
                datatype, raw = serialize(np.array([[value]], dtype=np.object_))
                tensor = infer.outputs.add(name=name, datatype=datatype)
                tensor.shape.extend([1, 1])
                infer.raw_output_contents.append(raw)
            if self.behaviour in ("pong", "one-hung-of-two", "one-blocked-of-two"):
                infer.parameters[FINAL_FLAG].bool_param = True
            yield response

    def close(self) -> None:
        self.release.set()
        self.server.stop(0)


@pytest.fixture
def triton(request):
    behaviour, _, instances = request.param.partition("/")
    server = FakeTriton(behaviour, int(instances or 1))
    yield server
    server.close()


@pytest.mark.parametrize("triton", ["pong"], indirect=True)
def test_a_ping_is_one_request_to_llm_with_its_required_inputs_and_the_ping_parameter(triton):
    assert stream_probe.probe(triton.url, timeout=5) == ("triton-7:8001", ["llm_0_0"], 1, None, False)
    (request,) = triton.requests
    assert request.model_name == "llm" and request.parameters[PING_PARAMETER].bool_param
    inputs = {t.name: deserialize(t.datatype, t.shape, raw) for t, raw in zip(request.inputs, request.raw_input_contents)}
    assert set(inputs) == {"text_input", "max_tokens"} and int(inputs["max_tokens"].flat[0]) == 1
    assert [o.name for o in request.outputs] == ["server", "instance"]


@pytest.mark.parametrize("triton", ["hang"], indirect=True)
def test_a_server_that_does_not_answer_fails_within_the_timeout(triton):
    started = time.monotonic()
    with pytest.raises(stream_probe.ProbeFailed, match="no answer to a stream ping"):
        stream_probe.probe(triton.url, timeout=0.5)
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("triton", ["error"], indirect=True)
def test_an_error_answer_fails_and_the_call_is_read_to_its_end(triton):
    """Not cancelled after its last response: that left Triton 2.51 counting the request as in
    flight (docs/architecture.md)."""
    with pytest.raises(stream_probe.ProbeFailed, match="not healthy"):
        stream_probe.probe(triton.url, timeout=5)
    assert triton.cancelled_after_answer is False


@pytest.mark.parametrize("triton", ["no-final"], indirect=True)
def test_a_stream_without_a_final_response_fails(triton):
    with pytest.raises(stream_probe.ProbeFailed, match="without a final response"):
        stream_probe.probe(triton.url, timeout=5)


@pytest.mark.parametrize("triton", ["pong/2"], indirect=True)
def test_the_instance_count_is_every_group_of_the_config(triton):
    """Triton runs a group's count on each GPU it lists (and a count of 0 is its default, 1)."""
    with grpc.insecure_channel(triton.url) as channel:
        assert stream_probe._count(stream_probe._config(channel, triton.url, "llm", 5)) == 2
        triton.groups = [(2, [0, 1]), (0, [])]
        assert stream_probe._count(stream_probe._config(channel, triton.url, "llm", 5)) == 2 * 2 + 1


@pytest.mark.parametrize("triton", ["pong/3"], indirect=True)
def test_a_probe_pings_until_each_instance_has_answered(triton):
    assert stream_probe.probe(triton.url, timeout=5) == ("triton-7:8001", ["llm_0_0", "llm_0_1", "llm_0_2"], 3, None, False)
    assert len(triton.requests) == 3 and len({r.id for r in triton.requests}) == 3


@pytest.mark.parametrize("triton", ["one-hung-of-two/2"], indirect=True)
def test_a_probe_fails_when_one_instance_of_two_fails(triton):
    """Triton hands an idle server's requests to the instances in turn: one ping a probe failed
    every other probe, so 3 failures in a row never came."""
    triton.groups = [(1, [])]  # a probe of one ping, as before: it reaches the healthy instance
    assert stream_probe.probe(triton.url, timeout=5) == ("triton-7:8001", ["llm_0_0"], 1, None, False)
    triton.groups = [(2, [])]
    with pytest.raises(stream_probe.ProbeFailed, match=r"not healthy.*\(ping 1\)"):
        stream_probe.probe(triton.url, timeout=5)  # the next request reaches the other one


@pytest.mark.parametrize("triton", ["one-blocked-of-two/2"], indirect=True)
def test_a_probe_fails_when_an_instance_answers_no_ping(triton):
    started = time.monotonic()
    with pytest.raises(stream_probe.ProbeFailed, match=r"1 of the 2 instances of llm .* answered none of \d+ "
                                                       r"stream pings in 1 s \(answered: llm_0_0 \d+\)"):
        stream_probe.probe(triton.url, timeout=1)
    assert time.monotonic() - started < 3
    assert 2 <= len(triton.requests) <= 1 / stream_probe.PING_PAUSE + 2  # paced, not a flood


@pytest.mark.parametrize("triton", ["hang/2"], indirect=True)
def test_the_timeout_bounds_the_whole_probe(triton):
    started = time.monotonic()
    with pytest.raises(stream_probe.ProbeFailed, match="no answer to a stream ping"):
        stream_probe.probe(triton.url, timeout=0.5)
    assert time.monotonic() - started < 5 and len(triton.requests) == 1


@pytest.mark.parametrize("triton", ["pong", "hang"], indirect=True)
def test_the_command_exits_0_when_answered_and_1_when_not(triton, capsys):
    code = stream_probe.main(["--url", triton.url, "--timeout", "0.5"])
    out = capsys.readouterr()
    if triton.behaviour == "pong":
        assert code == 0 and "server triton-7:8001" in out.out and "instances (llm_0_0)" in out.out
    else:
        assert code == 1 and "not live" in out.err


@pytest.mark.parametrize("triton", ["pong"], indirect=True)
def test_a_python_backend_engine_gets_a_stop_ping_without_a_request_id(triton):
    triton.engine_backend = "python"  # the CPU engine
    assert stream_probe.probe(triton.url, timeout=5) == ("triton-7:8001", ["llm_0_0"], 1, "tensorrt_llm", False)
    ping, stop = triton.requests
    assert ping.model_name == "llm" and stop.model_name == "tensorrt_llm" and stop.id == ""  # stops nothing
    inputs = {t.name: deserialize(t.datatype, t.shape, raw) for t, raw in zip(stop.inputs, stop.raw_input_contents)}
    assert bool(inputs["stop"].flat[0]) and {"input_ids", "input_lengths", "request_output_len"} <= set(inputs)


@pytest.mark.parametrize("triton", ["pong"], indirect=True)
def test_a_dead_engine_stub_fails_the_probe_though_llm_answers(triton, capsys):
    """Triton does not restart a Python-backend stub that died, and stays ready; llm answers its
    pings without the engine (by hand: every generation a 500 after a second, the llm ping fine)."""
    triton.engine_backend, triton.engine = "python", "dead"
    with pytest.raises(stream_probe.ProbeFailed, match=r"the engine model: tensorrt_llm answered the stop ping with "
                                                       r"an error: Stub process 'tensorrt_llm_0_0' is not healthy"):
        stream_probe.probe(triton.url, timeout=5)
    assert stream_probe.main(["--url", triton.url, "--timeout", "5"]) == 1
    assert "not live: the engine model" in capsys.readouterr().err


@pytest.mark.parametrize("triton", ["pong"], indirect=True)
def test_tensorrt_llms_own_backend_is_not_pinged(triton, capsys):
    """In Triton's process (C++): it cannot die without Triton, and its requests wait behind the batch."""
    triton.engine_backend = "tensorrtllm"
    assert stream_probe.probe(triton.url, timeout=5) == ("triton-7:8001", ["llm_0_0"], 1, None, False)
    assert [r.model_name for r in triton.requests] == ["llm"]
    triton.engine_backend = "python"
    assert stream_probe.main(["--url", triton.url]) == 0
    assert "its engine model tensorrt_llm answered a stop ping" in capsys.readouterr().out


@pytest.mark.parametrize("triton", ["pong"], indirect=True)
def test_each_preprocessing_instance_tokenizes_a_word_where_the_repository_has_one(triton, capsys):
    triton.preprocessing_backend = "python"
    assert stream_probe.probe(triton.url, timeout=5) == ("triton-7:8001", ["llm_0_0"], 1, None, True)
    ping, *words = triton.requests
    assert ping.model_name == "llm" and [r.model_name for r in words] == ["preprocessing"] * 2  # its 2 instances
    inputs = {t.name: deserialize(t.datatype, t.shape, raw) for t, raw in zip(words[0].inputs, words[0].raw_input_contents)}
    assert inputs["QUERY"].flat[0] == b"ping" and inputs["REQUEST_OUTPUT_LEN"].flat[0] == 1
    assert stream_probe.main(["--url", triton.url]) == 0
    assert "; preprocessing tokenized a word, in" in capsys.readouterr().out
    triton.preprocessing_backend = "onnxruntime"  # not a stub of the Python backend: not asked
    triton.requests.clear()
    assert stream_probe.probe(triton.url, timeout=5).preprocessing is False
    assert [r.model_name for r in triton.requests] == ["llm"]


@pytest.mark.parametrize("triton", ["pong"], indirect=True)
def test_a_dead_preprocessing_stub_fails_the_probe_though_llm_and_the_engine_answer(triton, capsys):
    """By hand: with its stub killed, every request to preprocessing failed and Triton, the model
    and the old probe all said ready/live."""
    triton.engine_backend, triton.preprocessing_backend, triton.preprocessing = "python", "python", "dead"
    with pytest.raises(stream_probe.ProbeFailed, match=r"the preprocessing model: preprocessing answered the tokenize "
                                                       r"ping with an error: Stub process 'preprocessing_0_0' is not "
                                                       r"healthy\. \(tokenize ping 1\)"):
        stream_probe.probe(triton.url, timeout=5)
    assert stream_probe.main(["--url", triton.url, "--timeout", "5"]) == 1
    assert "not live: the preprocessing model" in capsys.readouterr().err


def test_nothing_listening_fails_the_probe_at_the_config():
    with pytest.raises(stream_probe.ProbeFailed, match="the config of llm at 127.0.0.1:9 failed: UNAVAILABLE"):
        stream_probe.probe("127.0.0.1:9", timeout=2)
