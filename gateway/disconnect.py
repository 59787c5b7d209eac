"""Noticing a client that went away while its generation waits or runs, without writing to it.

A closed connection is otherwise only noticed on a write: an SSE heartbeat (every
``HEARTBEAT_INTERVAL``) or, for a non-streaming request, the response itself, after the whole
generation ran for nobody. Under gunicorn's gevent worker the request's socket
(``environ["gunicorn.socket"]``) is idle while the response is being produced: the request body
has been read and HTTP/1.1 clients send nothing more until the response ends. So a read event on
it means the peer closed it, or that it sent something: a pipelining client its next request
early, a TLS client its ``close_notify`` alert (which may come just before its FIN).

The watch is a libev read watcher on the socket's descriptor: no greenlet and no timer per
request while nothing happens. On a read event it asks the kernel for the connection's TCP state
(``TCP_INFO``): a FIN from the peer (``CLOSE_WAIT``) or a reset (``CLOSE``) means it is gone.
That works the same for TLS, where the bytes themselves are encrypted records. Where bytes came
and the connection is still open, it looks at the state again every :data:`RECHECK_SECONDS`
until the response ends (a pipelining client that leaves, a FIN that trails its
``close_notify``). Without ``TCP_INFO`` (not Linux) a plain socket is peeked instead
(``recv(MSG_PEEK)`` returns ``b""`` at a FIN) and TLS sockets are not watched: heartbeats and
token writes remain the signal there.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("trident.gateway")

#: Seconds between looks at the TCP state of a connection that sent bytes but is still open.
RECHECK_SECONDS = 1.0
_TCP_ESTABLISHED = 1  # linux/tcp_states.h: the only state in which the peer has not closed or reset
_TCP_INFO = getattr(socket, "TCP_INFO", None)


def peer_closed(sock: Any) -> bool | None:
    """Whether the peer of ``sock`` has closed (FIN) or reset its connection, from the kernel's
    TCP state; None where the kernel does not tell (no ``TCP_INFO``)."""
    if _TCP_INFO is None:
        return None
    try:
        state = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 1)
    except OSError:  # closed here already
        return True
    return state[0] != _TCP_ESTABLISHED


def gevent_active() -> bool:
    """Whether this process runs under gevent's patched sockets (the gateway's workers)."""
    try:
        from gevent import monkey
    except ImportError:  # pragma: no cover - gevent is a dependency
        return False
    return monkey.is_module_patched("socket")


def new_event() -> Any:
    """An event to wait on: gevent's in the gateway's workers (``threading`` is not patched there,
    gateway.worker, and the waiters and setters are greenlets of one hub), else threading's."""
    if gevent_active():
        import gevent.event

        return gevent.event.Event()
    return threading.Event()


class DisconnectWatch:
    """Calls ``on_gone`` once if the peer closes ``sock`` before :meth:`stop`."""

    def __init__(self, sock: Any, on_gone: Callable[[], None]) -> None:
        self._sock = sock
        self._on_gone = on_gone
        self._io: Any = None
        self._stopped = False
        self.gone = False

    @classmethod
    def start(cls, environ: dict[str, Any], on_gone: Callable[[], None]) -> DisconnectWatch:
        watch = cls(environ.get("gunicorn.socket"), on_gone)
        watch._arm()
        return watch

    def _arm(self) -> None:
        sock = self._sock
        if sock is None or not gevent_active():
            return
        if hasattr(sock, "getpeercert") and _TCP_INFO is None:  # TLS: nothing to peek at
            return
        try:
            from gevent import get_hub

            self._io = get_hub().loop.io(sock.fileno(), 1)  # 1: EV_READ
            self._io.start(self._readable)
        except (OSError, ValueError, AttributeError) as exc:  # a closed or odd socket
            log.debug("no disconnect watch: %s", exc)
            self._io = None

    def _readable(self) -> None:
        # In the hub's loop: never block here, hand the check to a greenlet.
        self._close_io()
        import gevent

        gevent.spawn(self._check)

    def _check(self) -> None:
        if self._stopped:
            return
        closed = peer_closed(self._sock)
        if closed is None:  # no TCP state: a plain socket's peek sees the FIN
            try:
                closed = self._sock.recv(1, socket.MSG_PEEK) == b""
            except OSError:  # reset by the peer, or already closed
                closed = True
            if not closed:
                return  # bytes of a pipelined request: watching stops
        import gevent

        # Bytes came and the connection is open: look again now and then (the read watcher would
        # fire at once while they sit unread).
        while not closed:
            gevent.sleep(RECHECK_SECONDS)
            if self._stopped:
                return
            closed = peer_closed(self._sock)
        self._gone()

    def _gone(self) -> None:
        if not self.gone and not self._stopped:
            self.gone = True
            self._on_gone()

    def _close_io(self) -> None:
        io, self._io = self._io, None
        if io is not None:
            io.stop()
            io.close()

    def stop(self) -> None:
        """Stop watching (the response ended; the connection may be kept alive)."""
        self._stopped = True
        self._close_io()
