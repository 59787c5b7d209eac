"""Streaming at more streams than the engine has slots, clients that vanish at every stage, and
a gateway worker that dies mid-stream.

The small-batch Triton has SMALL_BATCH engine slots; these tests run 12x and 50x that many
streams through the real gateway. Timing is judged by the engine's own counters (tokens
generated against tokens the clients received, decode steps), not by wall-clock bounds, except
where the contract names one (the engine idle within 2 s of the last client gone).
"""
import json
import os
import signal
import threading
import time

import pytest
import redis
import requests
from conftest import SMALL_BATCH, start_gateway, start_triton
from e2e_helpers import API_KEY, child_pids, engine_metrics, open_generate, worker_holding
from load_clients import COUNTING, Stream, disconnect_storm, join_all, log_mark, log_since
from testkit import wait_until

from gateway.keys import add_key
from trident import stream_probe


@pytest.fixture(scope="module")
def load_gateway(small_triton, tmp_path_factory):
    gw = start_gateway(small_triton, tmp_path_factory, extra_env={"TRIDENT_HEARTBEAT_INTERVAL": "0.5"})
    yield gw
    gw.stop()


def test_streams_beyond_the_slots_get_tokens_as_the_engine_makes_them(load_gateway, small_triton):
    """48 streams on 4 slots (44 waiting in the engine's queue). Before the fix the llm model's
    responses waited for a thread of the Python backend's pool, all of which were held by BLS
    calls waiting for their first token: clients got nothing until the first batch ended. Here,
    at every moment, the clients have received nearly every token the engine has generated.
    A stream probe's ping meanwhile is answered while requests wait (trident.stream_probe)."""
    n, tokens = 12 * SMALL_BATCH, 96
    Stream.received = 0
    before = engine_metrics(small_triton)
    samples, stop = [], threading.Event()

    def monitor():
        while not stop.is_set():
            with Stream.lock:
                received = Stream.received
            generated = engine_metrics(small_triton)["generated"] - before["generated"]
            samples.append((generated, received))
            time.sleep(0.1)

    watcher = threading.Thread(target=monitor, daemon=True)
    watcher.start()
    streams = [Stream(load_gateway.url, {**COUNTING, "max_new_tokens": tokens}).start() for _ in range(n)]
    # The stream probe's pings are answered ahead of the queue: while requests still wait for a slot.
    assert wait_until(lambda: engine_metrics(small_triton)["waiting"] > 0, timeout=60)
    assert stream_probe.probe(small_triton.grpc_url, timeout=30)[1] == ["llm_0_0"]
    assert engine_metrics(small_triton)["waiting"] > 0
    join_all(streams, small_triton)
    stop.set()
    watcher.join()

    assert all(s.status == 200 and s.log[-1] == "done" for s in streams), [s.log[-3:] for s in streams]
    assert len({s.text for s in streams}) == 1  # greedy: every stream the same text
    # With the bug, a whole batch's tokens (4 x 96) were held until that batch ended. Without it,
    # clients trail the engine only by what it makes while its counter is published (every 0.1 s)
    # and a scheduling hiccup of a loaded 2-core machine (0.3 s: ~90 tokens here): half a batch
    # separates the two with a wide margin on both sides.
    lag = max(generated - received for generated, received in samples)
    assert lag <= SMALL_BATCH * tokens // 2, f"clients lagged the engine by {lag} tokens: {samples}"
    # Streams that waited for a slot got their 200 and heartbeats (0.5 s) before any token.
    waited = [s for s in streams if s.log.index("token") > s.log.index("headers") + 1]
    assert len(waited) >= n // 2, [s.log[:4] for s in streams]
    assert all(s.log[1] == "comment" for s in waited)


