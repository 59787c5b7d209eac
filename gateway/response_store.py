"""Stored responses of OpenAI's Responses API: ``store``, ``previous_response_id`` and the
``/v1/responses/{id}`` routes (retrieve, delete, list its input items).

Off unless the deployment names a store with ``RESPONSES_STORE`` (``TRIDENT_RESPONSES_STORE``),
as vLLM keeps none unless asked (``VLLM_ENABLE_RESPONSES_API_STORE``):

* ``memory``: in this worker process, at most ``RESPONSES_MEMORY_MB`` of them (the oldest go
  first). Only for one gateway process: another worker does not see them.
* ``redis://host:port/db`` (or ``rediss://``, ``unix://``): in Redis, shared by every worker and
  replica, as the rate limits are; each record expires with Redis's own TTL.

A record is the response object as it was answered and the conversation it continued: the
input items of every earlier turn (the previous response's own context, its output) and of this
one. ``previous_response_id`` continues that conversation with the new input; ``instructions``
is not carried over (OpenAI's rule). Records last ``RESPONSES_TTL`` seconds and belong to the API
key that made them: another key gets a 404, as for a response that does not exist.

A background response (gateway.background) changes while it runs: :meth:`update` changes a
record only if it still is what its caller saw (the runner's result and a cancel never overwrite
each other), and a run lease (:meth:`renew_run`, :meth:`run_lapsed`) says that the process
running it is alive. One created with ``stream: true`` keeps its stream's events, in
order, each under its ``sequence_number`` (:meth:`append_events`), for clients that follow it or
resume it later (:meth:`read_events`; in Redis a stream, read with ``XREAD BLOCK``); they go with
the record.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

from .concurrency import is_redis
from .disconnect import new_event
from .errors import store_unreachable_errors, unavailable

log = logging.getLogger("trident.gateway")

#: how RESPONSES_STORE names the in-process store
MEMORY = "memory"
_PREFIX = "trident:response:"
_RUN_PREFIX = "trident:response-run:"
_EVENTS_PREFIX = "trident:response-events:"
_LAPSED_PREFIX = "trident:response-run-lapsed:"
#: the longest a read of events waits (in Redis also at most half its connections' socket timeout)
MAX_EVENT_WAIT = 1.0


class ResponseStore(Protocol):
    def put(self, owner: str, response_id: str, record: dict[str, Any]) -> None: ...

    def get(self, owner: str, response_id: str) -> dict[str, Any] | None: ...

    def delete(self, owner: str, response_id: str) -> bool: ...

    def update(self, owner: str, response_id: str,
               change: Callable[[dict[str, Any]], dict[str, Any] | None]) -> dict[str, Any] | None:
        """Atomically: the record, ``change``d (``change`` returns the new record, or None to
        leave it as it is). Returns the record now stored; None when there is none (or it is
        another owner's)."""
        ...

    def renew_run(self, response_id: str, seconds: float) -> None:
        """The process running a background response is alive for ``seconds`` more."""
        ...

    def run_lapsed(self, response_id: str, grace: float) -> bool:
        """Whether the response's run lease has lapsed and stayed so ``grace`` seconds: the first
        look that finds it lapsed notes when (and answers no); a look ``grace`` seconds after that,
        still without a lease, answers yes. :meth:`renew_run` forgets the note. A run alive across
        a store outage longer than its lease renews it within seconds of the store's return,
        before any reader's second look."""
        ...

    def append_events(self, response_id: str, first: int, events: list[bytes]) -> None:
        """Keep a streamed response's next events (one SSE event each), numbered from ``first``.
        Those already kept are skipped, so a batch whose append failed (or seemed to: a timeout
        after Redis took it) is appended again whole; a batch that would leave a gap is refused
        (ValueError). Nothing is kept for a record that is gone."""
        ...

    def read_events(self, response_id: str, after: int, wait: float) -> list[tuple[int, bytes]]:
        """The kept events numbered above ``after``, with their numbers; when there are none yet,
        waiting up to ``wait`` seconds (at most :data:`MAX_EVENT_WAIT`) for the next."""
        ...

    def last_event(self, response_id: str) -> tuple[int, bytes] | None:
        """The last kept event, with its number; None when none is."""
        ...


class MemoryStore:
    """Records in this process, oldest evicted first past ``max_chars`` of JSON."""

    def __init__(self, ttl: float, max_chars: int, clock: Any = time.monotonic) -> None:
        self.ttl, self.max_chars, self._clock = ttl, max_chars, clock
        self._records: OrderedDict[str, tuple[str, float, str]] = OrderedDict()  # id -> (owner, expiry, JSON)
        self._chars = 0
        self._runs: dict[str, float] = {}  # id -> end of its run lease
        self._lapsed: dict[str, float] = {}  # id -> when a look first found its lease lapsed
        self._events: dict[str, list[bytes]] = {}  # id -> its stream's events (index: sequence number)
        self._waiting: dict[str, list[Any]] = {}  # id -> the events (gevent's or threading's) of its readers
        self._lock = threading.Lock()  # never held across anything that yields

    def put(self, owner: str, response_id: str, record: dict[str, Any]) -> None:
        text = self._text(record)
        with self._lock:
            self._put(owner, response_id, text)

    def _text(self, record: dict[str, Any]) -> str:
        text = json.dumps(record, ensure_ascii=False)
        if len(text) > self.max_chars:  # it would push itself out: say so (the reply: store false)
            raise ValueError(f"a record of {len(text)} characters does not fit the memory store's "
                             f"{self.max_chars}")
        return text

    def _put(self, owner: str, response_id: str, text: str) -> None:
        old = self._records.pop(response_id, None)  # rewritten: its events stay
        if old is not None:
            self._chars -= len(old[2])
        self._records[response_id] = (owner, self._clock() + self.ttl, text)
        self._chars += len(text)
        self._evict()

    def _evict(self) -> None:
        while self._chars > self.max_chars and self._records:
            self._drop(next(iter(self._records)))

    def get(self, owner: str, response_id: str) -> dict[str, Any] | None:
        with self._lock:
            entry = self._records.get(response_id)
            if entry is None or entry[0] != owner:
                return None
            if entry[1] <= self._clock():
                self._drop(response_id)
                return None
            text = entry[2]
        return json.loads(text)

    def delete(self, owner: str, response_id: str) -> bool:
        with self._lock:
            entry = self._records.get(response_id)
            if entry is None or entry[0] != owner or entry[1] <= self._clock():
                return False
            self._drop(response_id)
            return True

    def update(self, owner: str, response_id: str,
               change: Callable[[dict[str, Any]], dict[str, Any] | None]) -> dict[str, Any] | None:
        with self._lock:  # change() is plain data work: it does not yield
            entry = self._records.get(response_id)
            if entry is None or entry[0] != owner or entry[1] <= self._clock():
                return None
            record = json.loads(entry[2])
            new = change(record)
            if new is None:
                return record
            self._put(owner, response_id, self._text(new))
        return new

    def renew_run(self, response_id: str, seconds: float) -> None:
        with self._lock:
            now = self._clock()
            self._runs = {rid: end for rid, end in self._runs.items() if end > now}  # the lapsed go
            self._runs[response_id] = now + seconds
            self._lapsed.pop(response_id, None)

    def run_lapsed(self, response_id: str, grace: float) -> bool:
        with self._lock:
            now = self._clock()
            if self._runs.get(response_id, 0.0) > now:
                return False
            since = self._lapsed.setdefault(response_id, now)
            return now - since >= grace

    def append_events(self, response_id: str, first: int, events: list[bytes]) -> None:
        with self._lock:
            if response_id not in self._records:  # deleted, or evicted: nobody can read them
                return
            kept = self._events.setdefault(response_id, [])
            if first > len(kept):
                raise ValueError(f"events of {response_id} numbered from {first}, after {len(kept)}")
            events = events[len(kept) - first:]
            kept += events
            self._chars += sum(len(event) for event in events)
            waiting = self._waiting.pop(response_id, [])
            self._evict()
        for woken in waiting:
            woken.set()

    def read_events(self, response_id: str, after: int, wait: float) -> list[tuple[int, bytes]]:
        with self._lock:
            new = self._since(response_id, after)
            if new or wait <= 0:
                return new
            woken = new_event()
            self._waiting.setdefault(response_id, []).append(woken)
        woken.wait(min(wait, MAX_EVENT_WAIT))
        with self._lock:
            waiting = self._waiting.get(response_id)
            if waiting is not None and woken in waiting:
                waiting.remove(woken)
                if not waiting:
                    del self._waiting[response_id]
            return self._since(response_id, after)

    def last_event(self, response_id: str) -> tuple[int, bytes] | None:
        with self._lock:
            kept = self._events.get(response_id)
            return (len(kept) - 1, kept[-1]) if kept else None

    def _since(self, response_id: str, after: int) -> list[tuple[int, bytes]]:
        kept = self._events.get(response_id, [])
        start = max(after + 1, 0)
        return list(enumerate(kept[start:], start))

    def _drop(self, response_id: str) -> None:
        self._lapsed.pop(response_id, None)
        entry = self._records.pop(response_id, None)
        if entry is not None:
            self._chars -= len(entry[2])
        self._chars -= sum(len(event) for event in self._events.pop(response_id, ()))


class RedisStore:
    """Records in Redis (one string each, with Redis's TTL), shared by all gateways."""

    def __init__(self, uri: str, ttl: float, timeout: float) -> None:
        import redis

        self.ttl = max(1, int(ttl))
        self._redis = redis.Redis.from_url(uri, socket_connect_timeout=timeout, socket_timeout=timeout)
        self._max_wait = min(MAX_EVENT_WAIT, timeout / 2)  # a blocking read ends well within the socket timeout
        self._append_script = self._redis.register_script(_APPEND)
        self._lapsed_script = self._redis.register_script(_LAPSED)

    def put(self, owner: str, response_id: str, record: dict[str, Any]) -> None:
        self._redis.set(_PREFIX + response_id, json.dumps({"owner": owner, "record": record}, ensure_ascii=False),
                        ex=self.ttl)

    def get(self, owner: str, response_id: str) -> dict[str, Any] | None:
        raw = self._redis.get(_PREFIX + response_id)
        if raw is None:
            return None
        stored = json.loads(raw)
        return stored["record"] if stored.get("owner") == owner else None

    def delete(self, owner: str, response_id: str) -> bool:
        if self.get(owner, response_id) is None:
            return False
        return bool(self._redis.delete(_PREFIX + response_id, _EVENTS_PREFIX + response_id,
                                       _LAPSED_PREFIX + response_id))

    def update(self, owner: str, response_id: str,
               change: Callable[[dict[str, Any]], dict[str, Any] | None]) -> dict[str, Any] | None:
        """Redis's optimistic transaction: WATCH the key, read it, write it in MULTI/EXEC, which
        fails (and the read is done again) if another client wrote it in between."""
        import redis

        key = _PREFIX + response_id
        with self._redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    stored = json.loads(raw) if raw is not None else None
                    if stored is None or stored.get("owner") != owner:
                        return None
                    new = change(stored["record"])
                    if new is None:
                        return stored["record"]
                    pipe.multi()
                    pipe.set(key, json.dumps({"owner": owner, "record": new}, ensure_ascii=False), ex=self.ttl)
                    pipe.execute()
                    return new
                except redis.WatchError:
                    continue

    def renew_run(self, response_id: str, seconds: float) -> None:
        with self._redis.pipeline(transaction=False) as pipe:
            pipe.set(_RUN_PREFIX + response_id, b"1", px=max(1, int(seconds * 1000)))
            pipe.delete(_LAPSED_PREFIX + response_id)
            pipe.execute()

    def run_lapsed(self, response_id: str, grace: float) -> bool:
        """By Redis's clock (TIME), so the gateways' clocks need not agree (_LAPSED)."""
        return bool(self._lapsed_script(keys=[_RUN_PREFIX + response_id, _LAPSED_PREFIX + response_id],
                                        args=[int(grace * 1000), self.ttl * 1000]))

    def append_events(self, response_id: str, first: int, events: list[bytes]) -> None:
        """A Redis stream whose entry ids are ``0-<sequence number + 1>`` (ids must be above 0-0),
        so a read after a sequence number is an ``XREAD`` after its id; it expires with the record.
        One script (_APPEND) does it, so that a batch is kept whole or not at all, and one sent
        again skips what is kept."""
        import redis

        try:
            self._append_script(keys=[_PREFIX + response_id, _EVENTS_PREFIX + response_id],
                                args=[self.ttl, first, *events])
        except redis.exceptions.ResponseError as exc:
            if "numbered from" not in str(exc):
                raise
            raise ValueError(f"events of {response_id} {exc}") from None

    def read_events(self, response_id: str, after: int, wait: float) -> list[tuple[int, bytes]]:
        block = int(min(wait, self._max_wait) * 1000)
        found = self._redis.xread({_EVENTS_PREFIX + response_id: f"0-{max(after + 1, 0)}"},
                                  block=block if block > 0 else None)
        return [] if not found else [_entry(entry) for entry in found[0][1]]

    def last_event(self, response_id: str) -> tuple[int, bytes] | None:
        found = self._redis.xrevrange(_EVENTS_PREFIX + response_id, count=1)
        return _entry(found[0]) if found else None


#: KEYS: the record, its events' stream; ARGV: the TTL, the first event's number, the events.
#: Appends those not kept yet (a stream's last id is ``0-<events kept>``), unless that would leave
#: a gap (an error) or the record is gone (nothing: nobody can read them, and a deleted
#: response's stream is not made again).
_APPEND = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
local kept = 0
local top = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
if #top > 0 then
  kept = tonumber(string.match(top[1][1], '-(%d+)$'))
end
local first = tonumber(ARGV[2])
if first > kept then
  return redis.error_reply('numbered from ' .. first .. ', after ' .. kept)
end
for i = 3 + kept - first, #ARGV do
  redis.call('XADD', KEYS[2], '0-' .. (first + i - 2), 'e', ARGV[i])
end
redis.call('EXPIRE', KEYS[2], ARGV[1])
return 1
"""


#: KEYS: the run's lease, the note of when a look first found it lapsed; ARGV: the grace and the
#: note's own expiry (ms). 1 when the lease has been lapsed for the grace.
_LAPSED = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local since = redis.call('GET', KEYS[2])
if not since then
  redis.call('SET', KEYS[2], string.format('%.0f', now), 'PX', ARGV[2])
  return 0
end
if now - tonumber(since) >= tonumber(ARGV[1]) then
  return 1
end
return 0
"""


def _entry(entry: tuple[bytes, dict[bytes, bytes]]) -> tuple[int, bytes]:
    """A kept event of a Redis stream and its sequence number (its id's second part, less one)."""
    entry_id, fields = entry
    return int(entry_id.split(b"-")[1]) - 1, fields[b"e"]


def make_store(config: Any) -> ResponseStore | None:
    """The store RESPONSES_STORE names (None: off); gateway.config checked the name."""
    name = config.get("RESPONSES_STORE") or ""
    if not name:
        return None
    if name == MEMORY:
        workers = os.environ.get("GATEWAY_WORKERS", "1").strip()
        if workers.isdigit() and int(workers) > 1:  # gunicorn's workers (gateway.gunicorn_conf)
            raise ValueError(f"gateway config RESPONSES_STORE=memory keeps responses in one process, and "
                             f"GATEWAY_WORKERS is {workers}: a request reaching another worker would not find "
                             f"them; use a redis:// store, or one worker")
        return MemoryStore(config["RESPONSES_TTL"], int(config["RESPONSES_MEMORY_MB"] * 2**20))
    return RedisStore(name, config["RESPONSES_TTL"], config["STORE_TIMEOUT"])


def check_store_name(name: str) -> None:
    if name and name != MEMORY and not is_redis(name):
        raise ValueError(f"gateway config RESPONSES_STORE must be empty (off), '{MEMORY}' or a redis:// URI, "
                         f"got {name!r}")


def reachable(call: Any, retry_after: int, *args: Any) -> Any:
    """``call(*args)``, a 503 to retry when the store (Redis) cannot be reached."""
    try:
        return call(*args)
    except store_unreachable_errors() as exc:
        log.warning("the response store is unreachable: %s", exc)
        raise unavailable("The response store is unreachable; retry the request shortly", retry_after) from exc


__all__ = ["MEMORY", "MemoryStore", "RedisStore", "ResponseStore", "check_store_name", "make_store", "reachable"]
