"""Background responses (gateway.background): ``"background": true`` on ``/v1/responses``,
retrieved while it runs and after, cancelled, deleted, failed, and orphaned by a dead process;
through the official client against the in-process gateway (fake backend), with the in-process
store and with a real redis-server (skipped without one)."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

import openai
import pytest
from gateway_fakes import Gate, Pause, wait_until
from openai_fixtures import AUTH, MODEL
from test_gateway_anthropic import make_app
from test_gateway_response_store import app, redis_uri  # noqa: F401 (fixtures: a memory store, a redis one)
from test_gateway_responses import check_response, client_of, post

from gateway import background, metrics
from gateway.backend import Finished
from gateway.drain import DRAIN
from gateway.errors import unavailable
from gateway.response_store import MemoryStore

OWNER = "default"  # the name of the one API_KEY's key


def store_of(flask_app):
    return flask_app.extensions["trident.openai"].response_store


def in_flight(flask_app) -> int:
    return flask_app.extensions["trident"].in_flight.count


def slow(params):
    """A first token, then a long wait (until the generation is closed), then the end."""
    return ["Hello", Pause(30), " world", Finished("eos_token", prompt_tokens=3, completion_tokens=2)]


def retrieved(web, spec, response_id):
    response = web.get(f"/v1/responses/{response_id}", headers=AUTH)
    assert response.status_code == 200, response.get_json()
    return check_response(spec, response.get_json())


def wait_for_status(web, spec, response_id, status, timeout=5.0):
    assert wait_until(lambda: retrieved(web, spec, response_id)["status"] == status, timeout), (
        retrieved(web, spec, response_id))
    return retrieved(web, spec, response_id)


@contextlib.contextmanager
def own_redis_app(tmp_path):
    """The in-process gateway (make_app) with a Redis store on a redis-server of its own, which
    the test may stop (:func:`stopped`), and a STORE_TIMEOUT of 0.5 s; yields (app, backend,
    test client, OpenAPI document, the server's process)."""
    from testkit import start_redis, stop_redis

    from trident.child_process import free_port

    port = free_port()
    server = start_redis(tmp_path, port)
    try:
        yield (*make_app(tmp_path, RESPONSES_STORE=f"redis://127.0.0.1:{port}/0", STORE_TIMEOUT=0.5), server)
    finally:
        stop_redis(server)


@contextlib.contextmanager
def stopped(server):
    """redis-server stopped (SIGSTOP: it answers nothing, as a hung one or a failover) for the block."""
    os.kill(server.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.pid, signal.SIGCONT)


def test_a_background_response_is_queued_then_retrieved_completed_as_the_foreground_one(app):
    flask_app, backend, web, spec = app
    client = client_of(flask_app)
    foreground = client.responses.create(model=MODEL, input="Weather in Paris?", max_output_tokens=20)
    stored = metrics.STORED_RESPONSES.labels(outcome="stored")._value.get()
    queued = client.responses.create(model=MODEL, input="Weather in Paris?", max_output_tokens=20, background=True)
    assert queued.status == "queued" and queued.background is True and queued.store is True
    assert queued.output == [] and queued.usage is None
    done = wait_for_status(web, spec, queued.id, "completed")
    assert done["background"] is True and done["id"] == queued.id and done["created_at"] == queued.created_at
    assert done["output"][0]["content"][0]["text"] == foreground.output_text == "Hello, world ✓!"
    assert done["usage"] == foreground.usage.model_dump(exclude_unset=True)
    assert client.responses.retrieve(queued.id).output_text == foreground.output_text
    assert metrics.STORED_RESPONSES.labels(outcome="stored")._value.get() == stored + 1
    assert in_flight(flask_app) == 0 and backend.generations[-1].closed.is_set()
    # it is stored as any: continued, its input items listed
    [item] = client.responses.input_items.list(queued.id).data
    assert item.content[0].text == "Weather in Paris?"
    client.responses.create(model=MODEL, input="And in Rome?", previous_response_id=queued.id)
    assert "Hello, world ✓!" in backend.last_params.prompt
    with pytest.raises(openai.BadRequestError) as caught:  # finished: nothing to cancel
        client.responses.cancel(queued.id)
    assert caught.value.body["message"] == "Cannot cancel a response that is already completed."
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.cancel(foreground.id)
    assert caught.value.body["message"] == "Cannot cancel a synchronous response."


def test_cancel_ends_the_generation_and_answers_cancelled_again(app):
    flask_app, backend, web, spec = app
    backend.script = slow
    client = client_of(flask_app)
    queued = client.responses.create(model=MODEL, input="Weather in Paris?", background=True)
    running = wait_for_status(web, spec, queued.id, "in_progress")
    assert in_flight(flask_app) == 1 and not backend.generations[-1].closed.is_set()
    assert running["output"] == [] and running["usage"] is None
    cancelled = client.responses.cancel(queued.id)
    assert cancelled.status == "cancelled" and cancelled.id == queued.id
    check_response(spec, cancelled.model_dump(mode="json", exclude_unset=True))
    assert backend.generations[-1].closed.is_set()  # this process runs it: at once
    assert wait_until(lambda: in_flight(flask_app) == 0)
    assert background.RUNS == {}
    assert client.responses.cancel(queued.id).status == "cancelled"  # again: the same answer
    time.sleep(0.2)
    assert retrieved(web, spec, queued.id)["status"] == "cancelled"  # the run wrote nothing over it


def test_a_cancel_through_another_process_ends_the_run_at_its_next_look(app, monkeypatch):
    """Another gateway sharing the store cancels: the record changes, and the run, which looks
    at it every POLL_SECONDS, closes its generation."""
    flask_app, backend, web, spec = app
    monkeypatch.setattr(background, "POLL_SECONDS", 0.1)
    backend.script = slow
    queued = post(web, background=True).get_json()
    wait_for_status(web, spec, queued["id"], "in_progress")
    run = background.RUNS.pop(queued["id"])  # as if it ran elsewhere: cancel() cannot reach it
    try:
        assert background.cancel(store_of(flask_app), OWNER, queued["id"])["response"]["status"] == "cancelled"
        assert run.ended.wait(2) and backend.generations[-1].closed.is_set()
    finally:
        background.RUNS.pop(queued["id"], None)
    assert in_flight(flask_app) == 0 and retrieved(web, spec, queued["id"])["status"] == "cancelled"


def test_deleting_a_running_response_ends_its_generation(app):
    flask_app, backend, web, _ = app
    backend.script = slow
    queued = post(web, background=True).get_json()
    assert wait_until(lambda: backend.generations and backend.generations[-1].consumed >= 2)
    assert web.delete(f"/v1/responses/{queued['id']}", headers=AUTH).status_code == 200
    assert backend.generations[-1].closed.is_set() and wait_until(lambda: in_flight(flask_app) == 0)
    assert web.get(f"/v1/responses/{queued['id']}", headers=AUTH).status_code == 404


def test_a_generation_that_fails_makes_a_failed_response(app):
    flask_app, backend, web, spec = app
    backend.script = lambda params: ["Hel", unavailable("The engine is restarting", 1)]
    queued = post(web, background=True).get_json()
    failed = wait_for_status(web, spec, queued["id"], "failed")
    assert failed["error"] == {"code": "service_unavailable", "message": "The engine is restarting"}
    assert in_flight(flask_app) == 0


def test_a_bug_in_the_run_makes_a_failed_response_not_an_orphan(app, monkeypatch):
    flask_app, _, web, spec = app

    def broken(self, choices, finished):
        raise RuntimeError("a bug")

    monkeypatch.setattr("gateway.responses.ResponsesReply.response", broken)
    queued = post(web, background=True).get_json()
    failed = wait_for_status(web, spec, queued["id"], "failed")
    assert failed["error"]["code"] == "server_error" and failed["error"] != background.ORPHANED
    assert in_flight(flask_app) == 0


def test_the_drains_end_fails_a_running_response(app):
    flask_app, backend, web, spec = app
    backend.script = slow
    queued = post(web, background=True).get_json()
    wait_for_status(web, spec, queued["id"], "in_progress")
    DRAIN.end_streams()  # the drain's deadline (gateway.drain), as at the end of a SIGTERM's drain
    failed = wait_for_status(web, spec, queued["id"], "failed")
    assert failed["error"]["code"] == "service_unavailable" and "shutting down" in failed["error"]["message"]
    assert in_flight(flask_app) == 0


def test_a_response_whose_run_died_is_failed_when_read(app, monkeypatch):
    """A worker killed mid-run leaves its record in progress and its lease to lapse: read once
    the lease has lapsed and again ORPHAN_GRACE later, it is failed (and stored so); a cancel
    then finds it finished."""
    monkeypatch.setattr(background, "ORPHAN_GRACE", 0.5)
    flask_app, _, web, spec = app
    store = store_of(flask_app)
    record = {"response": {**retrieved_shape(), "id": "resp_dead", "status": "in_progress"}, "items": []}
    store.put(OWNER, "resp_dead", record)
    store.renew_run("resp_dead", 1.0)
    assert retrieved(web, spec, "resp_dead")["status"] == "in_progress"  # its lease runs
    time.sleep(1.2)
    assert retrieved(web, spec, "resp_dead")["status"] == "in_progress"  # lapsed: noted, not yet failed
    time.sleep(0.6)
    failed = retrieved(web, spec, "resp_dead")
    assert failed["status"] == "failed" and failed["error"] == background.ORPHANED
    assert store.get(OWNER, "resp_dead")["response"]["status"] == "failed"
    response = web.post("/v1/responses/resp_dead/cancel", headers=AUTH)
    assert response.status_code == 400
    assert response.get_json()["error"]["message"] == "Cannot cancel a response that is already failed."


def retrieved_shape():
    return {"object": "response", "created_at": 1, "model": MODEL, "output": [], "error": None,
            "incomplete_details": None, "usage": None, "background": True, "store": True}


def test_refusals_and_errors_before_admission_are_the_requests_status(app, tmp_path):
    flask_app, backend, web, _ = app
    for body in ({"store": False}, {"store": False, "stream": True}):
        response = post(web, background=True, **body)
        error = response.get_json()["error"]
        assert response.status_code == 400 and error["param"] == "background" and "must be stored" in error["message"]
    response = post(web, background="yes")
    assert response.status_code == 400 and response.get_json()["error"]["param"] == "background"
    backend.generate_error = unavailable("Triton is unreachable", 2)
    response = post(web, background=True)
    assert response.status_code == 503 and in_flight(flask_app) == 0
    backend.generate_error = None
    backend.script = lambda params: [unavailable("The engine queue is full", 1)]  # before the admission
    assert post(web, background=True).status_code == 503 and in_flight(flask_app) == 0
    _, _, off, _ = make_app(tmp_path / "off")  # no RESPONSES_STORE
    response = post(off, background=True)
    error = response.get_json()["error"]
    assert response.status_code == 400 and error["param"] == "background" and "RESPONSES_STORE" in error["message"]
    assert post(off, background=False).status_code == 200


def test_cancel_of_nothing_or_of_another_keys_response_is_a_404(tmp_path):
    from gateway.auth import hash_key

    flask_app, backend, web, _ = make_app(tmp_path, RESPONSES_STORE="memory", API_KEYS=[
        {"name": "other", "sha256": hash_key("other-key"), "models": ["*"]}])
    backend.script = slow
    queued = post(web, background=True).get_json()
    try:
        for headers in ({"Authorization": "Bearer other-key"}, AUTH):
            path = f"/v1/responses/{queued['id'] if headers is not AUTH else 'resp_nope'}/cancel"
            response = web.post(path, headers=headers)
            assert response.status_code == 404 and response.get_json()["error"]["param"] == "response_id"
    finally:
        assert web.post(f"/v1/responses/{queued['id']}/cancel", headers=AUTH).status_code == 200
    assert wait_until(lambda: in_flight(flask_app) == 0)


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_update_changes_a_record_only_from_what_its_caller_read(kind, request):
    """Two writers racing on one record (a run's end, a cancel): each change sees the other's
    result, never overwrites it."""
    if kind == "memory":
        store = MemoryStore(60, 2**20)
    else:
        from gateway.response_store import RedisStore

        store = RedisStore(request.getfixturevalue("redis_uri"), 60, 2)
    store.put("a", "r1", {"response": {"status": "queued"}, "items": []})

    def finish(record):
        return None if record["response"]["status"] != "queued" else {**record, "response": {"status": "completed"}}

    def cancel(record):
        return None if record["response"]["status"] != "queued" else {**record, "response": {"status": "cancelled"}}

    assert store.update("a", "r1", cancel)["response"]["status"] == "cancelled"
    assert store.update("a", "r1", finish)["response"]["status"] == "cancelled"  # unchanged, as it stands
    assert store.update("b", "r1", cancel) is None and store.update("a", "nope", cancel) is None
    assert not store.run_lapsed("r1", 0.3)  # no lease: the first look that finds none notes it
    store.renew_run("r1", 1.0)  # a lease, and the note forgotten
    time.sleep(0.4)
    assert not store.run_lapsed("r1", 0.3)  # the lease is current (past the note's grace)
    time.sleep(0.8)
    assert not store.run_lapsed("r1", 0.3)  # lapsed 1.2 s after the renewal: this look notes it
    time.sleep(0.4)
    assert store.run_lapsed("r1", 0.3) and store.run_lapsed("r1", 0.3)
    store.renew_run("r1", 0.2)  # renewed (the store was back): the note is forgotten
    time.sleep(0.4)
    assert not store.run_lapsed("r1", 0.3)
    time.sleep(0.4)
    assert store.run_lapsed("r1", 0.3)


def test_a_running_background_response_holds_its_keys_place_and_an_in_flight_place(tmp_path):
    """Its request has ended, but its generation counts: a key allowed 2 open generations gets a
    429 for a third while 2 run in the background, and the gateway's in-flight cap (3 here) a 503
    for the fourth; both are given back when they end."""
    from gateway.auth import hash_key

    flask_app, backend, web, _ = make_app(tmp_path, RESPONSES_STORE="memory", MAX_IN_FLIGHT=3, API_KEYS=[
        {"name": "batch", "sha256": hash_key("batch-key"), "models": ["*"], "max_concurrent": 2}])
    batch = {"Authorization": "Bearer batch-key"}
    backend.script = slow
    running = [web.post("/v1/responses", json={"input": "Hi", "background": True}, headers=batch).get_json()["id"]
               for _ in range(2)]
    refused = web.post("/v1/responses", json={"input": "Hi", "background": True}, headers=batch)
    assert refused.status_code == 429, refused.get_json()
    mine = post(web, background=True).get_json()["id"]  # another key: the third in-flight place
    full = post(web, background=True)
    assert full.status_code == 503 and in_flight(flask_app) == 3
    for response_id, headers in ((running[0], batch), (running[1], batch), (mine, AUTH)):
        assert web.post(f"/v1/responses/{response_id}/cancel", headers=headers).status_code == 200
    assert wait_until(lambda: in_flight(flask_app) == 0)
    again = web.post("/v1/responses", json={"input": "Hi", "background": True}, headers=batch)
    assert again.status_code == 200
    assert web.post(f"/v1/responses/{again.get_json()['id']}/cancel", headers=batch).status_code == 200
    assert wait_until(lambda: in_flight(flask_app) == 0)


def test_the_requests_log_line_and_outcome_come_at_the_runs_end(app, caplog):
    flask_app, backend, web, spec = app
    outcomes = metrics.GENERATIONS.labels("/v1/responses", MODEL, "eos_token")
    before = outcomes._value.get()
    backend.script = lambda params: ["Hel", Pause(1.0), "lo", Finished("eos_token", prompt_tokens=3,
                                                                        completion_tokens=2)]
    with caplog.at_level("INFO", logger="trident.gateway.request"):
        queued = post(web, background=True).get_json()
        assert not [r for r in caplog.records if r.getMessage() == "generation"]  # answered, still running
        wait_for_status(web, spec, queued["id"], "completed")
        assert wait_until(lambda: [r for r in caplog.records if r.getMessage() == "generation"])
    [line] = [r.fields for r in caplog.records if r.getMessage() == "generation"]
    assert line["status"] == 200 and line["finish_reason"] == "eos_token" and line["completion_tokens"] == 2
    assert line["duration_s"] >= 0.95 and line["path"] == "/v1/responses"  # the run's, not the answer's
    assert outcomes._value.get() == before + 1


def test_a_store_outage_longer_than_the_lease_does_not_fail_a_run_that_is_alive(tmp_path, monkeypatch):
    """redis-server stopped (SIGSTOP) for twice the run's lease: the run cannot renew it and it
    lapses, but the run goes on; reads from the moment Redis answers again find it in progress
    (the first notes the lapse, the run renews within ORPHAN_GRACE), and it completes. Before the
    grace, the first read failed it ("stopped before it finished") and the run then stopped."""
    monkeypatch.setattr(background, "LEASE_SECONDS", 1.0)
    monkeypatch.setattr(background, "ORPHAN_GRACE", 3.0)
    with own_redis_app(tmp_path) as (flask_app, backend, web, spec, server):
        gate = threading.Event()
        backend.script = lambda params: ["Hello", Gate(gate), " world",
                                         Finished("eos_token", prompt_tokens=3, completion_tokens=2)]
        response_id = client_of(flask_app).responses.create(model=MODEL, input="Hi", background=True).id
        assert wait_until(lambda: backend.generations and backend.generations[-1].consumed >= 2)  # at the gate
        wait_for_status(web, spec, response_id, "in_progress")  # its first token: the run wrote it
        with stopped(server):
            time.sleep(2 * background.LEASE_SECONDS)
        deadline = time.monotonic() + background.ORPHAN_GRACE + 0.5
        while time.monotonic() < deadline:  # a client polling hard from the moment Redis is back
            assert retrieved(web, spec, response_id)["status"] == "in_progress"
            time.sleep(0.1)
        assert not backend.generations[-1].closed.is_set()
        gate.set()
        done = wait_for_status(web, spec, response_id, "completed")
        assert done["output"][0]["content"][0]["text"] == "Hello world"
        assert wait_until(lambda: in_flight(flask_app) == 0)


def test_in_progress_that_the_store_did_not_take_is_written_at_the_runs_next_look(app, monkeypatch):
    """The store fails the run's first write of in_progress (unreachable for a moment): the
    response reads in_progress after the run's next look at its record, not queued until its end."""
    import redis

    flask_app, backend, web, spec = app
    gate = threading.Event()
    backend.script = lambda params: ["Hello", Gate(gate), " world",
                                     Finished("eos_token", prompt_tokens=3, completion_tokens=2)]
    store = store_of(flask_app)
    real, refused = store.update, []

    def flaky(owner, response_id, change):
        if not refused:
            refused.append(response_id)
            raise redis.exceptions.ConnectionError("Connection refused")
        return real(owner, response_id, change)

    monkeypatch.setattr(store, "update", flaky)
    response_id = client_of(flask_app).responses.create(model=MODEL, input="Hi", background=True).id
    assert wait_until(lambda: refused)
    assert retrieved(web, spec, response_id)["status"] == "queued"
    wait_for_status(web, spec, response_id, "in_progress", timeout=background.POLL_SECONDS + 2)
    gate.set()
    assert wait_for_status(web, spec, response_id, "completed")["output"][0]["content"][0]["text"] == "Hello world"
