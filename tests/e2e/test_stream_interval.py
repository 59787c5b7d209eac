"""The llm model's ``stream_interval`` on the real stack: a repository built with
``--stream-interval 3``, its own Triton and the gunicorn gateway. A stream's first text comes at
once, then three tokens to a response; the text, the log-probabilities and the counts are the
same as without streaming. The default repository (interval 1) sends every token alone.
Clients that hang up between grouped responses, or while queued, are cancelled as with
interval 1.
"""
import math

import openai
import pytest
import requests

from conftest import build_small_repository, start_gateway, start_triton
from e2e_helpers import API_KEY, AUTH, sse_events
from load_clients import held_slots_storm

pytestmark = pytest.mark.e2e

INTERVAL = 3
SLOTS = 8
TOKENS = 16
BODY = {"prompt": "Write a short poem about the sea.", "max_new_tokens": TOKENS, "min_tokens": TOKENS,
        "temperature": 0, "logprobs": 1}


@pytest.fixture(scope="module")
def grouped_triton(tmp_path_factory):
    repo = build_small_repository(tmp_path_factory.mktemp("repo-interval") / "repository", max_batch_size=SLOTS,
                                  extra=["--stream-interval", str(INTERVAL)])
    triton = start_triton(repo, tmp_path_factory, "triton-interval")
    yield triton
    triton.stop()


@pytest.fixture(scope="module")
def grouped(grouped_triton, tmp_path_factory):
    gw = start_gateway(grouped_triton, tmp_path_factory)
    yield gw
    gw.stop()


def stream(gateway, body):
    with requests.post(gateway.url + "/generate", json={**body, "stream": True}, headers=AUTH, stream=True,
                       timeout=120) as r:
        assert r.status_code == 200, r.text
        events = sse_events(r)
    return [data for name, data in events if name == "token"], [data for name, data in events if name == "done"]


def test_tokens_come_three_to_a_response_and_add_up_to_the_plain_answer(grouped):
    plain = requests.post(grouped.url + "/generate", json=BODY, headers=AUTH, timeout=120)
    assert plain.status_code == 200, plain.text
    choice = plain.json()["choices"][0]
    tokens, done = stream(grouped, BODY)
    counts = [len(t["logprobs"]["tokens"]) for t in tokens]
    assert counts[0] == 1  # the first text at once
    assert sum(counts) == TOKENS and len(tokens) <= 1 + math.ceil((TOKENS - 1) / INTERVAL), counts
    for t in tokens:  # each response's tokens are its own text
        assert "".join(t["logprobs"]["tokens"]) == t["text"]
    assert "".join(t["text"] for t in tokens) == choice["text"]
    assert [tok for t in tokens for tok in t["logprobs"]["tokens"]] == choice["logprobs"]["tokens"]
    assert [v for t in tokens for v in t["logprobs"]["token_logprobs"]] == pytest.approx(
        choice["logprobs"]["token_logprobs"], abs=1e-6)
    assert done[0]["usage"]["completion_tokens"] == TOKENS


def test_the_default_repository_streams_every_token_alone(gateway):
    tokens, done = stream(gateway, BODY)
    assert [len(t["logprobs"]["tokens"]) for t in tokens] == [1] * TOKENS
    assert done[0]["usage"]["completion_tokens"] == TOKENS


def test_openai_chat_stream_in_groups_equals_the_plain_answer(grouped):
    oai = openai.OpenAI(base_url=f"{grouped.url}/v1", api_key=API_KEY, max_retries=0)
    kwargs = dict(model="smollm2-135m-instruct", messages=[{"role": "user", "content": "Name three rivers."}],
                  max_tokens=TOKENS, temperature=0)
    plain = oai.chat.completions.create(**kwargs).choices[0].message.content
    chunks = [c for c in oai.chat.completions.create(stream=True, **kwargs) if c.choices and c.choices[0].delta.content]
    assert "".join(c.choices[0].delta.content for c in chunks) == plain
    assert len(chunks) <= 1 + math.ceil((TOKENS - 1) / INTERVAL)


def test_clients_leaving_while_queued_and_between_groups_are_cancelled(grouped, grouped_triton):
    """8 streams hold the 8 slots; 40 more queue behind them and hang up at their 200 (all
    cancelled, none prefilled); then the 8 hang up at their next event, between two grouped
    responses: all cancelled, the engine idle within 2 s."""
    held_slots_storm(grouped.url, grouped_triton, clients=40, slots=SLOTS)
