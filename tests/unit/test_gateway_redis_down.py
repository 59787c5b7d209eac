"""The gateway with its Redis store unreachable (nothing listens on port 1): a bounded key's
requests get a 503 to retry, not a 500; flask-limiter's fail-open and in-memory fallback settings
apply to the open-generation bound too; a generation that ends while Redis is gone ends normally.
(tests/e2e/test_operations.py stops a real Redis mid-stream.)"""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from gateway_fakes import FakeBackend
from redis.exceptions import ConnectionError as RedisConnectionError
from testkit import assert_error

from gateway import create_app
from gateway.auth import hash_key
from gateway.concurrency import KeyConcurrency

UNIT = Path(__file__).resolve().parent
UNREACHABLE = "redis://127.0.0.1:1/0"
BODY = {"prompt": "Hi there"}
KEYS = [
    {"name": "limited", "sha256": hash_key("limited-key"), "models": ["*"], "rate_limit": "2/minute"},
    {"name": "bounded", "sha256": hash_key("bounded-key"), "models": ["*"], "max_concurrent": 1},
    {"name": "free", "sha256": hash_key("free-key"), "models": ["*"]},
]


def client(tmp_path, **config):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(KEYS))
    app = create_app({"API_KEYS_FILE": str(path), "RATELIMIT_STORAGE_URI": UNREACHABLE, "RETRY_AFTER": 7, **config},
                     backend=FakeBackend())
    return app.test_client()


def post(c, name, **body):
    return c.post("/generate", json={**BODY, **body}, headers={"Authorization": f"Bearer {name}-key"})


@pytest.mark.parametrize("stream", [False, True])
def test_a_bounded_key_gets_a_503_to_retry_and_a_free_key_is_served(tmp_path, caplog, stream):
    c = client(tmp_path)
    for name in ("limited", "bounded"):
        r = post(c, name, stream=stream)
        assert_error(r, 503, "service_unavailable", None, "The rate-limit store is unreachable; retry the request shortly")
        assert r.headers["Retry-After"] == "7"
    assert post(c, "free", stream=stream).status_code == 200
    assert not [rec for rec in caplog.records if rec.exc_info]  # a warning line, no traceback
    assert any("rate-limit store is unreachable" in rec.getMessage() for rec in caplog.records)


def in_a_fresh_process(tmp_path, config: dict, calls: list[str]) -> list[int]:
    """The status of each call (a key name), from an app made in a new interpreter: flask-limiter's
    one module-level Limiter keeps the first app's RATELIMIT_SWALLOW_ERRORS and in-memory fallback
    for every later app of the process (one app per process in production)."""
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(KEYS))
    script = f"""
import json, sys
sys.path[:0] = {[str(UNIT), str(UNIT.parent)]!r}
from gateway_fakes import FakeBackend
from gateway import create_app
config = {{"API_KEYS_FILE": {str(path)!r}, "RATELIMIT_STORAGE_URI": {UNREACHABLE!r}, **{config!r}}}
c = create_app(config, backend=FakeBackend()).test_client()
print(json.dumps([c.post("/generate", json={BODY!r}, headers={{"Authorization": "Bearer " + name + "-key"}}).status_code
                  for name in {calls!r}]))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=UNIT.parents[1])
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_fail_open_lets_both_through(tmp_path):
    calls = ["limited", "limited", "limited", "bounded", "bounded"]
    assert in_a_fresh_process(tmp_path, {"RATELIMIT_SWALLOW_ERRORS": True}, calls) == [200] * 5


def test_the_in_memory_fallback_keeps_counting_in_the_process(tmp_path):
    calls = ["limited", "limited", "limited", "bounded"]
    assert in_a_fresh_process(tmp_path, {"RATELIMIT_IN_MEMORY_FALLBACK_ENABLED": True}, calls) == [200, 200, 429, 200]


class GoneRedis:
    """The client of a Redis that has gone away."""

    def zrem(self, *args):
        raise RedisConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")


def test_a_generation_that_ends_while_redis_is_gone_gives_back_nothing_and_raises_nothing(caplog):
    caplog.set_level(logging.WARNING, logger="trident.gateway")
    bound = KeyConcurrency("redis://127.0.0.1:6379/0", lease=120)
    bound._redis, bound._script = GoneRedis(), lambda **kwargs: 1  # acquired while Redis was up
    release = bound.acquire("bounded", 1, retry_after=5)
    release()
    release()  # once only
    warnings = [rec.getMessage() for rec in caplog.records]
    assert len(warnings) == 1 and "expires with its lease in 120 s" in warnings[0]


def test_a_redis_that_accepts_and_never_answers_costs_a_request_the_store_timeout(tmp_path):
    """A Redis host gone without a reset (or hung): its port accepts (the kernel's backlog) and
    answers nothing. A bounded key's request is a 503 after STORE_TIMEOUT (0.5 s here), whatever
    the Redis client's own default (redis-py 8: 5 s; older ones waited for ever). Run in a fresh
    interpreter (flask-limiter's storage options, as above)."""
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # never accepted, never answered
    try:
        path = tmp_path / "keys.json"
        path.write_text(json.dumps(KEYS))
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        script = f"""
import json, sys
sys.path[:0] = {[str(UNIT), str(UNIT.parent)]!r}
from gateway_fakes import FakeBackend
from gateway import create_app
c = create_app({{"API_KEYS_FILE": {str(path)!r}, "RATELIMIT_STORAGE_URI": {url!r}, "STORE_TIMEOUT": 0.5}},
               backend=FakeBackend()).test_client()
started = time.monotonic()
codes = [c.post("/generate", json={BODY!r}, headers={{"Authorization": "Bearer " + name + "-key"}}).status_code
         for name in ("limited", "bounded", "free")]
print(json.dumps([codes, time.monotonic() - started]))
"""
        out = subprocess.run([sys.executable, "-c", "import time\n" + script], capture_output=True, text=True,
                             timeout=120, cwd=UNIT.parents[1])
        assert out.returncode == 0, out.stderr
        codes, seconds = json.loads(out.stdout.strip().splitlines()[-1])
        assert codes == [503, 503, 200]
        # Two waits of 0.5 s, with a wide margin; the client's own 5 s would take 10.
        assert seconds < 4, seconds
    finally:
        silent.close()
