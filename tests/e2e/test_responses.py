"""OpenAI's ``openai`` client's ``responses``, unmodified, against the real gateway and Triton (CPU
model): a response and its stream agree with each other and with the chat completion of the
same conversation, its logprobs equal chat's, a forced function call, a reply cut by
max_output_tokens, and a 400; stored responses continued across two gateways that share a real
Redis (RESPONSES_STORE)."""

import json
import time

import openai
import pytest
import requests
from conftest import start_gateway
from e2e_helpers import API_KEY, engine_metrics
from testkit import wait_until

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m-instruct"
QUESTION = "What is the capital of France? Answer in one sentence."
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city", "parameters": {
    "type": "object", "required": ["city"], "properties": {"city": {"type": "string", "maxLength": 30}}}}


@pytest.fixture
def oai(gateway):
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=API_KEY, max_retries=0)


def test_a_response_its_stream_and_the_chat_completion_agree_on_the_real_model(oai):
    response = oai.responses.create(model=MODEL, input=QUESTION, instructions="You are brief.", temperature=0,
                                    max_output_tokens=24)
    assert response.status == "completed" and "Paris" in response.output_text
    chat = oai.chat.completions.create(model=MODEL, temperature=0, max_tokens=24, messages=[
        {"role": "system", "content": "You are brief."}, {"role": "user", "content": QUESTION}])
    assert chat.choices[0].message.content == response.output_text  # the same generation, greedy
    assert (response.usage.input_tokens, response.usage.output_tokens) == (chat.usage.prompt_tokens,
                                                                          chat.usage.completion_tokens)
    with oai.responses.stream(model=MODEL, input=QUESTION, instructions="You are brief.", temperature=0,
                              max_output_tokens=24) as stream:
        events = list(stream)
        final = stream.get_final_response()
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == final.output_text == response.output_text
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    cut = oai.responses.create(model=MODEL, input=QUESTION, temperature=0, max_output_tokens=2)
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    assert cut.usage.output_tokens == 2


def test_logprobs_are_chats_for_the_same_generation(oai):
    """include message.output_text.logprobs with top_logprobs: the tokens spell the output text,
    and equal chat's logprobs for the same conversation (greedy), streamed the same."""
    asked = {"model": MODEL, "input": QUESTION, "temperature": 0, "max_output_tokens": 12, "top_logprobs": 2,
             "include": ["message.output_text.logprobs"]}
    response = oai.responses.create(**asked)
    tokens = response.output[0].content[0].logprobs
    assert "".join(t.token for t in tokens) == response.output_text and len(tokens) == response.usage.output_tokens
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob for t in tokens)
    chat = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}], temperature=0,
                                       max_tokens=12, logprobs=True, top_logprobs=2)
    assert [(t.token, round(t.logprob, 4)) for t in tokens] == [
        (t.token, round(t.logprob, 4)) for t in chat.choices[0].logprobs.content]
    with oai.responses.stream(**asked) as stream:
        streamed = [t for e in stream if e.type == "response.output_text.delta" for t in e.logprobs]
    assert [t.token for t in streamed] == [t.token for t in tokens]


def test_a_forced_function_call_and_its_output_sent_back(oai):
    request = {"model": MODEL, "input": "What is the weather in Paris?", "tools": [WEATHER],
               "tool_choice": {"type": "function", "name": "get_weather"}, "max_output_tokens": 40}
    [call] = oai.responses.create(**request).output
    assert call.type == "function_call" and call.name == "get_weather" and call.status == "completed"
    assert set(json.loads(call.arguments)) == {"city"}
    with oai.responses.stream(**request) as stream:
        streamed = [e for e in stream if e.type == "response.function_call_arguments.done"]
    assert len(streamed) == 1 and set(json.loads(streamed[0].arguments)) == {"city"}
    history = [{"role": "user", "content": "What is the weather in Paris?"}, call.model_dump(exclude_none=True),
               {"type": "function_call_output", "call_id": call.call_id, "output": "18 degrees and sunny"}]
    answer = oai.responses.create(model=MODEL, input=history, tools=[WEATHER], tool_choice="none", temperature=0,
                                  max_output_tokens=12)
    assert answer.output_text and answer.output[0].type == "message"


