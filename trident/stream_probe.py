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
from typing import Optional

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


def probe(url: str, *, model: str = MODEL, timeout: float = 10.0) -> tuple[str, list[str], int]:
    """Ping ``model`` until every instance its config names has answered, one ping after another,
    all within ``timeout`` seconds. Returns the server id, the instances and the pings sent;
    raises :class:`ProbeFailed` at an error answer, or when an instance has answered none."""
    import grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(url) as channel:
        instances = _instances(channel, url, model, timeout)
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
                server, instance = _ping(channel, url, model, left)
            except ProbeFailed as failure:
                raise ProbeFailed(f"{failure} (ping {pings + 1})") from None
            pings += 1
            answered[instance] = answered.get(instance, 0) + 1
    return server, sorted(answered), pings


def _instances(channel, url: str, model: str, timeout: float) -> int:
    """How many instances of ``model`` the server runs: its config's instance groups, each
    ``count`` instances (on each of its GPUs, for a group that lists GPUs)."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    try:
        config = stub.ModelConfig(service_pb2.ModelConfigRequest(name=model), timeout=timeout,
                                  wait_for_ready=False).config
    except grpc.RpcError as exc:
        raise _failed(exc, f"the config of {model} at {url}", timeout) from None
    return max(1, sum(max(1, group.count) * max(1, len(group.gpus)) for group in config.instance_group))


def _failed(exc, what: str, timeout: float) -> ProbeFailed:
    import grpc

    code = exc.code() if hasattr(exc, "code") else None
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ProbeFailed(f"no answer to {what} in {timeout:.3g} s")
    detail = exc.details() if hasattr(exc, "details") else str(exc)
    return ProbeFailed(f"{what} failed: {code.name if code else ''} {detail}")


def _ping(channel, url: str, model: str, timeout: float) -> tuple[str, str]:
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
        for response in call(_ping_request(model), timeout=timeout, wait_for_ready=False):
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
        raise ProbeFailed(f"{model} answered the ping with an error: {error}")
    if not answered:
        raise ProbeFailed(f"the stream ping to {model} at {url} ended without a final response")
    return named.get("server", "?"), named.get("instance", "?")


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
        server, instances, pings = probe(args.url, model=args.model, timeout=args.timeout)
    except ProbeFailed as failure:
        print(f"not live: {failure}", file=sys.stderr)
        return 1
    print(f"live: {args.model} at {args.url} (server {server}) answered {pings} stream ping{'s' * (pings != 1)} in "
          f"{(time.monotonic() - started) * 1000:.0f} ms, from each of its instances ({', '.join(instances)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
