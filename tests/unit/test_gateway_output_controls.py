"""Output controls through the gateway (issue 15), in-process with a fake backend: what each
route sends to the backend (SamplingParams), the shapes of choices and logprobs (JSON and SSE,
/generate and /v1), best_of, and errors naming each endpoint's own fields. The real stack is
tested in tests/e2e/test_output_controls.py."""

from __future__ import annotations

import json
import math

import jsonschema_rs
import pytest
from gateway_fakes import FakeBackend
from openai_fixtures import AUTH, MODEL, make_openai_app, sse_data
from test_gateway_openai_client import Client

from gateway.backend import Admitted, ChoiceEnd, Finished, PromptLogprobs, TextDelta, TokenLogprobs
from gateway.errors import ClientError
from trident.contract import GUIDE_EBNF, GUIDE_JSON_SCHEMA, GUIDE_REGEX, JSON_OBJECT_SCHEMA, Guide, ModelLimits


def piece(*tokens: tuple[str, float], top: int = 0) -> TokenLogprobs:
    """The tokens of one delta; with ``top``, alternatives: the token itself then "alt<i>"."""
    alternatives = None
    if top:
        alternatives = tuple(((t, lp), *((f"alt{i}", lp - 1 - i) for i in range(top - 1))) for t, lp in tokens)
    return TokenLogprobs(tuple(t for t, _ in tokens), tuple(range(len(tokens))), tuple(lp for _, lp in tokens),
                         alternatives)


def two_choices(params):
    """Choice 0 "Hello!" (two deltas), choice 1 "Hi" (one); choice 1 ends first, on a stop."""
    k = params.sampling.logprobs
    lp = (lambda *t: piece(*t, top=k)) if k is not None else (lambda *t: None)
    steps = [
        TextDelta("Hel", 0, lp(("H", -0.5), ("el", -0.25))),
        TextDelta("Hi", 1, lp(("Hi", -2.0))),
        TextDelta("lo!", 0, lp(("lo", -0.125), ("!", -1.0))),
    ]
    cum = (lambda v: v) if k is not None else (lambda v: None)
    ends = (ChoiceEnd(0, "eos_token", 4, cum(-1.875)), ChoiceEnd(1, "stop_sequence", 1, cum(-2.0)))
    if params.sampling.n == 1:
        steps, ends = [steps[0], steps[2]], ends[:1] if k is not None else ()
    tokens = sum(end.completion_tokens for end in ends) if ends else 4
    return [*steps, Finished("eos_token", prompt_tokens=3, completion_tokens=tokens, choices=ends)]


@pytest.fixture
def app_backend(tmp_path):
    return make_openai_app(tmp_path, backend=FakeBackend(script=two_choices))


@pytest.fixture
def client(app_backend):
    return app_backend[0].test_client()


@pytest.fixture
def backend(app_backend):
    return app_backend[1]


def generate(client, **body):
    return client.post("/generate", json={"prompt": "Hi", **body}, headers=AUTH)


def test_generate_fields_reach_the_backend_as_sampling_params(client, app_backend):
    backend = app_backend[1]
    body = dict(n=2, logprobs=3, presence_penalty=0.5, frequency_penalty=-1, min_tokens=2, min_p=0.1,
                logit_bias={"7": -100, "42": 2.5}, response_format={"type": "json_object"})
    assert generate(client, **body).status_code == 200
    sampling = backend.last_params.sampling
    assert (sampling.n, sampling.logprobs, sampling.presence_penalty, sampling.frequency_penalty) == (2, 3, 0.5, -1.0)
    assert (sampling.min_tokens, sampling.min_p, sampling.logit_bias) == (2, pytest.approx(0.1), ((7, -100.0), (42, 2.5)))
    assert sampling.guide == Guide(GUIDE_JSON_SCHEMA, JSON_OBJECT_SCHEMA)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": True}}
    assert generate(client, response_format=fmt).status_code == 200
    assert json.loads(backend.last_params.sampling.guide.text) == schema
    assert generate(client, regex="[0-9]+").status_code == 200
    assert backend.last_params.sampling.guide == Guide(GUIDE_REGEX, "[0-9]+")
    assert generate(client, response_format={"type": "text"}).status_code == 200
    assert backend.last_params.sampling.guide is None


def test_generate_json_has_every_choice_with_completions_logprobs(client):
    body = generate(client, n=2, logprobs=2).get_json()
    first, second = body["choices"]
    assert (first["text"], first["index"], first["finish_reason"]) == ("Hello!", 0, "eos_token")
    assert (second["text"], second["index"], second["finish_reason"]) == ("Hi", 1, "stop_sequence")
    assert first["logprobs"] == {
        "tokens": ["H", "el", "lo", "!"], "token_logprobs": [-0.5, -0.25, -0.125, -1.0],
        "top_logprobs": [{"H": -0.5, "alt0": -1.5}, {"el": -0.25, "alt0": -1.25}, {"lo": -0.125, "alt0": -1.125},
                         {"!": -1.0, "alt0": -2.0}],
        "text_offset": [0, 1, 3, 5],
    }
    assert "".join(first["logprobs"]["tokens"]) == first["text"]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    plain = generate(client).get_json()["choices"]
    assert len(plain) == 1 and plain[0]["logprobs"] is None


def test_generate_logprobs_zero_gives_the_chosen_token_only(client):
    logprobs = generate(client, logprobs=0).get_json()["choices"][0]["logprobs"]
    assert logprobs["top_logprobs"] == [{"H": -0.5}, {"el": -0.25}, {"lo": -0.125}, {"!": -1.0}]


def test_generate_stream_names_choices_and_carries_logprobs(client):
    response = generate(client, n=2, logprobs=1, stream=True)
    events = [line for line in response.get_data(as_text=True).split("\n\n") if line.startswith("event:")]
    parsed = [(e.split("\n")[0][7:], json.loads(e.split("\n")[1][6:])) for e in events]
    tokens = [data for name, data in parsed if name == "token"]
    assert [(t["index"], t["text"]) for t in tokens] == [(0, "Hel"), (1, "Hi"), (0, "lo!")]
    assert tokens[2]["logprobs"] == {"tokens": ["lo", "!"], "token_logprobs": [-0.125, -1.0],
                                     "top_logprobs": [{"lo": -0.125}, {"!": -1.0}], "text_offset": [3, 5]}
    assert tokens[1]["logprobs"]["text_offset"] == [0]
    name, done = parsed[-1]
    assert name == "done" and done["choices"] == [
        {"index": 0, "finish_reason": "eos_token", "completion_tokens": 4},
        {"index": 1, "finish_reason": "stop_sequence", "completion_tokens": 1}]


def test_generate_plain_stream_is_unchanged(client):
    text = generate(client, stream=True).get_data(as_text=True)
    assert 'event: token\ndata: {"text": "Hel"}\n\n' in text and '"index"' not in text and "logprobs" not in text


def test_completions_best_of_returns_the_best_by_sum_of_logprobs(app_backend):
    client, backend = Client(app_backend[0]).openai, app_backend[1]
    out = client.completions.create(model=MODEL, prompt="Hi", best_of=2, n=1)
    assert backend.last_params.sampling.n == 2 and backend.last_params.sampling.logprobs == 0
    assert [(c.index, c.text, c.logprobs) for c in out.choices] == [(0, "Hello!", None)]  # -1.875 > -2.0
    assert out.usage.completion_tokens == 5  # both choices were generated
    both = client.completions.create(model=MODEL, prompt="Hi", n=2, logprobs=1)
    assert [c.text for c in both.choices] == ["Hello!", "Hi"]
    assert both.choices[1].logprobs.tokens == ["Hi"] and both.choices[1].logprobs.top_logprobs == [{"Hi": -2.0}]


