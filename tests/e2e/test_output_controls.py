"""Output controls on the real stack (issue 15): the official ``openai`` client and raw
``/generate`` against the gunicorn gateway, Triton's ``llm`` model and the CPU engine.

Log-probabilities are the model's raw distribution (docs/api.md): under greedy decoding the
chosen token is the best alternative, with the same value.
"""
import concurrent.futures as cf
import json
import math

import jsonschema_rs
import openai
import pytest
import requests
from testkit import model_dir

from e2e_helpers import API_KEY, AUTH, sse_events

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m-instruct"
CAPITAL = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0},
                   "city": {"type": "string", "maxLength": 40}},
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}


@pytest.fixture
def oai(gateway):
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=API_KEY, max_retries=0)


def generate(gateway, **body):
    r = requests.post(gateway.url + "/generate", json=body, headers=AUTH, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_chat_top_logprobs_under_greedy(oai):
    out = oai.chat.completions.create(model=MODEL, messages=CAPITAL, max_tokens=12, temperature=0, logprobs=True,
                                      top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert "".join(t.token for t in content) == out.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3
        values = [a.logprob for a in t.top_logprobs]
        assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)
        assert t.top_logprobs[0].token == t.token and math.isclose(t.top_logprobs[0].logprob, t.logprob,
                                                                   abs_tol=1e-6)
        assert sum(math.exp(v) for v in values) <= 1 + 1e-4
        assert bytes(t.bytes).decode("utf-8", "replace") == t.token or "\ufffd" in t.token


def test_return_tokens_as_token_ids_names_every_token_and_alternative_by_its_id(oai, gateway):
    """vLLM's return_tokens_as_token_ids on the real stack: the same greedy generation names its
    tokens "token_id:<id>", ids whose text (/detokenize) is each token's text, the best
    alternative the chosen id with the same log-probability; whole and streamed, completions
    and chat."""
    def text_of(ids):
        r = requests.post(gateway.url + "/detokenize", json={"model": MODEL, "tokens": ids}, headers=AUTH, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()["prompt"]

    def ids_of(names):
        assert all(name.startswith("token_id:") for name in names), names
        return [int(name.split(":", 1)[1]) for name in names]

    asked = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0, "logprobs": 3}
    plain = oai.completions.create(**asked).choices[0]
    named = oai.completions.create(**asked, extra_body={"return_tokens_as_token_ids": True}).choices[0]
    assert named.text == plain.text and named.logprobs.token_logprobs == plain.logprobs.token_logprobs
    ids = ids_of(named.logprobs.tokens)
    assert [text_of([i]) for i in ids] == plain.logprobs.tokens and text_of(ids) == named.text
    assert named.logprobs.text_offset == plain.logprobs.text_offset  # offsets in the text, as before
    for chosen, lp, top in zip(ids, named.logprobs.token_logprobs, named.logprobs.top_logprobs):
        assert len(top) == 3 and set(ids_of(list(top))) >= {chosen}
        best = max(top, key=top.get)
        assert ids_of([best]) == [chosen] and math.isclose(top[best], lp, abs_tol=1e-6)
    chat = {"model": MODEL, "messages": CAPITAL, "max_tokens": 10, "temperature": 0, "logprobs": True,
            "top_logprobs": 2, "extra_body": {"return_tokens_as_token_ids": True}}
    whole = oai.chat.completions.create(**chat).choices[0]
    content = whole.logprobs.content
    assert text_of(ids_of([t.token for t in content])) == whole.message.content
    assert b"".join(bytes(t.bytes) for t in content).decode() == whole.message.content  # bytes: the texts'
    assert all(ids_of([t.top_logprobs[0].token]) == ids_of([t.token]) for t in content)
    streamed = [t.token for chunk in oai.chat.completions.create(**chat, stream=True)
                if chunk.choices and chunk.choices[0].logprobs for t in chunk.choices[0].logprobs.content]
    assert streamed == [t.token for t in content]


def test_return_token_ids_gives_the_ids_the_engine_got_and_generated(oai, gateway):
    """vLLM's return_token_ids on the real stack: prompt_token_ids are /tokenize's ids of the
    prompt (of the rendered conversation for chat; the kept ones with truncate_prompt_tokens),
    token_ids detokenize to each choice's text; streamed, the same ids a chunk at a time."""
    def post(path, body):
        r = requests.post(gateway.url + path, json={"model": MODEL, **body}, headers=AUTH, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()

    prompt = "The capital of France is"
    asked = {"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0,
             "extra_body": {"return_token_ids": True}}
    whole = oai.completions.create(**asked).model_dump()["choices"][0]
    ids = post("/tokenize", {"prompt": prompt})["tokens"]
    assert whole["prompt_token_ids"] == ids and whole["logprobs"] is None
    assert post("/detokenize", {"tokens": whole["token_ids"]})["prompt"] == whole["text"] and whole["token_ids"]
    chunks = [c.model_dump()["choices"][0] for c in oai.completions.create(**asked, stream=True)]
    assert [c["prompt_token_ids"] for c in chunks if c["prompt_token_ids"]] == [ids]
    assert [i for c in chunks for i in c["token_ids"] or []] == whole["token_ids"]
    cut = oai.completions.create(**{**asked, "extra_body": {"return_token_ids": True, "truncate_prompt_tokens": 3}})
    assert cut.model_dump()["choices"][0]["prompt_token_ids"] == ids[-3:]
    chat = {"model": MODEL, "messages": CAPITAL, "max_tokens": 10, "temperature": 0, "n": 2,
            "extra_body": {"return_token_ids": True}}
    answer = oai.chat.completions.create(**chat).model_dump()
    assert answer["prompt_token_ids"] == post("/tokenize", {"messages": CAPITAL})["tokens"]
    for choice in answer["choices"]:
        assert post("/detokenize", {"tokens": choice["token_ids"]})["prompt"] == choice["message"]["content"]
    streamed = [c.model_dump() for c in oai.chat.completions.create(**chat, stream=True)]
    assert [c["prompt_token_ids"] for c in streamed if c.get("prompt_token_ids")] == [answer["prompt_token_ids"]] * 2
    for index in (0, 1):
        got = [i for c in streamed for ch in c["choices"] if ch["index"] == index for i in ch["token_ids"] or []]
        assert got == answer["choices"][index]["token_ids"]


def test_prompt_logprobs_score_each_prompt_token_as_echo_does_with_ranks(oai, gateway):
    """vLLM's prompt_logprobs on the real stack (CPU engine): one entry per /tokenize id of the
    prompt (null first); each holds the prompt's token with the log-probability echo's logprobs
    give it, and the k best with echo's values, ranks 1..k; the token's rank agrees with them;
    decoded_token is /detokenize's text of the id alone; the text is the greedy text without
    the field. Chat: beside the choices, one per token of the rendered conversation. Streamed: 400."""
    def post(path, body):
        r = requests.post(gateway.url + path, json={"model": MODEL, **body}, headers=AUTH, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()

    prompt = "The capital of France is"
    asked = {"prompt": prompt, "max_tokens": 6, "temperature": 0}
    scored = post("/v1/completions", {**asked, "prompt_logprobs": 3})["choices"][0]
    echoed = post("/v1/completions", {**asked, "echo": True, "logprobs": 3, "max_tokens": 0})["choices"][0]["logprobs"]
    plain = post("/v1/completions", asked)["choices"][0]
    assert scored["text"] == plain["text"] and "prompt_logprobs" not in plain
    ids = post("/tokenize", {"prompt": prompt})["tokens"]
    entries = scored["prompt_logprobs"]
    assert len(entries) == len(ids) == len(echoed["token_logprobs"]) and entries[0] is None
    for i, (entry, token_id) in enumerate(zip(entries[1:], ids[1:]), start=1):
        own = entry[str(token_id)]
        assert list(entry)[0] == str(token_id) and own["logprob"] == pytest.approx(echoed["token_logprobs"][i], abs=1e-6)
        best = sorted(((v["rank"], v["logprob"]) for k, v in entry.items() if k != str(token_id) or v["rank"] <= 3))
        assert [r for r, _ in best] == list(range(1, 4))
        assert [lp for _, lp in best] == pytest.approx(sorted(echoed["top_logprobs"][i].values(), reverse=True)[:3],
                                                       abs=1e-6)
        assert own["rank"] >= 1 and (own["rank"] == 1) == (own["logprob"] >= best[0][1])
        assert own["decoded_token"] == post("/detokenize", {"tokens": [token_id]})["prompt"]
    assert any(entry[str(t)]["rank"] > 3 for entry, t in zip(entries[1:], ids[1:]))  # a token outside the 3 best
    chat = post("/v1/chat/completions", {"messages": CAPITAL, "max_tokens": 4, "prompt_logprobs": 0})
    conversation = post("/tokenize", {"messages": CAPITAL})["tokens"]
    assert [None if e is None else list(e) for e in chat["prompt_logprobs"]] == [None] + [[str(t)] for t in
                                                                                         conversation[1:]]
    streamed = requests.post(gateway.url + "/v1/completions", json={**asked, "prompt_logprobs": 1, "stream": True},
                             headers=AUTH, timeout=60)
    assert streamed.status_code == 400 and streamed.json()["error"]["param"] == "prompt_logprobs"


@pytest.mark.parametrize("chat", [False, True])
def test_continuous_usage_stats_counts_each_choices_tokens_as_they_stream(oai, chat):
    """vLLM's continuous_usage_stats on the real stack: every chunk's usage is the prompt's
    tokens and its choice's tokens so far, which are the ids streamed so far (return_token_ids);
    the last chunk's usage sums the choices."""
    extra = {"return_token_ids": True}
    options = {"include_usage": True, "continuous_usage_stats": True}
    common = {"model": MODEL, "max_tokens": 12, "temperature": 0, "n": 2, "stream": True,
              "stream_options": options, "extra_body": extra}
    stream = (oai.chat.completions.create(messages=CAPITAL, **common) if chat
              else oai.completions.create(prompt="The capital of France is", **common))
    chunks = [c.model_dump() for c in stream]
    *steps, last = chunks
    assert last["choices"] == [] and steps
    prompt_tokens = last["usage"]["prompt_tokens"]
    ids: dict[int, int] = {}
    for chunk in steps:
        choice, usage = chunk["choices"][0], chunk["usage"]
        ids[choice["index"]] = ids.get(choice["index"], 0) + len(choice["token_ids"] or [])
        assert usage["prompt_tokens"] == prompt_tokens
        assert usage["completion_tokens"] == ids[choice["index"]] or choice["finish_reason"] is not None
        assert usage["total_tokens"] == prompt_tokens + usage["completion_tokens"]
    finals = {c["choices"][0]["index"]: c["usage"]["completion_tokens"] for c in steps if c["choices"][0]["finish_reason"]}
    assert sorted(finals) == [0, 1] and sum(finals.values()) == last["usage"]["completion_tokens"]
    assert all(finals[i] >= ids[i] for i in finals)  # a stop token left out of the text is still counted


def test_generate_logprobs_streamed_and_not_agree_and_line_up_with_the_text(gateway):
    body = {"prompt": "The capital of France is", "max_new_tokens": 12, "temperature": 0, "logprobs": 2,
            "stop_sequences": ["\n\n"]}
    choice = generate(gateway, **body)["choices"][0]
    lp = choice["logprobs"]
    assert "".join(lp["tokens"]) == choice["text"]
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(lp["tokens"]))]
    assert all(len(top) in (2, 3) and top[tok] == v for top, tok, v in zip(lp["top_logprobs"], lp["tokens"],
                                                                             lp["token_logprobs"]))
    with requests.post(gateway.url + "/generate", json={**body, "stream": True}, headers=AUTH, stream=True,
                       timeout=120) as r:
        events = sse_events(r)
    tokens = [data for name, data in events if name == "token"]
    streamed = [v for t in tokens for v in t["logprobs"]["token_logprobs"]]
    assert "".join(t["text"] for t in tokens) == choice["text"]
    assert [tok for t in tokens for tok in t["logprobs"]["tokens"]] == lp["tokens"]
    assert streamed == pytest.approx(lp["token_logprobs"], abs=1e-6)
    assert [o for t in tokens for o in t["logprobs"]["text_offset"]] == lp["text_offset"]


def test_n_choices_greedy_identical_sampled_distinct_and_seeded(oai, gateway):
    greedy = oai.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0, n=3)
    assert len(greedy.choices) == 3 and len({c.text for c in greedy.choices}) == 1
    assert greedy.usage.completion_tokens == 3 * 12
    sampled = oai.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=1.0, n=4,
                                     seed=11)
    assert [c.index for c in sampled.choices] == [0, 1, 2, 3] and len({c.text for c in sampled.choices}) >= 3
    again = oai.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=1.0, n=4,
                                   seed=11)
    assert [c.text for c in again.choices] == [c.text for c in sampled.choices]
    one = oai.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=1.0, seed=11)
    assert one.choices[0].text == sampled.choices[0].text  # choice 0 is the n=1 stream
    chunks = list(oai.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=1.0,
                                         n=4, seed=11, stream=True))
    texts = ["".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i) for i in range(4)]
    assert texts == [c.text for c in sampled.choices]


