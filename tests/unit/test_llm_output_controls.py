"""The llm model's side of the output controls (issue 15), with the fake engine of
test_llm_service: several choices (each its own text, finish and counts; one final response),
logprobs aligned with the text streamed or not, guides checked before the engine."""
import threading

import numpy as np
import pytest
from test_llm_service import TIMEOUT, FakeEngine, FakeRequest, make_service, wait  # noqa: F401 (fixture)

from trident.contract import parse_error
from trident.engine_tensors import (
    CONTEXT_OUTPUTS,
    ENGINE_OUTPUTS,
    LOG_PROB_OUTPUTS,
    NUM_CACHED_TOKENS,
    SEQUENCE_INDEX,
    TOP_LOG_PROBS,
)
from trident.generation import TextGeneration, TokenLogprob
from trident.llm_io import engine_outputs, output_tensors
from trident.contract import ENGINE_FEATURES, ModelLimits, SamplingParams, TextRequest


def request(**inputs):
    req = FakeRequest(max_tokens=inputs.pop("max_tokens", 4), stream=inputs.pop("stream", True),
                      stop_words=inputs.pop("stop_words", ()))
    for name, value in inputs.items():
        dtype = object if isinstance(value, str) else np.float32 if isinstance(value, float) else np.int32
        if isinstance(value, bool):
            dtype = np.bool_
        req.inputs[name] = np.array([[value.encode() if isinstance(value, str) else value]], dtype=dtype)
    return req


def choice_texts(req, n):
    return ["".join(text for kind, i, text, _ in req.choices if i == index) for index in range(n)]


def choice_tokens(req, index):
    return [t for kind, i, _, tokens in req.choices if i == index and tokens for t in tokens]


@pytest.mark.parametrize("stream, interval", [(True, 1), (False, 1), (True, 2)])
def test_three_choices_each_with_its_text_and_one_final_response(make_service, tokenizer, stream, interval):
    service, engine = make_service(stream_interval=interval)
    req = request(num_return_sequences=3, stream=stream)
    service.accept(req)
    wait(req)
    assert choice_texts(req, 3) == [tokenizer.decode(engine.ids[i:i + 4]) for i in range(3)]
    kinds = [kind for kind, *_ in req.choices]
    assert kinds.count("final") == 1 and kinds[-1] == "final" and kinds.count("end") == 2
    ends = [p for k, p in req.sent if k == "send_final"]
    assert [reason for _, reason, _, _ in ends] == ["length"] * 3
    assert SEQUENCE_INDEX in engine.outputs


def test_a_choice_that_meets_its_stop_sequence_ends_alone(make_service, tokenizer):
    service, engine = make_service()
    stop = tokenizer.decode(engine.ids[1:2]).strip()  # choice 1 says it first, choice 0 one step later
    req = request(num_return_sequences=2, max_tokens=6, stop_words=(stop,))
    service.accept(req)
    wait(req)
    ends = [(kind, i) for kind, i, _, _ in req.choices if kind != "text"]
    assert ends[0] == ("end", 1)  # ended as soon as it matched, before the engine finished
    reasons = {i: p[1] for (kind, i), (k, p) in zip(ends, [s for s in req.sent if s[0] == "send_final"])}
    assert reasons == {0: "stop_sequence", 1: "stop_sequence"}
    assert engine.stops == engine.streams  # both matched: the engine request was stopped


