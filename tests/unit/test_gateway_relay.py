"""RelayCall's waits under gevent, as in the gateway's worker (everything patched but threading):
items put by a real thread (the relay's) wake the waiting greenlet through the process's one
async watcher, a wait's timeout (the SSE heartbeat) returns None in time, and the end comes
after every item."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
from gevent import monkey
monkey.patch_all(thread=False)
import threading, time, types
from gateway.triton_relay import RelayCall, _Wakeups

relay = types.SimpleNamespace(wakeups=_Wakeups())
assert relay.wakeups._hub is not None
call = RelayCall(relay)

def put_later(delay, item, last=False):
    threading.Thread(target=lambda: (time.sleep(delay), call.put(item, last=last))).start()

t0 = time.monotonic()
assert call.take(0.1) is None
assert 0.09 <= time.monotonic() - t0 < 3.0

put_later(0.15, "a")
t1 = time.monotonic()
assert call.take(5) == ["a"]  # woken by the item, not by the timeout
assert 0.14 <= time.monotonic() - t1
t2 = time.monotonic()
assert call.take(0.3) is None  # a new wait, a new timeout
assert 0.29 <= time.monotonic() - t2 < 3.0

put_later(0.05, "b")
put_later(0.1, "c", last=True)
got = []
while True:
    items = call.take(5)
    assert items is not None
    if items == []:
        break
    got += items
assert got == ["b", "c"], got
assert call.take(5) == []  # and again, at once
print("ok")
"""


def test_relay_call_waits_under_gevent():
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