def test_best_of_returns_the_choice_with_the_highest_sum_of_logprobs(oai):
    kwargs = dict(model=MODEL, prompt="My favourite colour is", max_tokens=8, temperature=1.0, seed=5)
    all3 = oai.completions.create(n=3, logprobs=0, **kwargs)
    sums = [sum(c.logprobs.token_logprobs) for c in all3.choices]
    best = oai.completions.create(best_of=3, **kwargs)
    assert len(best.choices) == 1 and best.choices[0].logprobs is None
    assert best.choices[0].text == all3.choices[max(range(3), key=sums.__getitem__)].text
    assert best.usage.completion_tokens == all3.usage.completion_tokens


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_output_parses_and_validates(oai, stream):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    prompts = ["Invent a person.", "Describe a pilot from Lyon.", "A fictional painter, please.",
               "Tell me about a baker.", "Make up a student in Tokyo.", "Describe your neighbour.",
               "A chess player from Oslo.", "Someone who loves cats.", "An old sailor.", "A young chef.",
               "A famous scientist.", "A nurse from Madrid.", "Describe a farmer.", "A teacher who likes jazz.",
               "Invent a football player.", "A librarian in Dublin.", "Someone who builds boats.",
               "A poet from Chile.", "A taxi driver in New York.", "A retired astronaut."]

    def ask(prompt):
        messages = [{"role": "user", "content": prompt + " Answer in JSON."}]
        if not stream:
            out = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=96, temperature=0.7, seed=1,
                                              response_format=fmt)
            return out.choices[0].message.content, out.choices[0].finish_reason
        chunks = list(oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=96, temperature=0.7,
                                                  seed=1, response_format=fmt, stream=True))
        return ("".join(c.choices[0].delta.content or "" for c in chunks if c.choices),
                [c.choices[0].finish_reason for c in chunks if c.choices][-1])

    with cf.ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(ask, prompts))
    for text, reason in results:
        assert reason == "stop", text
        jsonschema_rs.validate(PERSON, json.loads(text))


