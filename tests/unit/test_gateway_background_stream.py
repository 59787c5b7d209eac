"""Streamed background responses (gateway.background.Follower): ``"background": true, "stream":
true`` on ``/v1/responses`` answers the Responses events as the run keeps them in the store, and
``GET /v1/responses/{id}?stream=true&starting_after=N`` replays and follows them from the event
after N; the client's leaving does not end the generation. Through the official client against
the in-process gateway (fake backend), with the in-process store and a real redis-server."""

from __future__ import annotations

import json
import threading
import time

import httpx2
import openai
import pytest
from gateway_fakes import Gate, Pause, wait_until
from openai_fixtures import AUTH, KEY, MODEL
from test_gateway_anthropic import make_app, named_events as events_in
from test_gateway_background import (OWNER, in_flight, own_redis_app, retrieved, retrieved_shape, slow, stopped,
                                     store_of, wait_for_status)
from test_gateway_response_store import app, redis_uri  # noqa: F401 (fixtures: a memory store, a redis one)
from test_gateway_responses import client_of, events_of, post

from gateway import background
from gateway.backend import Finished
from gateway.drain import DRAIN
from gateway.errors import unavailable
from gateway.response_store import MemoryStore, RedisStore


def follow(web, response_id, query=""):
    response = web.get(f"/v1/responses/{response_id}?stream=true{query}", headers=AUTH)
    assert response.status_code == 200 and response.mimetype == "text/event-stream", response.get_data()
    return events_in(response.get_data())


def test_a_streamed_background_response_is_followed_replayed_and_resumed_through_the_official_client(app):
    flask_app, backend, web, spec = app
    client = client_of(flask_app)
    foreground = client.responses.create(model=MODEL, input="Weather in Paris?", max_output_tokens=20)
    with client.responses.create(model=MODEL, input="Weather in Paris?", max_output_tokens=20, background=True,
                                 stream=True) as stream:
        events = [event.model_dump(mode="json", exclude_unset=True) for event in stream]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[0]["type"] == "response.created" and events[-1]["type"] == "response.completed"
    response_id = events[0]["response"]["id"]
    final = events[-1]["response"]
    assert final["status"] == "completed" and final["background"] is True and final["id"] == response_id
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == \
        foreground.output_text == "Hello, world ✓!"
    assert final["output"][0]["content"][0]["text"] == foreground.output_text
    assert final["usage"] == foreground.usage.model_dump(exclude_unset=True)
    # The stored response is the stream's last; by then it was stored ended.
    assert client.responses.retrieve(response_id).model_dump(mode="json", exclude_unset=True) == final
    assert in_flight(flask_app) == 0 and backend.generations[-1].closed.is_set()
    # Replayed whole, and resumed after an event, through the official client and by hand.
    with client.responses.retrieve(response_id, stream=True) as again:
        assert [e.model_dump(mode="json", exclude_unset=True) for e in again] == events
    with client.responses.retrieve(response_id, stream=True, starting_after=3) as rest:
        assert [e.model_dump(mode="json", exclude_unset=True) for e in rest] == events[4:]
    assert [e["sequence_number"] for e in follow(web, response_id, f"&starting_after={len(events) - 2}")] == \
        [len(events) - 1]
    assert follow(web, response_id, f"&starting_after={len(events) + 5}") == []  # past the end: nothing, then it ends
    # The events as the document says (order, numbering from 0, each shape).
    raw = post(web, background=True, stream=True)
    assert events_of(spec, raw)[-1]["response"]["status"] == "completed"
    assert retrieved(web, spec, events[0]["response"]["id"])["status"] == "completed"


