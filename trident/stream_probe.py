"""Is a Triton's streaming path alive? A ping through ``ModelStreamInfer`` to the ``llm`` model.

Triton's HTTP health endpoints answer from its HTTP server: they stay "live" and "ready" when the
gRPC endpoint's stream handler is deadlocked (Triton 2.51, docs/architecture.md) or when the
``llm`` stub is wedged, and every stream of that server then hangs. This probe sends the
``llm`` model a ping (trident.contract PING_PARAMETER) on a stream call: the model answers at
once, ahead of its queue and without the engine, so a slow answer means a stuck server, not a
busy one.

The call is read to its end and cancelled only when its deadline passes with no answer (a call
cancelled as its response is written is what can deadlock Triton 2.51's endpoint; an answer
comes within milliseconds, the deadline is seconds).

With several instances of ``llm`` (``instance_group`` count above 1, one stub process each),
Triton hands each request to one of them, in turn when they are idle: one ping reaches one
instance. With one stub of two stopped, a probe of one ping failed every other time, so "3
failures in a row" never came. And an instance whose ``execute`` blocks takes no requests at
all, so pings never reach it. :func:`probe` reads the model's instance count from its config and
pings until every instance has answered (the answer names its instance), all within the
timeout; an error answer, or an instance that answers none, fails it.

The engine model (``llm``'s ``engine_model`` parameter) gets a ping of its own where it is a
Python-backend model, as the CPU engine is: the Python backend of Triton 2.51 (and since, up to
at least 2.64: triton-inference-server/server#8604) does not restart a stub that died, and Triton
stays live and ready, the model too, while every request to it fails after a second ("Stub
process ... is not healthy"). ``llm`` answers its pings without the engine, so only a ping of
the engine's own finds that. The ping is TensorRT-LLM's stop request without a request id: the
CPU engine answers it at once, ahead of its queue, and stops nothing. TensorRT-LLM's own backend
(C++, in Triton's process) is not pinged: it cannot die without Triton.

The ``preprocessing`` model (TensorRT-LLM's tokenizing model, kept for clients of Triton's gRPC
that tokenize there; nothing of trident's own path uses it) is a Python-backend model too, with a
stub that can die the same way, while ``llm`` and the engine go on answering: measured, every
request to it then failed ("Stub process 'preprocessing_0_0' is not healthy") and the probe
still passed, so that Triton was never restarted. Where the repository has it, each of its
instances gets a one-word prompt to tokenize (Triton hands requests to idle instances in turn).

    python -m trident.stream_probe                      # 127.0.0.1:$TRITON_GRPC_PORT (8001)
    python -m trident.stream_probe --url triton:8001 --timeout 10   # every ping within 10 s

Exit status 0 when every instance answered, 1 when not (a Kubernetes exec liveness probe). Where
grpcio or tritonclient cannot be imported (an image without them), it checks
``/v2/health/live`` over HTTP instead and says so.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from typing import NamedTuple, Optional

from .contract import PING_PARAMETER, control_inputs

#: The model that answers pings.
MODEL = "llm"

#: Seconds between pings once each instance has had one turn: an instance busy failing another
#: request (a second, for a stub the Python backend finds unhealthy) takes the next ping it can.
PING_PAUSE = 0.05


class ProbeFailed(RuntimeError):
    """The server did not answer the ping (the message says how)."""


def _ping_request(model: str):
    from .triton_wire import infer_request

    return infer_request(model, control_inputs(), request_id="ping-" + uuid.uuid4().hex[:12], outputs=("server", "instance"),
                         bool_parameters=(PING_PARAMETER,))


class Answer(NamedTuple):
    """What a probe heard: the server's id, the ``llm`` instances that answered, the pings sent
    to them, the engine model that answered its own ping (None: not a Python-backend model), and
    whether the ``preprocessing`` model answered (False: the repository has none)."""

    server: str
    instances: list[str]
    pings: int
    engine: Optional[str]
    preprocessing: bool = False


def probe(url: str, *, model: str = MODEL, timeout: float = 10.0) -> Answer:
    """Ping ``model`` until every instance its config names has answered, one ping after another,
    then each instance of its engine model where that is a Python-backend model, all within
    ``timeout`` seconds. Raises :class:`ProbeFailed` at an error answer, or when an instance
    has answered none."""
    import grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(url) as channel:
        config = _config(channel, url, model, timeout)
        instances = _count(config)
        answered: dict[str, int] = {}
        server, pings = "?", 0
        while len(answered) < instances:
            if pings >= instances:
                time.sleep(max(0.0, min(PING_PAUSE, deadline - time.monotonic())))
            left = deadline - time.monotonic()
            if left <= 0:
                heard = ", ".join(f"{name} {count}" for name, count in sorted(answered.items()))
                raise ProbeFailed(f"{instances - len(answered)} of the {instances} instances of {model} at {url} "
                                  f"answered none of {pings} stream pings in {timeout:.3g} s (answered: {heard})")
            try:
                named = _ask(channel, url, model, _ping_request(model), left, "the ping")
            except ProbeFailed as failure:
                raise ProbeFailed(f"{failure} (ping {pings + 1})") from None
            server, instance = named.get("server", "?"), named.get("instance", "?")
            pings += 1
            answered[instance] = answered.get(instance, 0) + 1
        engine = _ping_engine(channel, url, config, deadline)
        preprocessing = _ping_preprocessing(channel, url, deadline)
    return Answer(server, sorted(answered), pings, engine, preprocessing)


def _ping_engine(channel, url: str, llm_config, deadline: float) -> Optional[str]:
    """Ping each instance of ``llm``'s engine model when that is a Python-backend model (a stop
    request without an id, answered at once); returns its name, or None when not pinged."""
    from .engine_tensors import OUTPUT_IDS, stop_inputs
    from .triton_wire import infer_request

    named = llm_config.parameters.get("engine_model")
    if named is None or not named.string_value:
        return None
    engine = named.string_value
    config = _config(channel, url, engine, max(0.001, deadline - time.monotonic()))
    if config.backend != "python":
        return None
    _ask_each_instance(channel, url, engine, _count(config), deadline, "the stop ping", "the engine model",
                       lambda: infer_request(engine, stop_inputs(), outputs=(OUTPUT_IDS,)))
    return engine


#: TensorRT-LLM's tokenizing model (model_repository/common/preprocessing).
PREPROCESSING = "preprocessing"


def _ping_preprocessing(channel, url: str, deadline: float) -> bool:
    """Ask each instance of the ``preprocessing`` model, where the repository has one as a
    Python-backend model, to tokenize one word; returns whether it was asked."""
    import numpy as np

    from .triton_wire import infer_request

    try:
        config = _config(channel, url, PREPROCESSING, max(0.001, deadline - time.monotonic()), missing_ok=True)
    except ProbeFailed as failure:
        raise ProbeFailed(f"the preprocessing model: {failure}") from None
    if config is None or config.backend != "python":
        return False
    inputs = {"QUERY": np.array([[b"ping"]], dtype=np.object_), "REQUEST_OUTPUT_LEN": np.ones((1, 1), dtype=np.int32)}
    _ask_each_instance(channel, url, PREPROCESSING, _count(config), deadline, "the tokenize ping",
                       "the preprocessing model", lambda: infer_request(PREPROCESSING, inputs, outputs=("INPUT_ID",)))
    return True


def _ask_each_instance(channel, url: str, model: str, instances: int, deadline: float, what: str, role: str,
                       request) -> None:
    """Send ``request()`` to ``model`` once per instance, one after another, within ``deadline``."""
    for i in range(instances):
        left = deadline - time.monotonic()
        if left <= 0:
            raise ProbeFailed(f"no time left for {what} to {role} {model} at {url}")
        try:
            _ask(channel, url, model, request(), left, what)
        except ProbeFailed as failure:
            raise ProbeFailed(f"{role}: {failure} ({what.removeprefix('the ')} {i + 1})") from None


def _config(channel, url: str, model: str, timeout: float, *, missing_ok: bool = False):
    """``model``'s config; None for a model the server does not have, when ``missing_ok``."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    try:
        return stub.ModelConfig(service_pb2.ModelConfigRequest(name=model), timeout=timeout,
                                wait_for_ready=False).config
    except grpc.RpcError as exc:
        if missing_ok and hasattr(exc, "code") and exc.code() == grpc.StatusCode.NOT_FOUND:
            return None
        raise _failed(exc, f"the config of {model} at {url}", timeout) from None