def test_the_slot_that_frees_goes_to_the_earliest_priority(load_gateway, small_triton):
    """vLLM's priority through the gateway and llm: the engine's slots are held by long streams;
    a request of priority 10 waits, then one of -10. The one slot that frees (its client leaves)
    goes to -10, although it came later: while it decodes its 64 tokens, 10 still waits."""
    leave = [threading.Event() for _ in range(SMALL_BATCH)]
    hold = [Stream(load_gateway.url, {**COUNTING, "max_new_tokens": 900, "ignore_eos": True}, drop_after_tokens=1,
                   drop_when=event).start() for event in leave]
    try:
        assert wait_until(lambda: engine_metrics(small_triton)["active"] == SMALL_BATCH, timeout=60)
        low = Stream(load_gateway.url, {**COUNTING, "max_new_tokens": 4, "priority": 10}).start()
        assert wait_until(lambda: engine_metrics(small_triton)["waiting"] == 1, timeout=60)
        high = Stream(load_gateway.url, {**COUNTING, "max_new_tokens": 64, "ignore_eos": True,
                                         "priority": -10}).start()
        assert wait_until(lambda: engine_metrics(small_triton)["waiting"] == 2, timeout=60)
        leave[0].set()
        assert wait_until(lambda: "token" in high.log, timeout=60), (high.log, low.log)
        assert "token" not in low.log, low.log
        join_all([high, low], small_triton)
        assert high.log[-1] == low.log[-1] == "done" and high.status == low.status == 200
    finally:
        for event in leave:
            event.set()
        join_all(hold, small_triton)
    assert wait_until(lambda: not engine_metrics(small_triton)["active"], timeout=30)

def test_a_disconnect_storm_leaves_the_engine_idle(load_gateway, small_triton):
    """100 clients hang up after 2 tokens, 100 as soon as they have their 200 (still queued):
    all cancelled, the queued ones before prefill, the engine idle within 2 s of the last.
    Every cancellation reaches llm as a cancel request, none as a cancelled gRPC call (Triton
    2.51's gRPC endpoint can deadlock on those: docs/architecture.md)."""
    def cancellations():
        lines = small_triton.log_path.read_text(errors="replace").splitlines()
        return [line for line in lines if "cancelled by the client" in line]

    before = len(cancellations())
    disconnect_storm(load_gateway.url, small_triton, clients=100, slots=SMALL_BATCH)
    storm = cancellations()[before:]
    assert len(storm) >= 100, len(storm)
    assert all("cancel request" in line for line in storm), [x for x in storm if "cancel request" not in x][:3]


@pytest.fixture(scope="module")
def two_llm_triton(two_llm_repo, tmp_path_factory):
    server = start_triton(two_llm_repo, tmp_path_factory, "triton-two-llm")
    yield server
    server.stop()


def test_a_disconnect_storm_over_two_llm_instances_leaves_the_engine_idle(two_llm_triton, tmp_path_factory):
    """The same storm with two instances of llm: Triton hands each cancel request to either
    instance, and about half reach the one that does not hold the request. That one posts it on
    the instances' shared board (trident.cancel_board) and the holder ends the request: every
    leaver is still cancelled before prefill and the engine is idle within 2 s of the last
    client. Without the board those requests ran on until the gateway cancelled their calls 3 s
    later (its safety net), and the storm failed."""
    gw = start_gateway(two_llm_triton, tmp_path_factory, extra_env={"TRIDENT_HEARTBEAT_INTERVAL": "0.5"})
    try:
        log = two_llm_triton.log_path
        before = len(log.read_text(errors="replace").splitlines())
        disconnect_storm(gw.url, two_llm_triton, clients=40, slots=SMALL_BATCH)
        lines = log.read_text(errors="replace").splitlines()[before:]
    finally:
        gw.stop()
    storm = [line for line in lines if "cancelled by the client" in line]
    assert len(storm) >= 80, len(storm)
    assert all("cancel request" in line for line in storm), [x for x in storm if "cancel request" not in x][:3]
    crossed = [line for line in storm if "via another instance" in line]
    assert len(crossed) >= 5, f"only {len(crossed)} of {len(storm)} cancellations crossed instances"
    assert "instances share cancel requests" in log.read_text(errors="replace")


def test_tensorrt_llm_bls_is_llm_under_nvidias_name_when_asked_for(two_llm_triton):
    """``--nvidia-names tensorrt_llm_bls``: NVIDIA's BLS model name is served as llm itself (and
    ``ensemble`` is not); a client of it streams text with NVIDIA's inputs, and one that cancels
    its call leaves the engine idle within 2 s, as a client of llm."""
    import asyncio

    import grpc
    import numpy as np
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    from gateway.triton_codec import build_infer_request, parse_stream_response

    inputs = {"text_input": np.array([[b"1, 2, 3, 4, 5, 6,"]], dtype=object),
              "max_tokens": np.array([[1000]], np.int32), "min_tokens": np.array([[1000]], np.int32),
              "stream": np.array([[True]]), "temperature": np.array([[0.0]], np.float32)}

    async def main():
        async with grpc.aio.insecure_channel(two_llm_triton.grpc_url) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            index = await stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(ready=True))
            names = {m.name for m in index.models}
            call = stub.ModelStreamInfer(iter((build_infer_request("tensorrt_llm_bls", inputs),)))
            texts = []
            async for response in call:
                assert not response.error_message, response.error_message
                texts.append(parse_stream_response(response, request_id="bls", retry_after=1).text or "")
                if len(texts) == 3:
                    call.cancel()
                    break
            return names, texts

    names, texts = asyncio.run(main())
    assert {"llm", "tensorrt_llm", "tensorrt_llm_bls"} <= names and "ensemble" not in names, names
    assert "".join(texts).strip(), texts
    left = time.monotonic()
    while (now := engine_metrics(two_llm_triton))["active"] or now["waiting"]:
        assert time.monotonic() - left < 2, f"engine still busy 2 s after the client left: {now}"
        time.sleep(0.05)


