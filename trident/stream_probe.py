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

    python -m trident.stream_probe                      # 127.0.0.1:$TRITON_GRPC_PORT (8001)
    python -m trident.stream_probe --url triton:8001 --timeout 10

Exit status 0 when the ping was answered, 1 when not (a Kubernetes exec liveness probe). Where
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


class ProbeFailed(RuntimeError):
    """The server did not answer the ping (the message says how)."""


def _ping_request(model: str):
    from .triton_wire import infer_request

    return infer_request(model, control_inputs(), request_id="ping-" + uuid.uuid4().hex[:12], outputs=("server",),
                         bool_parameters=(PING_PARAMETER,))


def ping(url: str, *, model: str = MODEL, timeout: float = 10.0) -> str:
    """Ping ``model`` at the Triton gRPC endpoint ``url`` (``host:port``) on a stream call; the
    server id it answers with. Raises :class:`ProbeFailed` when no final answer comes within
    ``timeout`` seconds, or an error does."""
    import grpc
    from tritonclient.grpc import service_pb2

    from .triton_wire import STREAM_METHOD, is_final, output_arrays

    request = _ping_request(model)
    with grpc.insecure_channel(url) as channel:
        call = channel.unary_stream(STREAM_METHOD, request_serializer=service_pb2.ModelInferRequest.SerializeToString,
                                    response_deserializer=service_pb2.ModelStreamInferResponse.FromString)
        server: Optional[str] = None
        answered = False
        error = ""
        try:
            # Read to the call's end, also after an error: a call dropped after its final response
            # is cancelled by grpcio, which left Triton 2.51 counting the request as in flight.
            for response in call(request, timeout=timeout, wait_for_ready=False):
                if response.error_message:
                    error = error or response.error_message
                    continue
                arrays = output_arrays(response.infer_response)
                if "server" in arrays and arrays["server"].size:
                    value = arrays["server"].flat[0]
                    server = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
                answered = answered or is_final(response.infer_response)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise ProbeFailed(f"no answer to a stream ping to {model} at {url} in {timeout:g} s") from None
            detail = exc.details() if hasattr(exc, "details") else str(exc)
            raise ProbeFailed(f"stream ping to {model} at {url} failed: {code.name if code else ''} {detail}") from None
    if error:
        raise ProbeFailed(f"{model} answered the ping with an error: {error}")
    if not answered:
        raise ProbeFailed(f"the stream ping to {model} at {url} ended without a final response")
    return server or "?"


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
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the answer")
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
        server = ping(args.url, model=args.model, timeout=args.timeout)
    except ProbeFailed as failure:
        print(f"not live: {failure}", file=sys.stderr)
        return 1
    print(f"live: {args.model} at {args.url} (server {server}) answered a stream ping in "
          f"{(time.monotonic() - started) * 1000:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