def test_chat_logprobs_are_openais_shape(app_backend):
    client = Client(app_backend[0]).openai
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], n=2,
                                         logprobs=True, top_logprobs=2)
    content = out.choices[0].logprobs.content
    assert [c.token for c in content] == ["H", "el", "lo", "!"]
    assert content[0].logprob == -0.5 and content[0].bytes == [72]
    assert [(t.token, t.logprob) for t in content[0].top_logprobs] == [("H", -0.5), ("alt0", -1.5)]
    assert out.choices[1].message.content == "Hi" and out.choices[1].finish_reason == "stop"
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], n=2,
                                                 logprobs=True, stream=True))
    roles = [(c.choices[0].index, c.choices[0].delta.role) for c in chunks if c.choices[0].delta.role]
    assert roles == [(0, "assistant"), (1, "assistant")]
    streamed = [t.token for c in chunks if c.choices[0].index == 0 and c.choices[0].logprobs
                for t in c.choices[0].logprobs.content]
    assert streamed == ["H", "el", "lo", "!"]
    ends = [(c.choices[0].index, c.choices[0].finish_reason) for c in chunks if c.choices[0].finish_reason]
    assert ends == [(0, "stop"), (1, "stop")]
    plain = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}])
    assert plain.choices[0].logprobs is None


def _refuse(param):
    def script(params):
        return [ClientError("no", param=param)]
    return script


@pytest.mark.parametrize(("path", "body", "contract", "public"), [
    ("/generate", {"prompt": "x", "response_format": {"type": "json_object"}}, "guided_decoding_guide",
     "response_format"),
    ("/generate", {"prompt": "x", "regex": "a+"}, "guided_decoding_guide", "regex"),
    ("/generate", {"prompt": "x", "regex": "a+", "stream": True}, "guided_decoding_guide_type", "regex"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 3},
     "logprobs", "top_logprobs"),
    ("/v1/completions", {"prompt": "x", "logprobs": 3}, "logprobs", "logprobs"),
    ("/v1/completions", {"prompt": "x", "response_format": {"type": "json_object"}, "stream": True},
     "guided_decoding_guide", "response_format"),
    ("/v1/completions", {"prompt": "x", "best_of": 3}, "n", "best_of"),
    ("/v1/completions", {"prompt": "x", "structured_outputs": {"regex": "(a"}}, "guided_decoding_guide",
     "structured_outputs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "structured_outputs": {"grammar": "root ::= "}}, "guided_decoding_guide_type",
     "structured_outputs"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 3}, "max_new_tokens", "max_tokens"),
])
def test_backend_errors_name_the_endpoints_fields(tmp_path, path, body, contract, public):
    app, _ = make_openai_app(tmp_path, backend=FakeBackend(script=_refuse(contract)))
    response = app.test_client().post(path, json=body, headers=AUTH)
    assert response.status_code == 400, response.get_data(as_text=True)
    assert response.get_json()["error"]["param"] == public


def test_an_error_after_the_stream_began_names_the_endpoints_field(tmp_path):
    def script(params):
        return ["a", ClientError("bad guide", param="guided_decoding_guide")]

    app, _ = make_openai_app(tmp_path, backend=FakeBackend(script=script))
    response = app.test_client().post("/generate", json={"prompt": "x", "regex": "a+", "stream": True}, headers=AUTH)
    assert response.status_code == 200
    last = response.get_data(as_text=True).strip().split("\n\n")[-1]
    assert last.startswith("event: error") and json.loads(last.split("\n")[1][6:])["error"]["param"] == "regex"


def test_the_sum_of_shown_logprobs_is_the_choices_cum_logprob(client):
    """What a client computes from the tokens agrees with the engine's own sum (best_of's key)."""
    first = generate(client, n=2, logprobs=0).get_json()["choices"][0]
    assert math.isclose(sum(first["logprobs"]["token_logprobs"]), -1.875)
    chunks = sse_data(client.post("/v1/completions", json={"prompt": "x", "n": 2, "logprobs": 0, "stream": True},
                                  headers=AUTH))
    offsets = [c["choices"][0]["logprobs"]["text_offset"] for c in chunks
               if c != "[DONE]" and c["choices"] and c["choices"][0]["index"] == 0 and c["choices"][0]["logprobs"]]
    assert offsets == [[0, 1], [3, 5]]


# -- echo ---------------------------------------------------------------------------------------


def echoing(params):
    """What the llm model answers with echo: the prompt "Hi there" first (its tokens with
    logprobs: the first has none, NaN), then "!" (streamed: the prompt with the first token)."""
    k = params.sampling.logprobs
    prompt = piece(("Hi", float("nan")), (" there", -3.0), top=k) if k is not None else None
    if prompt is not None and k:  # the first token has no alternatives either
        prompt = TokenLogprobs(prompt.tokens, prompt.token_ids, prompt.logprobs, ((), *prompt.top[1:]))
    first = piece(("!", -0.5), top=k) if k is not None else None
    if params.stream:
        both = TokenLogprobs(prompt.tokens + first.tokens, (0, 1, 2), prompt.logprobs + first.logprobs,
                             prompt.top + first.top if prompt.top else None) if k is not None else None
        steps = [TextDelta("Hi there!", 0, both)]
    else:
        steps = [TextDelta("Hi there!", 0, TokenLogprobs(prompt.tokens + first.tokens, (0, 1, 2),
                                                         prompt.logprobs + first.logprobs,
                                                         prompt.top + first.top if prompt.top else None)
                           if k is not None else None)]
    return [*steps, Finished("length", prompt_tokens=2, completion_tokens=1)]


def test_completions_echo_reaches_the_backend_and_its_first_prompt_token_has_null_logprobs(tmp_path):
    app, backend = make_openai_app(tmp_path, backend=FakeBackend(script=echoing))
    client = app.test_client()
    spec = client.get("/openapi.json").get_json()
    body = client.post("/v1/completions", json={"prompt": "Hi there", "echo": True, "logprobs": 1, "max_tokens": 1},
                       headers=AUTH).get_json()
    assert backend.last_params.sampling.echo and backend.last_params.sampling.logprobs == 1
    import jsonschema_rs
    jsonschema_rs.Draft202012Validator({**spec, "$ref": "#/components/schemas/CompletionResponse"}).validate(body)
    [choice] = body["choices"]
    assert choice["text"] == "Hi there!"
    assert choice["logprobs"] == {"tokens": ["Hi", " there", "!"], "token_logprobs": [None, -3.0, -0.5],
                                  "top_logprobs": [None, {" there": -3.0}, {"!": -0.5}], "text_offset": [0, 2, 8]}
    # lm-evaluation-harness's loglikelihood reads exactly this: the continuation's logprobs, greedy or not
    continuation = choice["logprobs"]["token_logprobs"][1:-1]
    assert sum(continuation) == -3.0
    assert all(lp == max(top.values()) for lp, top in zip(continuation, choice["logprobs"]["top_logprobs"][1:-1]))
    chunks = sse_data(client.post("/v1/completions", json={"prompt": "Hi there", "echo": True, "logprobs": 1,
                                                           "max_tokens": 1, "stream": True}, headers=AUTH))
    assert chunks[0]["choices"][0]["text"] == "Hi there!"
    assert chunks[0]["choices"][0]["logprobs"]["token_logprobs"] == [None, -3.0, -0.5]
    plain = client.post("/v1/completions", json={"prompt": "Hi there", "echo": True}, headers=AUTH).get_json()
    assert plain["choices"][0]["text"] == "Hi there!" and plain["choices"][0]["logprobs"] is None
    assert backend.last_params.sampling.echo and backend.last_params.sampling.logprobs is None
    client.post("/v1/completions", json={"prompt": "Hi there", "echo": False}, headers=AUTH)
    assert not backend.last_params.sampling.echo


