"""The official ``openai`` client, unmodified, against the real gateway and Triton (CPU model):
/v1/models, /v1/completions and /v1/chat/completions, streamed and not, and the exception
class it raises for 401, 400 and 429."""

import hashlib
import json
import os
import re

import httpx2
import openai
import pytest
import requests
from conftest import start_gateway
from e2e_helpers import API_KEY, AUTH, log_lines, wait_for

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m-instruct"
# Not the bare question: its greedy first token is a near-tie ("The" 25.33 vs "L" 25.24 logits
# in float32) that the int4 weights flip into a French ramble; this one leads by > 1.3 in both.
CAPITAL = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


def counts(usage) -> tuple[int, int, int]:
    """A usage's token counts; its prompt_tokens_details depend on what the prefix cache held."""
    return usage.prompt_tokens, usage.completion_tokens, usage.total_tokens


@pytest.fixture
def oai(gateway):
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=API_KEY, max_retries=0)


def test_models(oai):
    assert [m.id for m in oai.models.list()] == [MODEL]
    card = oai.models.retrieve(MODEL).model_dump()
    assert card["id"] == card["root"] == MODEL and card["max_model_len"] == 2048  # vLLM's: the context


def test_completion_streamed_equals_json_for_greedy_requests(oai):
    request = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 12, "temperature": 0}
    whole = oai.completions.create(**request)
    chunks = list(oai.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed == whole.choices[0].text and "Paris" in streamed
    assert whole.choices[0].finish_reason == "length"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert whole.usage.completion_tokens == 12 and whole.usage.prompt_tokens == 5
    assert chunks[-1].choices == [] and counts(chunks[-1].usage) == counts(whole.usage)


def test_an_array_of_prompts_answers_each_as_alone(oai):
    """Several prompts in one /v1/completions request (LangChain's OpenAI class batches so): each
    prompt's greedy choices are what it gets alone, numbered prompt by prompt, streamed or not;
    the usage is the sum."""
    prompts = ["The capital of France is", "1, 2, 3, 4,", "Once upon a time"]
    alone = [oai.completions.create(model=MODEL, prompt=p, max_tokens=6, temperature=0) for p in prompts]
    whole = oai.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0, n=2)
    assert [(c.index, c.text) for c in whole.choices] == [
        (2 * i + k, a.choices[0].text) for i, a in enumerate(alone) for k in range(2)]
    assert whole.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert whole.usage.completion_tokens == 2 * sum(a.usage.completion_tokens for a in alone)
    chunks = list(oai.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0, stream=True,
                                         stream_options={"include_usage": True}))
    texts = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
    assert texts == {i: a.choices[0].text for i, a in enumerate(alone)}
    assert chunks[-1].usage.total_tokens == sum(a.usage.total_tokens for a in alone)


