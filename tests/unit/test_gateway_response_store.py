"""Stored responses (gateway.response_store): ``store``, ``previous_response_id`` and
``GET`` / ``DELETE /v1/responses/{id}``, ``GET .../input_items``, through the official client
against the in-process gateway (fake backend), with the in-process store and with a real
redis-server (skipped without one); the stores on their own (owners, expiry, the memory bound)."""

from __future__ import annotations

import jsonschema_rs
import openai
import pytest
from openai_fixtures import AUTH, MODEL
from test_gateway_openai_tools import says
from test_gateway_responses import CALL, TOOL, check_response, client_of, events_of, post
from test_gateway_anthropic import make_app
from testkit import running_redis

from gateway import metrics
from gateway.auth import hash_key
from gateway.response_store import MemoryStore, RedisStore
from trident.contract import MAX_CHAT_MESSAGES, ModelLimits

OTHER = {"Authorization": "Bearer other-key"}


def check(spec, name, body):
    jsonschema_rs.Draft202012Validator({**spec, "$ref": f"#/components/schemas/{name}"}).validate(body)
    return body
KEYS = [{"name": "other", "sha256": hash_key("other-key"), "models": ["*"]}]


@pytest.fixture(scope="module")
def redis_uri(tmp_path_factory):
    with running_redis(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture(params=["memory", "redis"])
def app(request, tmp_path):
    uri = "memory" if request.param == "memory" else request.getfixturevalue("redis_uri")
    return make_app(tmp_path, RESPONSES_STORE=uri, API_KEYS=KEYS)


def stored_count(outcome: str) -> float:
    return metrics.STORED_RESPONSES.labels(outcome=outcome)._value.get()


def test_a_response_is_stored_retrieved_listed_and_deleted_through_the_official_client(app):
    flask_app, backend, web, spec = app
    client = client_of(flask_app)
    stored = stored_count("stored")
    response = client.responses.create(model=MODEL, input="Weather in Paris?", instructions="Be brief.",
                                       max_output_tokens=20)
    assert response.store is True and response.previous_response_id is None
    assert stored_count("stored") == stored + 1
    again = client.responses.retrieve(response.id)
    assert again.model_dump() == response.model_dump()
    check_response(spec, web.get(f"/v1/responses/{response.id}", headers=AUTH).get_json())
    [item] = client.responses.input_items.list(response.id).data
    assert item.type == "message" and item.role == "user" and item.content[0].text == "Weather in Paris?"
    listed = web.get(f"/v1/responses/{response.id}/input_items", headers=AUTH).get_json()
    check(spec, "ResponsesInputItemList", listed)
    assert listed["first_id"] == listed["last_id"] == item.id and listed["has_more"] is False
    deleted = web.delete(f"/v1/responses/{response.id}", headers=AUTH).get_json()
    assert check(spec, "ResponsesDeleted", deleted) == {"id": response.id, "object": "response", "deleted": True}
    for call in (client.responses.retrieve, client.responses.delete):
        with pytest.raises(openai.NotFoundError):
            call(response.id)


def test_previous_response_id_continues_the_conversation_without_the_old_instructions(app):
    """The new request's prompt is the earlier input, the earlier output, then the new input;
    instructions are the new request's only (OpenAI's rule)."""
    flask_app, backend, web, spec = app
    client = client_of(flask_app)
    first = client.responses.create(model=MODEL, input="My name is Ada.", instructions="Be brief.")
    second = client.responses.create(model=MODEL, input="What is my name?", previous_response_id=first.id,
                                     instructions="Answer in French.")
    assert second.previous_response_id == first.id and second.instructions == "Answer in French."
    assert backend.last_params.prompt == ("<system>Answer in French.\n<user>My name is Ada.\n"
                                          "<assistant>Hello, world ✓!\n<user>What is my name?\n<assistant>")
    third = client.responses.create(model=MODEL, input=[{"role": "user", "content": "Thanks"}],
                                    previous_response_id=second.id)
    assert backend.last_params.prompt == ("<user>My name is Ada.\n<assistant>Hello, world ✓!\n<user>What is my "
                                          "name?\n<assistant>Hello, world ✓!\n<user>Thanks\n<assistant>")
    # the third response's input items: the whole conversation before its output, in pages
    texts = [(i.role, i.content[0].text) for i in client.responses.input_items.list(third.id, order="asc").data]
    assert texts == [("user", "My name is Ada."), ("assistant", "Hello, world ✓!"), ("user", "What is my name?"),
                     ("assistant", "Hello, world ✓!"), ("user", "Thanks")]
    ids = [i.id for i in client.responses.input_items.list(third.id, order="asc").data]
    assert ids[1] == first.output[0].id and ids[3] == second.output[0].id  # outputs keep their ids
    pages, after = [], None
    while True:
        query = "?limit=2&order=desc" + (f"&after={after}" if after else "")
        page = web.get(f"/v1/responses/{third.id}/input_items{query}", headers=AUTH).get_json()
        pages.append([item["id"] for item in page["data"]])
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert pages == [ids[::-1][:2], ids[::-1][2:4], ids[::-1][4:]]
    # the first response is unchanged by what continued it
    assert [i.content[0].text for i in client.responses.input_items.list(first.id).data] == ["My name is Ada."]


@pytest.mark.parametrize("stream", [False, True])
def test_a_call_and_its_output_continue_a_stored_response(app, stream):
    """A forced call is stored; the next request sends only the call's output and the previous
    id: the template sees the call and its result, in order."""
    _, backend, web, spec = app
    backend.script = says('{"city": "Paris"}')
    response = post(web, tools=[TOOL], tool_choice={"type": "function", "name": "get_weather"}, stream=stream)
    stored = events_of(spec, response)[-1]["response"] if stream else check_response(spec, response.get_json())
    assert stored["store"] is True
    [call] = stored["output"]
    assert web.get(f"/v1/responses/{stored['id']}", headers=AUTH).get_json() == stored
    backend.script = says("It is 18 C.")
    answer = post(web, previous_response_id=stored["id"], tools=[TOOL],
                  input=[{"type": "function_call_output", "call_id": call["call_id"], "output": "18 C"}])
    assert answer.status_code == 200, answer.get_json()
    assert backend.last_params.prompt.endswith(
        f'<user>Weather in Paris?\n<assistant>CALL get_weather {{"city": "Paris"}} city=Paris\n'
        f'<tool>RESULT OF {call["call_id"]}: 18 C\n<assistant>'), backend.last_params.prompt


def test_store_false_keeps_nothing_and_another_key_sees_nothing(app):
    _, backend, web, spec = app
    unstored = check_response(spec, post(web, store=False).get_json())
    assert unstored["store"] is False
    assert web.get(f"/v1/responses/{unstored['id']}", headers=AUTH).status_code == 404
    stored = post(web).get_json()
    for method in (web.get, web.delete):
        response = method(f"/v1/responses/{stored['id']}", headers=OTHER)
        assert response.status_code == 404 and response.get_json()["error"]["param"] == "response_id"
    response = web.post("/v1/responses", json={"input": "Hi", "previous_response_id": stored["id"]}, headers=OTHER)
    error = response.get_json()["error"]
    assert response.status_code == 404 and error["param"] == "previous_response_id" and stored["id"] in error["message"]
    assert web.get(f"/v1/responses/{stored['id']}", headers=AUTH).status_code == 200  # still the owner's


@pytest.mark.parametrize(("query", "param"), [("?limit=0", "limit"), ("?limit=101", "limit"), ("?limit=x", "limit"),
                                              ("?order=up", "order"), ("?after=msg_nope", "after")])
def test_bad_listing_queries_are_400s_naming_them(app, query, param):
    _, _, web, _ = app
    stored = post(web).get_json()
    response = web.get(f"/v1/responses/{stored['id']}/input_items{query}", headers=AUTH)
    assert response.status_code == 400 and response.get_json()["error"]["param"] == param
    assert web.get(f"/v1/responses/{stored['id']}?stream=true", headers=AUTH).status_code == 400


def test_a_response_that_could_not_be_stored_says_so(tmp_path, caplog):
    """Redis unreachable when the response is done: the answer stands, with store false; looking
    a response up is a 503 to retry."""
    flask_app, backend, web, spec = make_app(tmp_path, RESPONSES_STORE="redis://127.0.0.1:1/0", STORE_TIMEOUT=0.5)
    failed = stored_count("failed")
    assert check_response(spec, post(web).get_json())["store"] is False
    assert stored_count("failed") == failed + 1
    final = events_of(spec, post(web, stream=True))[-1]["response"]
    assert final["store"] is False
    assert any("could not store response" in record.getMessage() for record in caplog.records)
    for method in (web.get, web.delete):
        response = method("/v1/responses/resp_1", headers=AUTH)
        assert response.status_code == 503 and response.headers["Retry-After"]
    response = post(web, previous_response_id="resp_1")
    assert response.status_code == 503 and "response store" in response.get_json()["error"]["message"]


def test_without_a_store_nothing_is_kept_and_previous_response_id_is_a_400(tmp_path):
    _, _, web, spec = make_app(tmp_path)
    body = check_response(spec, post(web, store=True).get_json())
    assert body["store"] is False
    response = web.get(f"/v1/responses/{body['id']}", headers=AUTH)
    assert response.status_code == 404 and "RESPONSES_STORE" in response.get_json()["error"]["message"]
    response = post(web, previous_response_id=body["id"])
    assert response.status_code == 400 and response.get_json()["error"]["param"] == "previous_response_id"


# -- the stores ----------------------------------------------------------------------------------


def test_the_memory_store_keeps_records_per_owner_until_they_expire_or_room_runs_out():
    now = [0.0]
    store = MemoryStore(ttl=10, max_chars=200, clock=lambda: now[0])
    store.put("a", "r1", {"x": 1})
    assert store.get("a", "r1") == {"x": 1} and store.get("b", "r1") is None
    assert not store.delete("b", "r1") and store.get("a", "r1") == {"x": 1}
    now[0] = 10.0
    assert store.get("a", "r1") is None  # expired
    for i in range(10):
        store.put("a", f"big{i}", {"text": "y" * 50})
    kept = [i for i in range(10) if store.get("a", f"big{i}") is not None]
    assert kept == [7, 8, 9]  # the oldest went first, the bound holds
    assert store.delete("a", "big9") and store.get("a", "big9") is None and not store.delete("a", "big9")
    with pytest.raises(ValueError, match="does not fit"):  # one record over the whole bound: refused, not lost
        store.put("a", "huge", {"text": "z" * 300})
    assert store.get("a", "big8") is not None


def test_the_redis_store_shares_records_with_every_store_on_the_same_redis(redis_uri):
    one, two = RedisStore(redis_uri, ttl=60, timeout=1), RedisStore(redis_uri, ttl=60, timeout=1)
    one.put("a", "shared", {"response": {"id": "shared"}, "items": []})
    assert two.get("a", "shared") == {"response": {"id": "shared"}, "items": []} and two.get("b", "shared") is None
    assert not two.delete("b", "shared") and two.delete("a", "shared") and one.get("a", "shared") is None
    one.put("a", "ttl", {})
    assert 0 < one._redis.ttl("trident:response:ttl") <= 60


def test_the_memory_store_is_refused_beside_several_workers(tmp_path, monkeypatch):
    """Each worker would keep its own responses: a request reaching another one would get a 404."""
    monkeypatch.setenv("GATEWAY_WORKERS", "2")
    with pytest.raises(ValueError, match="GATEWAY_WORKERS is 2"):
        make_app(tmp_path, RESPONSES_STORE="memory")
    make_app(tmp_path / "redis", RESPONSES_STORE="redis://127.0.0.1:1/0")  # shared: fine


def test_truncation_auto_serves_a_chain_of_stored_responses_longer_than_any_request(app):
    """A conversation continued response after response grows past the messages one request may
    hold: with truncation auto each continuation is served from its last
    turns, while what is stored stays the whole conversation."""
    flask_app, backend, web, spec = app
    backend.model_limits = ModelLimits(max_context=65536)  # the count of messages is what binds
    previous, asked = None, 0
    for batch in range(3):  # 3 x 100 turns, each with its reply: 3 x 200 items and 3 replies
        turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {batch}.{i}"} for i in range(199)]
        body = {"input": turns, "truncation": "auto", "max_output_tokens": 20}
        if previous is not None:
            body["previous_response_id"] = previous
        response = post(web, **body)
        assert response.status_code == 200, response.get_json()
        previous, asked = check_response(spec, response.get_json())["id"], asked + len(turns)
    prompt = backend.last_params.prompt
    assert prompt.endswith("<user>turn 2.198\n<assistant>") and "turn 0.0\n" not in prompt
    assert MAX_CHAT_MESSAGES - 2 <= prompt.count("<user>") + prompt.count("<assistant>") - 1 <= MAX_CHAT_MESSAGES
    listed = web.get(f"/v1/responses/{previous}/input_items?limit=100&order=asc", headers=AUTH).get_json()
    assert listed["data"][0]["content"][0]["text"] == "turn 0.0" and listed["has_more"]
    response = post(web, input="And?", previous_response_id=previous, max_output_tokens=20)
    assert response.status_code == 400 and response.get_json()["error"]["param"] == "input"