def scored_prompt(params):
    """What llm answers an echo with max_tokens 0: the prompt's tokens alone, none generated."""
    prompt = TokenLogprobs(("Hi", " there"), (0, 1), (math.nan, -3.0), None)
    return [TextDelta("Hi there", 0, prompt if params.sampling.logprobs is not None else None),
            Finished("length", prompt_tokens=2, completion_tokens=0)]


def test_completions_max_tokens_0_with_echo_scores_the_prompt_and_without_echo_is_a_400(tmp_path):
    """OpenAI's legacy API and vLLM take max_tokens 0 with echo (HELM and older lm-evaluation-
    harness score prompts so); without echo it stays a 400, and chat has no echo."""
    app, backend = make_openai_app(tmp_path, backend=FakeBackend(script=scored_prompt))
    client = app.test_client()
    spec = client.get("/openapi.json").get_json()
    schemas = spec["components"]["schemas"]
    assert schemas["CompletionRequest"]["properties"]["max_tokens"]["minimum"] == 0
    assert schemas["ChatCompletionRequest"]["properties"]["max_tokens"]["minimum"] == 1
    body = client.post("/v1/completions", json={"prompt": "Hi there", "echo": True, "logprobs": 0, "max_tokens": 0},
                       headers=AUTH).get_json()
    assert backend.last_params.sampling.max_new_tokens == 0 and backend.last_params.sampling.echo
    import jsonschema_rs
    jsonschema_rs.Draft202012Validator({**spec, "$ref": "#/components/schemas/CompletionResponse"}).validate(body)
    [choice] = body["choices"]
    assert choice["text"] == "Hi there" and choice["finish_reason"] == "length"
    assert choice["logprobs"]["token_logprobs"] == [None, -3.0]
    assert body["usage"]["completion_tokens"] == 0
    for extra, status in (({}, 400), ({"echo": False}, 400), ({"echo": True}, 200)):
        reply = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 0, **extra}, headers=AUTH)
        assert reply.status_code == status, (extra, reply.get_json())
        if status == 400:
            error = reply.get_json()["error"]
            assert error["param"] == "max_tokens" and "0 only with echo" in error["message"]
    chat = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                     "max_tokens": 0}, headers=AUTH)
    assert chat.status_code == 400 and chat.get_json()["error"]["param"] == "max_tokens"
    assert "echo" not in chat.get_json()["error"]["message"]


# -- structured_outputs (vLLM's extension on /v1) -----------------------------------------------

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}


@pytest.mark.parametrize(("spec", "guide"), [
    ({"json": SCHEMA}, Guide(GUIDE_JSON_SCHEMA, json.dumps(SCHEMA))),
    ({"json": json.dumps(SCHEMA)}, Guide(GUIDE_JSON_SCHEMA, json.dumps(SCHEMA))),
    ({"json_object": True}, Guide(GUIDE_JSON_SCHEMA, JSON_OBJECT_SCHEMA)),
    ({"regex": "[0-9]{4}"}, Guide(GUIDE_REGEX, "[0-9]{4}")),
    ({"grammar": 'root ::= "yes" | "no"'}, Guide(GUIDE_EBNF, 'root ::= "yes" | "no"')),
    ({"choice": ["positive", 'say "hi"\n', "é"]}, Guide(GUIDE_EBNF, 'root ::= "positive" | "say \\"hi\\"\\n" | "é"')),
    ({"regex": None, "choice": ["a", "b"]}, Guide(GUIDE_EBNF, 'root ::= "a" | "b"')),
])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_structured_outputs_reach_the_engine_as_its_guide(client, backend, path, spec, guide):
    body = {"prompt": "x"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "x"}]}
    response = client.post(path, json={**body, "structured_outputs": spec}, headers=AUTH)
    assert response.status_code == 200, response.get_json()
    assert backend.last_params.sampling.guide == guide


def test_a_choice_guide_accepts_exactly_its_strings():
    """The EBNF built for choice, compiled by XGrammar as the engine does: each string and nothing else."""
    from xgrammar import Grammar
    from xgrammar.testing import _is_grammar_accept_string

    from gateway.control_fields import StructuredOutputs

    choices = ["positive", 'say "hi"', "back\\slash", "line\nbreak", "中文", "\x01"]
    guide = StructuredOutputs()._deserialize({"choice": choices}, "structured_outputs", {})
    grammar = Grammar.from_ebnf(guide.text)
    assert all(_is_grammar_accept_string(grammar, c) for c in choices)
    assert not any(_is_grammar_accept_string(grammar, c) for c in ["positiv", "positive ", "say hi", ""])


@pytest.mark.parametrize(("extra", "message"), [
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs must give exactly one of"),
    ({"structured_outputs": {}}, "structured_outputs must give exactly one of"),
    ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs has an unrecognized field: structural_tag"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice must be an array of 1 to 1024 non-empty"),
    ({"structured_outputs": {"choice": ["a", 3]}}, "structured_outputs.choice must be an array"),
    ({"structured_outputs": {"regex": ""}}, "structured_outputs.regex must be a non-empty string"),
    ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json must be a JSON schema"),
    ({"structured_outputs": {"json": [1]}}, "structured_outputs.json must be a JSON schema"),
    ({"structured_outputs": {"json_object": 1}}, "structured_outputs.json_object must be true"),
    # 0 and 0.0 are not false (a fuzzed request found them taken as "not given" beside a choice)
    ({"structured_outputs": {"choice": ["0"], "json_object": 0.0}}, "structured_outputs must give exactly one of"),
    ({"structured_outputs": {"json_object": 0}}, "structured_outputs.json_object must be true"),
    ({"structured_outputs": {"regex": 0}}, "structured_outputs.regex must be a non-empty string"),
    ({"structured_outputs": {"grammar": "x" * 70000}}, "structured_outputs.grammar must be at most 65536"),
    ({"structured_outputs": "json"}, "structured_outputs must be an object"),
    ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}},
     "give either structured_outputs or a JSON response_format, not both"),
])
def test_bad_structured_outputs_are_400s_naming_the_field(client, backend, extra, message):
    response = client.post("/v1/completions", json={"prompt": "x", **extra}, headers=AUTH)
    assert response.status_code == 400, response.get_json()
    error = response.get_json()["error"]
    assert error["param"] == "structured_outputs" and error["message"].startswith(message), error["message"]
    assert backend.calls == []


def test_structured_outputs_are_in_the_document_and_conflict_with_forced_tools(client, backend):
    schemas = client.get("/openapi.json").get_json()["components"]["schemas"]
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        kinds = [next(iter(one["required"])) for one in schemas[name]["properties"]["structured_outputs"]["anyOf"]
                 if "required" in one]
        assert kinds == ["json", "regex", "choice", "grammar", "json_object"]
    tools = [{"type": "function", "function": {"name": "f"}}]
    response = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "x"}], "tools": tools, "tool_choice": "required",
        "structured_outputs": {"choice": ["a"]}}, headers=AUTH)
    assert response.status_code == 400 and response.get_json()["error"]["param"] == "structured_outputs"