def test_a_client_that_leaves_does_not_end_the_run_and_resumes_where_it_was(tmp_path):
    """The client drops after two deltas while the run waits on the engine (heartbeats meanwhile);
    the generation goes on (nobody cancelled it); the client resumes after the last event it
    read and gets every later one, then the end."""
    flask_app, backend, web, spec = make_app(tmp_path, RESPONSES_STORE="memory", HEARTBEAT_INTERVAL=0.05)
    gate = threading.Event()
    backend.script = lambda params: ["Hello", ",", Gate(gate), " world", Finished("eos_token", prompt_tokens=3,
                                                                                  completion_tokens=3)]
    http = httpx2.Client(transport=httpx2.WSGITransport(app=flask_app), base_url="http://gateway")
    body = {"model": MODEL, "input": "Weather in Paris?", "background": True, "stream": True}
    chunks = []
    with http.stream("POST", "/v1/responses", json=body, headers=AUTH) as response:
        assert response.status_code == 200
        for chunk in response.iter_bytes():
            chunks.append(chunk)
            seen = events_in(b"".join(chunks))
            if b": keep-alive" in b"".join(chunks) and [e.get("delta") for e in seen][-1:] == [","]:
                break  # two deltas and a heartbeat: the run waits at the gate; the client leaves
    response_id = seen[0]["response"]["id"]
    time.sleep(0.2)
    assert not backend.generations[-1].closed.is_set() and in_flight(flask_app) == 1
    assert retrieved(web, spec, response_id)["status"] == "in_progress"
    gate.set()
    rest = follow(web, response_id, f"&starting_after={seen[-1]['sequence_number']}")
    assert rest[0]["sequence_number"] == seen[-1]["sequence_number"] + 1
    assert [e["sequence_number"] for e in seen + rest] == list(range(len(seen) + len(rest)))
    deltas = [e["delta"] for e in seen + rest if e["type"] == "response.output_text.delta"]
    assert deltas == ["Hello", ",", " world"] and rest[-1]["type"] == "response.completed"
    assert rest[-1]["response"]["output"][0]["content"][0]["text"] == "Hello, world"
    assert wait_until(lambda: in_flight(flask_app) == 0)


def test_a_cancel_ends_the_generation_and_its_followers_streams(app):
    flask_app, backend, web, spec = app
    backend.script = slow
    client = client_of(flask_app)
    stream = client.responses.create(model=MODEL, input="Weather in Paris?", background=True, stream=True)
    first = [next(stream) for _ in range(2)]
    response_id = first[0].response.id
    followed = []
    follower = threading.Thread(target=lambda: followed.extend(follow(web, response_id)))
    follower.start()
    assert wait_until(lambda: backend.generations and backend.generations[-1].consumed >= 2)
    assert client.responses.cancel(response_id).status == "cancelled"
    assert backend.generations[-1].closed.is_set()
    rest = [event.type for event in stream]  # the creator's stream ends too, with no event of an end
    follower.join(5)
    assert not follower.is_alive()
    assert "response.completed" not in rest and "response.failed" not in rest
    assert [e["type"] for e in followed][:2] == ["response.created", "response.in_progress"]
    assert followed[-1]["type"] == "response.output_text.delta"
    assert wait_until(lambda: in_flight(flask_app) == 0)
    assert retrieved(web, spec, response_id)["status"] == "cancelled"


def test_a_failing_generation_ends_its_stream_with_response_failed(app):
    flask_app, backend, web, spec = app
    backend.script = lambda params: ["Hel", unavailable("The engine is restarting", 1)]
    events = events_of(spec, post(web, background=True, stream=True))
    last = events[-1]
    assert last["type"] == "response.failed" and last["response"]["status"] == "failed"
    assert last["response"]["error"] == {"code": "service_unavailable", "message": "The engine is restarting"}
    assert follow(web, last["response"]["id"]) == events  # replayed, the same
    assert retrieved(web, spec, last["response"]["id"]) == last["response"]
    assert in_flight(flask_app) == 0


def test_a_response_whose_run_died_ends_its_followers_stream_failed(app, monkeypatch):
    """Its process was killed mid-run: the kept events, then (the lease lapsed, and stayed so
    ORPHAN_GRACE) response.failed from the record, numbered on."""
    monkeypatch.setattr(background, "ORPHAN_GRACE", 0.5)
    flask_app, _, web, spec = app
    store = store_of(flask_app)
    response = {**retrieved_shape(), "id": "resp_dead", "status": "in_progress"}
    store.put(OWNER, "resp_dead", {"response": response, "items": [], "streamed": True})
    kept = [f"event: response.created\ndata: {json.dumps({'type': 'response.created', 'sequence_number': 0, 'response': response})}\n\n".encode()]
    store.append_events("resp_dead", 0, kept)
    store.renew_run("resp_dead", 1.0)
    events = follow(web, "resp_dead")
    assert [e["type"] for e in events] == ["response.created", "response.failed"]
    assert events[1]["sequence_number"] == 1 and events[1]["response"]["error"] == background.ORPHANED
    assert retrieved(web, spec, "resp_dead")["status"] == "failed"