def test_direct_grpc_clients_of_the_ensemble_that_hang_up_are_cancelled(small_triton):
    """NVIDIA-style clients of ``ensemble`` cancel by cancelling their gRPC call. Triton's ensemble
    scheduler never passed that on to the running llm step, so each such generation ran to
    max_tokens for nobody; ``ensemble`` is now llm itself (trident.repo_builder.NVIDIA_NAMES). 4 streams
    decode, 4 wait in the engine's queue: the waiting ones leave first and are never prefilled,
    the decoding ones leave after 2 responses; the engine is idle within 2 s of the last."""
    import asyncio

    import grpc
    import numpy as np
    from tritonclient.grpc import service_pb2_grpc

    from gateway.triton_codec import build_infer_request

    before = engine_metrics(small_triton)
    inputs = {"text_input": np.array([[b"1, 2, 3, 4, 5, 6,"]], dtype=object),
              "max_tokens": np.array([[1000]], np.int32), "min_tokens": np.array([[1000]], np.int32),
              "stream": np.array([[True]])}

    async def until(predicate):
        for _ in range(600):
            if predicate(engine_metrics(small_triton)):
                return
            await asyncio.sleep(0.1)
        pytest.fail(f"engine never reached the expected state: {engine_metrics(small_triton)}")

    async def decode_then_leave(stub, seen):
        call = stub.ModelStreamInfer(iter((build_infer_request("ensemble", inputs),)))
        responses = 0
        async for _ in call:
            responses += 1
            seen.add(id(call))
            if responses == 2:
                await queued_left.wait()
                call.cancel()
                return

    async def main():
        async with grpc.aio.insecure_channel(small_triton.grpc_url) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            seen = set()
            decoding = [asyncio.ensure_future(decode_then_leave(stub, seen)) for _ in range(SMALL_BATCH)]
            while len(seen) < SMALL_BATCH:
                await asyncio.sleep(0.05)
            queued = [stub.ModelStreamInfer(iter((build_infer_request("ensemble", inputs),)))
                      for _ in range(SMALL_BATCH)]
            await until(lambda m: m["waiting"] - before["waiting"] >= SMALL_BATCH)
            for call in queued:
                call.cancel()
            await until(lambda m: m["waiting"] == before["waiting"])
            queued_left.set()
            await asyncio.gather(*decoding)

    queued_left = asyncio.Event()
    asyncio.run(main())
    left = time.monotonic()
    while (now := engine_metrics(small_triton))["active"] or now["waiting"]:
        assert time.monotonic() - left < 2, f"engine still busy 2 s after the last client left: {now}"
        time.sleep(0.05)
    settled = now["generated"]
    time.sleep(1.0)
    after = engine_metrics(small_triton)
    assert after["generated"] == settled, "tokens still generated after every client left"
    assert after["prefilled"] - before["prefilled"] == SMALL_BATCH  # the waiting ones never were
    assert after["cancelled"] - before["cancelled"] == 2 * SMALL_BATCH
    assert settled - before["generated"] < SMALL_BATCH * 200


@pytest.fixture(scope="module")
def quiet_gateway(small_triton, tmp_path_factory):
    """Heartbeats every 10 minutes: a client that leaves can only be noticed on its socket."""
    gw = start_gateway(small_triton, tmp_path_factory, extra_env={"TRIDENT_HEARTBEAT_INTERVAL": "600"})
    yield gw
    gw.stop()


def raw_request(url, body):
    """Send one request on a plain socket and return it (the response is never read)."""
    return open_generate(url, json.dumps(body).encode())