def test_chat_echo_puts_the_continued_assistant_message_in_front_of_each_choice(client, backend):
    """vLLM's chat echo: the last message's text starts every choice's content when it is the
    assistant's (the message continue_final_message continues), streamed in each choice's first
    chunk; the llm model is not asked to echo the prompt; nothing is echoed after a user message
    answered with the assistant's generation prompt, and that message is echoed without one."""
    continued = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Well, "}],
                 "continue_final_message": True, "echo": True, "n": 2}
    body = client.post("/v1/chat/completions", json=continued, headers=AUTH).get_json()
    assert [c["message"]["content"] for c in body["choices"]] == ["Well, Hello!", "Well, Hi"]
    assert backend.last_params.sampling.echo is False
    chunks = [c for c in sse_data(client.post("/v1/chat/completions", json={**continued, "stream": True},
                                              headers=AUTH)) if c != "[DONE]"]
    texts = {0: "", 1: ""}
    for chunk in chunks:
        for choice in chunk["choices"]:
            texts[choice["index"]] += choice["delta"].get("content") or ""
    assert texts == {0: "Well, Hello!", 1: "Well, Hi"}
    firsts = [next(c["choices"][0]["delta"] for c in chunks if c["choices"][0]["index"] == i) for i in (0, 1)]
    assert all(d["role"] == "assistant" and d["content"].startswith("Well, ") for d in firsts), firsts
    answered = client.post("/v1/chat/completions", json={**continued, "messages": continued["messages"][:1],
                                                         "continue_final_message": False}, headers=AUTH).get_json()
    assert [c["message"]["content"] for c in answered["choices"]] == ["Hello!", "Hi"]
    plain = client.post("/v1/chat/completions", json={**continued, "echo": False}, headers=AUTH).get_json()
    assert [c["message"]["content"] for c in plain["choices"]] == ["Hello!", "Hi"]
    # without a generation prompt the last message is continued whatever its role: echoed (vLLM's rule)
    raw = {"messages": [{"role": "user", "content": "The capital of France is"}], "add_generation_prompt": False,
           "echo": True, "n": 2}
    body = client.post("/v1/chat/completions", json=raw, headers=AUTH).get_json()
    assert [c["message"]["content"] for c in body["choices"]] == ["The capital of France isHello!",
                                                                  "The capital of France isHi"]
    tools = [{"type": "function", "function": {"name": "f"}}]
    refused = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "echo": True,
                                                        "tools": tools, "tool_choice": "required"}, headers=AUTH)
    assert refused.status_code == 400 and refused.get_json()["error"]["param"] == "echo"

@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_stop_token_ids_and_include_stop_str_in_output_reach_the_llm_model(client, backend, path):
    body = {"prompt": "x"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "x"}]}
    response = client.post(path, json={**body, "stop_token_ids": [2, 49152], "include_stop_str_in_output": True},
                           headers=AUTH)
    assert response.status_code == 200
    sampling = backend.last_params.sampling
    assert sampling.stop_token_ids == (2, 49152) and sampling.include_stop_str_in_output
    client.post(path, json=body, headers=AUTH)
    assert backend.last_params.sampling.stop_token_ids == () and not backend.last_params.sampling.include_stop_str_in_output
    for extra in ({"stop_token_ids": [1, -2]}, {"stop_token_ids": 3}, {"include_stop_str_in_output": "yes"}):
        bad = client.post(path, json={**body, **extra}, headers=AUTH)
        assert bad.status_code == 400 and bad.get_json()["error"]["param"] == next(iter(extra))


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_skip_special_tokens_false_reaches_the_llm_model(client, backend, path):
    body = {"prompt": "x"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "x"}]}
    assert client.post(path, json={**body, "skip_special_tokens": False}, headers=AUTH).status_code == 200
    assert backend.last_params.sampling.skip_special_tokens is False
    client.post(path, json={**body, "skip_special_tokens": True}, headers=AUTH)
    assert backend.last_params.sampling.skip_special_tokens is True
    client.post(path, json=body, headers=AUTH)
    assert backend.last_params.sampling.skip_special_tokens is True
    bad = client.post(path, json={**body, "skip_special_tokens": "no"}, headers=AUTH)
    assert bad.status_code == 400 and bad.get_json()["error"]["param"] == "skip_special_tokens"


def test_generate_takes_vllms_stop_token_ids_include_stop_and_skip_special_tokens(client, backend):
    """/generate has the same three extensions as /v1/*, under the same names."""
    body = {"prompt": "x", "stop_token_ids": [2, 7], "include_stop_str_in_output": True, "skip_special_tokens": False}
    assert client.post("/generate", json=body, headers=AUTH).status_code == 200
    sampling = backend.last_params.sampling
    assert (sampling.stop_token_ids, sampling.include_stop_str_in_output, sampling.skip_special_tokens) == \
        ((2, 7), True, False)
    client.post("/generate", json={"prompt": "x"}, headers=AUTH)
    sampling = backend.last_params.sampling
    assert (sampling.stop_token_ids, sampling.include_stop_str_in_output, sampling.skip_special_tokens) == \
        ((), False, True)
    for extra in ({"stop_token_ids": [1, -2]}, {"include_stop_str_in_output": 1}, {"skip_special_tokens": "no"}):
        bad = client.post("/generate", json={"prompt": "x", **extra}, headers=AUTH)
        assert bad.status_code == 400 and bad.get_json()["error"]["param"] == next(iter(extra))


def test_generate_takes_ignore_eos_next_to_min_tokens(client, backend):
    """/generate has vLLM's ignore_eos as /v1/* has it: its own field (min_tokens as given), the
    engines ban their end token up to max_new_tokens."""
    body = {"prompt": "x", "max_new_tokens": 9, "min_tokens": 2, "ignore_eos": True}
    assert client.post("/generate", json=body, headers=AUTH).status_code == 200
    sampling = backend.last_params.sampling
    assert (sampling.ignore_eos, sampling.min_tokens, sampling.engine_min_tokens) == (True, 2, 9)
    client.post("/generate", json={"prompt": "x", "min_tokens": 2}, headers=AUTH)
    sampling = backend.last_params.sampling
    assert (sampling.ignore_eos, sampling.min_tokens, sampling.engine_min_tokens) == (False, 2, 2)
    bad = client.post("/generate", json={"prompt": "x", "ignore_eos": 1}, headers=AUTH)
    assert bad.status_code == 400 and bad.get_json()["error"]["param"] == "ignore_eos"


@pytest.mark.parametrize("path", ["/generate", "/v1/completions", "/v1/chat/completions"])
def test_bad_words_reach_the_llm_model_as_written_and_after_a_space(client, backend, path):
    """vLLM's bad_words: each word is banned at the start of the text and inside it (BPE spells
    " Paris" apart from "Paris"), leading whitespace dropped, repeats sent once."""
    body = {"messages": [{"role": "user", "content": "x"}]} if path.endswith("chat/completions") else {"prompt": "x"}
    response = client.post(path, json={**body, "bad_words": ["Paris", " Paris", "  New York"]}, headers=AUTH)
    assert response.status_code == 200, response.get_json()
    assert backend.last_params.sampling.bad_words == ("Paris", " Paris", "New York", " New York")
    client.post(path, json=body, headers=AUTH)
    assert backend.last_params.sampling.bad_words == ()
    for words, message in ((["ok", " \n"], "bad_words[1] must have a character other than whitespace"),
                           ([""], "bad_words[0] must be a non-empty string"), ("Paris", "must be an array"),
                           (["x"] * 33, "bad_words must have at most 32 items, got 33"),
                           (["x" * 256], "bad_words[0] must be at most 255 characters")):
        bad = client.post(path, json={**body, "bad_words": words}, headers=AUTH)
        error = bad.get_json()["error"]
        assert bad.status_code == 400 and error["param"] == "bad_words" and message in error["message"], error