def test_the_drains_end_ends_a_follower_with_an_error_numbered_as_its_last_event(app):
    """A follower of a run elsewhere, at this gateway's drain deadline: an error event the client
    can resume after without losing one (the run goes on in its own process)."""
    flask_app, _, web, _ = app
    store = store_of(flask_app)
    response = {**retrieved_shape(), "id": "resp_far", "status": "in_progress"}
    store.put(OWNER, "resp_far", {"response": response, "items": [], "streamed": True})
    store.append_events("resp_far", 0, [b'event: response.created\ndata: {"type": "response.created", '
                                        b'"sequence_number": 0}\n\n'] * 1)
    store.renew_run("resp_far", 30.0)
    followed = []
    follower = threading.Thread(target=lambda: followed.extend(follow(web, "resp_far")))
    follower.start()
    try:
        assert wait_until(lambda: any(isinstance(s, background.Follower) for s in DRAIN.streams))
        DRAIN.end_streams()
        follower.join(5)
        assert not follower.is_alive()
    finally:
        store.delete(OWNER, "resp_far")
    assert [e["type"] for e in followed] == ["response.created", "error"]
    assert followed[1]["sequence_number"] == 0 and followed[1]["code"] == "service_unavailable"


def test_refusals_of_a_stream_to_follow(app):
    flask_app, backend, web, _ = app
    plain = post(web, background=True).get_json()  # created without stream: no events kept
    wait_until(lambda: in_flight(flask_app) == 0)
    streamed = events_in(post(web, background=True, stream=True).get_data())[0]["response"]["id"]
    for path, param in ((f"{plain['id']}?stream=true", "stream"), (f"{streamed}?stream=maybe", "stream"),
                        (f"{streamed}?stream=true&starting_after=-1", "starting_after"),
                        (f"{streamed}?stream=true&starting_after=x", "starting_after"),
                        (f"{streamed}?stream=true&starting_after={2**31}", "starting_after")):
        response = web.get(f"/v1/responses/{path}", headers=AUTH)
        assert response.status_code == 400 and response.get_json()["error"]["param"] == param, path
    other = web.get(f"/v1/responses/{streamed}?stream=true", headers={"Authorization": "Bearer other-key"})
    assert other.status_code == 404
    assert web.get(f"/v1/responses/{streamed}?stream=false", headers=AUTH).get_json()["status"] == "completed"


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_the_stores_keep_events_in_order_wake_a_waiting_reader_and_drop_them_with_the_record(kind, request):
    store = MemoryStore(60, 2**20) if kind == "memory" else RedisStore(request.getfixturevalue("redis_uri"), 60, 2)
    store.put("a", "r1", {"response": {"status": "in_progress"}, "items": []})
    store.append_events("r1", 0, [b"e0", b"e1"])
    store.append_events("r1", 2, [b"e2"])
    assert store.read_events("r1", -1, 0) == [(0, b"e0"), (1, b"e1"), (2, b"e2")]
    assert store.read_events("r1", 1, 0) == [(2, b"e2")] and store.read_events("r1", 2, 0) == []
    # a batch sent again (its append seemed to fail) keeps only what is new; one past a gap is refused
    store.append_events("r1", 1, [b"e1", b"e2"])
    assert store.read_events("r1", -1, 0) == [(0, b"e0"), (1, b"e1"), (2, b"e2")]
    with pytest.raises(ValueError, match="numbered from 4, after 3"):
        store.append_events("r1", 4, [b"e4"])
    store.append_events("gone", 0, [b"e0"])  # no record (deleted): nothing kept, no stream made
    assert store.read_events("gone", -1, 0) == [] and store.last_event("gone") is None
    # a reader waiting for the next event gets it when it is kept, not at the end of its wait
    threading.Timer(0.1, store.append_events, ("r1", 3, [b"e3"])).start()
    started = time.monotonic()
    assert store.read_events("r1", 2, 10.0) == [(3, b"e3")]
    assert time.monotonic() - started < 0.9  # woken, well before its (capped) wait of 1 s
    store.update("a", "r1", lambda record: {**record, "response": {"status": "completed"}})
    assert len(store.read_events("r1", -1, 0)) == 4  # a changed record keeps its events
    assert store.delete("a", "r1") and store.read_events("r1", -1, 0) == []
    if kind == "redis":  # a blocking read ends within the connection's socket timeout (a short one here)
        quick = RedisStore(request.getfixturevalue("redis_uri"), 60, 0.4)
        assert quick.read_events("r1", -1, 5.0) == []
    if kind == "memory":  # evicted with their record, and counted in the store's size
        small = MemoryStore(60, 400)
        small.put("a", "old", {"response": {}, "items": []})
        small.append_events("old", 0, [b"x" * 200])
        small.put("a", "new", {"response": {}, "items": []})
        small.append_events("new", 0, [b"y" * 200])
        assert small.get("a", "old") is None and small.read_events("old", -1, 0) == []
        assert small.read_events("new", -1, 0) == [(0, b"y" * 200)]