def test_json_object_and_regex_on_generate(gateway):
    out = generate(gateway, prompt="A JSON object describing a dog:", max_new_tokens=64, temperature=0,
                   response_format={"type": "json_object"})["choices"][0]
    assert out["finish_reason"] == "eos_token" and isinstance(json.loads(out["text"]), dict)
    date = generate(gateway, prompt="Today's date is", max_new_tokens=16, temperature=0,
                    regex=r" [0-9]{4}-[0-9]{2}-[0-9]{2}")["choices"][0]
    assert date["finish_reason"] == "eos_token"
    assert len(date["text"]) == 11 and date["text"][5] == "-" and date["text"][1:5].isdigit()


def test_bad_guides_are_400s_naming_the_field(gateway, oai):
    r = requests.post(gateway.url + "/generate", json={"prompt": "x", "regex": "(a"}, headers=AUTH, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "regex", r.text
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}
    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(model=MODEL, messages=CAPITAL, response_format=bad)
    assert caught.value.body["param"] == "response_format"


def test_structured_outputs_constrain_both_openai_endpoints(oai):
    """vLLM's structured_outputs through the official client (extra_body) on the real engine:
    choice gives exactly one of the strings, regex and grammar match, json validates; streamed
    the same; a regex XGrammar cannot take is a 400 naming structured_outputs."""
    review = [{"role": "user", "content": "Is this review positive or negative? 'I loved every minute.'"}]
    choices = ["positive", "negative", "mixed"]
    picked = oai.chat.completions.create(model=MODEL, messages=review, temperature=0, max_tokens=10,
                                         extra_body={"structured_outputs": {"choice": choices}})
    assert picked.choices[0].message.content in choices and picked.choices[0].finish_reason == "stop"
    streamed = oai.chat.completions.create(model=MODEL, messages=review, temperature=0, max_tokens=10, stream=True,
                                           extra_body={"structured_outputs": {"choice": choices}})
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == \
        picked.choices[0].message.content
    for temperature in (0.0, 1.5):  # sampling hot does not leave the choices either
        hot = oai.chat.completions.create(model=MODEL, messages=review, temperature=temperature, max_tokens=10, n=4,
                                          seed=7, extra_body={"structured_outputs": {"choice": choices}})
        assert all(c.message.content in choices for c in hot.choices)
    date = oai.completions.create(model=MODEL, prompt="Today's date is", temperature=0, max_tokens=16,
                                  extra_body={"structured_outputs": {"regex": r" [0-9]{4}-[0-9]{2}-[0-9]{2}"}})
    text = date.choices[0].text
    assert len(text) == 11 and text[5] == "-" and text[8] == "-" and text[1:5].isdigit()
    answer = oai.completions.create(model=MODEL, prompt="Is Paris in France? Answer:", temperature=0, max_tokens=8,
                                    extra_body={"structured_outputs": {"grammar": 'root ::= " " ("yes" | "no") "."'}})
    assert answer.choices[0].text in (" yes.", " no.")
    person = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Invent a person."}],
                                         temperature=0, max_tokens=96,
                                         extra_body={"structured_outputs": {"json": PERSON}})
    jsonschema_rs.validate(PERSON, json.loads(person.choices[0].message.content))
    with pytest.raises(openai.BadRequestError) as caught:
        oai.completions.create(model=MODEL, prompt="x", extra_body={"structured_outputs": {"regex": "(a"}})
    assert caught.value.body["param"] == "structured_outputs"