def test_the_contract_takes_as_many_bad_words_as_the_gateway_sends():
    """32 words become at most 64 sequences: within the contract's own limit (NVIDIA's ensemble
    input, which a gRPC client fills directly)."""
    from trident.contract import MAX_BAD_WORDS, SamplingParams
    from gateway.schemas import MAX_REQUEST_BAD_WORDS, spaced_variants

    words = spaced_variants([f"w{i}" for i in range(MAX_REQUEST_BAD_WORDS)])
    assert len(words) == MAX_BAD_WORDS
    SamplingParams(bad_words=words).check()
    with pytest.raises(Exception, match="bad_words must have at most 64 items"):
        SamplingParams(bad_words=words + ("one more",)).check()


@pytest.mark.parametrize("path", ["/generate", "/v1/completions", "/v1/chat/completions"])
def test_allowed_token_ids_and_truncate_prompt_tokens_reach_the_llm_model(client, backend, path):
    """vLLM's two extensions, under their names on every generation endpoint: loaded (the ids
    once each), absent by default, and refused with the field named when malformed."""
    body = ({"prompt": "x"} if path != "/v1/chat/completions" else {"messages": [{"role": "user", "content": "x"}]})
    response = client.post(path, json={**body, "allowed_token_ids": [7, 2, 7], "truncate_prompt_tokens": 16},
                           headers=AUTH)
    assert response.status_code == 200
    sampling = backend.last_params.sampling
    assert (sampling.allowed_token_ids, sampling.truncate_prompt_tokens) == ((7, 2), 16)
    client.post(path, json={**body, "truncate_prompt_tokens": -1, "allowed_token_ids": None}, headers=AUTH)
    assert (backend.last_params.sampling.allowed_token_ids, backend.last_params.sampling.truncate_prompt_tokens) == \
        ((), -1)
    client.post(path, json=body, headers=AUTH)
    assert (backend.last_params.sampling.allowed_token_ids, backend.last_params.sampling.truncate_prompt_tokens) == \
        ((), None)
    calls = len(backend.calls)
    for extra, message in (({"allowed_token_ids": []}, "at least one token id"),
                           ({"allowed_token_ids": [1, -2]}, "allowed_token_ids[1] must be a token id"),
                           ({"allowed_token_ids": [1] * 16385}, "at most 16384 entries"),
                           ({"allowed_token_ids": 3}, "array"),
                           ({"truncate_prompt_tokens": 0}, "must be -1"),
                           ({"truncate_prompt_tokens": -5}, "must be -1"),
                           ({"truncate_prompt_tokens": True}, "integer"),
                           ({"truncate_prompt_tokens": 2.5}, "integer")):
        bad = client.post(path, json={**body, **extra}, headers=AUTH)
        error = bad.get_json()["error"]
        assert bad.status_code == 400 and error["param"] == next(iter(extra)) and message in error["message"], error
    assert len(backend.calls) == calls


def test_a_token_id_prompt_longer_than_the_context_passes_with_truncate_prompt_tokens(client, backend):
    """The gateway's own check of a prompt of ids leaves the context to the llm model when the
    request truncates (the ids must still be the model's)."""
    body = {"prompt": [1] * 2100, "max_tokens": 9}
    refused = client.post("/v1/completions", json=body, headers=AUTH)
    assert refused.status_code == 400 and "2100 tokens" in refused.get_json()["error"]["message"]
    assert client.post("/v1/completions", json={**body, "truncate_prompt_tokens": 100}, headers=AUTH).status_code == 200
    assert backend.last_params.prompt_ids == (1,) * 2100 and backend.last_params.sampling.truncate_prompt_tokens == 100
    backend.model_limits = ModelLimits(vocab_size=50)
    outside = client.post("/v1/completions", json={**body, "prompt": [1, 50], "truncate_prompt_tokens": 1},
                          headers=AUTH)
    assert outside.status_code == 400 and outside.get_json()["error"]["param"] == "prompt"


def test_the_two_extensions_are_in_the_document(client):
    schemas = client.get("/openapi.json").get_json()["components"]["schemas"]
    for name in ("GenerateRequest", "CompletionRequest", "ChatCompletionRequest"):
        props = schemas[name]["properties"]
        assert props["allowed_token_ids"]["minItems"] == 1 and props["allowed_token_ids"]["maxItems"] == 16384
        assert {"const": -1} in props["truncate_prompt_tokens"]["anyOf"]


def with_ids(params):
    """One delta of two tokens (ids 7 and 300) with two alternatives each (ids 7, 9 and 300, 8),
    one of which is no whole character ("\ufffd": its bytes end in another token)."""
    logprobs = TokenLogprobs(("H", "é"), (7, 300), (-0.5, -0.25),
                             ((("H", -0.5), ("\ufffd", -1.5)), (("é", -0.25), ("e", -2.0))), ((7, 9), (300, 8)))
    return [TextDelta("Hé", 0, logprobs), Finished("eos_token", prompt_tokens=3, completion_tokens=2)]


@pytest.mark.parametrize("stream", [False, True])
def test_return_tokens_as_token_ids_names_the_logprobs_tokens_by_id(tmp_path, stream):
    """vLLM's return_tokens_as_token_ids: every token and alternative is "token_id:<id>" (two
    alternatives of the same text stay apart); bytes and text_offset stay the texts'. Without it
    the texts, as before."""
    client = make_openai_app(tmp_path, backend=FakeBackend(script=with_ids))[0].test_client()

    def ask(path, body):
        response = client.post(path, json={"model": MODEL, "stream": stream, **body}, headers=AUTH)
        assert response.status_code == 200, response.get_data(as_text=True)
        if not stream:
            return response.get_json()["choices"][0]["logprobs"]
        shown = [c["choices"][0]["logprobs"] for c in sse_data(response)[:-1] if c["choices"][0]["logprobs"]]
        assert len(shown) == 1
        return shown[0]

    completion = {"prompt": "Hi", "logprobs": 2}
    as_ids = ask("/v1/completions", {**completion, "return_tokens_as_token_ids": True})
    assert as_ids["tokens"] == ["token_id:7", "token_id:300"] and as_ids["text_offset"] == [0, 1]
    assert as_ids["top_logprobs"] == [{"token_id:7": -0.5, "token_id:9": -1.5}, {"token_id:300": -0.25, "token_id:8": -2.0}]
    as_texts = ask("/v1/completions", completion)
    assert as_texts["tokens"] == ["H", "é"] and as_texts["top_logprobs"][0] == {"H": -0.5, "\ufffd": -1.5}
    chat = {"messages": [{"role": "user", "content": "Hi"}], "logprobs": True, "top_logprobs": 2}
    content = ask("/v1/chat/completions", {**chat, "return_tokens_as_token_ids": True})["content"]
    assert [(c["token"], c["bytes"]) for c in content] == [("token_id:7", [72]), ("token_id:300", [195, 169])]
    assert [(t["token"], t["bytes"]) for t in content[0]["top_logprobs"]] == [("token_id:7", [72]),
                                                                              ("token_id:9", [239, 191, 189])]
    assert [c["token"] for c in ask("/v1/chat/completions", chat)["content"]] == ["H", "é"]