def test_prompts_of_token_ids_answer_as_their_text(oai, tokenizer):
    """prompt as token ids (lm-evaluation-harness's local-completions sends them so): the engine
    gets exactly these ids; greedy, they answer as the same text does, one prompt or several;
    an id the model does not have is a 400 from the gateway."""
    prompts = ["The capital of France is", "1, 2, 3, 4,"]
    ids = [tokenizer(p).input_ids for p in prompts]
    alone = [oai.completions.create(model=MODEL, prompt=p, max_tokens=6, temperature=0) for p in prompts]
    one = oai.completions.create(model=MODEL, prompt=ids[0], max_tokens=6, temperature=0)
    assert one.choices[0].text == alone[0].choices[0].text and counts(one.usage) == counts(alone[0].usage)
    several = oai.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    assert [c.text for c in several.choices] == [a.choices[0].text for a in alone]
    streamed = list(oai.completions.create(model=MODEL, prompt=ids[1], max_tokens=6, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == alone[1].choices[0].text
    with pytest.raises(openai.BadRequestError) as caught:
        oai.completions.create(model=MODEL, prompt=[ids[0], [1, len(tokenizer)]], max_tokens=6)
    assert caught.value.body["param"] == "prompt"
    assert f"token id {len(tokenizer)} (at 1) is not a token of the model" in caught.value.body["message"]


def test_echo_scores_a_continuation_as_lm_evaluation_harness_reads_it(oai, tokenizer):
    """lm-evaluation-harness's loglikelihood request (token ids of context + continuation, echo,
    logprobs 1, max_tokens 1) through the real engine: the prompt's tokens come first with their
    log-probabilities (the first null), and for a continuation the model would itself generate
    greedily each is the most likely token, with the log-probability it had when generated."""
    context = tokenizer("The capital of France is").input_ids
    continuation, greedy = [], []
    for _ in range(4):  # the model's own greedy tokens, one at a time (their ids, not a re-tokenized text)
        step = oai.completions.create(model=MODEL, prompt=context + continuation, max_tokens=1, temperature=0,
                                      logprobs=0).choices[0]
        [token] = tokenizer(step.text, add_special_tokens=False).input_ids
        continuation.append(token)
        greedy.append(step.logprobs.token_logprobs[0])
    request = dict(model=MODEL, prompt=[context + continuation] * 2, echo=True, logprobs=1, max_tokens=1,
                   temperature=0, seed=1234)
    scored = oai.completions.create(**request)
    for choice in scored.choices:
        lp = choice.logprobs
        prompt_text = tokenizer.decode(context + continuation)
        assert choice.text.startswith(prompt_text) and "".join(lp.tokens) == choice.text
        assert len(lp.tokens) == len(context) + len(continuation) + 1
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert lp.text_offset[:3] == [0, len(lp.tokens[0]), len(lp.tokens[0]) + len(lp.tokens[1])]
        part = slice(len(context), -1)  # what lm-evaluation-harness sums
        assert lp.token_logprobs[part] == pytest.approx(greedy, abs=0.02)
        assert all(value == max(top.values()) for value, top in zip(lp.token_logprobs[part], lp.top_logprobs[part]))
        assert all(v < 0 for v in lp.token_logprobs[1:])
    assert scored.usage.completion_tokens == 2  # the echoed prompt is not counted
    chunks = list(oai.completions.create(**{**request, "prompt": context + continuation}, stream=True))
    first = chunks[0].choices[0]
    assert first.text.startswith(prompt_text) and first.logprobs.token_logprobs[0] is None
    plain = oai.completions.create(model=MODEL, prompt="The capital of France is", echo=True, max_tokens=3,
                                   temperature=0)
    assert plain.choices[0].text.startswith("The capital of France is") and plain.choices[0].logprobs is None


def test_echo_with_max_tokens_0_scores_the_prompt_alone(oai, tokenizer):
    """OpenAI's legacy scoring request (HELM, older lm-evaluation-harness): echo, logprobs and
    max_tokens 0 through the real engine give the prompt's tokens and log-probabilities alone,
    the same as with max_tokens 1 less its generated token; streamed the same; 0 without echo is
    a 400."""
    prompt = "The capital of France is Paris"
    request = dict(model=MODEL, prompt=prompt, echo=True, logprobs=2, temperature=0)
    scored = oai.completions.create(**request, max_tokens=0)
    [choice] = scored.choices
    ids = tokenizer(prompt).input_ids
    assert choice.text == prompt and choice.finish_reason == "length"
    assert len(choice.logprobs.tokens) == len(ids) and "".join(choice.logprobs.tokens) == prompt
    assert scored.usage.completion_tokens == 0 and scored.usage.prompt_tokens == len(ids)
    one = oai.completions.create(**request, max_tokens=1).choices[0].logprobs
    assert choice.logprobs.token_logprobs[0] is None
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(one.token_logprobs[1:len(ids)], abs=0.02)
    assert [set(t) for t in choice.logprobs.top_logprobs[1:]] == [set(t) for t in one.top_logprobs[1:len(ids)]]
    chunks = list(oai.completions.create(**request, max_tokens=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == prompt
    plain = oai.completions.create(model=MODEL, prompt=prompt, echo=True, max_tokens=0)
    assert plain.choices[0].text == prompt and plain.usage.completion_tokens == 0
    # logprobs 0: no alternatives, only each token's own log-probability (was a 500 until 2026-12-06)
    bare = oai.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=0, max_tokens=0).choices[0].logprobs
    assert bare.token_logprobs[1:] == pytest.approx(choice.logprobs.token_logprobs[1:], abs=0.02)
    assert [list(t) for t in bare.top_logprobs[1:]] == [[token] for token in bare.tokens[1:]]
    with pytest.raises(openai.BadRequestError) as caught:
        oai.completions.create(model=MODEL, prompt=prompt, max_tokens=0)
    assert caught.value.body["param"] == "max_tokens"


def test_chat_streamed_equals_json_for_greedy_requests(oai):
    request = {"model": MODEL, "messages": CAPITAL, "max_tokens": 40, "temperature": 0}
    whole = oai.chat.completions.create(**request)
    answer = whole.choices[0].message.content
    assert "Paris" in answer
    assert whole.choices[0].finish_reason == "stop"  # the model ended its turn (eos_token)
    # The prompt is the model's chat template around the question, counted by its tokenizer.
    assert whole.usage.prompt_tokens > 20 and whole.usage.completion_tokens < 40
    chunks = list(oai.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer
    assert counts(chunks[-1].usage) == counts(whole.usage)


def test_ignore_eos_generates_through_the_end_token_as_benchmark_clients_ask(oai, gateway):
    """vLLM's bench serve (openai-chat, --ignore-eos) sends this body; every request had been a 400
    (an unknown field). The model ends its turn after a sentence without it; with it, the stream
    runs to max_completion_tokens and usage counts them."""
    body = {"model": MODEL, "messages": CAPITAL, "max_completion_tokens": 40, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    reply = requests.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=120,
                          headers={"Authorization": f"Bearer {API_KEY}"})
    assert reply.status_code == 200, reply.text
    events = [json.loads(line[len("data: "):]) for line in reply.text.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    assert events[-1]["usage"]["completion_tokens"] == 40
    assert [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]] == ["length"]
    assert "Paris" in "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])
    natural = oai.chat.completions.create(model=MODEL, messages=CAPITAL, max_tokens=40, temperature=0)
    assert natural.choices[0].finish_reason == "stop" and natural.usage.completion_tokens < 40
    held = oai.chat.completions.create(model=MODEL, messages=CAPITAL, max_tokens=40, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert (held.choices[0].finish_reason, held.usage.completion_tokens) == ("length", 40)
    assert held.choices[0].message.content.startswith(natural.choices[0].message.content)


def test_usage_counts_the_prompt_tokens_the_prefix_cache_served(oai):
    """The same long prompt twice: the first is computed whole, the second reuses the engine's
    cached blocks, and usage.prompt_tokens_details.cached_tokens says how many tokens (whole
    blocks, never the prompt's last token)."""
    import uuid

    prompt = f"Note {uuid.uuid4().hex}: " + "the quick brown fox jumps over the lazy dog, " * 8
    first = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    second = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens == second.usage.prompt_tokens > 64
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert 0 < second.usage.prompt_tokens_details.cached_tokens < second.usage.prompt_tokens
    assert second.choices[0].text == first.choices[0].text


def test_a_cache_salt_keeps_a_tenants_prefix_to_its_own_requests(oai):
    """vLLM's cache_salt on the real stack: a salted prompt's blocks serve the same salt only
    (cached_tokens), not another salt nor unsalted requests, which keep their own; chat too."""
    import uuid

    prompt = f"Tenant note {uuid.uuid4().hex}: " + "the quick brown fox jumps over the lazy dog, " * 8

    def cached(salt=None, **extra):
        body = {"cache_salt": salt} if salt is not None else {}
        answer = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0, extra_body=body,
                                        **extra)
        return answer.usage.prompt_tokens_details.cached_tokens

    assert cached("tenant-a") == 0
    reused = cached("tenant-a")
    assert reused > 0
    assert (cached("tenant-b"), cached(), cached(), cached("tenant-b")) == (0, 0, reused, reused)
    chat = [{"role": "user", "content": prompt}]
    tokens = [oai.chat.completions.create(model=MODEL, messages=chat, max_tokens=2, extra_body={"cache_salt": salt})
              .usage.prompt_tokens_details.cached_tokens for salt in ("tenant-c", "tenant-c", "tenant-d")]
    assert tokens[0] == tokens[2] == 0 < tokens[1]


def test_keys_of_one_cache_salt_share_cached_prompts_and_no_other_key_sees_them(triton, tmp_path_factory):
    """A keys file where two keys of one tenant carry cache_salt "acme" and a third none: the
    tenant's keys reuse each other's blocks, the third key none of them, on the real stack."""
    import uuid

    keys = tmp_path_factory.mktemp("keys") / "keys.json"
    names = {"acme-1": "acme", "acme-2": "acme", "other": None}
    keys.write_text(json.dumps([{"name": name, "sha256": hashlib.sha256(name.encode()).hexdigest(), "models": ["*"],
                                 **({"cache_salt": salt} if salt else {})} for name, salt in names.items()]))
    gateway = start_gateway(triton, tmp_path_factory, extra_env={"TRIDENT_API_KEYS_FILE": str(keys)})
    prompt = f"Shared note {uuid.uuid4().hex}: " + "the quick brown fox jumps over the lazy dog, " * 8
    try:
        def cached(key):
            client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0)
            answer = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0)
            return answer.usage.prompt_tokens_details.cached_tokens

        first = cached("acme-1")
        assert first == 0 and cached("acme-2") > 0 and cached("other") == 0 and cached("other") > 0
    finally:
        gateway.stop()


WEATHER_TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city",
        "parameters": {"type": "object", "required": ["city", "unit"], "properties": {
            "city": {"type": "string", "maxLength": 30}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}},
    {"type": "function", "function": {
        "name": "get_time", "parameters": {"type": "object", "required": ["timezone"],
                                           "properties": {"timezone": {"type": "string", "maxLength": 30}}}}},
]
WEATHER_QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}],
                         ids=["required", "named"])
