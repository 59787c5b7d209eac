"""Anthropic's own ``anthropic`` client, unmodified, against the real gateway and Triton (CPU
model): /v1/messages streamed and not, its token count, a prefilled reply, stop sequences, a forced tool, the
key as x-api-key, and the exception class it raises for a 400 or a 401 (Anthropic's error shape)."""

import anthropic
import pytest
from e2e_helpers import API_KEY

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m-instruct"
CAPITAL = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
GREEDY = {"temperature": 0}  # not a parameter of the newest client: sent as Anthropic's API takes it
WEATHER = {"name": "get_weather", "description": "The weather in a city", "input_schema": {
    "type": "object", "required": ["city"], "properties": {"city": {"type": "string", "maxLength": 30}}}}


@pytest.fixture
def claude(gateway):
    return anthropic.Anthropic(base_url=gateway.url, api_key=API_KEY, max_retries=0)


def test_a_message_and_its_stream_agree_on_the_real_model(claude):
    message = claude.messages.create(model=MODEL, max_tokens=24, messages=CAPITAL, extra_body=GREEDY)
    [block] = message.content
    assert block.type == "text" and "Paris" in block.text
    assert message.stop_reason == "end_turn" and message.usage.input_tokens > 0 and message.usage.output_tokens > 0
    with claude.messages.stream(model=MODEL, max_tokens=24, messages=CAPITAL, extra_body=GREEDY) as stream:
        events = list(stream)
        final = stream.get_final_message()
    text = "".join(e.delta.text for e in events if e.type == "content_block_delta" and e.delta.type == "text_delta")
    assert text == block.text and final.usage.input_tokens == message.usage.input_tokens
    # the first event already has the prompt's count: the llm model's admission says it
    assert events[0].type == "message_start" and events[0].message.usage.input_tokens == message.usage.input_tokens
    assert final.usage.output_tokens == message.usage.output_tokens and final.stop_reason == "end_turn"
    assert claude.messages.count_tokens(model=MODEL, messages=CAPITAL).input_tokens == message.usage.input_tokens
    cut = claude.messages.create(model=MODEL, max_tokens=2, messages=CAPITAL, extra_body=GREEDY)
    assert cut.stop_reason == "max_tokens" and cut.usage.output_tokens == 2


def test_prefill_system_and_stop_sequences(claude):
    prefill = [*CAPITAL, {"role": "assistant", "content": "The capital of France is"}]
    message = claude.messages.create(model=MODEL, max_tokens=8, messages=prefill, extra_body=GREEDY,
                                     system="You answer briefly.")
    assert message.content[0].text.startswith(" Paris"), message.content
    stopped = claude.messages.create(model=MODEL, max_tokens=24, messages=prefill, extra_body=GREEDY,
                                     stop_sequences=["xyz", "Paris"])
    assert (stopped.stop_reason, stopped.stop_sequence) == ("stop_sequence", "Paris")
    assert "Paris" not in stopped.content[0].text if stopped.content else True
    with claude.messages.stream(model=MODEL, max_tokens=24, messages=prefill, extra_body=GREEDY,
                                stop_sequences=["xyz", "Paris"]) as stream:  # the same, streamed
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", "Paris")
    assert text == (stopped.content[0].text if stopped.content else "")


def test_a_forced_tool_is_a_tool_use_block(claude):
    message = claude.messages.create(model=MODEL, max_tokens=40, extra_body=GREEDY, tools=[WEATHER],
                                     tool_choice={"type": "tool", "name": "get_weather"},
                                     messages=[{"role": "user", "content": "What is the weather in Berlin?"}])
    [use] = [b for b in message.content if b.type == "tool_use"]
    assert use.name == "get_weather" and isinstance(use.input.get("city"), str)
    assert message.stop_reason == "tool_use"
    with claude.messages.stream(model=MODEL, max_tokens=40, extra_body=GREEDY, tools=[WEATHER],
                                tool_choice={"type": "tool", "name": "get_weather"},
                                messages=[{"role": "user", "content": "What is the weather in Berlin?"}]) as stream:
        final = stream.get_final_message()
    assert [(b.name, b.input) for b in final.content if b.type == "tool_use"] == [(use.name, use.input)]


def test_bad_requests_raise_the_clients_exception(claude):
    with pytest.raises(anthropic.BadRequestError) as caught:
        claude.messages.create(model=MODEL, max_tokens=8, messages=CAPITAL, extra_body={"temperature": 1.5})
    assert caught.value.status_code == 400 and caught.value.body["error"]["param"] == "temperature"
    # Anthropic's error shape and request id, through the real gateway under gunicorn
    assert caught.value.body["type"] == "error" and caught.value.body["error"]["type"] == "invalid_request_error"
    assert caught.value.request_id and caught.value.body["request_id"] == caught.value.request_id
    with pytest.raises(anthropic.AuthenticationError) as caught:
        anthropic.Anthropic(base_url=claude.base_url, api_key="wrong", max_retries=0).messages.create(
            model=MODEL, max_tokens=8, messages=CAPITAL)
    assert caught.value.body["error"]["type"] == "authentication_error"
    message = claude.messages.create(model=MODEL, max_tokens=2, messages=CAPITAL)
    assert message._request_id  # the request-id header, which the client reads