def test_stop_token_ids_and_included_stops_on_the_real_model(oai, gateway):
    """vLLM's stop_token_ids and include_stop_str_in_output through the official client: a token
    of the greedy continuation ends it there (finish_reason stop, text before it), its text kept
    with include_stop_str_in_output, as is a stop sequence; streamed the same."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir()))
    kwargs = dict(model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0)
    full = oai.completions.create(**kwargs).choices[0].text
    ids = tokenizer(full, add_special_tokens=False).input_ids
    stop = ids[2]  # a token in the middle of the greedy continuation
    before = tokenizer.decode(ids[:ids.index(stop)])
    cut = oai.completions.create(**kwargs, extra_body={"stop_token_ids": [stop]}).choices[0]
    assert (cut.text, cut.finish_reason) == (before, "stop")
    kept = oai.completions.create(**kwargs, extra_body={"stop_token_ids": [stop], "include_stop_str_in_output": True})
    assert kept.choices[0].text == tokenizer.decode(ids[:ids.index(stop) + 1])
    chunks = oai.completions.create(**kwargs, stream=True, extra_body={"stop_token_ids": [stop]})
    assert "".join(c.choices[0].text for c in chunks if c.choices) == before
    generated = generate(gateway, prompt=kwargs["prompt"], max_new_tokens=12, temperature=0,
                         stop_token_ids=[stop])  # /generate takes them too
    [choice] = generated["choices"]
    assert choice["text"] == before and choice["finish_reason"] == "stop_sequence"
    word = full.split()[1]
    with_stop = oai.completions.create(**kwargs, stop=[word], extra_body={"include_stop_str_in_output": True})
    assert with_stop.choices[0].text == full[:full.index(word) + len(word)]
    assert with_stop.choices[0].finish_reason == "stop"


def test_stop_reason_is_the_stop_sequence_or_token_that_ended_the_choice(oai):
    """vLLM's stop_reason on the real stack: the stop sequence the greedy text met (of two
    given), the id of a stop token, null at max_tokens and at the model's end token; streamed,
    in the finish chunk; chat too."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir()))
    kwargs = dict(model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0)
    full = oai.completions.create(**kwargs).choices[0]
    assert (full.finish_reason, full.model_extra["stop_reason"]) == ("length", None)
    word = full.text.split()[1]
    stop = tokenizer(full.text, add_special_tokens=False).input_ids[2]
    for extra, expected in (({"stop": ["never said here", word]}, word),
                            ({"extra_body": {"stop_token_ids": [stop]}}, stop)):
        choice = oai.completions.create(**kwargs, **extra).choices[0]
        assert (choice.finish_reason, choice.model_extra["stop_reason"]) == ("stop", expected)
        chunks = [c.choices[0] for c in oai.completions.create(**kwargs, **extra, stream=True) if c.choices]
        assert [(c.finish_reason, c.model_extra["stop_reason"]) for c in chunks if c.finish_reason] == [("stop", expected)]
    ended = oai.chat.completions.create(model=MODEL, messages=CAPITAL, max_tokens=60, temperature=0).choices[0]
    assert (ended.finish_reason, ended.model_extra["stop_reason"]) == ("stop", None)  # <|im_end|>, the end id
    said = ended.message.content.split()[2]
    cut = oai.chat.completions.create(model=MODEL, messages=CAPITAL, max_tokens=60, temperature=0, stop=[said])
    assert cut.choices[0].model_extra["stop_reason"] == said