@pytest.mark.parametrize("streamed", [False, True])
def test_a_client_that_leaves_is_noticed_without_a_write(quiet_gateway, small_triton, streamed):
    """The gateway watches the client's socket: a client that hangs up while its generation is
    queued in the engine, or running, cancels it within the llm model's polling interval, not
    at the next heartbeat (10 minutes here) or at the end of the generation. One that leaves
    while queued never reaches prefill."""
    def engine_until(predicate, what):
        deadline = time.monotonic() + 60
        while not predicate(now := engine_metrics(small_triton)):
            assert time.monotonic() < deadline, f"{what}: {now}"
            time.sleep(0.05)
        return now

    before = engine_metrics(small_triton)
    body = {**COUNTING, "stream": streamed, "max_new_tokens": 800}
    running = [raw_request(quiet_gateway.url, body) for _ in range(SMALL_BATCH)]
    engine_until(lambda m: m["active"] == SMALL_BATCH and m["generated"] > before["generated"], "not running")
    queued = [raw_request(quiet_gateway.url, body) for _ in range(SMALL_BATCH)]
    engine_until(lambda m: m["waiting"] == SMALL_BATCH, "not queued")
    for sock in queued:
        sock.close()
    left = time.monotonic()
    now = engine_until(lambda m: m["waiting"] == 0, "the queued requests were not cancelled")
    assert time.monotonic() - left < 2.0, "queued requests cancelled late"
    assert now["prefilled"] - before["prefilled"] == SMALL_BATCH  # the queued ones never started
    assert now["active"] == SMALL_BATCH
    for sock in running:
        sock.close()
    left = time.monotonic()
    now = engine_until(lambda m: m["active"] == 0, "the running requests were not cancelled")
    assert time.monotonic() - left < 2.0, "running requests cancelled late"
    assert now["cancelled"] - before["cancelled"] == 2 * SMALL_BATCH
    assert now["prefilled"] - before["prefilled"] == SMALL_BATCH


