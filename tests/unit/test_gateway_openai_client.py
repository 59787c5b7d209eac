"""The official ``openai`` client against the in-process gateway (WSGI transport, fake backend):
it parses every body, raises the right exception class for each status, and retries only when
the gateway says that retrying can work."""

from __future__ import annotations

import json

import httpx2
import openai
import pytest
from gateway_fakes import FakeBackend
from openai_fixtures import KEY, MODEL, make_openai_app

from gateway.backend import Finished
from gateway.errors import ServerError


class Client:
    """An OpenAI client bound to an in-process app; ``sent`` records (path, JSON body)."""

    def __init__(self, app, *, api_key=KEY, max_retries=0):
        self.sent: list[tuple[str, object]] = []
        http = httpx2.Client(
            transport=httpx2.WSGITransport(app=app),
            event_hooks={"request": [self._record]},
        )
        self.openai = openai.OpenAI(base_url="http://gateway/v1", api_key=api_key, http_client=http,
                                    max_retries=max_retries)

    def _record(self, request):
        body = json.loads(request.content) if request.content else None
        self.sent.append((request.url.path, body))


@pytest.fixture
def app_backend(tmp_path):
    return make_openai_app(tmp_path)


def test_chat_json_and_stream(app_backend):
    client = Client(app_backend[0]).openai
    messages = [{"role": "user", "content": "Hi"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert whole.choices[0].finish_reason == "stop"
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content == "Hello, world ✓!"
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_completions_json_and_stream(app_backend):
    client = Client(app_backend[0]).openai
    whole = client.completions.create(model=MODEL, prompt="Hi", max_tokens=3)
    assert whole.choices[0].text == "Hello, wor" and whole.choices[0].finish_reason == "length"
    chunks = list(client.completions.create(model=MODEL, prompt="Hi", max_tokens=3, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_models(app_backend):
    client = Client(app_backend[0]).openai
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).owned_by == "trident"


def test_the_client_sends_only_what_its_caller_passed(app_backend):
    """Why unknown fields can be refused: the client adds none of its own."""
    client = Client(app_backend[0])
    client.openai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}])
    client.openai.completions.create(model=MODEL, prompt="Hi", stream=True).close()
    assert client.sent == [
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}),
        ("/v1/completions", {"model": MODEL, "prompt": "Hi", "stream": True}),
    ]


def test_an_assistant_message_from_a_response_can_be_sent_back(app_backend):
    client = Client(app_backend[0]).openai
    messages = [{"role": "user", "content": "Hi"}]
    reply = client.chat.completions.create(model=MODEL, messages=messages).choices[0].message
    messages += [reply.model_dump(), {"role": "user", "content": "More"}]  # refusal, tool_calls... null
    assert client.chat.completions.create(model=MODEL, messages=messages).choices[0].message.content


@pytest.mark.parametrize(
    ("call", "exception", "status"),
    [
        (lambda c: c.chat.completions.create(model=MODEL, messages=[]), openai.BadRequestError, 400),
        (lambda c: c.completions.create(model=MODEL, prompt="x", n=17), openai.BadRequestError, 400),
        (lambda c: c.completions.create(model=MODEL, prompt="x", extra_body={"foo": 1}), openai.BadRequestError, 400),
        (lambda c: c.completions.create(model="gpt-4", prompt="x"), openai.NotFoundError, 404),
        (lambda c: c.models.retrieve("gpt-4"), openai.NotFoundError, 404),
    ],
)
def test_client_errors_raise_the_matching_exception(app_backend, call, exception, status):
    with pytest.raises(exception) as caught:
        call(Client(app_backend[0]).openai)
    assert caught.value.status_code == status
    assert caught.value.body["code"] == status and caught.value.body["message"]


def test_401_is_authentication_error(app_backend):
    with pytest.raises(openai.AuthenticationError) as caught:
        Client(app_backend[0], api_key="wrong").openai.models.list()
    assert caught.value.body == {"message": "Invalid API key", "type": "authentication_error", "param": None,
                                 "code": 401}


def test_429_with_a_long_wait_is_raised_without_retrying(tmp_path):
    app, backend = make_openai_app(tmp_path, {"DEFAULT_RATE_LIMIT": "1/hour"})
    client = Client(app, max_retries=2)
    client.openai.completions.create(model=MODEL, prompt="x")
    with pytest.raises(openai.RateLimitError) as caught:
        client.openai.completions.create(model=MODEL, prompt="x")
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert len(client.sent) == 2 and len(backend.calls) == 1  # no blind retry


def test_503_is_retried_after_retry_after_then_raised(tmp_path):
    error = ServerError("The inference server is unavailable; try again later", status=503, retry_after=1)
    app, backend = make_openai_app(tmp_path, backend=FakeBackend(generate_error=error))
    client = Client(app, max_retries=1)
    with pytest.raises(openai.InternalServerError) as caught:
        client.openai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}])
    assert caught.value.status_code == 503 and caught.value.body["type"] == "service_unavailable"
    assert len(backend.calls) == 2  # retried once, as x-should-retry: true allows


def test_501_is_not_retried(monkeypatch):
    monkeypatch.delenv("TRIDENT_TOKENIZER_DIR", raising=False)
    from gateway import create_app

    client = Client(create_app({"API_KEY": KEY}, backend=FakeBackend()), max_retries=2)
    with pytest.raises(openai.InternalServerError) as caught:
        client.openai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}])
    assert caught.value.status_code == 501 and len(client.sent) == 1


def test_failure_mid_stream_raises_api_error(tmp_path):
    error = ServerError("The inference server is unavailable; try again later", status=503, retry_after=5)
    app, _ = make_openai_app(tmp_path, backend=FakeBackend(script=lambda p: ["Hel", error, Finished("eos_token", 1, 1)]))
    stream = Client(app).openai.completions.create(model=MODEL, prompt="x", stream=True)
    texts = []
    with pytest.raises(openai.APIError, match="The inference server is unavailable"):
        for chunk in stream:
            texts.append(chunk.choices[0].text)
    assert texts == ["Hel"]