def test_forced_tool_calls_follow_the_functions_parameters(oai, tool_choice):
    """tool_choice "required" and a named function (gateway.tools) through the real llm model's
    XGrammar constraint: the official client reads the calls, streamed or not, and each call's
    arguments are JSON that matches its function's parameters; the streamed calls equal the
    whole ones (greedy); a conversation carrying the call and its result goes on."""
    request = {"model": MODEL, "messages": WEATHER_QUESTION, "tools": WEATHER_TOOLS, "tool_choice": tool_choice,
               "temperature": 0, "max_tokens": 80}
    whole = oai.chat.completions.create(**request)
    choice = whole.choices[0]
    assert choice.finish_reason == "stop" and choice.message.content is None
    calls = choice.message.tool_calls
    assert calls and all(call.type == "function" and call.id.startswith("call_") for call in calls)
    if isinstance(tool_choice, dict):
        assert [call.function.name for call in calls] == ["get_weather"]
    for call in calls:
        arguments = json.loads(call.function.arguments)
        if call.function.name == "get_weather":
            assert set(arguments) == {"city", "unit"} and arguments["unit"] in ("celsius", "fahrenheit")
        else:
            assert call.function.name == "get_time" and set(arguments) == {"timezone"}
    streamed = {}
    for chunk in oai.chat.completions.create(**request, stream=True):
        for piece in chunk.choices[0].delta.tool_calls or []:
            call = streamed.setdefault(piece.index, {"id": piece.id, "name": piece.function.name, "arguments": "",
                                                     "pieces": 0})
            call["arguments"] += piece.function.arguments or ""
            call["pieces"] += bool(piece.function.arguments)
    assert [(c["name"], c["arguments"]) for c in streamed.values()] == [
        (call.function.name, call.function.arguments) for call in calls]
    assert all(c["pieces"] > 1 for c in streamed.values())  # the arguments stream as they come, both ways
    history = [*WEATHER_QUESTION, choice.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": calls[0].id, "content": "18 degrees and sunny"}]
    answer = oai.chat.completions.create(model=MODEL, messages=history, tools=WEATHER_TOOLS, tool_choice="none",
                                         temperature=0, max_tokens=8)
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls


@pytest.fixture(scope="module", params=["hermes", "llama3_json", "mistral", "pythonic", "qwen3_coder", "deepseek_v31",
                                        "kimi_k2", "glm45", "minimax_m2"])
def parser_gateway(request, triton, tmp_path_factory):
    """A gateway that reads one tool-call syntax (TOOL_CALL_PARSER: tool_choice "auto")."""
    gw = start_gateway(triton, tmp_path_factory, extra_env={"TRIDENT_TOOL_CALL_PARSER": request.param})
    gw.parser = request.param
    yield gw
    gw.stop()


def call_turn(parser: str, city: str) -> list[dict]:
    """A question and the assistant's earlier answer in the parser's syntax, as plain text:
    SmolLM2's template renders no tools, so the conversation itself shows the small model the
    syntax."""
    if parser == "hermes":
        call = json.dumps({"name": "get_weather", "arguments": {"city": city, "unit": "celsius"}})
        answer = f"<tool_call>\n{call}\n</tool_call>"
    elif parser == "llama3_json":
        answer = json.dumps({"name": "get_weather", "parameters": {"city": city, "unit": "celsius"}})
    elif parser == "mistral":  # SmolLM2 has no [TOOL_CALLS] token: the marker is plain text here
        answer = "[TOOL_CALLS]" + json.dumps([{"name": "get_weather", "arguments": {"city": city, "unit": "celsius"}}])
    elif parser == "deepseek_v31":  # SmolLM2 has no such tokens: the markers are plain text here
        call = json.dumps({"city": city, "unit": "celsius"})
        answer = f"<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{call}<｜tool▁call▁end｜><｜tool▁calls▁end｜>"
    elif parser == "qwen3_coder":
        answer = (f"<tool_call>\n<function=get_weather>\n<parameter=city>\n{city}\n</parameter>\n"
                  "<parameter=unit>\ncelsius\n</parameter>\n</function>\n</tool_call>")
    elif parser == "kimi_k2":  # SmolLM2 has no such tokens: the markers are plain text here
        call, number = json.dumps({"city": city, "unit": "celsius"}), ("Rome", "Oslo").index(city)  # Kimi numbers the calls
        answer = (f"<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:{number}"
                  f"<|tool_call_argument_begin|>{call}<|tool_call_end|><|tool_calls_section_end|>")
    elif parser == "minimax_m2":
        answer = (f'<minimax:tool_call>\n<invoke name="get_weather">\n<parameter name="city">{city}</parameter>\n'
                  '<parameter name="unit">celsius</parameter>\n</invoke>\n</minimax:tool_call>')
    elif parser == "glm45":
        answer = (f"<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>{city}</arg_value>\n"
                  "<arg_key>unit</arg_key>\n<arg_value>celsius</arg_value>\n</tool_call>")
    else:
        answer = f'[get_weather(city="{city}", unit="celsius")]'
    return [{"role": "user", "content": f"What is the weather in {city}?"}, {"role": "assistant", "content": answer}]


def test_auto_tool_calls_are_read_from_the_models_own_text(parser_gateway, oai):
    """tool_choice "auto" through the real llm model, unconstrained, in each syntax the gateway
    reads: the model writes the call in it (shown by earlier turns), the gateway answers it as
    tool_calls with finish_reason "tool_calls", streamed the same (greedy); a question it answers
    in words stays text. The shared gateway (no parser) refuses auto."""
    plain, oai = oai, openai.OpenAI(base_url=f"{parser_gateway.url}/v1", api_key=API_KEY, max_retries=0)
    system = {"role": "system", "content": "You answer weather questions by calling get_weather."}
    messages = [system, *call_turn(parser_gateway.parser, "Rome"), *call_turn(parser_gateway.parser, "Oslo"),
                {"role": "user", "content": "What is the weather in Berlin?"}]
    request = {"model": MODEL, "messages": messages, "tools": WEATHER_TOOLS, "temperature": 0, "max_tokens": 120}
    whole = oai.chat.completions.create(**request)  # tool_choice left out: "auto", OpenAI's default with tools
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message
    [call] = choice.message.tool_calls
    # kimi_k2's calls keep the model's own ids (functions.NAME:N), the others get the gateway's
    assert re.fullmatch(r"functions\.get_weather:\d+" if parser_gateway.parser == "kimi_k2" else r"call_\w+", call.id)
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"] == "Berlin"
    assert not choice.message.content
    streamed, content, reasons = {}, "", []
    for chunk in oai.chat.completions.create(**request, tool_choice="auto", stream=True):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        reasons.append(chunk.choices[0].finish_reason)
        for piece in delta.tool_calls or []:
            streamed[piece.index] = (piece.function.name, piece.function.arguments)
    assert list(streamed.values()) == [(call.function.name, call.function.arguments)]
    assert content == "" and reasons[-1] == "tool_calls"
    words = oai.chat.completions.create(**{**request, "messages": CAPITAL, "max_tokens": 40})
    assert words.choices[0].finish_reason == "stop" and "Paris" in words.choices[0].message.content
    assert not words.choices[0].message.tool_calls
    with pytest.raises(openai.BadRequestError) as caught:
        plain.chat.completions.create(**request)
    assert caught.value.body["param"] == "tool_choice" and "TOOL_CALL_PARSER" in caught.value.body["message"]


def test_a_prefilled_reply_is_continued_and_template_fields_reach_the_prompt(oai, gateway):
    """vLLM's continue_final_message on the real model: the assistant's reply, begun by the
    caller, is continued (the prompt ends with its text, no end of turn), with echo the whole
    message in the reply, streamed or not; /tokenize renders the
    same prompt (its count is usage.prompt_tokens); add_generation_prompt false drops the header;
    a reserved chat_template_kwargs key is a 400."""
    prefill = [*CAPITAL, {"role": "assistant", "content": "The capital of France is"}]
    extra = {"continue_final_message": True}
    reply = oai.chat.completions.create(model=MODEL, messages=prefill, max_tokens=6, temperature=0, extra_body=extra)
    assert reply.choices[0].message.content.startswith(" Paris"), reply.choices[0].message.content
    # vLLM's echo: the whole message, the caller's beginning and the model's continuation
    whole = "The capital of France is" + reply.choices[0].message.content
    echoed = oai.chat.completions.create(model=MODEL, messages=prefill, max_tokens=6, temperature=0,
                                         extra_body={**extra, "echo": True})
    assert echoed.choices[0].message.content == whole
    assert (echoed.usage.prompt_tokens, echoed.usage.completion_tokens) == (reply.usage.prompt_tokens,
                                                                            reply.usage.completion_tokens)
    stream = oai.chat.completions.create(model=MODEL, messages=prefill, max_tokens=6, temperature=0, stream=True,
                                         extra_body={**extra, "echo": True})
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == whole
    tokenized = requests.post(f"{gateway.url}/tokenize", json={"messages": prefill, **extra}, headers=AUTH, timeout=30).json()
    assert tokenized["count"] == reply.usage.prompt_tokens
    text = requests.post(f"{gateway.url}/detokenize", json={"tokens": tokenized["tokens"]}, headers=AUTH, timeout=30).json()
    assert text["prompt"].endswith("<|im_start|>assistant\nThe capital of France is")
    headless = requests.post(f"{gateway.url}/tokenize", json={"messages": CAPITAL, "add_generation_prompt": False},
                             headers=AUTH, timeout=30).json()
    assert headless["count"] == oai.chat.completions.create(model=MODEL, messages=CAPITAL, max_tokens=1,
                                                            extra_body={"add_generation_prompt": False}).usage.prompt_tokens
    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(model=MODEL, messages=CAPITAL, max_tokens=1,
                                    extra_body={"chat_template_kwargs": {"messages": []}})
    assert caught.value.body["param"] == "chat_template_kwargs"


#: the thinking tags of each REASONING_PARSER tried
THINK_TAGS = {"deepseek_r1": ("<think>", "</think>"), "glm45": ("<think>", "</think>"), "mistral": ("[THINK]", "[/THINK]")}


@pytest.fixture(scope="module", params=list(THINK_TAGS))
def reasoning_gateway(request, triton, tmp_path_factory):
    """A gateway that reads one thinking syntax (REASONING_PARSER)."""
    gw = start_gateway(triton, tmp_path_factory, extra_env={"TRIDENT_REASONING_PARSER": request.param})
    gw.parser = request.param
    yield gw
    gw.stop()


def thinking_turn(question: str, thought: str, answer: str, parser: str = "deepseek_r1") -> list[dict]:
    """A question and the assistant's earlier answer with its thinking, as plain text: SmolLM2
    does not think on its own (and has none of the tags as special tokens), so the conversation
    shows it how."""
    opening, closing = THINK_TAGS[parser]
    return [{"role": "user", "content": question},
            {"role": "assistant", "content": f"{opening}{thought}{closing}{answer}"}]


def test_a_reasoning_models_thinking_comes_apart_from_its_answer(reasoning_gateway):
    """REASONING_PARSER on the real model (greedy), through the official client: the thinking
    the model writes comes as reasoning (and reasoning_content), the answer as content, streamed
    the same; include_reasoning false leaves it out. For the models that open their thinking
    themselves (glm45, mistral), an answer that does not is content; for the others (the
    template opened it), reasoning."""
    oai = openai.OpenAI(base_url=f"{reasoning_gateway.url}/v1", api_key=API_KEY, max_retries=0)
    parser = reasoning_gateway.parser
    messages = [*thinking_turn("What is the capital of Italy?", "Italy's capital is Rome.", "Rome.", parser),
                *thinking_turn("What is the capital of Spain?", "Spain's capital is Madrid.", "Madrid.", parser),
                {"role": "user", "content": "What is the capital of France?"}]
    request = {"model": MODEL, "messages": messages, "temperature": 0, "max_tokens": 40}
    message = oai.chat.completions.create(**request).choices[0].message
    extra = message.model_extra or {}
    assert extra.get("reasoning") and extra["reasoning"] == extra.get("reasoning_content"), message
    assert THINK_TAGS[parser][0] not in extra["reasoning"] and THINK_TAGS[parser][1] not in (message.content or "")
    assert "Paris" in message.content
    thought, content = "", ""
    for chunk in oai.chat.completions.create(**request, stream=True):
        delta = chunk.choices[0].delta
        thought += (delta.model_extra or {}).get("reasoning") or ""
        content += delta.content or ""
    assert (thought, content) == (extra["reasoning"], message.content)
    hidden = oai.chat.completions.create(**request, extra_body={"include_reasoning": False}).choices[0].message
    assert hidden.content == message.content and "reasoning" not in (hidden.model_extra or {})
    direct = oai.chat.completions.create(**{**request, "messages": CAPITAL}).choices[0].message  # no thinking shown
    assert THINK_TAGS[parser][0] not in (direct.content or "") + ((direct.model_extra or {}).get("reasoning") or "")
    if parser in ("glm45", "mistral"):
        assert "Paris" in direct.content and direct.model_extra["reasoning"] is None, direct
    else:
        assert direct.content is None and "Paris" in direct.model_extra["reasoning"], direct


def test_stop_sequences_finish_with_stop(oai):
    whole = oai.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=30,
                                   temperature=0, stop=["."])
    assert whole.choices[0].finish_reason == "stop"
    assert "." not in whole.choices[0].text and "Paris" in whole.choices[0].text


