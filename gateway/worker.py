"""The gunicorn worker class: gevent for HTTP, real threads for gRPC's poller.

    gunicorn -k gateway.worker.GeventGrpcWorker 'gateway:create_app()'

gunicorn's gevent worker patches everything with gevent; this one leaves ``threading`` (and so
``queue``) unpatched. The gRPC client (gateway.triton_relay) is an asyncio loop with ``grpc.aio``
in a greenlet of the hub's thread, woken through a socket by grpc.aio's poller thread, which
must be a real thread. Measured with scripts/bench_gateway.py: gRPC's own gevent integration
(``grpc.experimental.gevent.init_gevent``), which an earlier version of this worker used, spent
about two thirds of a worker's CPU per relayed token.

What this means for the rest of the gateway: a ``threading`` lock is a real lock, so no code may
hold one across anything that yields to another greenlet (gateway.state.InFlight does not;
prometheus-client and flask-limiter hold theirs only around memory updates); and nothing in a
request may block in a threading primitive waiting for another greenlet (the relay loop is one:
it would wait too).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import weakref
from pathlib import Path

import gevent
from gevent import monkey
from gevent import socket
from gevent.server import StreamServer
from gunicorn.workers import ggevent
from gunicorn.workers.ggevent import GeventWorker

_log = logging.getLogger("trident.gateway")

#: Seconds a connection's first request line and headers may take to arrive (GATEWAY_HEADER_TIMEOUT).
HEADER_TIMEOUT = 30.0
#: Seconds a wait for a request may last once the worker drains: a request already on its way
#: still gets its 503; a connection that sends nothing is closed.
DRAINING_WAIT = 1.0


def header_timeout(environ=os.environ) -> float:  # noqa: ANN001
    return float(environ.get("GATEWAY_HEADER_TIMEOUT") or HEADER_TIMEOUT)


class RequestWait:
    """gunicorn's wait for a connection's next request line and headers, as this worker bounds
    it (GeventGrpcWorker.timeout_ctx). gunicorn's gevent worker waits ``keepalive`` seconds (2 by
    default) for every request, the first on a new connection included, then closes the
    connection without a word: a client whose first request came 2 s after it connected (a
    slow network, a client or a gateway worker busy for a moment) lost its connection with no
    answer (tests/e2e/test_scale.py saw 2 of 20 streams so). Here the first request gets
    GATEWAY_HEADER_TIMEOUT (30 s) and later ones ``keepalive`` (GATEWAY_KEEPALIVE); while it
    waits the connection is idle, and a drain closes idle connections at once (they would hold
    the worker's exit until gunicorn's graceful timeout)."""

    def __init__(self, worker: "GeventGrpcWorker") -> None:
        self.worker = worker
        self.greenlet = gevent.getcurrent()
        self.first = self.greenlet not in worker.served
        seconds = worker.first_request_timeout if self.first else worker.cfg.keepalive
        if worker.draining:
            seconds = min(seconds, DRAINING_WAIT)
        self.timeout = gevent.Timeout(seconds, False)  # False: it ends the wait quietly

    def __enter__(self) -> "RequestWait":
        self.worker.served.add(self.greenlet)
        self.worker.waiting[self.greenlet] = self
        self.timeout.__enter__()
        return self

    def __exit__(self, *exc) -> bool:  # noqa: ANN002
        self.worker.waiting.pop(self.greenlet, None)
        return bool(self.timeout.__exit__(*exc))


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


LISTEN_HANDOVER_S = 1.0

#: Linux's switch for moving the connections waiting in a closing listener to another of its port
MIGRATE_REQ = Path("/proc/sys/net/ipv4/tcp_migrate_req")


def migration_warning(worker_count: int, switch: Path = MIGRATE_REQ) -> str | None:
    """What to tell the operator when connections can be reset as workers are replaced: each
    worker listens on its own socket (``reuse_port``), and closing a socket resets the connections
    still in its backlog, or still in their handshake, unless the kernel moves them to another
    listener of the port (``net.ipv4.tcp_migrate_req``, Linux 5.14+). None when that is on, the
    switch cannot be read (another kernel), or one worker serves (it is replaced only as the
    whole server stops)."""
    if worker_count < 2:
        return None
    try:
        if switch.read_text().strip() != "0":
            return None
    except OSError:
        return None
    return (f"net.ipv4.tcp_migrate_req is 0: when a reload (HUP) replaces the {worker_count} workers, each old "
            "one's listening socket closes, and the kernel resets the connections still waiting in it (a few in "
            "a reload under load); set it to 1 in the gateway's network namespace (Compose: sysctls; "
            "docs/operations.md)")


def listening_sockets(port: int) -> int:
    """TCP sockets listening on ``port`` in this network namespace (Linux's /proc/net/tcp and
    tcp6; 0 when they cannot be read)."""
    suffix = f":{port:04X}"
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as rows:
                next(rows, None)
                for row in rows:
                    fields = row.split(None, 4)
                    if len(fields) > 3 and fields[3] == "0A" and fields[1].endswith(suffix):
                        count += 1
        except OSError:
            continue
    return count


class FewAcceptsPerTurnServer(StreamServer):
    """gevent's server, accepting at most 4 connections per turn of the event loop instead of 100.
    Each accepted connection's greenlet runs its whole admission (HTTP parsing, key, rate limit,
    validation, the gRPC call's start: about 2 ms of CPU) before the loop turns again, and the
    relay loop (gateway.triton_relay) runs once a turn. With 100 a turn, a burst of new
    connections held every running stream's tokens back until up to 100 admissions were done: in
    the burst test of tests/unit/test_gateway_gunicorn.py a stream's first token came after 99 of
    120 quick replies; with 10 a turn, after 29-49 (its call's start, admission and first token
    each wait a turn); with 4, after 7-15. gunicorn itself accepts 1 a turn when it runs more
    than one worker. Fewer accepts a turn cost little: 4 against 10 a turn, 128 clients each
    opening a connection for one two-token stream, 1.83 / 2.09 / 2.11 against 1.84 / 2.24 /
    2.35 ms of the worker's CPU a request (three alternated runs, 1,280 requests each, on the
    2-vCPU EPYC of docs/operations.md); 1 a turn had cost about 13 % more than 10 (an earlier
    measurement, with the relay on its own thread)."""

    max_accept = 4
    handshake_timeout = HEADER_TIMEOUT  # GATEWAY_HEADER_TIMEOUT: set once by GeventGrpcWorker.init_process
    started: weakref.WeakSet = weakref.WeakSet()  # this process's servers, for the drain to close

    def start(self) -> None:
        super().start()
        FewAcceptsPerTurnServer.started.add(self)

    def stop_listening(self, workers: int = 1) -> None:
        """Close the listening socket now, after taking the connections already waiting in its
        backlog (each is answered, as any request during the drain). gunicorn closes it only
        when its run loop next wakes, up to 1 s after SIGTERM; with ``reuse_port`` each worker
        has its own socket, so during a reload (HUP) the kernel kept giving the old worker new
        connections for that second (each a 503 "shutting down"), and closing a socket resets
        the connections still in its backlog. ``workers``: how many the server runs (gunicorn's
        ``workers``)."""
        if self.closed:
            return
        # Not before a new worker's socket listens on the port (a reload's new workers bind theirs
        # just after their fork, when the old ones are told to stop): closing first refused
        # connections. Of the sockets listening, at most ``workers`` are the old ones (this one
        # included), so one more is a new one's; waiting for any second one let both old workers
        # of two close before either new one listened, when the new ones were slow to be
        # scheduled after their fork (a loaded machine): the port refused connections meanwhile.
        # A worker stopping alone (no new one comes) waits the second gunicorn waited.
        address = self.socket.getsockname()
        deadline = time.monotonic() + LISTEN_HANDOVER_S
        while (isinstance(address, tuple) and time.monotonic() < deadline
               and listening_sockets(address[1]) < workers + 1):
            gevent.sleep(0.02)
        if self.closed:
            return
        while not self.full():
            try:
                args = self.do_read()  # a non-blocking accept: None once the backlog is empty
            except OSError:
                break
            if not args:
                break
            self.do_handle(*args)
        self.close()

    def wrap_socket_and_handle(self, client_socket, address):  # noqa: ANN001, ANN201 (gevent's)
        """gevent's, with the TLS handshake bounded by GATEWAY_HEADER_TIMEOUT: gevent's waits as
        long as the client likes, so a client that connected and sent nothing held its
        connection (and a place of the worker's pool) forever (more than 40 s measured; plain
        HTTP gives up after the header timeout, gateway.worker.RequestWait)."""
        ssl_socket = self.wrap_socket(client_socket, do_handshake_on_connect=False, **self.ssl_args)
        with contextlib.closing(ssl_socket):
            shaken = False
            with gevent.Timeout(self.handshake_timeout, False):
                ssl_socket.do_handshake()
                shaken = True
            if not shaken:
                return None
            return self.handle(ssl_socket, address)


class NamedListener:
    """A listening socket as gunicorn's connection handler sees it, with its address read once.
    gunicorn's handler starts every connection with ``listener.getsockname()``; for a connection
    accepted just before the drain closed the listener that raised EBADF ("Socket error
    processing request", an ERROR line), and the connection was closed with its request unread:
    the client got a reset (1 to 5 in 3 reloads under load, tests/unit/test_gateway_gunicorn.py)."""

    __slots__ = ("_sock", "_name")

    def __init__(self, sock) -> None:  # noqa: ANN001
        self._sock, self._name = sock, sock.getsockname()

    def getsockname(self):  # noqa: ANN201
        return self._name

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self._sock, name)


class GeventGrpcWorker(GeventWorker):
    """gunicorn's gevent worker, with ``threading`` left to the OS, at most 4 accepts per loop
    turn (FewAcceptsPerTurnServer), and a drain on SIGTERM (gateway.drain)."""

    def init_process(self) -> None:
        from gunicorn.workers import base

        FewAcceptsPerTurnServer.handshake_timeout = header_timeout()  # this worker process only
        self.first_request_timeout = max(FewAcceptsPerTurnServer.handshake_timeout, float(self.cfg.keepalive))
        self.served: weakref.WeakSet = weakref.WeakSet()  # connections' greenlets that had a request wait
        # Those waiting for a request now (idle), with the timeout that bounds the wait.
        self.waiting: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.draining = False

        base.util.write_error = write_json_error  # this worker process only
        ggevent.StreamServer = FewAcceptsPerTurnServer  # what GeventWorker.run builds, in this process only
        super().init_process()

    def run(self) -> None:
        self.named_listeners = {sock: NamedListener(sock) for sock in self.sockets}
        super().run()
        self.wait_for_background_runs()

    def wait_for_background_runs(self) -> None:
        """Once the connections are done: the background responses still running
        (gateway.background) go on until the drain's deadline, which fails them, as it ends
        the open streams; a little longer for them to store that."""
        from .background import RUNS
        from .drain import DRAIN, drain_timeout

        deadline = (DRAIN.started or time.monotonic()) + drain_timeout() + 2.0
        if RUNS:
            _log.info("draining: %d background response(s) still running", len(RUNS))
        while RUNS and time.monotonic() < deadline:
            self.notify()
            gevent.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    def handle(self, listener, client, addr) -> None:  # noqa: ANN001 (gunicorn's)
        super().handle(self.named_listeners.get(listener, listener), client, addr)

    def handle_request(self, listener_name, req, sock, addr):  # noqa: ANN001, ANN201 (gunicorn's)
        """gunicorn's, with a write that ran past ``SEND_TIMEOUT`` (gateway.app.SendTimeout) ending
        the connection with one log line instead of gunicorn's traceback, and the socket's
        timeout taken off again afterwards (the wait for a kept-alive connection's next request
        and its body's read have limits of their own)."""
        try:
            return super().handle_request(listener_name, req, sock, addr)
        except TimeoutError:
            peer = addr if isinstance(addr, str) else ":".join(str(part) for part in addr[:2])
            _log.warning("a client took no bytes of its response for %s s; its connection is closed "
                         "(%s %s from %s)", sock.gettimeout(), req.method, req.path, peer or "-")
            raise StopIteration from None  # gunicorn's way to close the connection quietly
        finally:
            sock.settimeout(None)

    def timeout_ctx(self) -> RequestWait:
        """The bound of each wait for a request (RequestWait); gunicorn's is ``keepalive`` for all."""
        return RequestWait(self)

    def handle_exit(self, sig, frame) -> None:  # noqa: ANN001 (gunicorn's signal handler)
        from .drain import DRAIN, drain_timeout

        DRAIN.begin(drain_timeout())
        self.draining = True
        for server in list(FewAcceptsPerTurnServer.started):
            gevent.spawn(server.stop_listening, self.cfg.workers)
        gevent.spawn(self.close_idle_connections)
        super().handle_exit(sig, frame)

    def close_idle_connections(self) -> None:
        """End the connections waiting for a request: each wait ends as when its time is up (its
        own timeout raised in it, which ends the wait quietly), and gunicorn closes the socket.
        A kept-alive connection waiting for its next request is closed at once (its client may
        resend on a new one, as after any keep-alive timeout). A fresh connection waiting for its
        first request gets DRAINING_WAIT to send it (then it is answered, a 503 for a
        generation): a client that had just connected was sending it, and a close with its
        request unread reset the connection (1 in 30 reloads under load)."""
        idle = list(self.waiting.items())
        if idle:
            _log.info("draining: closing %d idle connection(s)", len(idle))
        fresh = []
        for greenlet, wait in idle:
            if wait.first:
                fresh.append(greenlet)
            else:
                greenlet.kill(exception=wait.timeout, block=False)
        if fresh:
            gevent.sleep(DRAINING_WAIT)
            for greenlet in fresh:
                wait = self.waiting.get(greenlet)
                if wait is not None and wait.first:  # still waiting for that first request
                    greenlet.kill(exception=wait.timeout, block=False)

    def patch(self) -> None:
        monkey.patch_all(thread=False)
        # As GeventWorker.patch: the listening sockets become gevent sockets.
        self.sockets = [socket.socket(s.FAMILY, socket.SOCK_STREAM, fileno=s.sock.detach()) for s in self.sockets]