def test_a_gateway_worker_killed_mid_stream(small_triton, tmp_path_factory, redis_url):
    """One of two gateway workers dies (SIGKILL: the OOM killer, a crash) with streams open.
    gunicorn starts another in its place; the engine stops the dead worker's generations within
    2 s (their gRPC calls went with it, and llm finds them gone: no cancel request was sent); the
    other worker's streams finish whole. The place a dead stream held in its key's
    ``max_concurrent`` bound (counted in Redis) comes back when its lease runs out, which only a
    live worker renews: not a request timeout (10 minutes) later, as before 2026-12-05. And a
    live stream keeps its place for many leases."""
    keys = tmp_path_factory.mktemp("keys") / "keys.json"
    one = {"Authorization": f"Bearer {add_key(keys, name='one-stream', models=['*'], max_concurrent=1)}"}
    lease = 3.0
    gw = start_gateway(small_triton, tmp_path_factory, workers=2, extra_env={
        "TRIDENT_API_KEYS_FILE": str(keys), "TRIDENT_RATELIMIT_STORAGE_URI": redis_url,
        "TRIDENT_CONCURRENCY_LEASE": str(lease), "TRIDENT_HEARTBEAT_INTERVAL": "0.5"})

    def refused():  # a one-token generation of the bounded key
        r = requests.post(gw.url + "/generate", json={"prompt": "1, 2,", "max_new_tokens": 1}, headers=one,
                          timeout=60)
        assert r.status_code in (200, 429), r.text
        return r.status_code == 429

    def opened(stream):
        assert wait_until(lambda: stream.port is not None, timeout=60), stream.log
        return stream

    try:
        assert wait_until(lambda: len(child_pids(gw.process.pid)) == 2, timeout=30)
        # Long enough that no stream ends before the kill, on 4 slots.
        body = {**COUNTING, "max_new_tokens": 600}
        # The bounded key's stream decides which worker dies; more streams until each worker
        # holds at least two (the kernel spreads connections over the workers' sockets). Each
        # stream's worker is read once, while its connection is open.
        first = opened(Stream(gw.url, body, headers=one).start())
        held = {first: worker_holding(gw, first.port)}
        victim = held[first]
        assert victim is not None
        streams = [first]
        while len(streams) < 24 and not (sum(pid == victim for pid in held.values()) >= 2
                                         and sum(pid != victim for pid in held.values()) >= 2):
            stream = opened(Stream(gw.url, body).start())
            streams.append(stream)
            held[stream] = worker_holding(gw, stream.port)
        doomed = [s for s in streams if held[s] == victim]
        kept = [s for s in streams if held[s] != victim]
        assert len(doomed) >= 2 and len(kept) >= 2 and None not in held.values(), held
        assert refused()
        mark = log_mark(small_triton)

        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        # Once gunicorn has reaped it (its listening socket is closed: no connection goes there),
        # the dead stream's place still counts: its lease, renewed a third of one ago at most, runs on.
        assert wait_until(lambda: victim not in child_pids(gw.process.pid), timeout=5)
        assert refused()
        while len(gone := [line for line in log_since(small_triton, mark) if "cancelled by the client" in line]) \
                < len(doomed):
            assert time.monotonic() - killed < 2.0, f"{len(gone)} of {len(doomed)} cancelled 2 s after the kill"
            time.sleep(0.05)
        assert len(gone) == len(doomed) and all("found gone" in line for line in gone), gone

        assert wait_until(lambda: len(workers := child_pids(gw.process.pid)) == 2 and victim not in workers,
                          timeout=60), child_pids(gw.process.pid)
        assert wait_until(lambda: not refused(), timeout=lease + 5, interval=0.2), "the dead stream's place never came back"
        join_all(kept, small_triton)
        assert all(s.status == 200 and s.log[-1] == "done" for s in kept), [s.log[-3:] for s in kept]
        assert len({s.text for s in kept}) == 1
        assert all(s.log[-1] == "broken" and "done" not in s.log for s in doomed), [s.log[-3:] for s in doomed]

        # A live stream of the bounded key keeps its place: its worker (gevent) renews the lease.
        leave = threading.Event()
        long = opened(Stream(gw.url, {**COUNTING, "max_new_tokens": 1000}, headers=one, drop_when=leave).start())
        store = redis.Redis.from_url(redis_url)
        places = lambda: store.zrange("trident:open-generations:one-stream", 0, -1, withscores=True)  # noqa: E731
        assert wait_until(lambda: len(places()) == 1, timeout=10), places()
        first = places()[0][1]
        assert wait_until(lambda: places() and places()[0][1] > first + lease / 6, timeout=lease), places()
        assert "done" not in long.log and refused()
        leave.set()
        long.thread.join(timeout=60)
        assert wait_until(lambda: not refused(), timeout=10, interval=0.2)
        assert wait_until(lambda: engine_metrics(small_triton)["active"] == 0, timeout=10)
    finally:
        gw.stop()


def test_a_frozen_gateway_worker_has_its_generations_cancelled_by_triton(triton, tmp_path_factory):
    """A gateway worker freezes (SIGSTOP; a host lost without a reset looks the same to Triton)
    with 8 long streams open. Triton pings its clients every 10 s and closes a connection whose
    ping goes unanswered for 10 s (trident.triton_launcher.GRPC_KEEPALIVE_ARGS), so llm finds the
    calls gone and the engine stops their generations. Without those flags all 8 generations ran
    to their end, for nobody (by hand: 4 x 1,900 tokens generated, none cancelled)."""
    gw = start_gateway(triton, tmp_path_factory, extra_env={"TRIDENT_HEARTBEAT_INTERVAL": "0.5"})
    n, tokens = 8, 1900  # about a minute of generation for the 8 together on this machine
    try:
        (worker,) = child_pids(gw.process.pid)
        before = engine_metrics(triton)
        streams = [Stream(gw.url, {**COUNTING, "max_new_tokens": tokens}).start() for _ in range(n)]
        assert wait_until(lambda: all("token" in s.log for s in streams), timeout=60), [s.log[:3] for s in streams]
        mark = log_mark(triton)
        os.kill(worker, signal.SIGSTOP)
        try:
            frozen = time.monotonic()

            def cancelled():
                return sum("cancelled by the client" in line for line in log_since(triton, mark))

            assert wait_until(lambda: cancelled() == n, timeout=45, interval=0.2), \
                f"{cancelled()} of {n} generations cancelled 45 s after the gateway froze: {engine_metrics(triton)}"
            took = time.monotonic() - frozen
            assert all("found gone" in line for line in log_since(triton, mark) if "cancelled by the client" in line)
            assert wait_until(lambda: engine_metrics(triton)["active"] == 0, timeout=5)
            assert engine_metrics(triton)["generated"] - before["generated"] < n * tokens
        finally:
            os.kill(worker, signal.SIGCONT)
        assert took >= 10, f"cancelled {took:.1f} s after the freeze: not by the keepalive (10 s pings)"
    finally:
        gw.stop()