def test_every_stream_ends_with_done(gateway):
    response = requests.post(
        f"{gateway.url}/v1/chat/completions",
        json={"messages": CAPITAL, "max_tokens": 3, "stream": True},
        headers={"Authorization": f"Bearer {API_KEY}"}, stream=True, timeout=60,
    )
    raw = [line for line in response.iter_lines(decode_unicode=True) if line]
    assert raw[0].startswith(":")  # the admission: a comment (SSE clients skip them), headers out at once
    lines = [line for line in raw if not line.startswith(":")]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: {") for line in lines[:-1])
    assert json.loads(lines[-2][len("data: "):])["choices"][0]["finish_reason"] == "length"


def test_401_is_authentication_error(gateway):
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model=MODEL, messages=CAPITAL)


@pytest.mark.parametrize(
    ("request_kwargs", "param", "text"),
    [
        ({"n": 17}, "n", "n must be between 1 and 16"),
        ({"max_tokens": 2048}, "messages", "context"),  # refused by Triton: prompt + max_tokens > context
    ],
)
def test_400_is_bad_request_error(oai, request_kwargs, param, text):
    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(model=MODEL, messages=CAPITAL, **request_kwargs)
    assert caught.value.body["param"] == param and text in caught.value.body["message"]


def test_404_is_not_found_error(oai):
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="gpt-4", prompt="Hi")


