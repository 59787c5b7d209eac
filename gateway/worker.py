"""The gunicorn worker class: gevent for HTTP, real threads for gRPC.

    gunicorn -k gateway.worker.GeventGrpcWorker 'gateway:create_app()'

gunicorn's gevent worker patches everything with gevent; this one leaves ``threading`` (and so
``queue``) unpatched. The gRPC client runs on its own OS thread (gateway.triton_relay: an
asyncio loop with ``grpc.aio``, whose poller threads must be real threads) and hands events to
greenlets in batches through a libev async watcher. Measured with scripts/bench_gateway.py: gRPC's
own gevent integration (``grpc.experimental.gevent.init_gevent``), which the previous version
of this worker used, spent about two thirds of a worker's CPU per relayed token.

What this means for the rest of the gateway: a ``threading`` lock is a real lock, so no code may
hold one across anything that yields to another greenlet (gateway.state.InFlight does not;
prometheus-client and flask-limiter hold theirs only around memory updates); and nothing in a
request may block in a threading primitive waiting for another greenlet.
"""

from __future__ import annotations



from gevent import monkey
from gevent import socket
from gevent.server import StreamServer
from gunicorn.workers import ggevent
from gunicorn.workers.ggevent import GeventWorker


def write_json_error(sock, status_int: int, reason: str, mesg: str) -> None:  # noqa: ANN001
    """gunicorn's answer to a request it could not parse (before the app runs), in the JSON
    envelope of shared/API.md instead of an HTML page. gunicorn's own detail is left out: it may
    quote a header, and headers carry API keys."""
    import json

    from gunicorn import util

    from .ids import new_id

    messages = {
        400: "The request is not valid HTTP (request line, a header or the chunked body)",
        403: "The request is forbidden",
        414: "The request line is too long",
        417: "Expectation failed",
        431: "The request's header fields are too large",
        500: "The server could not handle the request",
        501: "Unsupported transfer coding",
    }
    kind = "server_error" if status_int >= 500 else "invalid_request_error"
    body = json.dumps({"error": {"message": messages.get(status_int, reason), "type": kind, "param": None,
                                 "code": status_int}}).encode()
    head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"X-Request-ID: {new_id()}\r\nContent-Length: {len(body)}\r\n\r\n").encode("latin-1")
    util.write_nonblock(sock, head + body)


class FewAcceptsPerTurnServer(StreamServer):
    """gevent's server, accepting at most 10 connections per turn of the event loop instead of
    100. Each accepted connection's greenlet runs its whole admission (HTTP parsing, key, rate
    limit, validation, the gRPC call's start: about 2 ms of CPU) before the loop turns again, and
    the relay thread's wake-ups (gateway.triton_relay) are handled only at the next turn. With 100
    a turn, a burst of new connections held every running stream's tokens back until up to 100
    admissions were done: in the burst test of tests/unit/test_gateway_gunicorn.py a stream's
    first token came after 99 of 120 quick replies (10 a turn: after 9). gunicorn itself accepts
    1 a turn when it runs more than one worker. One a turn costs more per connection: about
    +13 % of the worker's CPU per short stream with 50 clients that reconnect for every request
    (10 a turn: +4 %, within the noise; CPU per request over 3 alternated runs of 3 rounds,
    2,000 two-token streams each, on the 2-vCPU EPYC of docs/operations.md)."""

    max_accept = 10


class GeventGrpcWorker(GeventWorker):
    """gunicorn's gevent worker, with ``threading`` left to the OS, at most 10 accepts per loop
    turn (FewAcceptsPerTurnServer), and a drain on SIGTERM (gateway.drain)."""

    def init_process(self) -> None:
        from gunicorn.workers import base

        base.util.write_error = write_json_error  # this worker process only
        ggevent.StreamServer = FewAcceptsPerTurnServer  # what GeventWorker.run builds, in this process only
        super().init_process()

    def handle_exit(self, sig, frame) -> None:  # noqa: ANN001 (gunicorn's signal handler)
        from .drain import DRAIN, drain_timeout

        DRAIN.begin(drain_timeout())
        super().handle_exit(sig, frame)

    def patch(self) -> None:
        monkey.patch_all(thread=False)
        # As GeventWorker.patch: the listening sockets become gevent sockets.
        self.sockets = [socket.socket(s.FAMILY, socket.SOCK_STREAM, fileno=s.sock.detach()) for s in self.sockets]
