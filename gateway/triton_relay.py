"""gRPC to Triton on one asyncio loop per worker process, handed to greenlets in batches.

Why: through gRPC's gevent integration (``grpc.experimental.gevent``) every streamed message
went from a C-core thread through gevent's thread pool, a hub callback, a channel-spin greenlet
and a condition variable with a timeout before the waiting greenlet saw it: about two thirds of a
gateway worker's CPU per relayed token (py-spy, scripts/bench_gateway.py). Here one asyncio loop
runs a ``grpc.aio`` channel for every call of the process; each message is parsed there and
appended to its call's inbox, and the waiting greenlet takes every event that arrived for its
call at once.

Under gevent (the gateway's workers) the loop runs in a greenlet of the hub's own thread, on an
OS epoll selector that the hub watches (:class:`_HubSelector`); grpc.aio's poller thread wakes it
through a socket, and the loop sets the signals (:class:`_HubSignal`) of the calls that got
something directly.
Until 2026-12-04 the loop had an OS thread of its own, which woke the hub through a libev async
watcher: the two threads then handed the GIL back and forth for every batch, and a worker spent
more CPU per relayed token (about 8 % at 500 streams) and per stream in bursts (docs/operations.md,
Gateway speed). Outside gevent (tests, scripts) the loop still runs on its own thread and
signals plain threading events.

This needs ``threading`` unpatched in the gevent worker (gateway.worker patches everything else),
so that grpc.aio's poller thread is a real thread.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import signal
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import grpc
from gevent.hub import Waiter as _Waiter  # only used with a gevent hub (_HubSignal, _HubSelector)
from tritonclient.grpc import service_pb2, service_pb2_grpc

from trident.triton_wire import is_final

log = logging.getLogger("trident.gateway.triton")

#: Seconds the gRPC deadline of a call lies beyond its timeout and cancel grace: only a call that
#: neither its cancel request nor the grace ended is cancelled by gRPC itself.
DEADLINE_MARGIN = 2.0


class CallTimedOut(TimeoutError):
    """A streaming call ran past its ``timeout`` (the consumer's item; the call is then ended
    with its cancel request, as for a client that left)."""


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


def _hub_wait(hub: Any, waiter: Any, timeout: float | None, expired: Any) -> Any:
    """In a greenlet of ``hub``'s thread: what ``waiter`` (a gevent ``Waiter``) is switched with,
    or ``expired`` after ``timeout`` seconds (None: no limit). The timeout is a plain libev timer
    that switches the same waiter: under a ``gevent.Timeout`` (an exception raised into the
    greenlet) a wait cost 5.5-7.7 us and an expiry 9.4-11 us, this way 2.9-3.8 and 2.4 (timeit)."""
    if timeout is None:
        return waiter.get()
    timer = hub.loop.timer(timeout)
    try:
        timer.start(waiter.switch, expired)
        return waiter.get()
    finally:
        timer.close()


class _HubSignal:
    """What a call's consumer waits on when the relay loop runs in a greenlet of the hub's thread:
    ``set``/``clear``/``wait(timeout)`` as gevent's ``Event``, for one waiting greenlet at a
    time, woken by a hub callback (``set``) or its timeout (:func:`_hub_wait`). gevent's
    ``Event.wait`` with a timeout runs under a ``gevent.Timeout``: 5.5-7.7 against 2.9-3.0 us a
    wait that is set, 9.4 against 2.4 us one that times out (timeit, 50,000 waits)."""

    __slots__ = ("_hub", "_flag", "_waiter")

    def __init__(self) -> None:
        from gevent import get_hub

        self._hub = get_hub()
        self._flag = False
        self._waiter: Any = None

    def set(self) -> None:
        self._flag = True
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            self._hub.loop.run_callback(waiter.switch, True)

    def clear(self) -> None:
        self._flag = False

    def wait(self, timeout: float | None = None) -> bool:
        if self._flag:
            return True
        if self._waiter is not None:
            raise RuntimeError("another greenlet already waits on this call")
        waiter = self._waiter = _Waiter(self._hub)
        try:
            return _hub_wait(self._hub, waiter, timeout, False)
        finally:
            if self._waiter is waiter:
                self._waiter = None


class RelayCall:
    """One streaming call: its parsed events arrive in ``inbox`` (relay loop), the consumer
    takes them with :meth:`take`."""

    def __init__(self, relay: Relay, *, cancel_request: Callable[[], Any] | None = None,
                 cancel_grace: float = 0.0) -> None:
        self._relay = relay
        self._event = relay.new_event()
        self.inbox: collections.deque[Any] = collections.deque()
        self.done = False  # no more items will arrive
        self._task: asyncio.Task | None = None
        self._cancelled = False
        self._cancel_request = cancel_request
        self._cancel_grace = cancel_grace
        # Relay loop only: the bidirectional call, resolved once its request is written (or its
        # start failed), and whether this side has half-closed (nothing more can be sent).
        self._grpc: Any = None
        self._written: asyncio.Future | None = None
        self._half_closed = False
        self._timer: asyncio.TimerHandle | None = None

    def put(self, item: Any, *, last: bool = False) -> None:
        """From the relay loop: one item (or the end), and a wake-up when the consumer may wait."""
        self.inbox.append(item)
        if last:
            self.done = True
        self._event.set()

    def end(self, item: Any = None) -> None:
        """From the relay loop: the end (with ``item``, an exception, when it failed), unless the
        events already ended."""
        if not self.done:
            self.put(item, last=True)

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
        """Any thread, any time, more than once: ends the call's request, if it has not ended.
        The cancel request (see :meth:`Relay.stream`) goes on the same call, which is then read
        to its end; the call is cancelled only if it has not ended ``cancel_grace`` seconds
        later."""
        if self._cancelled:
            return
        self._cancelled = True
        task = self._task
        if task is not None:
            self._relay.loop.call_soon_threadsafe(self._end_started_call, task)

    def _time_out(self, timeout: float) -> None:  # on the loop
        if self.done:
            return
        self.end(CallTimedOut(f"the call ran past its timeout of {timeout:g} s"))
        self.cancel()

    def _end_started_call(self, task: asyncio.Task) -> None:  # on the loop
        if task.done() or self._half_closed:  # ended, or ending by itself
            return
        loop = self._relay.loop
        loop.create_task(self._send_cancel())
        loop.call_later(self._cancel_grace, lambda: task.done() or task.cancel())

    async def _send_cancel(self) -> None:  # on the loop
        assert self._written is not None and self._cancel_request is not None
        await self._written
        await self._half_close(self._cancel_request())

    async def _half_close(self, last_request: Any = None) -> None:  # on the loop
        """Sends ``last_request`` (when given) and closes this side of the call, once."""
        if self._half_closed or self._grpc is None:
            return
        self._half_closed = True
        try:
            if last_request is not None:
                await self._grpc.write(last_request)
            await self._grpc.done_writing()
        except Exception as exc:  # the call has ended: its reader sees how
            log.info("could not finish the call's requests: %r", exc)


class Relay:
    """The relay of this worker process: its event loop (in a greenlet of the gevent hub's thread,
    or on a thread of its own without gevent), its channel, its stub."""

    def __init__(self, target: str, options: list[tuple[str, Any]]) -> None:
        self.pid = os.getpid()
        self._channel: grpc.aio.Channel | None = None
        self.stub: Any = None
        self._stream_infer: Any = None
        self._runner: Any
        #: What a call's consumer waits on, set by the loop: a gevent event when the loop runs in a
        #: greenlet of the hub's thread, else a threading event (the loop has its own thread).
        self.new_event: Callable[[], Any]
        if _gevent_hub() is not None:
            # In a greenlet of the hub's thread (see _HubSelector): grpc.aio's completions reach
            # the loop as readable sockets, and its waits yield to the hub.
            import gevent

            self.new_event = _HubSignal
            self.loop = _RelayLoop(_HubSelector())
            self._runner = gevent.spawn(self.loop.run_forever)
            self._runner.link_exception(self._loop_died)
        else:
            self.new_event = threading.Event
            self.loop = _RelayLoop(_real_selector())
            started = threading.Event()
            self._runner = threading.Thread(target=self._run, args=(started,), name="trident-grpc-relay",
                                            daemon=True)
            self._runner.start()
            started.wait()
        # Scheduled, not awaited: the loop runs callbacks in order, so the stub exists before any
        # later call runs; and the caller never yields to another greenlet (which could build a
        # second relay, with a second event loop: grpc.aio then mixes their futures).
        self.loop.call_soon_threadsafe(self._connect, target, options)

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(started.set)
        self.loop.run_forever()

    def _loop_died(self, runner: Any) -> None:  # in the hub
        """Every call of this process goes through the loop, and grpc.aio's poller stays bound to
        it, so a worker without it can only hang its streams: it stops (gracefully: SIGTERM, the
        drain of gateway.drain) and gunicorn starts a new one."""
        log.critical("the gRPC relay loop died (%r); stopping this worker", runner.exception)
        os.kill(os.getpid(), signal.SIGTERM)

    def _connect(self, target: str, options: list[tuple[str, Any]]) -> None:  # on the loop
        self._channel = grpc.aio.insecure_channel(target, options=options)
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        # Bidirectional, written to directly (no request iterator, so no task to consume one):
        # a client that leaves is handled by a cancel request written on the same call (see stream).
        self._stream_infer = self._channel.stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer",
            request_serializer=service_pb2.ModelInferRequest.SerializeToString,
            response_deserializer=service_pb2.ModelStreamInferResponse.FromString,
        )

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float | None) -> Any:
        """Run a coroutine on the relay loop and wait for its result (cooperatively under
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

    def stream(self, request: Any, *, timeout: float, parse: Callable[[Any], Any],
               cancel_request: Callable[[], Any], cancel_grace: float = 5.0) -> RelayCall:
        """Start ``ModelStreamInfer`` with ``request``; each of its responses goes through
        ``parse`` on the relay loop (an exception ends the events as an item) into the call's
        inbox. Its last response (the final flag, or an error) ends the events at once; the call
        is then half-closed and read to its end (Triton ends it after that).

        ``cancel_request`` builds the request that :meth:`RelayCall.cancel` sends to end this one
        (built only then: most calls end by themselves, and building it took about 9 us). It goes
        on the same call, so it reaches the server that holds the request: round_robin picks a
        server for every call, and a cancel on a call of its own could reach another Triton.
        The call itself is not cancelled: Triton 2.51's gRPC endpoint can deadlock when a client
        cancels a stream while one of its responses is being written (docs/architecture.md).

        A call still running ``timeout`` seconds after its start ends the same way, its events
        with a :class:`CallTimedOut` item; its gRPC deadline, later by the cancel grace and
        :data:`DEADLINE_MARGIN`, is only the last resort."""
        call = RelayCall(self, cancel_request=cancel_request, cancel_grace=cancel_grace)
        deadline = timeout + cancel_grace + DEADLINE_MARGIN

        async def pump() -> None:
            try:
                try:
                    grpc_call = call._grpc = self._stream_infer(timeout=deadline, wait_for_ready=False)
                    await grpc_call.write(request)
                finally:
                    call._written.set_result(None)
                async for response in grpc_call:
                    if call.done:  # its request ended (or failed to parse): read to the end
                        continue
                    last = bool(response.error_message) or is_final(response.infer_response)
                    try:
                        call.put(parse(response))
                    except Exception as exc:  # a bad response: the consumer decides (it cancels)
                        call.end(exc)
                    if last:
                        call.end()
                        await call._half_close()
                call.end()
            except asyncio.CancelledError:
                call.end()
            except BaseException as exc:  # grpc.aio.AioRpcError: the consumer decides
                call.end(exc)
            finally:
                if call._timer is not None:
                    call._timer.cancel()

        def start() -> None:
            call._written = self.loop.create_future()
            call._timer = self.loop.call_later(timeout, call._time_out, timeout)
            call._task = self.loop.create_task(pump())
            if call._cancelled:
                call._task.cancel()

        self.loop.call_soon_threadsafe(start)
        return call

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


class _HubSelector:
    """An OS epoll selector for an asyncio loop that runs in a greenlet of the gevent hub's thread.

    ``select`` takes what is ready without yielding, so the loop runs every ready callback in one
    go; only when nothing is ready does it wait, cooperatively, for the epoll descriptor itself to
    become readable (one libev watcher on it). That watcher fires in the hub's poll phase, once per
    turn of the hub's loop, so each step of a call (its start, each batch of its responses) waits
    behind at most one turn's admissions of new connections (gateway.worker limits them to 4).
    gevent's own ``GeventSelector`` yields to the hub on every call, even with work ready, which
    put the loop behind every greenlet queued at that moment, for every step."""

    def __init__(self) -> None:
        import gevent

        self._selector = _real_selector()
        self._hub = gevent.get_hub()
        self._watcher = self._hub.loop.io(self._selector.fileno(), 1)  # EV_READ

    def __getattr__(self, name: str) -> Any:  # register, unregister, modify, get_key, get_map
        return getattr(self._selector, name)

    def select(self, timeout: float | None = None) -> list[Any]:
        ready = self._selector.select(0)
        if ready or (timeout is not None and timeout <= 0):
            return ready
        waiter = _Waiter(self._hub)  # woken by the descriptor's watcher or the timeout
        self._watcher.start(waiter.switch, None)
        try:
            _hub_wait(self._hub, waiter, timeout, None)
        finally:
            self._watcher.stop()
        return self._selector.select(0)

    def close(self) -> None:
        self._watcher.close()
        self._selector.close()


def _real_selector() -> Any:
    """The OS selector, not gevent's (which would run a gevent hub inside the relay's own thread,
    or, in the hub's thread, yield to the hub on every turn of the loop: _HubSelector)."""
    try:
        from gevent import monkey

        if monkey.is_module_patched("selectors"):
            return monkey.get_original("selectors", "DefaultSelector")()
    except ImportError:  # pragma: no cover
        pass
    import selectors

    return selectors.DefaultSelector()
