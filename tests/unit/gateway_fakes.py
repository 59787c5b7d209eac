"""Fakes for the gateway's tests: a ``Backend`` (in-process) and a Triton gRPC server."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

from gateway.backend import ChoiceEnd, Event, Finished, TextDelta
from gateway.errors import ApiError
from gateway.triton_codec import serialize
from trident.contract import CANCEL_PARAMETER, CANCEL_TOKEN_PARAMETER, ModelLimits, TextRequest
from trident.triton_wire import deserialize

GenerationParams = TextRequest  # what a backend receives

DEFAULT_DELTAS = ("Hello", ",", " wor", "ld", " ✓", "!")


@dataclass
class Pause:
    """A script step: wait this long (or until the generation is closed)."""

    seconds: float


@dataclass
class Gate:
    """A script step: wait until ``event`` is set (or the generation is closed; at most 30 s)."""

    event: threading.Event


Step = str | TextDelta | Finished | Pause | Gate | BaseException
Script = Callable[[GenerationParams], list[Step]]


def default_script(params: GenerationParams) -> list[Step]:
    """Deltas (one, joined, when not streaming, as the "llm" model does) then Finished; with
    ``n`` choices, each choice's deltas in turn and every choice's end, as the llm model sends."""
    max_new_tokens, n = params.sampling.max_new_tokens, params.sampling.n
    deltas = list(DEFAULT_DELTAS)[:max_new_tokens]
    reason = "length" if max_new_tokens <= len(DEFAULT_DELTAS) else "eos_token"
    prompt_tokens = len(params.prompt.split())
    if n == 1:
        steps: list[Step] = deltas if params.stream else ["".join(deltas)]
        return [*steps, Finished(reason, prompt_tokens=prompt_tokens, completion_tokens=len(deltas))]
    texts = deltas if params.stream else ["".join(deltas)]
    steps = [TextDelta(text, index=i) for i in range(n) for text in texts]
    ends = tuple(ChoiceEnd(i, reason, len(deltas)) for i in range(n))
    return [*steps, Finished(reason, prompt_tokens=prompt_tokens, completion_tokens=n * len(deltas), choices=ends)]


class FakeGeneration:
    def __init__(self, steps: list[Step]) -> None:
        self._steps = steps
        self.closed = threading.Event()
        self.consumed = 0  # steps taken: after close, no more are

    def __iter__(self) -> Iterator[Event]:
        for step in self._steps:
            if self.closed.is_set():
                return
            self.consumed += 1
            if isinstance(step, Pause):
                if self.closed.wait(step.seconds):
                    return
            elif isinstance(step, Gate):
                deadline = time.monotonic() + 30
                while not step.event.wait(0.01):
                    if self.closed.is_set() or time.monotonic() > deadline:
                        return
            elif isinstance(step, BaseException):
                raise step
            elif isinstance(step, str):
                yield TextDelta(step)
            else:
                yield step

    def close(self) -> None:
        self.closed.set()


@dataclass
class FakeBackend:
    script: Script = default_script
    generate_error: ApiError | None = None  # raised by generate() itself
    ready_error: ApiError | None = None  # raised by check_ready()
    model_limits: ModelLimits = field(default_factory=ModelLimits)  # what Triton would report
    calls: list[tuple[GenerationParams, str]] = field(default_factory=list)
    generations: list[FakeGeneration] = field(default_factory=list)
    tokenizer_calls: list[tuple] = field(default_factory=list)

    def generate(self, params: GenerationParams, *, request_id: str) -> FakeGeneration:
        self.calls.append((params, request_id))
        if self.generate_error is not None:
            raise self.generate_error
        generation = FakeGeneration(self.script(params))
        self.generations.append(generation)
        return generation

    def check_ready(self) -> None:
        if self.ready_error is not None:
            raise self.ready_error

    def limits(self, model: str) -> ModelLimits:
        return self.model_limits

    def tokenize(self, model: str, text: str, *, add_special_tokens: bool, request_id: str) -> list[int]:
        """One id per character below 256 (its code), after a 1 (the "special token") when asked."""
        self.tokenizer_calls.append(("tokenize", model, text, add_special_tokens))
        return ([1] if add_special_tokens else []) + [ord(c) if ord(c) < 256 else 0 for c in text]

    def tokenize_pieces(self, model: str, text: str, *, add_special_tokens: bool,
                        request_id: str) -> tuple[list[int], list[str]]:
        """tokenize's ids; each one's piece: "<s>" for the special token, else its character."""
        ids = self.tokenize(model, text, add_special_tokens=add_special_tokens, request_id=request_id)
        return ids, ["<s>" if i == 1 else chr(i) for i in ids]

    def detokenize(self, model: str, ids: list[int], *, request_id: str) -> str:
        self.tokenizer_calls.append(("detokenize", model, ids))
        return "".join(chr(i) if i < 256 else f"<{i}>" for i in ids if i != 1)

    @property
    def last_params(self) -> GenerationParams:
        return self.calls[-1][0]


def wait_until(predicate: Callable[[], bool], timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def stream_response(*, text=None, finish=None, final=False, error="", arrays=None):
    """A ModelStreamInferResponse as Triton would send it for model "llm" (``arrays``: more
    output tensors, e.g. trident.llm_io.output_tensors')."""
    response = service_pb2.ModelStreamInferResponse(error_message=error)
    infer = response.infer_response
    infer.model_name = "llm"
    infer.id = "rid"
    infer.parameters["triton_final_response"].bool_param = final
    outputs = {}
    if text is not None:
        outputs["text_output"] = np.array([[text.encode()]], dtype=np.object_)
    if finish is not None:
        reason, prompt_tokens, completion_tokens = finish
        outputs["finish_reason"] = np.array([[reason.encode()]], dtype=np.object_)
        outputs["prompt_tokens"] = np.array([[prompt_tokens]], dtype=np.int32)
        outputs["completion_tokens"] = np.array([[completion_tokens]], dtype=np.int32)
    outputs.update(arrays or {})
    add_outputs(infer, outputs)
    return response


def add_outputs(infer, arrays) -> None:
    """Put numpy arrays into a ModelInferResponse as Triton does (raw_output_contents)."""
    for name, array in arrays.items():
        datatype, raw = serialize(array)
        tensor = infer.outputs.add(name=name, datatype=datatype)
        tensor.shape.extend(array.shape)
        infer.raw_output_contents.append(raw)


# -- a fake Triton gRPC server ------------------------------------------------------------------


class FakeTriton(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Answers like Triton's "llm" model, scripted by the prompt:

    * anything else: stream=true -> deltas "Hello", ",", " world", then finish outputs on a
      non-final response, then an empty final response; stream=false -> one final response with
      the whole text and the finish outputs;
    * "slow": one delta, then waits (up to 30 s) for the client to cancel;
    * "stall": waits for cancel before any output; "flood": 200 deltas of 64 KiB at once (more
      than a socket's buffers hold), then waits for the cancel; "error-400", "error-500", "error-after",
      "no-finish": see ``_script``.

    Cancellations are counted in ``cancelled`` and, when ``cancel_log`` is set, appended to it
    (a line each: the prompt, then ``cancel-request`` when the cancel request came on the stream
    of the request it ends, ``cancel-request-elsewhere`` when on a call of its own, or
    ``grpc-cancel``).
    """

    DELTAS = ("Hello", ",", " world")

    def __init__(self, cancel_log: str | None = None) -> None:
        self.requests: list[service_pb2.ModelInferRequest] = []
        self.cancel_requests: list[str] = []  # tokens named by llm cancel requests
        self._cancel_events: dict[str, threading.Event] = {}
        self._cancel_where: dict[str, str] = {}  # token -> how its cancel request came
        self._lock = threading.Lock()
        self.cancelled: list[str] = []  # requests ended early, by a cancel request or a gRPC cancel
        self.grpc_cancelled: list[str] = []  # of those, the ones whose call the client cancelled
        self.ready_models = {"llm"}
        self.cancel_log = cancel_log

    def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return service_pb2.ServerReadyResponse(ready=True)

    def ModelReady(self, request, context):
        return service_pb2.ModelReadyResponse(ready=request.name in self.ready_models)

    def ModelConfig(self, request, context):
        response = service_pb2.ModelConfigResponse()
        response.config.name = request.name
        response.config.parameters["max_context"].string_value = "2048"
        response.config.parameters["max_new_tokens_limit"].string_value = "2048"
        return response

    def ModelStreamInfer(self, request_iterator, context):
        """Like Triton: every request read from the stream is answered at once, concurrently
        with the others (a cancel request can follow its request on the same stream), and the
        RPC ends when the client has half-closed and every request has had its last response."""
        rpc = {"prompt": None, "done": False, "tokens": set()}
        # Recorded when the RPC ends without finishing: the server may stop iterating this
        # generator at a yield when the client cancels, so code after a yield need not run.
        context.add_callback(lambda: rpc["done"] or self._record_cancel(rpc["prompt"], grpc_cancel=True))
        out: queue.SimpleQueue = queue.SimpleQueue()
        answered = object()  # one request had its last response

        def answer(request) -> None:
            try:
                for response in self._answer(request, context, rpc):
                    out.put(response)
            finally:
                out.put(answered)

        def read() -> None:
            count = 0
            try:
                for request in request_iterator:
                    if CANCEL_TOKEN_PARAMETER in request.parameters:
                        rpc["tokens"].add(request.parameters[CANCEL_TOKEN_PARAMETER].string_param)
                    count += 1
                    threading.Thread(target=answer, args=(request,), daemon=True).start()
            except Exception:  # the client cancelled: the RPC is over
                pass
            out.put(("read", count))

        threading.Thread(target=read, daemon=True).start()
        requests_read, finished = None, 0
        while requests_read is None or finished < requests_read:
            item = out.get()
            if item is answered:
                finished += 1
            elif isinstance(item, tuple):
                requests_read = item[1]
            else:
                yield item
        rpc["done"] = True

    def _answer(self, request, context, rpc):
        if CANCEL_PARAMETER in request.parameters:  # llm's cancel request: ends the named one
            token = request.parameters[CANCEL_PARAMETER].string_param
            self.cancel_requests.append(token)
            # Where it came: on the stream of the request it names, or on a call of its own
            # (which, with several Tritons behind one channel, may reach another server).
            self._cancel_where[token] = "cancel-request" if token in rpc["tokens"] else "cancel-request-elsewhere"
            self._cancel_event(token).set()
            yield stream_response(final=True)
            return
        self.requests.append(request)
        token = request.parameters[CANCEL_TOKEN_PARAMETER].string_param if CANCEL_TOKEN_PARAMETER in request.parameters else ""
        ended = self._cancel_event(token)
        inputs = {t.name: (t, raw) for t, raw in zip(request.inputs, request.raw_input_contents)}
        prompt = rpc["prompt"] = bytes(deserialize_input(inputs["text_input"]).flat[0]).decode()
        stream = bool(deserialize_input(inputs["stream"]).flat[0]) if "stream" in inputs else False
        for step in self._script(prompt, stream):
            if isinstance(step, Pause):
                deadline = time.monotonic() + step.seconds
                while context.is_active() and not ended.is_set() and time.monotonic() < deadline:
                    time.sleep(0.01)
                if not context.is_active():
                    return
                if ended.is_set():  # as llm does: the request ends with an empty final response
                    self._record_cancel(prompt, how=self._cancel_where.get(token, "cancel-request"))
                    yield stream_response(final=True)
                    return
            else:
                yield step
        if isinstance(step, Pause) or not (step.error_message or
                                           step.infer_response.parameters["triton_final_response"].bool_param):
            # Triton flags every request's last response (the empty final one when asked for)
            yield stream_response(final=True)

    def _cancel_event(self, token: str) -> threading.Event:
        if not token:
            return threading.Event()
        with self._lock:
            return self._cancel_events.setdefault(token, threading.Event())

    def _record_cancel(self, prompt: str | None, *, grpc_cancel: bool = False, how: str = "cancel-request") -> None:
        if grpc_cancel:
            self.grpc_cancelled.append(prompt or "")
            how = "grpc-cancel"
        self.cancelled.append(prompt or "")
        if self.cancel_log:
            with open(self.cancel_log, "a") as f:
                f.write(f"{prompt} {how}\n")

    def _script(self, prompt: str, stream: bool) -> list:
        finish = ("eos_token", len(prompt.split()), len(self.DELTAS))
        if prompt == "slow":
            return [stream_response(text="Hello"), Pause(30)]
        if prompt == "stall":
            return [Pause(30)]
        if prompt == "flood":
            return [*(stream_response(text="x" * 65536) for _ in range(200)), Pause(30)]
        if prompt == "stall-after":
            return [stream_response(text="Hello"), Pause(30)]
        if prompt == "error-400":
            return [stream_response(error="[invalid_request_error:prompt] prompt has 5000 tokens, the context 2048")]
        if prompt == "error-500":
            return [stream_response(error="engine exploded at engine.py:12")]
        if prompt == "error-after":
            return [stream_response(text="Hello"), stream_response(error="[service_unavailable] engine restarting")]
        if prompt == "no-finish":
            return [stream_response(text="Hello")]
        if not stream:
            return [stream_response(text="".join(self.DELTAS), finish=finish, final=True)]
        return [
            *(stream_response(text=d) for d in self.DELTAS),
            stream_response(finish=finish),
            stream_response(final=True),
        ]


def deserialize_input(pair) -> np.ndarray:
    tensor, raw = pair
    return deserialize(tensor.datatype, list(tensor.shape), raw)


def start_fake_triton(servicer: FakeTriton, port: int = 0) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server, port


if __name__ == "__main__":  # python gateway_fakes.py PORT CANCEL_LOG: a fake Triton for gunicorn tests
    import sys

    _server, _port = start_fake_triton(FakeTriton(cancel_log=sys.argv[2]), int(sys.argv[1]))
    print(f"fake triton on {_port}", flush=True)
    _server.wait_for_termination()