def test_bad_requests_raise_the_clients_exception(oai):
    with pytest.raises(openai.BadRequestError) as caught:
        oai.responses.create(model=MODEL, input=QUESTION, previous_response_id="resp_1")
    assert caught.value.body["param"] == "previous_response_id"


def test_truncation_auto_serves_a_conversation_longer_than_the_context_from_its_last_turns(oai, gateway):
    """Two long turns and a question: over the context as a whole (a 400 naming input without
    truncation); with truncation auto the instructions and the turns from the second user
    message on are served: the same generation (greedy) and prompt tokens as the chat
    completion of just those messages."""
    def notes(topic):
        return " ".join(f"Note {i} about {topic}: it is worth remembering." for i in range(110))

    turns = [{"role": "user", "content": notes("birds")}, {"role": "assistant", "content": "Noted."},
             {"role": "user", "content": notes("trees")}, {"role": "assistant", "content": "Noted."},
             {"role": "user", "content": QUESTION}]
    settings = {"model": MODEL, "instructions": "You are brief.", "temperature": 0, "max_output_tokens": 24}
    with pytest.raises(openai.BadRequestError) as caught:
        oai.responses.create(input=turns, **settings)
    assert caught.value.body["param"] == "input" and "context" in caught.value.body["message"]
    response = oai.responses.create(input=turns, truncation="auto", **settings)
    assert response.status == "completed" and response.truncation == "auto" and "Paris" in response.output_text
    kept = [{"role": "system", "content": "You are brief."}, *turns[2:]]
    chat = oai.chat.completions.create(model=MODEL, messages=kept, temperature=0, max_tokens=24)
    assert (response.output_text, response.usage.input_tokens) == (chat.choices[0].message.content,
                                                                   chat.usage.prompt_tokens)
    whole = requests.post(f"{gateway.url}/tokenize", headers={"Authorization": f"Bearer {API_KEY}"},
                       json={"model": MODEL, "messages": [kept[0], *turns]}, timeout=30).json()["count"]
    assert whole + 24 > 2048 > chat.usage.prompt_tokens + 24  # one more turn would not have fit


@pytest.fixture(scope="module")
def two_gateways(triton, tmp_path_factory, redis_url):
    """Two gateway processes (replicas) sharing one Redis for their stored responses."""
    env = {"TRIDENT_RESPONSES_STORE": redis_url}
    gateways = [start_gateway(triton, tmp_path_factory, extra_env=env) for _ in range(2)]
    yield [openai.OpenAI(base_url=f"{gw.url}/v1", api_key=API_KEY, max_retries=0) for gw in gateways]
    for gw in gateways:
        gw.stop()


def test_a_stored_response_is_continued_through_another_gateway(two_gateways):
    """A response stored by one gateway is retrieved, listed and continued (previous_response_id)
    through the other: the continuation is the same generation (greedy) as the stateless request
    with the whole conversation, whole and streamed; deleted through either, it is gone from both."""
    one, two = two_gateways
    settings = {"model": MODEL, "temperature": 0, "max_output_tokens": 16}
    first = one.responses.create(input="My name is Ada. Say hello to me.", **settings)
    assert first.store is True and first.status in ("completed", "incomplete")
    assert two.responses.retrieve(first.id).model_dump() == first.model_dump()
    assert [i.content[0].text for i in two.responses.input_items.list(first.id).data] == [
        "My name is Ada. Say hello to me."]
    second = two.responses.create(input="What is my name?", previous_response_id=first.id, **settings)
    whole = [{"role": "user", "content": "My name is Ada. Say hello to me."},
             {"role": "assistant", "content": first.output_text}, {"role": "user", "content": "What is my name?"}]
    stateless = one.responses.create(input=whole, store=False, **settings)
    assert stateless.store is False
    assert (second.output_text, second.usage.input_tokens) == (stateless.output_text, stateless.usage.input_tokens)
    assert second.previous_response_id == first.id
    with one.responses.stream(input="What is my name?", previous_response_id=first.id, **settings) as stream:
        streamed = list(stream)[-1].response  # response.completed, or .incomplete where max_output_tokens cut it
    assert streamed.status == second.status and streamed.output_text == second.output_text
    assert one.responses.retrieve(streamed.id).model_dump() == streamed.model_dump()
    texts = [i.content[0].text for i in one.responses.input_items.list(second.id, order="asc").data]
    assert texts == ["My name is Ada. Say hello to me.", first.output_text, "What is my name?"]
    two.responses.delete(first.id)
    for client in (one, two):
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(first.id)
    assert one.responses.retrieve(second.id).id == second.id  # what continued it keeps its own copy