@pytest.fixture(scope="module")
def background_gateways(small_triton, tmp_path_factory, redis_url):
    """Two gateways in front of the small-batch Triton, sharing a Redis response store."""
    gateways = [start_gateway(small_triton, tmp_path_factory, extra_env={"TRIDENT_RESPONSES_STORE": redis_url})
                for _ in range(2)]
    yield gateways
    for gw in gateways:
        gw.stop()


def test_background_responses_beyond_the_slots_cancelled_through_another_gateway_free_the_engine(
        background_gateways, small_triton):
    """6x the slots in background responses through one gateway (the engine: 4 running, 20
    waiting), all cancelled through the other, the waiting ones first: each run sees its record
    cancelled at its next look (every second) and cancels its generation, so the engine's queue
    empties within that second plus its own 2 s, none of the waiting ones ever reaches prefill,
    then the running ones are cancelled the same way and the engine is idle, its token counter
    still; every response reads cancelled through both gateways, and the first gateway's
    in-flight places are all given back."""
    one, two = background_gateways
    auth = {"Authorization": f"Bearer {API_KEY}"}
    numbers = {"type": "object", "required": ["numbers"], "additionalProperties": False, "properties": {
        "numbers": {"type": "array", "items": {"type": "integer"}, "minItems": 5000}}}
    body = {"input": "List numbers.", "max_output_tokens": 600, "background": True,
            "text": {"format": {"type": "json_schema", "name": "numbers", "schema": numbers}}}
    n = 6 * SMALL_BATCH
    before = engine_metrics(small_triton)
    ids = []
    for _ in range(n):
        created = requests.post(f"{one.url}/v1/responses", json=body, headers=auth, timeout=60)
        assert created.status_code == 200 and created.json()["status"] == "queued", created.text
        ids.append(created.json()["id"])
    assert wait_until(lambda: (lambda m: m["active"] == SMALL_BATCH and m["waiting"] == n - SMALL_BATCH)(
        engine_metrics(small_triton)), timeout=60), engine_metrics(small_triton)
    assert in_flight(one.url) == n

    def statuses(gw):
        return {i: requests.get(f"{gw.url}/v1/responses/{i}", headers=auth, timeout=30).json()["status"] for i in ids}

    # which ones run: in progress from their first token; the others wait in the engine's queue
    assert wait_until(lambda: sorted(statuses(two).values()).count("in_progress") == SMALL_BATCH, timeout=30)
    now = statuses(two)
    running = [i for i in ids if now[i] == "in_progress"]
    waiting = [i for i in ids if now[i] == "queued"]
    assert len(waiting) == n - SMALL_BATCH, now

    def cancel(batch):
        for response_id in batch:
            cancelled = requests.post(f"{two.url}/v1/responses/{response_id}/cancel", headers=auth, timeout=30)
            assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled", cancelled.text
        return time.monotonic()

    last = cancel(waiting)
    assert wait_until(lambda: engine_metrics(small_triton)["waiting"] == 0, timeout=30)
    emptied = time.monotonic() - last
    assert engine_metrics(small_triton)["active"] == SMALL_BATCH  # the running ones run on
    last = cancel(running)
    assert wait_until(lambda: engine_metrics(small_triton)["active"] == 0, timeout=30), engine_metrics(small_triton)
    idle = time.monotonic() - last
    print(f"queue empty {emptied:.2f} s after the last waiting one's cancel, engine idle {idle:.2f} s after the "
          f"last running one's")
    assert emptied < 1 + 2 and idle < 1 + 2, (emptied, idle)  # the runs' next look (1 s), then the engine's 2 s
    settled = engine_metrics(small_triton)
    assert settled["prefilled"] - before["prefilled"] == SMALL_BATCH  # no waiting one was run
    time.sleep(0.5)
    assert engine_metrics(small_triton)["generated"] == settled["generated"]
    for gw in (one, two):
        assert set(statuses(gw).values()) == {"cancelled"}
    assert wait_until(lambda: in_flight(one.url) == 0, timeout=5)


def in_flight(url: str) -> int:
    text = requests.get(url + "/metrics", timeout=10).text
    return int(float(text.split("\ntrident_gateway_in_flight_requests ", 1)[1].split()[0]))