def test_return_tokens_as_token_ids_must_be_a_boolean(client):
    response = client.post("/v1/completions", json={"prompt": "Hi", "return_tokens_as_token_ids": "yes"},
                           headers=AUTH)
    assert response.status_code == 400 and response.get_json()["error"]["param"] == "return_tokens_as_token_ids"


def test_tokens_as_ids_leave_out_alternatives_whose_ids_did_not_come():
    """An llm model that sends no alternatives' ids: named by id, the chosen token alone."""
    from gateway.choices import chat_logprobs, completion_logprobs

    older = TokenLogprobs(("H",), (7,), (-0.5,), ((("H", -0.5), ("x", -1.5)),))
    assert completion_logprobs([older], as_ids=True)["top_logprobs"] == [{"token_id:7": -0.5}]
    assert chat_logprobs([older], as_ids=True)["content"][0]["top_logprobs"] == []
    assert completion_logprobs([older])["top_logprobs"] == [{"H": -0.5, "x": -1.5}]


def ids_script(params):
    """The llm model's answer with return_prompt_token_ids and logprobs: the admission with the
    prompt's ids, each choice's tokens with their ids, the final event with the prompt's ids."""
    prompt = ((5, 6, 7),) if params.return_prompt_token_ids else None
    n = params.sampling.n
    tokens = params.sampling.logprobs is not None
    def delta(text, index, ids):
        logprobs = TokenLogprobs(tuple(text), ids, (-0.5,) * len(ids)) if tokens else None
        return TextDelta(text, index, logprobs)
    steps = [Admitted("vm:1", prompt_tokens=3, prompt_token_ids=prompt)]
    for i in range(n):
        steps += [delta("ab", i, (10 + i, 20 + i)), delta("c", i, (30 + i,))]
    ends = tuple(ChoiceEnd(i, "eos_token", 3, -1.5) for i in range(n))
    return [*steps, Finished("eos_token", prompt_tokens=3, completion_tokens=3 * n, choices=ends if n > 1 else (),
                             prompt_token_ids=prompt)]


@pytest.mark.parametrize("stream", [False, True])
def test_return_token_ids_gives_the_prompts_and_each_choices_ids(tmp_path, stream):
    """vLLM's return_token_ids: the llm model is asked for the prompt's ids and for tokens (so
    their ids) though the reply shows no logprobs; completions: prompt_token_ids and token_ids on
    each choice (streamed: the prompt's in each choice's first chunk, each chunk its own ids);
    chat: prompt_token_ids beside the choices (streamed: in the role chunks)."""
    backend = FakeBackend(script=ids_script)
    client = make_openai_app(tmp_path, backend=backend)[0].test_client()

    def ask(path, body):
        response = client.post(path, json={"model": MODEL, "stream": stream, "n": 2, "return_token_ids": True, **body},
                               headers=AUTH)
        assert response.status_code == 200, response.get_data(as_text=True)
        sampling = backend.last_params.sampling
        assert backend.last_params.return_prompt_token_ids and sampling.logprobs == 0
        return sse_data(response)[:-1] if stream else response.get_json()

    completion = ask("/v1/completions", {"prompt": "Hi"})
    chat = ask("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})
    spec = client.get("/openapi.json").get_json()
    for name, bodies in (("Completion", completion), ("ChatCompletion", chat)):  # the document says these fields
        ref = f"#/components/schemas/{name}{'Chunk' if stream else 'Response'}"
        for body in bodies if stream else [bodies]:
            jsonschema_rs.Draft202012Validator({**spec, "$ref": ref}).validate(body)
    if not stream:
        assert [(c["index"], c["prompt_token_ids"], c["token_ids"], c["logprobs"]) for c in completion["choices"]] == [
            (0, [5, 6, 7], [10, 20, 30], None), (1, [5, 6, 7], [11, 21, 31], None)]
        assert chat["prompt_token_ids"] == [5, 6, 7]
        assert [(c["token_ids"], c["logprobs"]) for c in chat["choices"]] == [([10, 20, 30], None), ([11, 21, 31], None)]
        return
    for index in (0, 1):
        own = [c["choices"][0] for c in completion if c["choices"][0]["index"] == index]
        assert [c["prompt_token_ids"] for c in own] == [[5, 6, 7], None, None]  # the last: the finish chunk
        assert [c["token_ids"] for c in own] == [[10 + index, 20 + index], [30 + index], []]
        assert all(c["logprobs"] is None for c in own)
        chunks = [c for c in chat if c["choices"][0]["index"] == index]
        assert [c.get("prompt_token_ids") for c in chunks] == [[5, 6, 7], None, None]
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert [c["choices"][0]["token_ids"] for c in chunks] == [[10 + index, 20 + index], [30 + index], []]


def test_return_token_ids_with_several_prompts_gives_each_choice_its_prompts_ids(tmp_path):
    def script(params):
        ids = tuple(ord(c) for c in params.prompt)
        return [Admitted("vm:1", 1, (ids,)), TextDelta("x", 0, TokenLogprobs(("x",), (99,), (-1.0,))),
                Finished("eos_token", prompt_tokens=len(ids), completion_tokens=1, prompt_token_ids=(ids,))]

    client = make_openai_app(tmp_path, backend=FakeBackend(script=script))[0].test_client()
    for stream in (False, True):
        response = client.post("/v1/completions", json={"prompt": ["ab", "c"], "return_token_ids": True,
                                                        "stream": stream}, headers=AUTH)
        assert response.status_code == 200
        choices = ([c["choices"][0] for c in sse_data(response)[:-1] if c["choices"][0]["prompt_token_ids"]]
                   if stream else response.get_json()["choices"])
        assert sorted((c["index"], c["prompt_token_ids"], c["token_ids"]) for c in choices) == [
            (0, [97, 98], [99]), (1, [99], [99])]


def test_return_token_ids_is_refused_with_echo(client):
    response = client.post("/v1/completions", json={"prompt": "Hi", "echo": True, "return_token_ids": True},
                           headers=AUTH)
    assert response.status_code == 400 and response.get_json()["error"]["param"] == "return_token_ids"


def counted_script(params):
    """Two choices, each "ab" (2 tokens) then "c" (1 token) with NVIDIA's per-response counts
    when asked for (return_num_output_tokens); choice 1 ends with 4 tokens (a stop token left
    out of the text)."""
    counted = params.return_num_output_tokens
    steps = [Admitted("vm:1", prompt_tokens=5)]
    for i in range(params.sampling.n):
        steps += [TextDelta("ab", i, tokens=2 if counted else None), TextDelta("c", i, tokens=1 if counted else None)]
    ends = (ChoiceEnd(0, "eos_token", 3), ChoiceEnd(1, "stop_sequence", 4))[:params.sampling.n]
    return [*steps, Finished("eos_token", prompt_tokens=5, completion_tokens=7, choices=ends)]


@pytest.mark.parametrize("path,body", [("/v1/completions", {"prompt": "Hi"}),
                                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})])
