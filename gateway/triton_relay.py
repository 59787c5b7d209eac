"""gRPC to Triton on one native thread per worker process, handed to greenlets in batches.

Why: through gRPC's gevent integration (``grpc.experimental.gevent``) every streamed message
went from a C-core thread through gevent's thread pool, a hub callback, a channel-spin greenlet
and a condition variable with a timeout before the waiting greenlet saw it: about two thirds of a
gateway worker's CPU per relayed token (py-spy, scripts/bench_gateway.py). Here one OS thread runs
an asyncio loop with a ``grpc.aio`` channel for every call of the process; each message is parsed
there and appended to its call's inbox, and the gevent side is woken once per batch (a libev
async watcher, which coalesces the wake-ups of many calls into one hub callback). A waiting
greenlet then takes every event that arrived for its call at once.

This needs ``threading`` unpatched in the gevent worker (gateway.worker patches everything else),
so that grpc.aio's own threads are real threads. Outside gevent (tests, scripts) the same code
signals plain threading events.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

log = logging.getLogger("trident.gateway.triton")


def _gevent_hub() -> Any:
    """The gevent hub of this thread when gevent patched the process, else None."""
    try:
        from gevent import monkey
    except ImportError:  # pragma: no cover - gevent is a dependency
        return None
    if not monkey.is_module_patched("socket"):
        return None
    import gevent

    return gevent.get_hub()


class _Wakeups:
    """Signals that cross from the relay thread to the consumers. Under gevent: one libev async
    watcher for the whole process (thread-safe to send, coalesced), whose hub callback sets the
    gevent events of every call that got something; otherwise each call's threading.Event."""

    def __init__(self) -> None:
        self._hub = _gevent_hub()
        self._pending: collections.deque[Any] = collections.deque()
        if self._hub is not None:
            self._watcher = self._hub.loop.async_()
            self._watcher.start(self._drain)

    def new_event(self) -> Any:
        if self._hub is not None:
            import gevent.event

            return gevent.event.Event()
        return threading.Event()

    def set(self, event: Any) -> None:
        """From the relay thread."""
        if self._hub is None:
            event.set()
            return
        self._pending.append(event)
        self._watcher.send()

    def _drain(self) -> None:  # in the hub
        pending = self._pending
        while pending:
            pending.popleft().set()


class RelayCall:
    """One streaming call: its parsed events arrive in ``inbox`` (relay thread), the consumer
    takes them with :meth:`take`."""

    def __init__(self, relay: Relay, *, cancel_request: Any = None, cancel_grace: float = 0.0) -> None:
        self._relay = relay
        self._event = relay.wakeups.new_event()
        self.inbox: collections.deque[Any] = collections.deque()
        self.done = False  # no more items will arrive
        self._task: asyncio.Task | None = None
        self._cancelled = False
        self._cancel_request = cancel_request
        self._cancel_grace = cancel_grace

    def put(self, item: Any, *, last: bool = False) -> None:
        """From the relay thread: one item (or the end), and a wake-up when the consumer may wait."""
        self.inbox.append(item)
        if last:
            self.done = True
        self._relay.wakeups.set(self._event)

    def take(self, timeout: float | None) -> list[Any] | None:
        """Every item that has arrived, waiting up to ``timeout`` for the first; None when the
        timeout passed first; [] when the call ended and everything was taken."""
        if not self.inbox:
            if self.done:
                return []
            self._event.clear()
            if not self.inbox and not self.done and not self._event.wait(timeout):
                return None
        items = []
        inbox = self.inbox
        while inbox:
            items.append(inbox.popleft())
        return items

    def cancel(self) -> None:
        """Any thread, any time, more than once: ends the call. With a ``cancel_request`` (see
        :meth:`Relay.stream`) that request is sent on a second call and this one is read to its
        end; it is cancelled only if it has not ended ``cancel_grace`` seconds later."""
        if self._cancelled:
            return
        self._cancelled = True
        task = self._task
        if task is not None:
            self._relay.loop.call_soon_threadsafe(self._end_started_call, task)

    def _end_started_call(self, task: asyncio.Task) -> None:  # on the loop
        if task.done():
            return
        if self._cancel_request is None:
            task.cancel()
            return
        loop = self._relay.loop
        loop.create_task(self._relay.send_cancel(self._cancel_request))
        loop.call_later(self._cancel_grace, lambda: task.done() or task.cancel())