@pytest.mark.parametrize("stream, interval", [(True, 1), (False, 1), (True, 4)])
def test_logprob_tokens_concatenate_to_the_text(make_service, tokenizer, stream, interval):
    service, engine = make_service(limits=ModelLimits(features=frozenset(ENGINE_FEATURES)), stream_interval=interval)
    req = request(return_log_probs=True, num_top_log_probs=2, max_tokens=6, stream=stream)
    service.accept(req)
    wait(req)
    for _, _, text, tokens in req.choices:  # each response's tokens are its own text
        assert "".join(t.text for t in tokens) == text
    if stream:  # the first token at once, then the interval's groups, the rest with the final
        groups = [1] + [interval] * ((6 - 1) // interval)
        assert [len(tokens) for kind, _, _, tokens in req.choices if kind == "text"] == groups
    text = choice_texts(req, 1)[0]
    tokens = choice_tokens(req, 0)
    assert text == tokenizer.decode(engine.ids[:6])
    assert "".join(t.text for t in tokens) == text and [t.id for t in tokens] == engine.ids[:6]
    assert all(t.logprob == -0.25 and len(t.top) == 2 for t in tokens)
    assert [t.top[0][0] for t in tokens] == [tokenizer.decode([i]) for i in engine.ids[:6]]
    assert [t.top_ids for t in tokens] == [(i, engine.ids[0]) for i in engine.ids[:6]]  # the alternatives' ids
    assert set(LOG_PROB_OUTPUTS + (TOP_LOG_PROBS,)) <= set(engine.outputs)


@pytest.mark.parametrize("inputs, param", [
    (dict(return_log_probs=True, num_top_log_probs=2), "logprobs"),
    (dict(min_p=0.5), "min_p"),
    (dict(guided_decoding_guide_type="json"), "guided_decoding_guide_type"),
])
def test_what_the_engine_cannot_do_is_refused_naming_the_field(make_service, inputs, param):
    service, engine = make_service()  # no engine_features: like a repository without XGrammar's file
    req = request(**inputs)
    service.accept(req)
    wait(req)
    assert parse_error(req.sent[0][1]).param == param and engine.streams == []


def test_a_plain_request_asks_the_engine_for_token_ids_only():
    assert engine_outputs(SamplingParams()) == ENGINE_OUTPUTS
    assert engine_outputs(SamplingParams(logprobs=0)) == ENGINE_OUTPUTS + LOG_PROB_OUTPUTS
    assert SEQUENCE_INDEX in engine_outputs(SamplingParams(n=2))


def test_a_schema_xgrammar_cannot_compile_is_refused_naming_the_field(make_service):
    service, engine = make_service(limits=ModelLimits(features=frozenset(ENGINE_FEATURES)))
    req = request(guided_decoding_guide_type="json_schema", guided_decoding_guide='{"type": "bogus"}')
    service.accept(req)
    wait(req)
    (kind, message), = req.sent
    tagged = parse_error(message)
    assert kind == "send_error" and tagged.param == "guided_decoding_guide" and "bogus" in tagged.message
    assert engine.streams == []


def test_guided_requests_wait_for_xgrammar_to_load_while_other_requests_go_on(make_service):
    """A stub imports XGrammar (and torch) at its first request with a guide, once, on a thread
    of its own: the guided requests wait there, unanswered, while a plain one is admitted and
    answered; then each is checked as usual (a schema XGrammar cannot take refused, a good one
    generated), and later guided requests are checked at once."""
    release, loads = threading.Event(), []

    def load():
        loads.append(threading.current_thread().name)
        assert release.wait(TIMEOUT)

    service, engine = make_service(limits=ModelLimits(features=frozenset(ENGINE_FEATURES)),
                                   service_args=dict(load_guides=load, guides_loaded=False))
    bad = request(guided_decoding_guide_type="json_schema", guided_decoding_guide='{"type": "bogus"}')
    good = request(guided_decoding_guide_type="json_schema", guided_decoding_guide='{"type": "object"}')
    plain = request()
    for req in (bad, good, plain):
        req.admission = True
        service.accept(req)
    wait(plain)
    assert plain.sent[0][0] == "send_admission" and plain.sent[-1][0] == "send_final"
    assert bad.sent == [] and good.sent == [] and loads == ["llm-load-xgrammar"]
    release.set()
    wait(bad)
    wait(good)
    (kind, message), = bad.sent
    assert kind == "send_error" and parse_error(message).param == "guided_decoding_guide"
    assert good.sent[0][0] == "send_admission" and good.sent[-1][0] == "send_final"
    assert [t["guided_decoding_guide"].reshape(-1)[0] for t in engine.tensors if "guided_decoding_guide" in t] == [
        b'{"type": "object"}']  # the plain request's tensors have none
    later = request(guided_decoding_guide_type="json_schema", guided_decoding_guide='{"type": "bogus"}')
    service.accept(later)
    assert later.sent and later.sent[0][0] == "send_error" and loads == ["llm-load-xgrammar"]  # at once


def test_output_tensors_shapes():
    gen = TextGeneration(None, TextRequest(prompt="p", sampling=SamplingParams(logprobs=2, n=2)), prompt_tokens=3,
                         index=1, token_text=str)
    gen.finish_reason = "length"
    tokens = [TokenLogprob("a", 5, -0.5, (("a", -0.5), ("b", -1.0)), (5, 9)), TokenLogprob("", 6, -0.25, (("c", -0.3),), (4,))]
    out = output_tensors("a", index=1, tokens=tokens, gen=gen, n=2)
    assert out["sequence_index"].tolist() == [[1]]
    assert out["output_token_texts"].shape == (1, 2) and out["output_log_probs"].dtype == np.float32
    assert out["top_log_prob_texts"].shape == (1, 2, 2) and out["top_log_probs"][0, 1, 1] == -np.inf
    assert out["top_log_prob_ids"].dtype == np.int32 and out["top_log_prob_ids"].tolist() == [[[5, 9], [4, -1]]]
    assert out["finish_reason"].tolist() == [[b"length"]] and "cum_log_probs" in out
    assert set(output_tensors("x")) == {"text_output"}


# -- echo (OpenAI's /v1/completions echo) -------------------------------------------------------

FEATURES = ModelLimits(features=frozenset(ENGINE_FEATURES))


@pytest.mark.parametrize("stream", [True, False])
def test_echo_puts_the_prompt_in_front_of_each_choice(make_service, tokenizer, stream):
    service, engine = make_service()
    req = request(echo=True, num_return_sequences=2, stream=stream)
    service.accept(req)
    wait(req)
    assert choice_texts(req, 2) == ["Hello there" + tokenizer.decode(engine.ids[i:i + 4]) for i in range(2)]
    if stream:  # the prompt comes at once, with the first token
        first = [text for kind, i, text, _ in req.choices if i == 0][0]
        assert first == "Hello there" + tokenizer.decode(engine.ids[:1])
    assert not set(CONTEXT_OUTPUTS) & set(engine.outputs)  # text only: the engine is not asked
    ends = [p for k, p in req.sent if k == "send_final"]
    assert [completion for _, _, _, completion in ends] == [4, 4]  # the prompt is not counted


def test_echo_of_token_ids_is_their_text(make_service, tokenizer):
    service, engine = make_service()
    ids = tokenizer("Hi <|im_start|>you", add_special_tokens=False).input_ids
    req = request(echo=True, stream=False)
    req.inputs["text_input"] = np.array([[b""]], dtype=object)
    req.inputs["input_ids"] = np.array([ids], dtype=np.int32)
    service.accept(req)
    wait(req)
    assert choice_texts(req, 1)[0] == "Hi <|im_start|>you" + tokenizer.decode(engine.ids[:4])


@pytest.mark.parametrize("stream", [True, False])
def test_echo_with_logprobs_gives_the_prompt_tokens_first(make_service, tokenizer, stream):
    service, engine = make_service(limits=FEATURES)
    req = request(echo=True, return_log_probs=True, num_top_log_probs=2, num_return_sequences=2, stream=stream)
    service.accept(req)
    wait(req)
    assert set(CONTEXT_OUTPUTS) <= set(engine.outputs)
    prompt_ids = engine.prompts[-1]
    for index in range(2):
        tokens = choice_tokens(req, index)
        text = choice_texts(req, 2)[index]
        assert "".join(t.text for t in tokens) == text and text.startswith("Hello there")
        head = tokens[:len(prompt_ids)]
        assert [t.id for t in head] == prompt_ids and "".join(t.text for t in head) == "Hello there"
        assert np.isnan(head[0].logprob) and head[0].top == ()
        assert [t.logprob for t in head[1:]] == [-0.5 - i / 100 for i in range(1, len(prompt_ids))]
        assert [t.top for t in head[1:]] == [((tokenizer.decode([t]), -0.5 - i / 100), (tokenizer.decode([0]), -9.0))
                                             for i, t in enumerate(prompt_ids[1:], start=1)]
        assert [t.top_ids for t in head] == [()] + [(t, 0) for t in prompt_ids[1:]]
        assert [t.id for t in tokens[len(prompt_ids):]] == [engine.ids[(s + index) % len(engine.ids)] for s in range(4)]
    ends = [p for k, p in req.sent if k == "send_final"]
    assert [completion for _, _, _, completion in ends] == [4, 4]


@pytest.mark.parametrize("echo_k", [None, 1, 3])
def test_prompt_logprobs_come_in_a_response_of_their_own_before_the_text(make_service, tokenizer, echo_k):
    """num_prompt_log_probs k: the engine is asked for the prompt's k best (with echo's logprobs,
    the more of the two, each shown its own); one non-final response before any text holds the
    prompt's ids (as the engine got them), their texts decoded alone, log-probabilities, ranks
    and the k best with texts and ids; then the text as without it."""
    service, engine = make_service(limits=FEATURES)
    echo = {} if echo_k is None else {"echo": True, "return_log_probs": True, "num_top_log_probs": echo_k}
    req = request(num_prompt_log_probs=2, num_return_sequences=2, stream=True, **echo)
    service.accept(req)
    wait(req)
    assert set(CONTEXT_OUTPUTS) <= set(engine.outputs)
    assert int(engine.tensors[-1]["num_context_log_probs"][0, 0]) == max(2, echo_k or 0)
    prompt_ids = engine.prompts[-1]
    kinds = [kind for kind, _ in req.sent]
    first_text = kinds.index("send_text")
    assert kinds.count("send_outputs") == 1 and kinds.index("send_outputs") < first_text
    arrays = next(payload for kind, payload in req.sent if kind == "send_outputs")
    assert req.output_finals == [False]
    L = len(prompt_ids)
    assert arrays["prompt_token_ids"] == [prompt_ids]
    assert arrays["prompt_token_texts"] == [[tokenizer.decode([t]).encode() for t in prompt_ids]]
    assert np.isnan(arrays["prompt_log_probs"][0][0])
    assert arrays["prompt_log_probs"][0][1:] == pytest.approx([-0.5 - i / 100 for i in range(1, L)])
    assert arrays["prompt_log_prob_ranks"] == [[0] + [1] * (L - 1)]
    assert arrays["prompt_top_log_prob_ids"] == [[[-1, -1]] + [[t, 0] for t in prompt_ids[1:]]]
    assert arrays["prompt_top_log_prob_texts"][0][1] == [tokenizer.decode([prompt_ids[1]]).encode(),
                                                        tokenizer.decode([0]).encode()]
    assert arrays["prompt_top_log_probs"][0][0] == [float("-inf")] * 2
    assert arrays["prompt_top_log_probs"][0][1] == pytest.approx([-0.51, -9.0])
    texts = choice_texts(req, 2)
    for index in range(2):
        generated = tokenizer.decode(engine.ids[index:index + 4])
        assert texts[index] == ("Hello there" if echo_k is not None else "") + generated
        if echo_k is not None:  # echo's tokens keep their own k
            head = choice_tokens(req, index)[:L]
            assert [len(t.top) for t in head] == [0] + [min(echo_k, 3)] * (L - 1)


def test_prompt_logprobs_need_the_engine_feature_and_a_k_within_bounds(make_service):
    service, engine = make_service()  # the GPU repository's features: no prompt log-probabilities
    req = request(num_prompt_log_probs=1)
    service.accept(req)
    wait(req)
    assert parse_error(req.sent[0][1]).param == "prompt_logprobs" and engine.streams == []
    service, engine = make_service(limits=FEATURES)
    req = request(num_prompt_log_probs=21)
    service.accept(req)
    wait(req)
    error = parse_error(req.sent[0][1])
    assert error.param == "prompt_logprobs" and "between 0 and 20" in error.message and engine.streams == []


def test_cache_salt_reaches_the_engine_as_its_id_where_the_engine_takes_it(make_service):
    from trident.engine_tensors import cache_salt_id

    service, engine = make_service(limits=FEATURES)
    req = request(cache_salt="tenant-é", stream=False)
    service.accept(req)
    wait(req)
    assert engine.tensors[-1]["cache_salt_id"].tolist() == [[cache_salt_id("tenant-é")]]
    plain = request(stream=False)
    service.accept(plain)
    wait(plain)
    assert "cache_salt_id" not in engine.tensors[-1]
    service, engine = make_service()  # the GPU repository's features: TensorRT-LLM's backend takes no salt
    refused = request(cache_salt="tenant-é")
    service.accept(refused)
    wait(refused)
    assert parse_error(refused.sent[0][1]).param == "cache_salt" and engine.streams == []


def test_priority_reaches_the_cpu_engine_and_only_0_a_gpu_one(make_service):
    service, engine = make_service(limits=FEATURES)
    req = request(priority=-5, stream=False)
    service.accept(req)
    wait(req)
    assert engine.tensors[-1]["priority"].tolist() == [[-5]]
    service, engine = make_service()  # the GPU repository's features: the backend sets no priority
    zero = request(priority=0, stream=False)
    service.accept(zero)
    wait(zero)
    assert "priority" not in engine.tensors[-1] and all(kind != "send_error" for kind, _ in zero.sent)
    refused = request(priority=3)
    service.accept(refused)
    wait(refused)
    error = parse_error(refused.sent[0][1])
    assert error.param == "priority" and "TensorRT-LLM" in error.message and len(engine.streams) == 1


def test_echo_with_logprobs_needs_the_engine_feature(make_service):
    service, engine = make_service()  # the GPU repository's features: no prompt log-probabilities
    req = request(echo=True, return_log_probs=True)
    service.accept(req)
    wait(req)
    assert parse_error(req.sent[0][1]).param == "echo" and engine.streams == []


def test_an_engine_that_sends_no_prompt_logprobs_is_an_error(make_service, tokenizer):
    class Forgetful(FakeEngine):
        def stream(self, tensors, engine_id, outputs=()):
            tensors = {k: v for k, v in tensors.items() if k != "num_context_log_probs"}
            yield from super().stream(tensors, engine_id, outputs)

    service, engine = make_service(engine=Forgetful(tokenizer), limits=FEATURES)
    for asked in ({"echo": True, "return_log_probs": True}, {"num_prompt_log_probs": 2}):
        req = request(**asked)
        service.accept(req)
        wait(req)
        (kind, message), = [s for s in req.sent if s[0] == "send_error"]
        assert "no log-probabilities" in message and "of the prompt" in message
        assert not any(kind == "send_text" for kind, _ in req.sent)


@pytest.mark.parametrize("include", [False, True])
def test_a_stop_token_ends_its_choice_and_stops_the_engine(make_service, tokenizer, include):
    """stop_token_ids (vLLM's), direct gRPC: the choice ends at the token (its text only with
    include_stop_str_in_output), finish_reason stop, and the engine request is stopped."""
    service, engine = make_service()
    three = tokenizer(" three", add_special_tokens=False).input_ids
    req = request(stream=False, max_tokens=8, include_stop_str_in_output=include)
    req.inputs["stop_token_ids"] = np.array([[three[0], 7]], dtype=np.int32)
    service.accept(req)
    wait(req)
    assert choice_texts(req, 1) == [" one two" + (" three" if include else "")]
    [(_, reason, _, completion)] = [p for k, p in req.sent if k == "send_final"]
    assert (reason, completion) == ("stop_sequence", 3)
    assert engine.stops == engine.streams


@pytest.mark.parametrize("logprobs", [False, True])
def test_the_models_other_end_tokens_end_a_choice_as_its_end_id(make_service, tokenizer, logprobs):
    """generation_config.json's end tokens (Llama 3's <|eom_id|>, Qwen's <|endoftext|>): the
    choice ends there as at the engine's end id (no text, not counted, eos_token), the engine
    request is stopped; not before min_tokens, never with ignore_eos, and not for a request
    that names its own end_id."""
    three = tokenizer(" three", add_special_tokens=False).input_ids[0]
    extra = {"return_log_probs": True} if logprobs else {}
    service, engine = make_service(end_ids=(three, tokenizer.eos_token_id))
    req = request(stream=False, max_tokens=6, **extra)
    service.accept(req)
    wait(req)
    assert choice_texts(req, 1) == [" one two"]
    [(_, reason, _, completion)] = [p for k, p in req.sent if k == "send_final"]
    assert (reason, completion) == ("eos_token", 2)
    assert engine.stops == engine.streams
    if logprobs:
        assert [t.text for t in choice_tokens(req, 0)] == [" one", " two"]
    for held in (request(stream=False, max_tokens=6, ignore_eos=True, **extra),
                 request(stream=False, max_tokens=6, end_id=tokenizer.eos_token_id, **extra)):
        service.accept(held)
        wait(held)
        assert choice_texts(held, 1)[0].startswith(" one two three four")
        assert [p[1] for k, p in held.sent if k == "send_final"] == ["length"]
    # the engine bans its end id up to max_tokens (TensorRT-LLM has no ignore_eos)
    assert int(engine.tensors[-2]["min_tokens"][0, 0]) == 6
    # ignore_eos keeps stop_token_ids (vLLM's): the same token asked for as a stop still stops
    stopped = request(stream=False, max_tokens=6, ignore_eos=True, **extra)
    stopped.inputs["stop_token_ids"] = np.array([[three]], dtype=np.int32)
    service.accept(stopped)
    wait(stopped)
    assert choice_texts(stopped, 1) == [" one two"]
    assert [p[1] for k, p in stopped.sent if k == "send_final"] == ["stop_sequence"]
    for min_tokens, text, reason in ((2, " one two", "eos_token"),  # an end may be the 3rd token
                                     (3, " one two three four five six", "length")):
        req = request(stream=False, max_tokens=6, min_tokens=min_tokens, **extra)
        service.accept(req)
        wait(req)
        assert choice_texts(req, 1) == [text]
        assert [p[1] for k, p in req.sent if k == "send_final"] == [reason]
        assert int(engine.tensors[-1]["min_tokens"][0, 0]) == min_tokens


@pytest.mark.parametrize("logprobs", [False, True])
def test_stop_reason_names_the_stop_sequence_or_token_that_ended_a_choice(make_service, tokenizer, logprobs):
    """vLLM's stop_reason on a choice's last response: stop_sequence (the sequence matched),
    stop_token_id (a stop_token_ids token, or an end token of the model's besides the end id);
    neither when the engine's end id or max_tokens ended it."""
    three, five = (tokenizer(w, add_special_tokens=False).input_ids[0] for w in (" three", " five"))
    service, engine = make_service(end_ids=(five,))
    extra = {"return_log_probs": True} if logprobs else {}
    cases = [({"stop_words": ("hree",)}, "hree"), ({"stop_token_ids": [three, 7]}, three), ({}, five),
             ({"max_tokens": 3}, None), ({"ignore_eos": True, "max_tokens": 20}, None)]
    for asked, expected in cases:
        stops = asked.pop("stop_token_ids", None)
        req = request(stream=False, max_tokens=asked.pop("max_tokens", 8), stop_words=asked.pop("stop_words", ()),
                      **asked, **extra)
        if stops is not None:
            req.inputs["stop_token_ids"] = np.array([stops], dtype=np.int32)
        service.accept(req)
        wait(req)
        (gen,) = req.ended
        assert gen.stop_reason == expected, asked
        arrays = output_tensors("", gen=gen)
        if isinstance(expected, str):
            assert arrays["stop_sequence"].tolist() == [[expected.encode()]] and "stop_token_id" not in arrays
        elif expected is not None:
            assert arrays["stop_token_id"].tolist() == [[expected]] and "stop_sequence" not in arrays
        else:
            assert not {"stop_sequence", "stop_token_id"} & set(arrays)
    assert [p[1] for k, p in req.sent if k == "send_final"] == ["eos_token"]  # the engine ended the last one


@pytest.mark.parametrize("logprobs", [False, True])
def test_min_tokens_holds_back_stop_tokens_and_stop_sequences_on_the_wire(make_service, tokenizer, logprobs):
    """Direct gRPC: min_tokens (vLLM's) lets no stop_token_ids token or stop sequence end the
    choice before that many tokens (the engine gets min_tokens as given, banning its end id);
    ignore_eos and min_tokens together: the engine's min_tokens is max_tokens, stops still
    count after min_tokens."""
    three = tokenizer(" three", add_special_tokens=False).input_ids[0]
    extra = {"return_log_probs": True} if logprobs else {}
    service, engine = make_service()
    cases = (({"min_tokens": 3}, " one two three four five six", "length", 3),
             ({"min_tokens": 2}, " one two", "stop_sequence", 2),
             ({"min_tokens": 2, "ignore_eos": True}, " one two", "stop_sequence", 6))
    for kw, text, reason, engine_min in cases:
        req = request(stream=True, max_tokens=6, **kw, **extra)
        req.inputs["stop_token_ids"] = np.array([[three]], dtype=np.int32)
        service.accept(req)
        wait(req)
        assert choice_texts(req, 1) == [text], kw
        assert [p[1] for k, p in req.sent if k == "send_final"] == [reason]
        assert int(engine.tensors[-1]["min_tokens"][0, 0]) == engine_min
    for kw, text, reason in (({"min_tokens": 3}, " one two three ", "stop_sequence"),
                             ({"min_tokens": 4}, " one two three four ", "stop_sequence"),
                             ({"min_tokens": 5}, " one two three four five six", "length")):
        req = request(stream=True, max_tokens=6, stop_words=("f",), **kw, **extra)
        service.accept(req)
        wait(req)
        assert choice_texts(req, 1) == [text], kw
        assert [p[1] for k, p in req.sent if k == "send_final"] == [reason]


def test_min_tokens_sends_the_stop_tokens_to_an_engine_that_bans_them(make_service, tokenizer):
    """On an engine with the feature (the CPU engine), min_tokens also bans what would end the
    choice besides the end id: stop_token_ids and the model's other end tokens (vLLM's
    min_tokens), as the input min_tokens_stop_ids. Not sent without min_tokens, with ignore_eos
    (the engine's min_tokens is then max_tokens, while stop tokens end the text from min_tokens
    on), or to an engine without the feature (TensorRT-LLM's backend has no such input); a
    request naming its own end_id sends its stop_token_ids only. With ignore_eos only the
    stop_token_ids are sent (the model's other end tokens end nothing then): see the next test."""
    three, five = (tokenizer(w, add_special_tokens=False).input_ids[0] for w in (" three", " five"))
    eos = tokenizer.eos_token_id
    cases = (({"min_tokens": 2}, FEATURES, [three, five]),
             ({"min_tokens": 2, "end_id": eos}, FEATURES, [five]),
             ({}, FEATURES, None),
             ({"min_tokens": 2, "ignore_eos": True}, FEATURES, [five]),  # the other end tokens end nothing then
             ({"min_tokens": 2}, ModelLimits(), None))
    for kw, limits, sent in cases:
        service, engine = make_service(end_ids=(three, eos), limits=limits)
        req = request(stream=False, max_tokens=6, **kw)
        req.inputs["stop_token_ids"] = np.array([[five]], dtype=np.int32)
        service.accept(req)
        wait(req)
        ids = engine.tensors[-1].get("min_tokens_stop_ids")
        assert (None if ids is None else ids.tolist()) == (None if sent is None else [sorted(sent)]), kw
        assert ids is None or ids.dtype == np.int32


def test_ignore_eos_with_min_tokens_bans_the_end_id_throughout_and_the_stop_tokens_for_min_tokens(
        make_service, tokenizer):
    """vLLM bans stop_token_ids for min_tokens tokens with ignore_eos too. The engine's
    min_tokens is then the request's, the end id a one-token bad word (banned throughout, as the
    whole-output min_tokens banned it); without stop tokens to ban, or on an engine without the
    feature, ignore_eos stays min_tokens = max_tokens."""
    from trident.engine.triton_io import decode_word_list

    five = tokenizer(" five", add_special_tokens=False).input_ids[0]
    eos = tokenizer.eos_token_id
    for stop_ids, limits, expected in (([five], FEATURES, (2, [[eos]], [[five]])),
                                       ([], FEATURES, (6, [], None)),
                                       ([five], ModelLimits(), (6, [], None))):
        service, engine = make_service(limits=limits)
        req = request(stream=False, max_tokens=6, min_tokens=2, ignore_eos=True)
        if stop_ids:
            req.inputs["stop_token_ids"] = np.array([stop_ids], dtype=np.int32)
        service.accept(req)
        wait(req)
        t = engine.tensors[-1]
        bad = decode_word_list(t["bad_words_list"]) if "bad_words_list" in t else []
        ids = t.get("min_tokens_stop_ids")
        assert (int(t["min_tokens"][0, 0]), bad, None if ids is None else ids.tolist()) == expected, stop_ids


class Counting(FakeEngine):
    """Records the tokens each request asked the engine for."""

    def stream(self, tensors, engine_id, outputs=()):
        self.asked = getattr(self, "asked", []) + [int(tensors["request_output_len"][0, 0])]
        yield from super().stream(tensors, engine_id, outputs)


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("logprobs", [False, True])
def test_echo_with_max_tokens_0_scores_the_prompt_and_generates_nothing(make_service, tokenizer, stream, logprobs):
    """OpenAI's legacy echo with max_tokens 0 (vLLM's too): the engine makes one token, which
    the reply leaves out; each choice is the prompt alone, 0 completion tokens, ended by length."""
    service, engine = make_service(engine=Counting(tokenizer), limits=FEATURES)
    extra = {"return_log_probs": True, "num_top_log_probs": 1} if logprobs else {}
    req = request(echo=True, max_tokens=0, num_return_sequences=2, stream=stream, **extra)
    service.accept(req)
    wait(req)
    assert engine.asked == [1]
    assert choice_texts(req, 2) == ["Hello there", "Hello there"]
    if logprobs:
        prompt_ids = engine.prompts[-1]
        for index in range(2):
            assert [t.id for t in choice_tokens(req, index)] == prompt_ids
    ends = [p for k, p in req.sent if k == "send_final"]
    assert [(reason, completion) for _, reason, _, completion in ends] == [("length", 0)] * 2


def test_max_tokens_0_without_echo_is_refused_and_with_it_still_needs_room_for_the_engines_token(
        make_service, tokenizer):
    service, engine = make_service(limits=ModelLimits(max_context=8, max_new_tokens=4))
    req = request(max_tokens=0)
    service.accept(req)
    wait(req)
    error = parse_error(req.sent[0][1])
    assert error.param == "max_new_tokens" and "0 only with echo" in error.message
    full = request(echo=True, max_tokens=0, stream=False)  # 8 prompt ids: no room for the engine's one token
    full.inputs["text_input"] = np.array([[b""]], dtype=object)
    full.inputs["input_ids"] = np.array([[5] * 8], dtype=np.int32)
    service.accept(full)
    wait(full)
    assert parse_error(full.sent[0][1]).param == "prompt" and engine.streams == []


@pytest.mark.parametrize("stream", [True, False])
def test_the_prefix_cache_share_reaches_every_choice_still_open_at_the_engines_end(make_service, stream):
    """An engine with the feature (CPU) is asked for num_cached_tokens (in its final response),
    and each choice's last response carries it; without the feature (GPU) it is neither asked
    for nor sent."""
    service, engine = make_service(limits=FEATURES)
    req = request(num_return_sequences=3, stream=stream)
    service.accept(req)
    wait(req)
    assert NUM_CACHED_TOKENS in engine.outputs
    assert [g.cached_tokens for g in req.ended] == [7, 7, 7]
    gen = req.ended[0]
    assert output_tensors("x", gen=gen)["cached_tokens"].tolist() == [[7]]
    plain, engine = make_service()  # the GPU repository's features: not asked, not reported
    req = request(stream=stream)
    plain.accept(req)
    wait(req)
    assert NUM_CACHED_TOKENS not in engine.outputs and [g.cached_tokens for g in req.ended] == [None]
    assert "cached_tokens" not in output_tensors("x", gen=req.ended[0])


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_are_left_out_unless_skip_special_tokens_is_false(make_service, tokenizer, skip):
    """skip_special_tokens (vLLM's), direct gRPC: a special token the engine generates (here
    <|im_start|>) is not in the text by default; with false it is, streamed or not."""
    reply = " one<|im_start|> two"
    engine = FakeEngine(tokenizer, reply)
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") in engine.ids
    for stream in (True, False):
        service, _ = make_service(engine=engine)
        req = request(stream=stream, max_tokens=len(engine.ids))
        if not skip:
            req.inputs["skip_special_tokens"] = np.array([[False]], dtype=np.bool_)
        service.accept(req)
        wait(req)
        assert choice_texts(req, 1) == [" one two" if skip else reply]


# -- truncate_prompt_tokens and allowed_token_ids (vLLM's) -------------------------------------------

PROMPT = "one two three four five six seven eight nine ten eleven twelve"


@pytest.mark.parametrize("as_ids", [False, True])
def test_truncate_prompt_tokens_gives_the_engine_the_prompts_last_tokens(make_service, tokenizer, as_ids):
    """vLLM's truncate_prompt_tokens: the last k tokens of the tokenized prompt (or of its ids),
    counted as the prompt's tokens; -1 keeps as many as fit the context with max_tokens. A
    prompt too long for the context without it is a 400, with it served."""
    ids = tokenizer(PROMPT).input_ids
    limits = ModelLimits(max_context=10, max_new_tokens=8)
    cases = ((None, None), (3, ids[-3:]), (-1, ids[-(10 - 4):]), (len(ids) + 5, None))
    for keep, sent in cases:
        service, engine = make_service(limits=limits)
        req = request(stream=False, max_tokens=4)
        if as_ids:
            req.inputs["text_input"] = np.array([[b""]], dtype=object)
            req.inputs["input_ids"] = np.array([ids], dtype=np.int32)
        else:
            req.inputs["text_input"] = np.array([[PROMPT.encode()]], dtype=object)
        if keep is not None:
            req.inputs["truncate_prompt_tokens"] = np.array([[keep]], dtype=np.int32)
        service.accept(req)
        wait(req)
        if keep is None or keep > limits.max_context:  # not truncated, or k over the context: refused
            error = parse_error(req.sent[0][1])
            assert error.param == ("prompt" if keep is None else "truncate_prompt_tokens"), error
            assert engine.streams == []
            continue
        assert engine.prompts[-1] == sent, keep
        final = [p for k, p in req.sent if k == "send_final"][0]
        assert final[2] == len(sent)  # prompt_tokens: what the engine was given


def test_truncate_prompt_tokens_that_still_leaves_no_room_is_refused(make_service, tokenizer):
    service, engine = make_service(limits=ModelLimits(max_context=10, max_new_tokens=8))
    req = request(stream=False, max_tokens=8)
    req.inputs["text_input"] = np.array([[PROMPT.encode()]], dtype=object)
    req.inputs["truncate_prompt_tokens"] = np.array([[5]], dtype=np.int32)  # 5 + 8 > 10
    service.accept(req)
    wait(req)
    error = parse_error(req.sent[0][1])
    assert error.param == "prompt" and "5 tokens" in error.message and engine.streams == []


@pytest.mark.parametrize("keep", [0, -2])
def test_truncate_prompt_tokens_out_of_range_is_refused(make_service, keep):
    service, engine = make_service()
    req = request(stream=False)
    req.inputs["truncate_prompt_tokens"] = np.array([[keep]], dtype=np.int32)
    service.accept(req)
    wait(req)
    assert parse_error(req.sent[0][1]).param == "truncate_prompt_tokens" and engine.streams == []


def test_echo_of_a_truncated_prompt_is_the_text_of_the_tokens_kept(make_service, tokenizer):
    service, engine = make_service()
    req = request(echo=True, stream=False, max_tokens=2)
    req.inputs["text_input"] = np.array([[PROMPT.encode()]], dtype=object)
    req.inputs["truncate_prompt_tokens"] = np.array([[2]], dtype=np.int32)
    service.accept(req)
    wait(req)
    kept = tokenizer(PROMPT).input_ids[-2:]
    assert tokenizer.decode(kept) == " eleven twelve"
    assert choice_texts(req, 1)[0] == " eleven twelve" + tokenizer.decode(engine.ids[:2])


def test_allowed_token_ids_reach_the_engine_as_a_dense_bias_with_logit_bias(make_service, tokenizer):
    """Only the allowed ids keep their logits (their logit_bias added); every other token gets
    DISALLOWED_BIAS, a logit_bias on it included, in TensorRT-LLM's embedding_bias (both engines)."""
    from trident.contract import DISALLOWED_BIAS

    vocab = len(tokenizer)
    service, engine = make_service()
    req = request(stream=False)
    req.inputs["allowed_token_ids"] = np.array([[7, 9, 7]], dtype=np.int32)
    req.inputs["logit_bias_ids"] = np.array([[9, 11]], dtype=np.int32)
    req.inputs["logit_bias_values"] = np.array([[2.5, 50.0]], dtype=np.float32)
    service.accept(req)
    wait(req)
    bias = engine.tensors[-1]["embedding_bias"]
    assert bias.shape == (1, vocab) and bias.dtype == np.float32
    expected = np.full(vocab, DISALLOWED_BIAS, dtype=np.float32)
    expected[7], expected[9] = 0.0, 2.5
    assert np.array_equal(bias[0], expected)
    plain = request(stream=False)  # no restriction, no bias: no tensor
    service.accept(plain)
    wait(plain)
    assert "embedding_bias" not in engine.tensors[-1]


def test_allowed_token_ids_outside_the_vocabulary_are_refused(make_service, tokenizer):
    service, engine = make_service()
    req = request(stream=False)
    req.inputs["allowed_token_ids"] = np.array([[5, len(tokenizer) + 3]], dtype=np.int32)
    service.accept(req)
    wait(req)
    error = parse_error(req.sent[0][1])
    assert error.param == "allowed_token_ids" and str(len(tokenizer) + 3) in error.message
    assert engine.streams == []


@pytest.mark.parametrize("admission", [True, False])
def test_return_prompt_token_ids_sends_the_ids_the_engine_got_first(make_service, tokenizer, admission):
    """return_prompt_token_ids: the first response (the admission, asked for or not) holds the
    prompt's ids, after truncate_prompt_tokens; the engine got those ids."""
    service, engine = make_service()
    req = request(return_prompt_token_ids=True, truncate_prompt_tokens=2)
    req.admission = admission
    service.accept(req)
    wait(req)
    kind, (count, ids) = req.sent[0]
    whole = tokenizer("Hello there").input_ids
    assert kind == "send_admission" and ids == whole[-2:] == list(engine.prompts[-1]) and count == 2
    assert req.sent[-1][0] == "send_final"
    plain = request()
    service.accept(plain)
    wait(plain)
    assert all(kind != "send_admission" for kind, _ in plain.sent)