def test_the_official_clients_resume_helper_reads_the_rest(app):
    """``client.responses.retrieve(id, stream=True, starting_after=N)`` after a stream the client
    read part of: the events it had not seen, each once."""
    flask_app, backend, _, _ = app
    backend.script = lambda params: ["Hello", Pause(0.3), ",", " world", Finished("eos_token", prompt_tokens=3,
                                                                                   completion_tokens=3)]
    client = openai.OpenAI(base_url="http://gateway/v1", api_key=KEY, max_retries=0,
                           http_client=httpx2.Client(transport=httpx2.WSGITransport(app=flask_app)))
    stream = client.responses.create(model=MODEL, input="Hi", background=True, stream=True)
    seen = [next(stream) for _ in range(5)]
    stream.close()
    with client.responses.retrieve(seen[0].response.id, stream=True, starting_after=seen[-1].sequence_number) as rest:
        later = list(rest)
    numbers = [e.sequence_number for e in seen + later]
    assert numbers == list(range(len(numbers))) and later[-1].type == "response.completed"
    assert later[-1].response.output_text == "Hello, world"


def test_a_store_that_becomes_unreachable_ends_a_followers_stream_with_an_error_to_resume_after(tmp_path,
                                                                                               monkeypatch):
    import redis

    flask_app, backend, web, _ = make_app(tmp_path, RESPONSES_STORE="memory")
    backend.script = slow
    store = store_of(flask_app)
    created = post(web, background=True, stream=True)  # read whole below: its run is cancelled first
    reads = {"n": 0}
    real = store.read_events

    def flaky(response_id, after, wait):
        reads["n"] += 1
        if reads["n"] > 1:
            raise redis.exceptions.ConnectionError("Connection refused")
        return real(response_id, after, wait)

    monkeypatch.setattr(store, "read_events", flaky)
    chunks = iter(created.response)
    first = events_in(next(chunks))
    rest = events_in(b"".join(chunks))
    assert [e["type"] for e in first][:2] == ["response.created", "response.in_progress"]
    assert [e["type"] for e in rest] == ["error"] and rest[0]["code"] == "service_unavailable"
    assert rest[0]["sequence_number"] == first[-1]["sequence_number"]
    monkeypatch.setattr(store, "read_events", real)
    assert web.post(f"/v1/responses/{first[0]['response']['id']}/cancel", headers=AUTH).status_code == 200
    assert wait_until(lambda: in_flight(flask_app) == 0)


def _gated_script(gates):
    """Deltas, each after its gate: the run keeps each in a batch of its own."""
    steps = ["Hello"]
    for gate, text in zip(gates, [",", " world", "!"]):
        steps += [Gate(gate), text]
    return lambda params: [*steps, Finished("eos_token", prompt_tokens=3, completion_tokens=4)]


def _whole(events):
    """A whole stream: numbered 0..n-1, each once, its deltas, its end."""
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[-1]["type"] == "response.completed"
    return "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")