def _count(config) -> int:
    """How many instances a model config runs: its instance groups, each ``count`` instances (on
    each of its GPUs, for a group that lists GPUs)."""
    return max(1, sum(max(1, group.count) * max(1, len(group.gpus)) for group in config.instance_group))


def _failed(exc, what: str, timeout: float) -> ProbeFailed:
    import grpc

    code = exc.code() if hasattr(exc, "code") else None
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ProbeFailed(f"no answer to {what} in {timeout:.3g} s")
    detail = exc.details() if hasattr(exc, "details") else str(exc)
    return ProbeFailed(f"{what} failed: {code.name if code else ''} {detail}")


def _ask(channel, url: str, model: str, request, timeout: float, what: str) -> dict[str, str]:
    """Send ``request`` on a stream call and read the call to its end; returns the first value of
    each output. Raises :class:`ProbeFailed` at an error answer, no answer, or no final response."""
    import grpc
    from tritonclient.grpc import service_pb2

    from .triton_wire import STREAM_METHOD, is_final, output_arrays

    call = channel.unary_stream(STREAM_METHOD, request_serializer=service_pb2.ModelInferRequest.SerializeToString,
                                response_deserializer=service_pb2.ModelStreamInferResponse.FromString)
    named: dict[str, str] = {}
    answered = False
    error = ""
    try:
        # Read to the call's end, also after an error: a call dropped after its final response
        # is cancelled by grpcio, which left Triton 2.51 counting the request as in flight.
        for response in call(request, timeout=timeout, wait_for_ready=False):
            if response.error_message:
                error = error or response.error_message
                continue
            for name, array in output_arrays(response.infer_response).items():
                if array.size:
                    value = array.flat[0]
                    named[name] = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
            answered = answered or is_final(response.infer_response)
    except grpc.RpcError as exc:
        raise _failed(exc, f"a stream ping to {model} at {url}", timeout) from None
    if error:
        raise ProbeFailed(f"{model} answered {what} with an error: {error}")
    if not answered:
        raise ProbeFailed(f"{what} to {model} at {url} ended without a final response")
    return named


