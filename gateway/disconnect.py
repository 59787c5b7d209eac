"""Noticing a client that went away while its generation waits or runs, without writing to it.

A closed connection is otherwise only noticed on a write: an SSE heartbeat (every
``HEARTBEAT_INTERVAL``) or, for a non-streaming request, the response itself, after the whole
generation ran for nobody. Under gunicorn's gevent worker the request's socket
(``environ["gunicorn.socket"]``) is idle while the response is being produced: the request body
has been read and HTTP/1.1 clients send nothing more until the response ends. So a read event on
it means the peer closed it (``recv(MSG_PEEK)`` returns ``b""``, or fails with a reset), or,
rarely, that a pipelining client sent its next request early, in which case watching stops.

The watch is a libev read watcher on the socket's descriptor: no greenlet and no timer per
request while nothing happens. TLS sockets are not watched (a peek would see TLS records, not
the end of the stream); there, and outside gevent, heartbeats remain the only signal.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from typing import Any

log = logging.getLogger("trident.gateway")


def gevent_active() -> bool:
    """Whether this process runs under gevent's patched sockets (the gateway's workers)."""
    try:
        from gevent import monkey
    except ImportError:  # pragma: no cover - gevent is a dependency
        return False
    return monkey.is_module_patched("socket")


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
        if sock is None or hasattr(sock, "getpeercert") or not gevent_active():
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
        try:
            data = self._sock.recv(1, socket.MSG_PEEK)
        except OSError:  # reset by the peer, or already closed
            data = b""
        if data == b"" and not self.gone and not self._stopped:
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