def test_events_the_store_did_not_take_are_sent_again_and_a_follower_reads_no_gap(app, monkeypatch):
    """Two batches whose append failed (the store unreachable) are held and kept, in order, with
    the next one; a follower that waited meanwhile and one that replays it later read every event
    once, none missing."""
    import redis

    flask_app, backend, web, spec = app
    gates = [threading.Event() for _ in range(3)]
    backend.script = _gated_script(gates)
    store = store_of(flask_app)
    real, failed = store.append_events, []

    def flaky(response_id, first, events):
        if failing.is_set():
            failed.append(first)
            raise redis.exceptions.ConnectionError("Connection refused")
        return real(response_id, first, events)

    failing = threading.Event()
    monkeypatch.setattr(store, "append_events", flaky)
    created = post(web, background=True, stream=True)
    chunks = iter(created.response)
    first = events_in(next(chunks))
    response_id = first[0]["response"]["id"]
    assert wait_until(lambda: backend.generations and backend.generations[-1].consumed >= 2)  # at the first gate
    followed = []
    follower = threading.Thread(target=lambda: followed.extend(follow(web, response_id)))
    follower.start()
    failing.set()
    gates[0].set()
    assert wait_until(lambda: len(failed) == 1)
    gates[1].set()
    assert wait_until(lambda: len(failed) == 2)
    assert failed[0] == failed[1]  # the held batch first, again
    failing.clear()
    gates[2].set()
    follower.join(10)
    assert not follower.is_alive()
    assert _whole(followed) == "Hello, world!"
    assert first + events_in(b"".join(chunks)) == followed  # the creator's own stream, read now
    replayed = follow(web, response_id)
    assert replayed == followed and replayed[-1]["response"] == retrieved(web, spec, response_id)
    assert wait_until(lambda: in_flight(flask_app) == 0)


def test_a_redis_that_stops_answering_mid_run_loses_no_event(tmp_path):
    """redis-server stopped (SIGSTOP) while the run keeps two batches: each append times out,
    perhaps taken by Redis once it runs again; the run sends them again with the next batch
    and the stream read after reads each event once, in order."""
    with own_redis_app(tmp_path) as (flask_app, backend, web, spec, server):
        gates, response_id = _left_at_the_first_gate(backend, web)
        with stopped(server):
            for n, gate in enumerate(gates[:2]):
                gate.set()
                assert wait_until(lambda: backend.generations[-1].consumed >= 4 + 2 * n, 5)  # at the next gate
                time.sleep(1.2)  # the batch's append (and a look at the record) timed out
        gates[2].set()
        assert wait_until(lambda: in_flight(flask_app) == 0, 10)
        events = follow(web, response_id)
        assert _whole(events) == "Hello, world!"
        assert events[-1]["response"] == retrieved(web, spec, response_id)


def test_a_run_that_ends_while_redis_is_stopped_stores_its_end_and_its_events_once_it_is_back(tmp_path):
    """The generation ends while redis-server is stopped (SIGSTOP): its places are given back at
    once, and the run tries again until Redis answers, then stores the response completed and
    keeps the events held back and the last; the stream read after is whole. Before, the end
    was lost (the response read in progress, then failed as if its process had died)."""
    with own_redis_app(tmp_path) as (flask_app, backend, web, spec, server):
        gates, response_id = _left_at_the_first_gate(backend, web)
        with stopped(server):
            for gate in gates:
                gate.set()
            assert wait_until(lambda: in_flight(flask_app) == 0, 5)  # ended: its place given back meanwhile
            time.sleep(1.5)  # tries of its end
        stored = wait_for_status(web, spec, response_id, "completed", timeout=5)
        events = follow(web, response_id)
        assert _whole(events) == "Hello, world!" == stored["output"][0]["content"][0]["text"]
        assert events[-1]["response"] == stored


def _left_at_the_first_gate(backend, web):
    """A streamed background response of :func:`_gated_script` whose client left after its
    first events, its run waiting at the first gate: (the gates, its id)."""
    gates = [threading.Event() for _ in range(3)]
    backend.script = _gated_script(gates)
    created = post(web, background=True, stream=True)
    response_id = events_in(next(iter(created.response)))[0]["response"]["id"]
    created.close()  # the run goes on
    assert wait_until(lambda: backend.generations and backend.generations[-1].consumed >= 2)
    return gates, response_id