def _http_live(url: str, timeout: float) -> None:
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout) as response:
        if response.status != 200:
            raise ProbeFailed(f"{url}: HTTP {response.status}")


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Ping a Triton's llm model on a gRPC stream; exit 0 when it answers.")
    p.add_argument("--url", default=f"127.0.0.1:{os.environ.get('TRITON_GRPC_PORT', '8001')}",
                   help="Triton's gRPC endpoint, host:port (default 127.0.0.1:$TRITON_GRPC_PORT or 8001)")
    p.add_argument("--model", default=MODEL)
    p.add_argument("--timeout", type=float, default=10.0, help="seconds the whole probe may take (the config and every ping)")
    p.add_argument("--http-live", default=f"http://127.0.0.1:{os.environ.get('TRITON_HTTP_PORT', '8000')}/v2/health/live",
                   help="checked instead where this Python has no gRPC client")
    args = p.parse_args(argv)
    try:
        import grpc  # noqa: F401
        import tritonclient.grpc  # noqa: F401
    except ImportError as exc:
        try:
            _http_live(args.http_live, args.timeout)
        except (OSError, ProbeFailed) as failure:
            print(f"not live: {failure}", file=sys.stderr)
            return 1
        print(f"live over HTTP only ({args.http_live}): no gRPC client here ({exc})")
        return 0
    started = time.monotonic()
    try:
        answer = probe(args.url, model=args.model, timeout=args.timeout)
    except ProbeFailed as failure:
        print(f"not live: {failure}", file=sys.stderr)
        return 1
    pings = answer.pings
    engine = f"; its engine model {answer.engine} answered a stop ping" if answer.engine else ""
    if answer.preprocessing:
        engine += f"; {PREPROCESSING} tokenized a word"
    print(f"live: {args.model} at {args.url} (server {answer.server}) answered {pings} stream ping{'s' * (pings != 1)}, "
          f"from each of its instances ({', '.join(answer.instances)}){engine}, in "
          f"{(time.monotonic() - started) * 1000:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
