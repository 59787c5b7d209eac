"""One threading.Event per key, made on first use by whichever thread asks first.

``collections.defaultdict(threading.Event)`` is not safe for that: when the engine's thread
(setting a request's event) and the test's thread (waiting on it) both find the key missing at
once, each makes its own Event, one overwrites the other, and the waiter can wait on the one
nobody sets. That made ``test_new_request_joins_a_full_batch_within_one_step`` time out once
("request 26 did not finish"): its 31 requests all finish in the same engine step while the test
walks through them (tests/unit/test_thread_events.py shows the loss).
"""
from __future__ import annotations

import threading
from collections.abc import Hashable


class Events:
    def __init__(self) -> None:
        self._events: dict[Hashable, threading.Event] = {}
        self._lock = threading.Lock()

    def __getitem__(self, key: Hashable) -> threading.Event:
        with self._lock:
            event = self._events.get(key)
            if event is None:
                event = self._events[key] = threading.Event()
            return event
