"""Concurrent generations per API key (``max_concurrent`` in the keys file): OWASP API4.

A rate limit bounds how many generations a key *starts* in a window; this bounds how many it
has *open* at once (a stream may hold an engine slot for minutes). Over the bound is a 429
``rate_limit_error`` with ``Retry-After``. The count is kept where the rate limits are
(``RATELIMIT_STORAGE_URI``): in the process for ``memory://`` (per worker, so a key's bound is per
worker there), in Redis for ``redis://``, shared by every worker and replica. In Redis each open
generation is a member of a sorted set scored by its lease's end: ``lease`` seconds
(``CONCURRENCY_LEASE``, 30 s), which the worker that holds it renews every third of that while
the generation is open (one pipelined ``ZADD`` for all of its members). So the places of a
worker (or a whole gateway) that dies holding some come back within a lease, not a request
timeout later; and a generation that ends while Redis is unreachable still ends as it should:
its member, which could not be removed, expires with its lease (a warning in the log). While
Redis is unreachable, new generations of a bounded key get a 503 (gateway.errors), as with the
rate limits; flask-limiter's ``RATELIMIT_SWALLOW_ERRORS`` (let them through) and
``RATELIMIT_IN_MEMORY_FALLBACK_ENABLED`` (count in the process meanwhile) apply here too.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from .disconnect import gevent_active
from .errors import ClientError, store_unreachable_errors
from .ids import new_id

log = logging.getLogger("trident.gateway")

_ACQUIRE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then
  return 0
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""


class KeyConcurrency:
    """Counts each key's open generations; ``acquire`` returns the function that gives one back."""

    def __init__(self, storage_uri: str, *, lease: float, timeout: float = 2.0, fail_open: bool = False,
                 memory_fallback: bool = False) -> None:
        self.storage_uri = storage_uri
        self.lease = lease
        self.timeout = timeout  # a Redis connect or command
        self.fail_open, self.memory_fallback = fail_open, memory_fallback
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()  # never held across anything that yields
        self._redis: Any = None
        self._script: Any = None
        self._held: dict[str, set[str]] = {}  # Redis key -> this process's open members: renewed
        self._renewer_pid = 0  # the process whose renewer runs (a forked worker starts its own)

    def acquire(self, name: str, limit: int | None, *, retry_after: int) -> Callable[[], None]:
        if not limit:
            return _nothing
        if is_redis(self.storage_uri):
            try:
                return self._acquire_redis(name, limit, retry_after)
            except Exception as exc:
                if not ((self.fail_open or self.memory_fallback) and isinstance(exc, store_unreachable_errors())):
                    raise  # a 429, or a 503 (gateway.errors)
                log.warning("Redis is unreachable (%s): the open generations of key %r are %s", exc, name,
                            "counted in this process meanwhile" if self.memory_fallback else "not bounded meanwhile")
                if not self.memory_fallback:
                    return _nothing
        with self._lock:
            count = self._counts.get(name, 0)
            if count >= limit:
                raise _refused(name, limit, retry_after)
            self._counts[name] = count + 1
        released = False

        def release() -> None:
            nonlocal released
            with self._lock:
                if not released:
                    released = True
                    self._counts[name] -= 1

        return release

    def _acquire_redis(self, name: str, limit: int, retry_after: int) -> Callable[[], None]:
        if self._redis is None:
            import redis

            self._redis = redis.Redis.from_url(self.storage_uri, socket_connect_timeout=self.timeout,
                                               socket_timeout=self.timeout)
            self._script = self._redis.register_script(_ACQUIRE)
        key, member, now = f"trident:open-generations:{name}", new_id(), time.time()
        if not self._script(keys=[key], args=[now, now + self.lease, member, limit, int(self.lease) + 60]):
            raise _refused(name, limit, retry_after)
        with self._lock:
            self._held.setdefault(key, set()).add(member)
        self._start_renewer()
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                with self._lock:
                    members = self._held.get(key)
                    if members is not None:
                        members.discard(member)
                        if not members:
                            del self._held[key]
                try:
                    self._redis.zrem(key, member)
                except Exception as exc:  # Redis unreachable: the member expires with its lease
                    log.warning("could not give back an open generation of key %r in Redis (%s); it "
                                "expires with its lease in %.0f s", name, exc, self.lease)

        return release

    def renew(self) -> int:
        """Extend the lease of every open generation of this process to ``lease`` seconds from now
        (one pipelined ``ZADD``), and count again one whose entry Redis lost (a Redis outage longer
        than a lease, a restart); returns how many. A generation that ends while the pipeline is
        on its way has its entry removed again after it, so renewing never keeps a place of an
        ended one."""
        with self._lock:
            held = {key: list(members) for key, members in self._held.items()}
        if not held:
            return 0
        until = time.time() + self.lease
        pipe = self._redis.pipeline(transaction=False)
        for key, members in held.items():
            pipe.zadd(key, dict.fromkeys(members, until))
            pipe.expire(key, int(self.lease) + 60)
        pipe.execute()
        with self._lock:
            ended = {key: [m for m in members if m not in self._held.get(key, ())] for key, members in held.items()}
        for key, members in ended.items():
            if members:
                self._redis.zrem(key, *members)
        return sum(len(members) for members in held.values())

    def _start_renewer(self) -> None:
        with self._lock:
            if self._renewer_pid == os.getpid():
                return
            self._renewer_pid = os.getpid()
        _in_background(self._renew_forever)

    def _renew_forever(self) -> None:
        failing = False
        while True:
            time.sleep(self.lease / 3)
            try:
                self.renew()
            except Exception as exc:  # Redis unreachable: the leases run on; renewed when it is back
                if not failing:
                    log.warning("could not renew the leases of this worker's open generations in Redis (%s); "
                                "they expire %.0f s after their last renewal", exc, self.lease)
                failing = True
            else:
                failing = False


def _in_background(target: Callable[[], None]) -> None:
    """Run ``target`` as a greenlet of this thread's hub in the gevent worker (its sockets are
    gevent's, and the Redis client's pooled connections belong to the hub that made them; the
    worker leaves ``threading`` unpatched, gateway.worker), else as a daemon thread."""
    if gevent_active():
        import gevent

        gevent.spawn(target)
    else:
        threading.Thread(target=target, name="trident-lease-renewer", daemon=True).start()


def is_redis(storage_uri: str) -> bool:
    """Whether the limits' store is Redis (else flask-limiter's memory:// in the process)."""
    return storage_uri.startswith(("redis://", "rediss://", "unix://"))


def _nothing() -> None:
    pass


def _refused(name: str, limit: int, retry_after: int) -> ClientError:
    return ClientError(
        f"API key '{name}' already has {limit} generations open, its limit; retry when one ends",
        status=429,
        headers={"Retry-After": str(retry_after)},
    )
