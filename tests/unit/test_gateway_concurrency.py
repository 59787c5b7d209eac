"""A key's open generations counted in a real Redis (gateway.concurrency.KeyConcurrency): each
holds a place for a short lease that its process renews while it is open, so a process that dies
holding places gives them back within a lease (tests/e2e/test_load.py kills a gateway worker
mid-stream), and a live one keeps its places however long its generations run."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest
import redis
from testkit import ROOT, free_port, start_redis, stop_redis, wait_until

from gateway.concurrency import KeyConcurrency
from gateway.errors import ClientError

LEASE = 0.6  # renewed every 0.2 s


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    port = free_port()
    proc = start_redis(tmp_path_factory.mktemp("redis"), port)
    yield f"redis://127.0.0.1:{port}/0"
    stop_redis(proc)


@pytest.fixture
def key(request):
    return f"k-{request.node.name}"  # each test its own key


def refused(bound: KeyConcurrency, name: str, limit: int) -> bool:
    try:
        release = bound.acquire(name, limit, retry_after=1)
    except ClientError as exc:
        assert exc.status == 429
        return True
    release()
    return False


def members(url: str, name: str) -> int:
    return redis.Redis.from_url(url).zcard(f"trident:open-generations:{name}")


def test_a_live_process_keeps_its_places_for_longer_than_a_lease(redis_url, key):
    bound = KeyConcurrency(redis_url, lease=LEASE)
    release = bound.acquire(key, 1, retry_after=1)
    time.sleep(4 * LEASE)  # without renewal the place would have expired three times over
    assert refused(KeyConcurrency(redis_url, lease=LEASE), key, 1)  # another worker, same Redis
    assert members(redis_url, key) == 1
    release()
    assert members(redis_url, key) == 0
    assert not refused(bound, key, 1)


def test_the_places_of_a_process_that_died_come_back_after_a_lease(redis_url, key):
    """A process takes both places of a key and is killed (SIGKILL) with them: the key is refused
    until their lease runs out, then served; nothing gave them back."""
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from gateway.concurrency import KeyConcurrency
        bound = KeyConcurrency({redis_url!r}, lease={LEASE})
        held = [bound.acquire({key!r}, 2, retry_after=1) for _ in range(2)]
        print("held", flush=True)
        time.sleep(600)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        time.sleep(2 * LEASE)  # the holder renews meanwhile
        other = KeyConcurrency(redis_url, lease=LEASE)
        assert refused(other, key, 2)
        holder.kill()
        holder.wait()
        died = time.monotonic()
        assert refused(other, key, 2)
        assert wait_until(lambda: not refused(other, key, 2), timeout=10, interval=0.05)
        assert time.monotonic() - died <= LEASE + 0.5  # within the last lease it renewed, plus a margin
    finally:
        holder.kill()
        holder.wait()


def test_renewing_keeps_only_the_places_still_open(redis_url, key):
    bound = KeyConcurrency(redis_url, lease=LEASE)
    kept = bound.acquire(key, 3, retry_after=1)
    gone = bound.acquire(key, 3, retry_after=1)
    assert bound.renew() == 2 and members(redis_url, key) == 2
    gone()
    gone()  # once only
    assert bound.renew() == 1 and members(redis_url, key) == 1
    # Redis lost the entry (an outage longer than a lease, a restart): the open one counts again.
    redis.Redis.from_url(redis_url).delete(f"trident:open-generations:{key}")
    assert bound.renew() == 1 and members(redis_url, key) == 1
    kept()
    assert bound.renew() == 0 and members(redis_url, key) == 0


def test_a_generation_that_ends_while_its_renewal_is_on_the_way_stays_given_back(redis_url, key):
    """release() between renew's snapshot and its ZADD (another greenlet, while the pipeline
    waits for Redis): the ZADD puts the entry back, and renew removes it again."""
    bound = KeyConcurrency(redis_url, lease=LEASE)
    release = bound.acquire(key, 1, retry_after=1)
    real_pipeline = bound._redis.pipeline

    class EndsMeanwhile:
        def __init__(self, **kwargs):
            self.pipe = real_pipeline(**kwargs)

        def __getattr__(self, name):
            return getattr(self.pipe, name)

        def execute(self):
            release()  # removed from Redis here, before the ZADD below reaches it
            assert members(redis_url, key) == 0
            return self.pipe.execute()

    bound._redis.pipeline = EndsMeanwhile
    assert bound.renew() == 1
    assert members(redis_url, key) == 0
    assert not refused(KeyConcurrency(redis_url, lease=60), key, 1)