class Relay:
    """The relay thread of this worker process: its event loop, its channel, its stub."""

    def __init__(self, target: str, options: list[tuple[str, Any]]) -> None:
        self.pid = os.getpid()
        self.wakeups = _Wakeups()
        self.loop = _RelayLoop(_real_selector())
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(started,), name="trident-grpc-relay", daemon=True)
        self._thread.start()
        started.wait()
        self._channel: grpc.aio.Channel | None = None
        self.stub: Any = None
        self._stream_infer: Any = None
        # Scheduled, not awaited: the loop runs callbacks in order, so the stub exists before any
        # later call runs; and the caller never yields to another greenlet (which could build a
        # second relay, with a second event loop: grpc.aio then mixes their futures).
        self.loop.call_soon_threadsafe(self._connect, target, options)

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(started.set)
        self.loop.run_forever()

    def _connect(self, target: str, options: list[tuple[str, Any]]) -> None:  # on the loop
        self._channel = grpc.aio.insecure_channel(target, options=options)
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        # ModelStreamInfer is bidirectional, but each call here sends exactly one request and
        # half-closes: on the wire that is a server-streaming call, and invoking it as one spares
        # grpc.aio the request-iterator task and its write and done-writing steps for every call
        # (about 10 % of the relay thread's samples under load, py-spy).
        self._stream_infer = self._channel.unary_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer",
            request_serializer=service_pb2.ModelInferRequest.SerializeToString,
            response_deserializer=service_pb2.ModelStreamInferResponse.FromString,
        )

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float | None) -> Any:
        """Run a coroutine on the relay thread and wait for its result (cooperatively under
        gevent); its exception is raised here."""
        call = RelayCall(self)

        async def wrapped() -> None:
            try:
                call.put(("ok", await coro), last=True)
            except BaseException as exc:  # handed over, raised in the caller
                call.put(("error", exc), last=True)

        self.loop.call_soon_threadsafe(lambda: self.loop.create_task(wrapped()))
        items = call.take(timeout)
        while items == [] or items is None:
            if items is None:
                raise TimeoutError("relay call timed out")
            items = call.take(timeout)
        kind, value = items[0]
        if kind == "error":
            raise value
        return value

    def stream(self, request: Any, *, timeout: float, parse: Callable[[Any], Any], cancel_request: Any = None,
               cancel_grace: float = 5.0) -> RelayCall:
        """Start ``ModelStreamInfer`` with one request; each response goes through ``parse`` on
        the relay thread (its exception ends the stream as an item) into the call's inbox.

        ``cancel_request``: what :meth:`RelayCall.cancel` sends (on a second call) to end this
        one, instead of cancelling it: Triton 2.51's gRPC endpoint can deadlock when a client
        cancels a stream while one of its responses is being written (docs/architecture.md)."""
        call = RelayCall(self, cancel_request=cancel_request, cancel_grace=cancel_grace)

        async def pump() -> None:
            try:
                grpc_call = self._stream_infer(request, timeout=timeout, wait_for_ready=False)
                # Read to the end: the server ends the call right after its final response
                # (cancelling a call whose request completed kept Triton's model loaded).
                async for response in grpc_call:
                    call.put(parse(response))
                call.put(None, last=True)
            except asyncio.CancelledError:
                call.put(None, last=True)
            except BaseException as exc:  # grpc.aio.AioRpcError, a bad response: the consumer decides
                call.put(exc, last=True)

        def start() -> None:
            call._task = self.loop.create_task(pump())
            if call._cancelled:
                call._task.cancel()

        self.loop.call_soon_threadsafe(start)
        return call

    async def send_cancel(self, request: Any) -> None:
        """A cancel request's call, read to its end (never cancelled: see :meth:`stream`)."""
        try:
            async for _ in self._stream_infer(request, timeout=30, wait_for_ready=False):
                pass
        except Exception as exc:  # the original call is still cancelled after its grace
            log.info("cancel request failed: %r", exc)

    def close(self) -> None:
        if self._channel is not None:
            try:
                self.run(self._channel.close(), timeout=5)
            except Exception:
                pass
        self.loop.call_soon_threadsafe(self.loop.stop)


class _RelayLoop(asyncio.SelectorEventLoop):
    """asyncio's selector loop whose self-pipe (written by every ``call_soon_threadsafe``, which
    grpc.aio's poller thread makes for each completion) is a pair of OS sockets, not gevent's
    wrappers, which cost 9 % of a worker's CPU under load (py-spy)."""

    def _make_self_pipe(self) -> None:
        import _socket

        cls = _original("socket", "socket")
        a, b = _socket.socketpair()
        self._ssock, self._csock = cls(fileno=a.detach()), cls(fileno=b.detach())
        self._ssock.setblocking(False)
        self._csock.setblocking(False)
        self._internal_fds += 1
        self._add_reader(self._ssock.fileno(), self._read_from_self)


def _original(module: str, name: str) -> Any:
    try:
        from gevent import monkey

        if monkey.is_module_patched(module):
            return monkey.get_original(module, name)
    except ImportError:  # pragma: no cover
        pass
    return getattr(__import__(module), name)


def _real_selector() -> Any:
    """The OS selector, not gevent's (which would run a gevent hub inside the relay thread)."""
    try:
        from gevent import monkey

        if monkey.is_module_patched("selectors"):
            return monkey.get_original("selectors", "DefaultSelector")()
    except ImportError:  # pragma: no cover
        pass
    import selectors

    return selectors.DefaultSelector()
