"""The relay under gevent, as in the gateway's worker (everything patched but threading), against
the fake Triton in its own process: the asyncio loop runs in a greenlet of the hub's thread (no
thread of its own); a call's wait times out in time (the SSE heartbeat) and wakes at its item;
40 streams at once reach their greenlets while another greenlet keeps running; a client that
leaves, or a call past its timeout, ends with a cancel request sent on that same call (so it reaches the server that
holds the request), not with a gRPC cancel; and a relay loop that dies stops
the worker (SIGTERM to itself), which would otherwise hang every stream."""
import os
import subprocess
import sys
from pathlib import Path

from testkit import free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
from gevent import monkey
monkey.patch_all(thread=False)
import signal, sys, threading, time
import gevent
from testkit import MODEL
from gateway.backend import Finished, TextDelta
from gateway.triton_backend import TritonBackend
from gateway.triton_relay import RelayCall
from trident.contract import SamplingParams, TextRequest

backend = TritonBackend(url="127.0.0.1:" + sys.argv[1], models={MODEL: "llm"}, request_timeout=10, ready_timeout=2)
relay = backend.relay
assert [t.name for t in threading.enumerate() if t.name == "trident-grpc-relay"] == []
backend.check_ready()

call = RelayCall(relay)
t0 = time.monotonic()
assert call.take(0.1) is None
assert 0.09 <= time.monotonic() - t0 < 3.0
relay.loop.call_soon_threadsafe(relay.loop.call_later, 0.15, call.put, "a")
t1 = time.monotonic()
assert call.take(5) == ["a"]  # woken by the item, not by the timeout
assert 0.14 <= time.monotonic() - t1 < 3.0
relay.loop.call_soon_threadsafe(call.put, "b")
relay.loop.call_soon_threadsafe(lambda: call.put("c", last=True))
got = []
while (items := call.take(5)) != []:
    assert items is not None
    got += items
assert got == ["b", "c"], got
assert call.take(5) == []  # and again, at once

def request(prompt):
    return TextRequest(prompt=prompt, model=MODEL, stream=True, sampling=SamplingParams())

ticks = []
def ticker():
    while True:
        ticks.append(time.monotonic())
        gevent.sleep(0.005)

def one(i):
    generation = backend.generate(request("Hi there"), request_id=f"r{i}")
    try:
        return list(generation)
    finally:
        generation.close()

tick = gevent.spawn(ticker)
streams = [gevent.spawn(one, i) for i in range(40)]
gevent.joinall(streams, timeout=30, raise_error=True)
tick.kill()
for g in streams:
    assert g.value == [TextDelta("Hello"), TextDelta(","), TextDelta(" world"), Finished("eos_token", 2, 3)], g.value
assert len(ticks) >= 3, ticks  # the hub ran other greenlets meanwhile

slow = backend.generate(request("slow"), request_id="r-slow")
assert slow.next_events(10) == [TextDelta("Hello")]
slow.close()  # the client left: a cancel request ends the call, read to its end
t2 = time.monotonic()
while not slow._call.done and time.monotonic() - t2 < 2.5:  # the hard cancel comes after 3 s
    gevent.sleep(0.01)
assert slow._call.done
print("closed", flush=True)

# A generation past its timeout ends the same way (a cancel request on its call), not by its
# gRPC deadline, which gRPC would enforce by cancelling the call.
from gateway.errors import ApiError
backend.request_timeout = 0.5
late = backend.generate(request("slow"), request_id="r-late")
assert late.next_events(10) == [TextDelta("Hello")]
t3 = time.monotonic()
try:
    late.next_events(10)
    raise AssertionError("no timeout")
except ApiError as exc:
    assert exc.status == 504 and "request timeout of 0.5 s" in str(exc), exc
assert time.monotonic() - t3 < 3.0
late.close()
while not late._call._task.done() and time.monotonic() - t3 < 2.5:  # read to its end
    gevent.sleep(0.01)
assert late._call._task.done()
backend.request_timeout = 10
print("timed-out", flush=True)

terms = []
signal.signal(signal.SIGTERM, lambda *args: terms.append(args[0]))
relay._runner.kill(RuntimeError("relay loop failure for the test"), block=True)
deadline = time.monotonic() + 5
while not terms and time.monotonic() < deadline:
    gevent.sleep(0.01)
assert terms == [signal.SIGTERM], terms
print("ok", flush=True)
"""


def test_the_relay_under_gevent(tmp_path):
    cancel_log = tmp_path / "cancelled.txt"
    cancel_log.touch()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "unit")])}
    port = free_port()
    fake = subprocess.Popen([sys.executable, str(ROOT / "tests/unit/gateway_fakes.py"), str(port), str(cancel_log)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert "fake triton on" in fake.stdout.readline()
        done = subprocess.run([sys.executable, "-c", SCRIPT, str(port)], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0 and done.stdout.split() == ["closed", "timed-out", "ok"], done.stdout + done.stderr
        assert "the gRPC relay loop died" in done.stderr and "stopping this worker" in done.stderr, done.stderr
        # The stream the client left was ended by a cancel request written on that same stream
        # (the fake records where it came: a separate call could reach another Triton), which llm
        # answers; the call itself was never cancelled (Triton 2.51: docs/architecture.md).
        # So was the stream that ran past its timeout.
        assert wait_until(lambda: cancel_log.read_text().splitlines() == ["slow cancel-request"] * 2,
                          timeout=5), cancel_log.read_text()
    finally:
        fake.terminate()
        fake.wait(10)


def test_a_calls_hub_signal_wakes_its_greenlet_times_out_and_takes_one_waiter():
    """gateway.triton_relay._HubSignal, what a call's consumer waits on under gevent: set before
    the wait answers at once; a set from another greenlet wakes it; a wait past its timeout says
    False (and a later set does not wake anything stale); a second waiting greenlet is an error."""
    import gevent

    from gateway.triton_relay import _HubSignal

    # The hub's clock as of now: a hub of this thread that an earlier test left idle keeps its
    # last loop time, and timers started from it would be due at once.
    gevent.get_hub().loop.update_now()
    signal = _HubSignal()
    signal.set()
    assert signal.wait(5) is True
    signal.clear()
    gevent.spawn_later(0.01, signal.set)
    assert signal.wait(5) is True
    signal.clear()
    assert signal.wait(0.02) is False
    signal.set()  # nobody waits: only the flag
    assert signal.wait(0) is True
    signal.clear()
    first = gevent.spawn(signal.wait, 5)
    gevent.sleep(0.01)
    try:
        second = gevent.spawn(signal.wait, 5)
        second.join(1)
        assert isinstance(second.exception, RuntimeError)
    finally:
        signal.set()
        assert first.get(timeout=1) is True