def test_continuous_usage_stats_gives_every_chunk_its_choices_usage_so_far(tmp_path, path, body):
    """vLLM's stream_options.continuous_usage_stats (with include_usage): each chunk's usage is
    the prompt's tokens and its choice's tokens so far (the finish chunk: the choice's
    completion_tokens); the last chunk the whole usage. Without include_usage it changes nothing."""
    backend = FakeBackend(script=counted_script)
    client = make_openai_app(tmp_path, backend=backend)[0].test_client()
    spec = client.get("/openapi.json").get_json()
    options = {"include_usage": True, "continuous_usage_stats": True}
    response = client.post(path, json={"model": MODEL, "stream": True, "n": 2, "stream_options": options, **body},
                           headers=AUTH)
    assert response.status_code == 200 and backend.last_params.return_num_output_tokens
    chunks = sse_data(response)[:-1]
    for chunk in chunks:
        jsonschema_rs.Draft202012Validator(
            {**spec, "$ref": f"#/components/schemas/{'Chat' if 'chat' in path else ''}CompletionChunk"}).validate(chunk)
    seen = [(c["choices"][0]["index"], c["usage"]["completion_tokens"]) for c in chunks if c["choices"]]
    assert seen == [(0, 2), (0, 3), (1, 2), (1, 3), (0, 3), (1, 4)]
    assert all(c["usage"]["prompt_tokens"] == 5 and c["usage"]["total_tokens"] == 5 + c["usage"]["completion_tokens"]
               for c in chunks)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 7
    plain = client.post(path, json={"model": MODEL, "stream": True, "n": 2, "stream_options": {
        "continuous_usage_stats": True}, **body}, headers=AUTH)
    assert not backend.last_params.return_num_output_tokens
    assert all("usage" not in c for c in sse_data(plain)[:-1])


def test_continuous_usage_stats_needs_stream(client):
    response = client.post("/v1/completions", json={"prompt": "Hi", "stream_options": {
        "include_usage": True, "continuous_usage_stats": True}}, headers=AUTH)
    assert response.status_code == 400 and response.get_json()["error"]["param"] == "stream_options"


def scored_script(params):
    """The llm model's answer with num_prompt_log_probs: the prompt's tokens with their
    log-probabilities, ranks and best alternatives (before the text), each choice's text."""
    k = params.sampling.prompt_logprobs
    scored = None
    if k is not None:  # the prompt "A big" (ids 5, 6, 7); the second token among the best, the third not
        rows = ((), (("B", -0.75), (" big", -0.75), ("C", -2.0)), (("!", -0.5), ("?", float("-inf")), ("x", -3.0)))
        ids = ((), (8, 6, 9), (10, 11, 12))
        tokens = TokenLogprobs(("A", " big", "!"), (5, 6, 7), (math.nan, -0.75, float("-inf")),
                               tuple(row[:k] for row in rows), tuple(row[:k] for row in ids))
        scored = (PromptLogprobs(tokens, (0, 2, 49152)),)
    n = params.sampling.n
    ends = tuple(ChoiceEnd(i, "eos_token", 1) for i in range(n))
    return [Admitted("vm:1", prompt_tokens=3), *(TextDelta("ok", i) for i in range(n)),
            Finished("eos_token", prompt_tokens=3, completion_tokens=n, choices=ends if n > 1 else (),
                     prompt_logprobs=scored)]


def test_prompt_logprobs_gives_each_prompt_tokens_logprob_rank_and_best_tokens(tmp_path):
    """vLLM's prompt_logprobs: the llm model is asked for k; completions: each choice's
    prompt_logprobs, chat: beside the choices; null for the first token, then the prompt's token
    (its rank) and the k best (ranks 1..k; the prompt's token keeps its first place with its rank
    among them); -inf shown as -9999.0; the document describes the field."""
    backend = FakeBackend(script=scored_script)
    client = make_openai_app(tmp_path, backend=backend)[0].test_client()
    spec = client.get("/openapi.json").get_json()

    def ask(path, body, name):
        response = client.post(path, json={"model": MODEL, "n": 2, "prompt_logprobs": 2, **body}, headers=AUTH)
        assert response.status_code == 200, response.get_data(as_text=True)
        assert backend.last_params.sampling.prompt_logprobs == 2
        body = response.get_json()
        jsonschema_rs.Draft202012Validator({**spec, "$ref": f"#/components/schemas/{name}Response"}).validate(body)
        return body

    expected = [None,
                {"6": {"logprob": -0.75, "rank": 2, "decoded_token": " big"},
                 "8": {"logprob": -0.75, "rank": 1, "decoded_token": "B"}},
                {"7": {"logprob": -9999.0, "rank": 49152, "decoded_token": "!"},
                 "10": {"logprob": -0.5, "rank": 1, "decoded_token": "!"},
                 "11": {"logprob": -9999.0, "rank": 2, "decoded_token": "?"}}]
    completion = ask("/v1/completions", {"prompt": "A big"}, "Completion")
    assert [c["prompt_logprobs"] for c in completion["choices"]] == [expected, expected]
    assert [list(entry) for entry in expected[1:]] == [["6", "8"], ["7", "10", "11"]]
    assert [list(entry) for entry in completion["choices"][0]["prompt_logprobs"][1:]] == [["6", "8"], ["7", "10", "11"]]
    chat = ask("/v1/chat/completions", {"messages": [{"role": "user", "content": "A big"}]}, "ChatCompletion")
    assert chat["prompt_logprobs"] == expected and all("prompt_logprobs" not in c for c in chat["choices"])
    zero = client.post("/v1/completions", json={"prompt": "A big", "prompt_logprobs": 0}, headers=AUTH).get_json()
    assert zero["choices"][0]["prompt_logprobs"] == [None, {"6": {"logprob": -0.75, "rank": 2, "decoded_token": " big"}},
                                                     {"7": {"logprob": -9999.0, "rank": 49152, "decoded_token": "!"}}]
    plain = client.post("/v1/completions", json={"prompt": "A big"}, headers=AUTH).get_json()
    assert backend.last_params.sampling.prompt_logprobs is None and "prompt_logprobs" not in plain["choices"][0]


def test_prompt_logprobs_with_several_prompts_gives_each_choice_its_prompts(tmp_path):
    def script(params):
        ids = tuple(ord(c) for c in params.prompt)
        tokens = TokenLogprobs(tuple(params.prompt), ids, (math.nan,) + (-1.0,) * (len(ids) - 1),
                               ((),) * len(ids), ((),) * len(ids))
        return [TextDelta("x"), Finished("eos_token", prompt_tokens=len(ids), completion_tokens=1,
                                         prompt_logprobs=(PromptLogprobs(tokens, (0,) + (3,) * (len(ids) - 1)),))]

    client = make_openai_app(tmp_path, backend=FakeBackend(script=script))[0].test_client()
    response = client.post("/v1/completions", json={"prompt": ["ab", "c"], "n": 2, "prompt_logprobs": 0}, headers=AUTH)
    assert response.status_code == 200
    shown = sorted((c["index"], c["prompt_logprobs"]) for c in response.get_json()["choices"])
    b = {"98": {"logprob": -1.0, "rank": 3, "decoded_token": "b"}}
    assert shown == [(0, [None, b]), (1, [None, b]), (2, [None]), (3, [None])]


@pytest.mark.parametrize("body,message", [
    ({"prompt_logprobs": 2, "stream": True}, "stream"),
    ({"prompt_logprobs": 21}, "between 0 and 20"),
    ({"prompt_logprobs": -1}, "between 0 and 20"),
    ({"prompt_logprobs": True}, "integer"),
])
@pytest.mark.parametrize("path,request_body", [("/v1/completions", {"prompt": "Hi"}),
                                               ("/v1/chat/completions",
                                                {"messages": [{"role": "user", "content": "Hi"}]})])
def test_prompt_logprobs_out_of_range_or_streamed_is_a_400(client, body, message, path, request_body):
    response = client.post(path, json={**request_body, **body}, headers=AUTH)
    error = response.get_json()["error"]
    assert response.status_code == 400 and error["param"] == "prompt_logprobs" and message in error["message"]