def test_429_is_rate_limit_error_without_blind_retries(triton, tmp_path_factory):
    key = "tiny-limit-key"
    keys = tmp_path_factory.mktemp("keys") / "keys.json"
    keys.write_text(json.dumps([{"name": "tiny", "sha256": hashlib.sha256(key.encode()).hexdigest(),
                                 "models": ["*"], "rate_limit": "1/hour"}]))
    gateway = start_gateway(triton, tmp_path_factory, extra_env={"TRIDENT_API_KEYS_FILE": str(keys)})
    try:
        sent = []
        http = httpx2.Client(event_hooks={"request": [lambda request: sent.append(request.url.path)]})
        client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=2, http_client=http)
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=1)
        with pytest.raises(openai.RateLimitError) as caught:
            client.chat.completions.create(model=MODEL, messages=CAPITAL, max_tokens=1)
        headers = caught.value.response.headers
        assert int(headers["retry-after"]) > 60 and headers["x-should-retry"] == "false"
        assert sent == ["/v1/completions", "/v1/chat/completions"]  # the client did not retry
        # one budget for the key: /generate is refused too
        response = requests.post(f"{gateway.url}/generate", json={"prompt": "Hi"},
                                 headers={"Authorization": f"Bearer {key}"}, timeout=30)
        assert response.status_code == 429
    finally:
        gateway.stop()


def test_request_id_names_the_reply_and_the_request_in_the_log(oai, gateway):
    """vLLM's request_id through the official client (extra_body): the reply's id, and the
    request's log line; streamed, every chunk's id."""
    rid = "e2e-job-" + os.urandom(4).hex()
    raw = oai.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, extra_body={"request_id": rid})
    assert raw.parse().id == f"chatcmpl-{rid}" and raw.headers["x-request-id"] == rid
    chunks = list(oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                              stream=True, extra_body={"request_id": rid + "s"}))
    assert {c.id for c in chunks} == {f"chatcmpl-{rid}s"}
    assert wait_for(lambda: {rid, rid + "s"} <= {line.get("request_id") for line in log_lines(gateway)
                                                if line.get("msg") == "generation"})