def test_min_tokens_holds_back_stop_tokens_and_stop_sequences_on_the_real_model(oai, gateway):
    """vLLM's min_tokens: before that many tokens neither a stop_token_ids token nor a stop
    sequence ends the text; the CPU engine bans the stop token there, as vLLM (greedy then takes
    another token in its place); from the next token on they end it. ignore_eos alone keeps them
    (vLLM's bench clients send it with stops)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir()))
    kwargs = dict(model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0)
    full = oai.completions.create(**kwargs).choices[0].text
    ids = tokenizer(full, add_special_tokens=False).input_ids
    stop = ids[2]
    at = ids.index(stop)
    held = oai.completions.create(**kwargs, extra_body={"stop_token_ids": [stop], "min_tokens": at + 1}).choices[0]
    prefix = tokenizer.decode(ids[:at])
    assert held.text.startswith(prefix) and held.text != full, held.text
    assert not held.text[len(prefix):].startswith(tokenizer.decode([stop])), held.text
    cut = oai.completions.create(**kwargs, extra_body={"stop_token_ids": [stop], "min_tokens": at}).choices[0]
    assert (cut.text, cut.finish_reason) == (tokenizer.decode(ids[:at]), "stop")
    kept = oai.completions.create(**kwargs, extra_body={"stop_token_ids": [stop], "ignore_eos": True}).choices[0]
    assert (kept.text, kept.finish_reason) == (tokenizer.decode(ids[:at]), "stop")
    # a stop sequence: the text of its first token, which occurs once in the continuation
    word = next(t for t in (tokenizer.decode([i]).strip() for i in ids[1:]) if t and full.count(t) == 1)
    through = next(k for k in range(1, len(ids) + 1) if word in tokenizer.decode(ids[:k]))  # tokens up to it
    for min_tokens, text, reason in ((through, full, "length"), (through - 1, full[:full.index(word)], "stop")):
        streamed = oai.completions.create(**kwargs, stop=[word], stream=True, extra_body={"min_tokens": min_tokens})
        chunks = [c for c in streamed if c.choices]
        assert ("".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason) == (text, reason)
        generated = generate(gateway, prompt=kwargs["prompt"], max_new_tokens=12, temperature=0,
                             stop_sequences=[word], min_tokens=min_tokens)["choices"][0]
        assert generated["text"] == text


def test_skip_special_tokens_false_keeps_them_in_the_text_on_the_real_model(oai):
    """vLLM's skip_special_tokens: after a finished ChatML user turn the model opens the
    assistant's with <|im_start|>; by default that token is left out of the text, with false it
    is kept (streamed the same), and the rest of the text is the same."""
    prompt = "<|im_start|>user\nHi<|im_end|>\n"
    kwargs = dict(model=MODEL, prompt=prompt, max_tokens=4, temperature=0)
    kept = oai.completions.create(**kwargs, extra_body={"skip_special_tokens": False}).choices[0].text
    assert kept.startswith("<|im_start|>"), kept
    plain = oai.completions.create(**kwargs).choices[0].text
    assert "<|im_start|>" not in plain and plain == kept.replace("<|im_start|>", "")
    chunks = oai.completions.create(**kwargs, stream=True, extra_body={"skip_special_tokens": False})
    assert "".join(c.choices[0].text for c in chunks if c.choices) == kept


def test_frequency_penalty_two_stops_a_repeating_continuation(gateway):
    """ "la la la ..." goes on repeating greedily; at frequency_penalty 2 no token comes twice."""
    body = {"prompt": "la la la la la", "max_new_tokens": 6, "temperature": 0, "logprobs": 0}
    plain = generate(gateway, **body)["choices"][0]["logprobs"]["tokens"]
    penalized = generate(gateway, **body, frequency_penalty=2.0)["choices"][0]["logprobs"]["tokens"]
    assert len(plain) == 6 and len(plain) - len(set(plain)) >= 3, plain
    assert len(penalized) == len(set(penalized)), penalized


def test_logprobs_sum_to_the_engines_cum_log_probs(gateway, triton):
    """What /generate shows agrees with the engine's own scores, read over direct gRPC from the
    llm model: the same per-token values and their sum is its cum_log_probs."""
    import queue

    import numpy as np
    import tritonclient.grpc as grpcclient

    prompt = "The capital of France is"
    shown = generate(gateway, prompt=prompt, max_new_tokens=10, temperature=0, logprobs=0)["choices"][0]

    def tensor(name, value, dtype, datatype):
        t = grpcclient.InferInput(name, [1, 1], datatype)
        t.set_data_from_numpy(np.array([[value]], dtype=dtype))
        return t

    inputs = [tensor("text_input", prompt.encode(), object, "BYTES"), tensor("max_tokens", 10, np.int32, "INT32"),
              tensor("temperature", 0.0, np.float32, "FP32"), tensor("stream", True, np.bool_, "BOOL"),
              tensor("return_log_probs", True, np.bool_, "BOOL")]
    results: "queue.Queue" = queue.Queue()
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    client.async_stream_infer("llm", inputs, enable_empty_final_response=True)
    values, cum = [], None
    while True:
        result, error = results.get(timeout=120)
        assert error is None, error
        if result.as_numpy("output_log_probs") is not None:
            values.extend(result.as_numpy("output_log_probs").reshape(-1).tolist())
        if result.as_numpy("cum_log_probs") is not None:
            cum = float(result.as_numpy("cum_log_probs").reshape(-1)[0])
        if result.get_response().parameters["triton_final_response"].bool_param:
            break
    client.stop_stream()
    client.close()
    token_logprobs = shown["logprobs"]["token_logprobs"]
    assert values == pytest.approx(token_logprobs, abs=1e-6)
    assert cum is not None and abs(sum(token_logprobs) - cum) < 1e-3


def test_penalties_reduce_repetition(gateway):
    body = {"prompt": "1, 2, 3, 4, 5, 6,", "max_new_tokens": 24, "temperature": 0, "logprobs": 0}

    def repeats(**extra):
        tokens = generate(gateway, **body, **extra)["choices"][0]["logprobs"]["tokens"]
        return len(tokens) - len(set(tokens))

    plain = repeats()
    assert plain >= 8  # " 7, 8, 9, ...": the comma over and over
    assert repeats(frequency_penalty=2.0) < plain
    assert repeats(presence_penalty=2.0) < plain


def test_logit_bias_bans_and_forces_a_token_and_min_tokens_holds_off_the_end(gateway):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir()))
    paris = tok(" Paris", add_special_tokens=False).input_ids
    assert len(paris) == 1
    body = {"prompt": "The capital of France is", "max_new_tokens": 4, "temperature": 0}
    assert generate(gateway, **body)["choices"][0]["text"].startswith(" Paris")
    banned = generate(gateway, **body, logit_bias={str(paris[0]): -100})["choices"][0]["text"]
    assert "Paris" not in banned
    forced = generate(gateway, **{**body, "prompt": "My dog is called"}, logit_bias={str(paris[0]): 100})
    assert forced["choices"][0]["text"] == " Paris" * 4
    short = {"prompt": "Say yes.", "max_new_tokens": 40, "temperature": 0}
    ended = generate(gateway, **short)
    natural = ended["usage"]["completion_tokens"]
    assert ended["choices"][0]["finish_reason"] == "eos_token" and natural < 30
    held = generate(gateway, **short, min_tokens=natural + 5)
    assert held["usage"]["completion_tokens"] >= natural + 5
    # min_tokens bans the stop tokens too (vLLM's; the CPU engine): a forced stop token comes only
    # once min_tokens tokens are there, and ends the text at once (counted, its text left out)
    stopped = generate(gateway, **{**body, "prompt": "My dog is called", "max_new_tokens": 8},
                       logit_bias={str(paris[0]): 100}, stop_token_ids=[paris[0]], min_tokens=3)
    [choice] = stopped["choices"]
    assert (stopped["usage"]["completion_tokens"], choice["finish_reason"]) == (3 + 1, "stop_sequence"), stopped
    assert "Paris" not in choice["text"] and choice["text"].strip(), stopped
    # with ignore_eos as well (vLLM bans them then too): the end token never, the stop token
    # from min_tokens on
    stopped = generate(gateway, **{**body, "prompt": "My dog is called", "max_new_tokens": 8},
                       logit_bias={str(paris[0]): 100}, stop_token_ids=[paris[0]], min_tokens=3, ignore_eos=True)
    [choice] = stopped["choices"]
    assert (stopped["usage"]["completion_tokens"], choice["finish_reason"]) == (3 + 1, "stop_sequence"), stopped
    assert "Paris" not in choice["text"] and choice["text"].strip(), stopped


def test_bad_words_keep_words_out_of_the_output_on_the_real_model(oai, gateway):
    """vLLM's bad_words through the llm model and the CPU engine: a greedy answer that names
    Paris (its own token, " Paris" inside the sentence) no longer does; a word of several tokens
    is kept out too (the engine bans its last token after the others); /generate takes the same."""
    settings = {"model": MODEL, "messages": CAPITAL, "temperature": 0, "max_tokens": 24}
    plain = oai.chat.completions.create(**settings).choices[0].message.content
    assert "Paris" in plain, plain
    banned = oai.chat.completions.create(**settings, extra_body={"bad_words": ["Paris"]}).choices[0].message.content
    assert "Paris" not in banned and banned != plain, banned
    word, prompt, text = multi_token_word(gateway)
    kept_out = generate(gateway, prompt=prompt, max_new_tokens=16, temperature=0, bad_words=[word])["choices"][0]["text"]
    assert word not in kept_out and kept_out != text, (word, text, kept_out)
    streamed = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stream=True,
                                      extra_body={"bad_words": [word]})
    assert "".join(chunk.choices[0].text for chunk in streamed) == kept_out


def multi_token_word(gateway) -> tuple[str, str, str]:
    """A word of several tokens (after a space) in a greedy continuation, its prompt and the
    continuation (SmolLM2's common words are one token each: rarer ones are looked for)."""
    for prompt in ("The scientific name of the house cat is", "The chemical formula of caffeine is",
                   "Albert Einstein was born in"):
        text = generate(gateway, prompt=prompt, max_new_tokens=16, temperature=0)["choices"][0]["text"]
        for word in (w.strip(".,;:!?()") for w in text.split()):
            if word.isalpha() and requests.post(gateway.url + "/tokenize", json={"prompt": " " + word}, headers=AUTH,
                                                timeout=30).json()["count"] > 1:
                return word, prompt, text
    pytest.fail("no greedy continuation has a word of several tokens")


def test_allowed_token_ids_restrict_sampled_output_on_the_real_model(oai, gateway):
    """vLLM's allowed_token_ids through the gateway, llm (the dense embedding_bias) and the CPU
    engine: sampled choices, streamed and not, hold only the allowed tokens (each token's text,
    from logprobs); the same request without it does not."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir()))
    words = (" yes", " no", " maybe", " Paris", ",")
    allowed = [tok(w, add_special_tokens=False).input_ids[0] for w in words]
    assert [tok.decode([i]) for i in allowed] == list(words)
    body = {"prompt": "Write a long story about a dragon:", "max_new_tokens": 12, "temperature": 1.3, "n": 3,
            "seed": 11, "logprobs": 0}
    free = generate(gateway, **body)
    assert any(t not in words for c in free["choices"] for t in c["logprobs"]["tokens"]), free
    restricted = generate(gateway, **body, allowed_token_ids=allowed)
    for choice in restricted["choices"]:
        tokens = choice["logprobs"]["tokens"]
        assert len(tokens) == 12 and set(tokens) <= set(words), choice
        assert choice["finish_reason"] == "length"  # the end token is not allowed either
    streamed = oai.completions.create(model=MODEL, prompt=body["prompt"], max_tokens=12, temperature=1.3, n=2,
                                      seed=3, stream=True, logprobs=0, extra_body={"allowed_token_ids": allowed})
    tokens = {}
    for chunk in streamed:
        for c in chunk.choices:
            tokens.setdefault(c.index, []).extend(c.logprobs.tokens if c.logprobs else [])
    assert sorted(tokens) == [0, 1]
    for seen in tokens.values():
        assert len(seen) == 12 and set(seen) <= set(words), seen


def test_truncate_prompt_tokens_serves_a_prompt_longer_than_the_context(oai, gateway):
    """vLLM's truncate_prompt_tokens on the real stack: a prompt of about 3,000 tokens (the
    context is 2,048) is a 400 as it is, served with its last 100 tokens, or with as many as fit
    (-1), on /generate and chat; usage counts the tokens the engine was given."""
    long_text = "The quick brown fox jumps over the lazy dog. " * 300
    refused = requests.post(gateway.url + "/generate", json={"prompt": long_text, "max_new_tokens": 8},
                            headers=AUTH, timeout=120)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "prompt", refused.text
    kept = generate(gateway, prompt=long_text, max_new_tokens=8, temperature=0, truncate_prompt_tokens=100)
    assert kept["usage"]["prompt_tokens"] == 100 and kept["usage"]["completion_tokens"] >= 1
    most = generate(gateway, prompt=long_text, max_new_tokens=48, temperature=0, truncate_prompt_tokens=-1)
    assert most["usage"]["prompt_tokens"] == 2048 - 48
    echoed = oai.completions.create(model=MODEL, prompt=long_text, max_tokens=2, temperature=0, echo=True,
                                    extra_body={"truncate_prompt_tokens": 6})
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir()))
    last = tok.decode(tok(long_text).input_ids[-6:])  # the echo is the text of the tokens kept
    assert last.startswith(" over the lazy dog.")
    assert echoed.usage.prompt_tokens == 6 and echoed.choices[0].text.startswith(last)
    assert len(echoed.choices[0].text) > len(last)
    chat = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": long_text + "Say hi."}],
                                       max_tokens=8, temperature=0, extra_body={"truncate_prompt_tokens": -1})
    assert chat.usage.prompt_tokens == 2048 - 8 and chat.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as err:  # more than the context: the 400 names the field
        oai.completions.create(model=MODEL, prompt="hi", max_tokens=2, extra_body={"truncate_prompt_tokens": 4096})
    assert err.value.body["param"] == "truncate_prompt_tokens"