def test_a_background_response_runs_through_one_gateway_and_is_read_and_cancelled_through_the_other(
        two_gateways, triton):
    """``background``: created through one gateway, answered queued; read through the other
    while it runs and once done, it is the foreground generation (greedy). A long one cancelled
    through the other gateway stops in the engine (the run looks at its record every second):
    the engine is idle and its token counter still soon after."""
    one, two = two_gateways
    settings = {"model": MODEL, "temperature": 0, "max_output_tokens": 24}
    foreground = one.responses.create(input=QUESTION, store=False, **settings)
    queued = one.responses.create(input=QUESTION, background=True, **settings)
    assert queued.status == "queued" and queued.background is True and queued.output == []
    done = _until_settled(two, queued.id)
    assert (done.status, done.output_text, done.usage.output_tokens) == (
        foreground.status, foreground.output_text, foreground.usage.output_tokens)
    assert one.responses.retrieve(queued.id).model_dump() == done.model_dump()

    # a constraint that cannot end before max_output_tokens: it runs for as long as the test needs
    numbers = {"type": "object", "required": ["numbers"], "additionalProperties": False, "properties": {
        "numbers": {"type": "array", "items": {"type": "integer"}, "minItems": 5000}}}
    long = one.responses.create(model=MODEL, input="List numbers.", max_output_tokens=1500, background=True,
                                text={"format": {"type": "json_schema", "name": "numbers", "schema": numbers}})
    assert wait_until(lambda: two.responses.retrieve(long.id).status == "in_progress", 30, 0.05)
    assert wait_until(lambda: engine_metrics(triton)["active"] == 1, 10)  # Triton's metrics lag a little
    cancelled = two.responses.cancel(long.id)
    assert cancelled.status == "cancelled" and cancelled.id == long.id
    assert wait_until(lambda: engine_metrics(triton)["active"] == 0, 2 + 1)  # the run's next look, then the engine
    generated = engine_metrics(triton)["generated"]
    time.sleep(0.5)
    assert engine_metrics(triton)["generated"] == generated
    assert one.responses.retrieve(long.id).status == "cancelled"
    assert two.responses.cancel(long.id).status == "cancelled"  # again: the same answer
    with pytest.raises(openai.BadRequestError):
        two.responses.cancel(queued.id)  # completed: nothing to cancel


def test_a_streamed_background_response_dropped_at_one_gateway_is_resumed_through_the_other(two_gateways):
    """``background`` and ``stream``: the client drops after three deltas from one gateway and
    resumes through the other after the last event it read (the events are kept in Redis): every
    later event once, numbered on, and together the foreground generation's text (greedy)."""
    one, two = two_gateways
    settings = {"model": MODEL, "temperature": 0, "max_output_tokens": 24}
    foreground = one.responses.create(input=QUESTION, store=False, **settings)
    stream = one.responses.create(input=QUESTION, background=True, stream=True, **settings)
    seen = []
    for event in stream:
        seen.append(event)
        if sum(e.type == "response.output_text.delta" for e in seen) == 3:
            break
    stream.close()  # the connection drops
    response_id = seen[0].response.id
    with two.responses.retrieve(response_id, stream=True, starting_after=seen[-1].sequence_number) as rest:
        later = list(rest)
    events = seen + later
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert later[-1].type == "response.completed" and later[-1].response.output_text == foreground.output_text
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == foreground.output_text
    assert two.responses.retrieve(response_id).model_dump() == later[-1].response.model_dump()


def _until_settled(client, response_id, timeout: float = 60):
    assert wait_until(lambda: client.responses.retrieve(response_id).status not in ("queued", "in_progress"), timeout, 0.05)
    return client.responses.retrieve(response_id)