def stops_script(params):
    """Each prompt's two choices: the first stopped by a stop sequence, the second by a stop
    token; with n = 1 (and the second prompt), one that the end token ended."""
    n = params.sampling.n
    ends = (ChoiceEnd(0, "stop_sequence", 1, stop="END"), ChoiceEnd(1, "stop_sequence", 1, stop=42))[:n]
    if params.prompt == "second":
        ends = tuple(ChoiceEnd(i, "eos_token", 1) for i in range(n))
    return [*(TextDelta("ok", i) for i in range(n)),
            Finished(ends[0].finish_reason, prompt_tokens=1, completion_tokens=n, choices=ends)]


@pytest.mark.parametrize("stream", [False, True])
def test_stop_reason_names_the_stop_sequence_or_token_of_each_choice(tmp_path, stream):
    """vLLM's stop_reason: in every choice (streamed: in its finish chunk), the stop sequence
    it matched, the stop token's id, or null; several prompts: each its own; described by the
    document."""
    client = make_openai_app(tmp_path, backend=FakeBackend(script=stops_script))[0].test_client()
    spec = client.get("/openapi.json").get_json()

    def ask(path, body, name):
        response = client.post(path, json={"model": MODEL, "stream": stream, **body}, headers=AUTH)
        assert response.status_code == 200, response.get_data(as_text=True)
        bodies = sse_data(response)[:-1] if stream else [response.get_json()]
        ref = f"#/components/schemas/{name}{'Chunk' if stream else 'Response'}"
        for one in bodies:
            jsonschema_rs.Draft202012Validator({**spec, "$ref": ref}).validate(one)
        choices = [c for one in bodies for c in one["choices"]]
        if stream:
            assert all("stop_reason" not in c for c in choices if c["finish_reason"] is None)
            choices = [c for c in choices if c["finish_reason"] is not None]
        return sorted((c["index"], c["stop_reason"]) for c in choices)

    completions = ask("/v1/completions", {"prompt": ["first", "second"], "n": 2}, "Completion")
    assert completions == [(0, "END"), (1, 42), (2, None), (3, None)]
    chat = ask("/v1/chat/completions", {"messages": [{"role": "user", "content": "first"}], "n": 2}, "ChatCompletion")
    assert chat == [(0, "END"), (1, 42)]
    one = ask("/v1/completions", {"prompt": "first"}, "Completion")
    assert one == [(0, "END")]


def test_add_special_tokens_defaults_to_true_on_completions_and_false_on_chat(client, backend):
    """vLLM's defaults: a completion's prompt gets the tokenizer's special tokens (a BOS); a
    chat template's rendering has its own (a Llama 3 template writes <|begin_of_text|>, which the
    tokenizer would add again); each can be asked the other way; documented."""
    chat = {"messages": [{"role": "user", "content": "Hi"}]}
    for path, body, expected in (("/v1/completions", {"prompt": "Hi"}, True), ("/v1/chat/completions", chat, False)):
        for given in (None, True, False):
            extra = {} if given is None else {"add_special_tokens": given}
            assert client.post(path, json={**body, **extra}, headers=AUTH).status_code == 200
            assert backend.last_params.add_special_tokens is (expected if given is None else given), (path, given)
    bad = client.post("/v1/chat/completions", json={**chat, "add_special_tokens": "no"}, headers=AUTH)
    assert bad.status_code == 400 and bad.get_json()["error"]["param"] == "add_special_tokens"
    spec = client.get("/openapi.json").get_json()["components"]["schemas"]
    assert "add_special_tokens" in spec["ChatCompletionRequest"]["properties"]


@pytest.mark.parametrize("path,body", [("/v1/completions", {"prompt": "Hi"}),
                                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})])
def test_cache_salt_goes_to_the_llm_model_and_must_be_a_non_empty_string(client, backend, path, body):
    assert client.post(path, json={**body, "cache_salt": "tenant-a"}, headers=AUTH).status_code == 200
    assert backend.last_params.sampling.cache_salt == "tenant-a"
    assert client.post(path, json=body, headers=AUTH).status_code == 200
    assert backend.last_params.sampling.cache_salt is None
    for bad in ("", 5, "x" * 1025):
        response = client.post(path, json={**body, "cache_salt": bad}, headers=AUTH)
        assert response.status_code == 400 and response.get_json()["error"]["param"] == "cache_salt", bad


@pytest.mark.parametrize("path,body", [("/v1/completions", {"prompt": "Hi"}), ("/generate", {"prompt": "Hi"}),
                                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
                                       ("/v1/responses", {"input": "Hi"})])
def test_priority_goes_to_the_llm_model_and_must_be_an_int32(client, backend, path, body):
    for given in (-3, 0, 2**31 - 1, -(2**31)):
        assert client.post(path, json={**body, "priority": given}, headers=AUTH).status_code == 200
        assert backend.last_params.sampling.priority == given
    assert client.post(path, json=body, headers=AUTH).status_code == 200
    assert backend.last_params.sampling.priority is None
    for bad in (1.5, "1", True, 2**31, -(2**31) - 1):
        response = client.post(path, json={**body, "priority": bad}, headers=AUTH)
        assert response.status_code == 400 and response.get_json()["error"]["param"] == "priority", bad


def test_request_id_names_the_request_and_the_reply_as_vllms(tmp_path):
    """vLLM's request_id: the reply's id (chatcmpl-<id>, cmpl-<id>, every streamed chunk's), the
    request's id (X-Request-ID answered, the backend's request id, the log line) unless the
    client sent X-Request-ID, which names the request first; Responses: the request's only (a
    stored response's id is the gateway's); not a tame id: a 400 naming it."""
    from test_gateway_anthropic import make_app

    flask_app, backend, web, _ = make_app(tmp_path)
    chat = {"messages": [{"role": "user", "content": "Hi"}], "request_id": "job-7:a"}
    response = web.post("/v1/chat/completions", json=chat, headers=AUTH)
    assert response.get_json()["id"] == "chatcmpl-job-7:a" and response.headers["X-Request-ID"] == "job-7:a"
    assert backend.calls[-1][1] == "job-7:a"
    chunks = [c for c in sse_data(web.post("/v1/chat/completions", json={**chat, "stream": True}, headers=AUTH))
              if c != "[DONE]"]
    assert {c["id"] for c in chunks} == {"chatcmpl-job-7:a"}
    response = web.post("/v1/completions", json={"prompt": "Hi", "request_id": "job-8"}, headers=AUTH)
    assert response.get_json()["id"] == "cmpl-job-8" and backend.calls[-1][1] == "job-8"
    response = web.post("/v1/chat/completions", json=chat, headers={**AUTH, "X-Request-ID": "from-header"})
    assert response.get_json()["id"] == "chatcmpl-job-7:a" and response.headers["X-Request-ID"] == "from-header"
    assert backend.calls[-1][1] == "from-header"
    response = web.post("/v1/responses", json={"input": "Hi", "request_id": "job-9"}, headers=AUTH)
    assert response.get_json()["id"].startswith("resp_") and backend.calls[-1][1] == "job-9"
    assert response.headers["X-Request-ID"] == "job-9"
    for bad in ("two words", "", "x" * 129, 5):
        for path, body in (("/v1/chat/completions", chat), ("/v1/completions", {"prompt": "Hi"}),
                           ("/v1/responses", {"input": "Hi"})):
            response = web.post(path, json={**body, "request_id": bad}, headers=AUTH)
            assert response.status_code == 400 and response.get_json()["error"]["param"] == "request_id", (path, bad)
