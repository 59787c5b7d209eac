"""The CPU engine's output controls (issue 15) on the real model, on both model paths: the
torch-ops float32 model (slot cache) and the fused int4 model (paged cache, prefix reuse).

Log-probabilities are checked against a teacher-forced float32 forward of Hugging Face
transformers; penalties against their formula on the same reference logits; n against the n = 1
stream; guided decoding by parsing and validating the text.
"""
from __future__ import annotations

import json
import time
from collections import defaultdict

import numpy as np
import pytest
from testkit import model_dir
from engine_sink import Collector
import torch

from trident.contract import DISALLOWED_BIAS, Guide, SamplingParams
from trident.engine import Engine, EngineConfig, GenerationRequest, InvalidRequestError, request_from_tensors, response_arrays
from trident.engine_tensors import (
    CONTEXT_LOG_PROB_RANKS,
    CONTEXT_LOG_PROBS,
    CONTEXT_OUTPUTS,
    CONTEXT_TOP_LOG_PROB_IDS,
    CONTEXT_TOP_LOG_PROBS,
    NUM_CACHED_TOKENS,
    engine_inputs,
    read_response,
)

CKPT = model_dir()
pytestmark = pytest.mark.skipif(not (CKPT / "model.safetensors").is_file(), reason=f"no checkpoint in {CKPT}")

EOS = 2
TIMEOUT = 120
# int4 weights: the engine's log-probabilities are those of the int4 model, so they differ from
# float32's by its quantization error. Measured on SmolLM2-135M: at most ~0.3 nats on these
# prompts' greedy tokens; the bound leaves margin and still catches a wrong distribution
# (temperature applied, a shifted position, a missing log_softmax: errors of whole nats).
INT4_LOGPROB_BOUND = 0.75
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "pattern": "^[A-Za-z ]{1,12}$"},
                   "colour": {"enum": ["red", "green", "blue"]},
                   "happy": {"type": "boolean"}},
    "required": ["name", "colour", "happy"],
    "additionalProperties": False,
}


_ids = iter(range(10**6))


def run(engine, ids, *, end_id=EOS, context=None, min_tokens_stops=(), **sampling):
    """Submit one request and wait: its streams by sequence index."""
    rid = f"r{next(_ids)}"
    sink = Collector()
    sampling.setdefault("max_new_tokens", 12)
    sampling.setdefault("temperature", 0.0)
    engine.submit(GenerationRequest(rid, list(ids), SamplingParams(**sampling), end_id=end_id,
                                    context_logprobs=context, min_tokens_stops=tuple(min_tokens_stops)), sink)
    return sink.streams(rid)


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(CKPT)


@pytest.fixture(scope="module")
def info_path(tmp_path_factory, tok):
    from trident.grammar import write_tokenizer_info

    return str(write_tokenizer_info(CKPT, tmp_path_factory.mktemp("xgr") / "xgrammar_tokenizer_info.json"))


def _engine(info_path, **config):
    eng = Engine(EngineConfig(checkpoint_dir=str(CKPT), max_batch_size=8, max_seq_len=256, dtype="float32",
                              xgrammar_tokenizer_info_path=info_path, **config))
    eng.start()
    return eng


@pytest.fixture(scope="module")
def fp32(info_path):
    eng = _engine(info_path)
    assert not eng.model.batch_invariant  # the torch-ops model, slot cache
    yield eng
    eng.stop()


@pytest.fixture(scope="module")
def int4(info_path):
    eng = _engine(info_path, weight_dtype="int4")
    assert eng.config.weight_dtype == "int4", "int4 kernels unavailable: the engine fell back"
    yield eng
    eng.stop()


@pytest.fixture(params=["fp32", "int4"])
def engine(request):
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(CKPT, dtype=torch.float32).eval()


def reference_logits(hf, prompt, output):
    """Teacher-forced float32 logits (len(output), V) of each output position."""
    with torch.inference_mode():
        logits = hf(torch.tensor([prompt + output])).logits[0].float()
    return logits[len(prompt) - 1:len(prompt) - 1 + len(output)]


def chat(tok, text):
    out = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


# ---- logprobs ----


@pytest.mark.parametrize("name, bound", [("fp32", 1e-4), ("int4", INT4_LOGPROB_BOUND)])
def test_logprobs_are_the_raw_model_distribution(request, tok, hf, name, bound):
    engine = request.getfixturevalue(name)
    prompt = tok("The capital of France is").input_ids
    # a temperature and a penalty change the sampling distribution, never the reported one
    [(tokens, _, outs)] = run(engine, prompt, max_new_tokens=10, logprobs=5, temperature=0.7, top_k=1,
                              repetition_penalty=1.3).values()
    lps = [x for o in outs for x in o.log_probs]
    top_ids = [x for o in outs for x in o.top_ids]
    top_lps = [x for o in outs for x in o.top_log_probs]
    assert len(lps) == len(top_ids) == len(top_lps) == len(tokens) == 10
    assert outs[-1].cum_log_prob == pytest.approx(sum(lps), abs=1e-4)
    ref = reference_logits(hf, prompt, tokens).log_softmax(-1)
    chosen = ref[torch.arange(len(tokens)), torch.tensor(tokens)]
    err = (torch.tensor(lps) - chosen).abs().max().item()
    print(f"{name}: max |logprob - fp32 reference| = {err:.2e}")
    assert err < bound
    for ids, values in zip(top_ids, top_lps):
        assert len(ids) == 5 and values == sorted(values, reverse=True)
    if name == "fp32":
        for i, ids in enumerate(top_ids):
            assert ids == ref[i].topk(5).indices.tolist()
            assert np.allclose(top_lps[i], ref[i].topk(5).values.tolist(), atol=1e-4)


def test_greedy_chooses_the_best_alternative_and_plain_requests_carry_none(int4, tok):
    prompt = chat(tok, "Name three fruits.")
    [(tokens, _, outs)] = run(int4, prompt, max_new_tokens=8, logprobs=3).values()
    assert [t[0] for o in outs for t in o.top_ids] == tokens
    assert all(lp == t[0] for o in outs for lp, t in zip(o.log_probs, o.top_log_probs))
    [(plain, _, outs)] = run(int4, prompt, max_new_tokens=8).values()
    assert plain == tokens
    assert all(o.log_probs is None and o.top_ids is None and o.sequence_index is None for o in outs)
    [(_, _, outs)] = run(int4, prompt, max_new_tokens=8, logprobs=0).values()
    assert all(len(o.log_probs) == len(o.token_ids) and o.top_ids is None for o in outs)


# ---- the prompt's log-probabilities (num_context_log_probs) ----

CONTEXT_TEXT = ("In 1492, Columbus sailed the ocean blue. He was looking for a route to India but found the "
                "Americas instead, which changed history.")


def outputs_of(engine, prompt, rid, *, streaming=True, request=None, **sampling):
    """One short greedy request (no end id) with these GenerationRequest fields: its outputs, in
    the order sent."""
    sink = Collector()
    sampling.setdefault("max_new_tokens", 3)
    sampling.setdefault("temperature", 0.0)
    engine.submit(GenerationRequest(rid, list(prompt), SamplingParams(**sampling), end_id=None, streaming=streaming,
                                    **(request or {})), sink)
    return sink.finished(rid)


def context_run(engine, prompt, k, *, rid=None, streaming=True, **sampling):
    """A request with context logprobs: its outputs in the order sent, checked that exactly the
    first carries the prompt's arrays; returns (log_probs (L,), top ids (L, k), top values, outputs)."""
    outs = outputs_of(engine, prompt, rid or f"c{next(_ids)}", streaming=streaming,
                      request={"context_logprobs": k}, **sampling)
    assert [o.context_log_probs is not None for o in outs] == [True] + [False] * (len(outs) - 1)
    first = outs[0]
    L = len(prompt)
    assert first.context_log_probs.shape == (L,) and first.context_log_probs.dtype == np.float32
    assert first.context_top_ids.shape == first.context_top_log_probs.shape == (L, k)
    return first.context_log_probs, first.context_top_ids, first.context_top_log_probs, outs


def reference_prompt_logprobs(hf, prompt):
    """Teacher-forced float32 log_softmax (L - 1, V): row i - 1 is the distribution of prompt[i]."""
    with torch.inference_mode():
        return hf(torch.tensor([prompt])).logits[0, :-1].float().log_softmax(-1)


@pytest.mark.parametrize("name, bound", [("fp32", 1e-4), ("int4", INT4_LOGPROB_BOUND)])
def test_context_logprobs_are_the_prompts_teacher_forced_distribution(request, tok, hf, name, bound):
    engine = request.getfixturevalue(name)
    prompt = tok(CONTEXT_TEXT).input_ids
    L, k = len(prompt), 5
    # raw logits: temperature and penalties change nothing
    lp, ids, values, _ = context_run(engine, prompt, k, temperature=0.7, top_k=1, repetition_penalty=1.3)
    assert np.isnan(lp[0]) and (ids[0] == -1).all() and np.isnan(values[0]).all()
    ref = reference_prompt_logprobs(hf, prompt)
    expected = ref[torch.arange(L - 1), torch.tensor(prompt[1:])].numpy()
    err = np.abs(lp[1:] - expected)
    print(f"{name}: prompt of {L}: max |logprob - fp32 reference| = {err.max():.2e}, mean {err.mean():.2e}")
    assert err.max() < bound and err.mean() < bound / 3  # a shifted row is off by nats everywhere
    ref_values = ref.topk(k).values.numpy()
    assert np.abs(values[1:] - ref_values).max() < bound
    # each alternative is the token it names (ties allowed: ids are checked through their values)
    assert np.abs(values[1:] - ref.gather(1, torch.from_numpy(ids[1:]).long()).numpy()).max() < bound
    assert (np.diff(values[1:], axis=1) <= 0).all()
    for i in range(1, L):  # consistent with the token's own entry
        assert values[i, 0] >= lp[i]
        if prompt[i] in ids[i].tolist():
            assert values[i, ids[i].tolist().index(prompt[i])] == lp[i]
    if name == "fp32":
        assert (ids[1:] == ref.topk(k).indices.numpy()).mean() > 0.95  # only near-ties may swap
    # each prompt token's rank: the tokens at least as likely there, itself included (vLLM's count)
    ranks = context_run(engine, prompt, k)[3][0].context_ranks
    assert ranks.shape == (L,) and ranks.dtype == np.int32 and ranks[0] == 0 and (ranks[1:] >= 1).all()
    for i in range(1, L):  # where the token is one of the k best, its rank is its place there
        row = ids[i].tolist()
        if prompt[i] in row and (values[i] == lp[i]).sum() == 1:
            assert ranks[i] == row.index(prompt[i]) + 1
    ref_ranks = (ref >= torch.from_numpy(expected)[:, None]).sum(-1).numpy()
    off = np.abs(ranks[1:] - ref_ranks)
    print(f"{name}: ranks {ranks[1:].min()}..{ranks[1:].max()}, off from the fp32 reference by at most {off.max()}, "
          f"the same at {(off == 0).mean():.0%} of the positions")
    if name == "fp32":  # only near-ties may differ
        assert (off <= np.maximum(2, ref_ranks // 100)).all()
    else:  # quantized weights move flat distributions' ranks; the order stays
        assert (off <= np.maximum(2, ref_ranks // 2)).all() and (off == 0).mean() > 0.7
    assert len(set(ranks[1:].tolist())) > 3  # not a constant
    # k = 0: the log-probabilities alone, the same ones (and the same ranks)
    lp0, ids0, _, outs0 = context_run(engine, prompt, 0)
    assert ids0.shape == (L, 0) and np.array_equal(lp0, lp, equal_nan=True)
    assert np.array_equal(outs0[0].context_ranks, ranks)


@pytest.mark.parametrize("name", ["fp32", "int4"])
def test_context_logprobs_of_a_chunked_prefill_are_the_same(request, info_path, tok, monkeypatch, name):
    """A prompt longer than prefill_token_budget (int4: prefilled over several steps, next to a
    plain request) and fewer context rows a step than the prompt has (both models) change nothing."""
    prompt = tok(CONTEXT_TEXT + " " + CONTEXT_TEXT).input_ids[:50]
    whole = context_run(request.getfixturevalue(name), prompt, 4)
    extra = {"weight_dtype": "int4"} if name == "int4" else {}
    small = _engine(info_path, prefill_token_budget=16, **extra)
    try:
        other = tok("A plain request beside it").input_ids
        for rows in (256, 7):
            monkeypatch.setattr("trident.engine.paged_batch.CONTEXT_ROWS_PER_STEP", rows)
            monkeypatch.setattr("trident.engine.slot_batch.CONTEXT_ROWS_PER_STEP", rows)
            sink = Collector()
            small.submit(GenerationRequest(f"beside-{rows}", other, SamplingParams(max_new_tokens=20, temperature=0.0)),
                         sink)
            steps = small.stats()["steps"]
            chunked = context_run(small, prompt, 4)
            assert sink.finished(f"beside-{rows}")[-1].finish_reason == "length"
            if name == "int4":  # its first token came after a prefill of one chunk a step
                assert chunked[3][0].step - steps >= -(-len(prompt) // min(16, rows))
            for a, b in zip(whole[:3], chunked[:3]):
                if name == "int4":  # rows never influence each other: the same bits
                    assert np.array_equal(a, b, equal_nan=True)
                else:
                    assert np.allclose(a, b, atol=1e-5, equal_nan=True)
            assert whole[3][0].token_ids == chunked[3][0].token_ids
    finally:
        small.stop()


def test_context_logprobs_bypass_the_prefix_cache_and_leave_it_to_others(int4, tok):
    prompt = tok("Prefix reuse and context log-probabilities: " + CONTEXT_TEXT).input_ids
    assert len(prompt) > 2 * int4.config.kv_block_size

    def delta(before):
        after = int4.stats()
        return {k: after[k] - before[k] for k in ("prefix_cache_hit_tokens", "prefix_cache_hit_requests",
                                                  "prompt_tokens_prefilled")}

    before = int4.stats()
    first = context_run(int4, prompt, 3)
    assert delta(before) == {"prefix_cache_hit_tokens": 0, "prefix_cache_hit_requests": 0,
                             "prompt_tokens_prefilled": len(prompt)}
    before = int4.stats()
    second = context_run(int4, prompt, 3)  # its blocks are cached now: every position computed anyway
    assert delta(before) == {"prefix_cache_hit_tokens": 0, "prefix_cache_hit_requests": 0,
                             "prompt_tokens_prefilled": len(prompt)}
    for a, b in zip(first[:3], second[:3]):
        assert np.array_equal(a, b, equal_nan=True)
    before = int4.stats()
    [(tokens, _, _)] = run(int4, prompt, max_new_tokens=3).values()  # a plain request reuses them
    reused = delta(before)
    assert reused["prefix_cache_hit_requests"] == 1 and reused["prefix_cache_hit_tokens"] > 0
    assert tokens == first[3][0].token_ids + [t for o in first[3][1:] for t in o.token_ids]


@pytest.mark.parametrize("streaming", [False, True])
def test_context_logprobs_of_n_sequences_come_once(engine, tok, streaming):
    prompt = tok(CONTEXT_TEXT).input_ids
    single = context_run(engine, prompt, 2)
    lp, ids, values, outs = context_run(engine, prompt, 2, n=2, streaming=streaming, max_new_tokens=4,
                                        temperature=1.0, seed=5)
    assert {o.sequence_index for o in outs} == {0, 1}
    for a, b in zip(single[:3], (lp, ids, values)):
        assert np.array_equal(a, b, equal_nan=True)


def test_a_bad_num_context_log_probs_is_an_invalid_request_naming_it(fp32, tok):
    sink = Collector()
    fp32.submit(GenerationRequest("ctx-21", [1, 2, 3], SamplingParams(max_new_tokens=2), context_logprobs=21), sink)
    [out] = sink.finished("ctx-21")
    assert out.finish_reason == "error" and out.error_type == "invalid_request_error"
    assert out.error_param == "num_context_log_probs" and "between 0 and 20" in out.error
    tensors = engine_inputs(SamplingParams(max_new_tokens=2), input_ids=[1, 2, 3], end_id=EOS, pad_id=EOS)
    with pytest.raises(InvalidRequestError, match="num_context_log_probs must be an integer") as err:
        request_from_tensors("f", {**tensors, "num_context_log_probs": np.array([[2.0]], dtype=np.float32)})
    assert err.value.param == "num_context_log_probs"
    assert request_from_tensors("off", {**tensors, "num_context_log_probs": np.array([[-1]], np.int32)}) \
        .context_logprobs is None
    assert request_from_tensors("absent", tensors).context_logprobs is None


# ---- n ----


def test_n_greedy_is_identical_sampled_distinct_seeded_reproducible(engine, tok):
    prompt = tok("Once upon a time, in a small village,").input_ids
    before = engine.stats()
    greedy = run(engine, prompt, n=3, max_new_tokens=8)
    after = engine.stats()
    assert sorted(greedy) == [0, 1, 2]
    assert greedy[0][0] == greedy[1][0] == greedy[2][0] == run(engine, prompt, max_new_tokens=8)[0][0]
    # the prompt computed once for the three (a new prompt for the prefix cache)
    assert after["prompt_tokens_prefilled"] - before["prompt_tokens_prefilled"] == len(prompt)
    assert after["requests_prefilled"] - before["requests_prefilled"] == 1
    kw = dict(n=4, max_new_tokens=12, temperature=1.0, seed=1234)
    sampled = run(engine, prompt, **kw)
    texts = [sampled[i][0] for i in range(4)]
    assert len({tuple(t) for t in texts}) == 4, texts
    assert [run(engine, prompt, **kw)[i][0] for i in range(4)] == texts
    single = run(engine, prompt, max_new_tokens=12, temperature=1.0, seed=1234)
    assert single[0][0] == texts[0]  # child 0 is the n = 1 stream
    assert all(sampled[i][1] in ("length", "end_id") for i in range(4))


def test_cancelling_an_n_request_ends_every_sequence(engine, tok):
    prompt = tok("Write a very long story about a dragon.").input_ids
    rid = "cancel-n"
    sink = Collector()
    engine.submit(GenerationRequest(rid, prompt, SamplingParams(n=3, max_new_tokens=200, temperature=1.0, seed=3),
                                    end_id=None, streaming=True), sink)
    assert sink.first[rid].wait(TIMEOUT)
    engine.cancel(rid)
    outs = sink.finished(rid)
    ends = {o.sequence_index: o.finish_reason for o in outs if o.finish_reason}
    assert ends == {0: "cancelled", 1: "cancelled", 2: "cancelled"}
    assert sum(len(o.token_ids) for o in outs) < 3 * 200
    deadline = time.monotonic() + 10  # the final output comes just before the batch drops them
    while engine.stats()["active"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats()["active"] == 0


# ---- penalties, min_tokens, logit_bias, min_p ----


def test_frequency_penalty_follows_its_formula(fp32, tok, hf):
    prompt = tok("the the the the the the the the").input_ids
    [(tokens, _, _)] = run(fp32, prompt, max_new_tokens=12, end_id=None, frequency_penalty=2.0,
                           presence_penalty=0.5).values()
    # every choice is the argmax of logit - 0.5 * (count > 0) - 2 * count over the output so far
    ref = reference_logits(hf, prompt, tokens)
    counts = torch.zeros(ref.shape[1])
    for i, t in enumerate(tokens):
        assert (ref[i] - 0.5 * (counts > 0) - 2.0 * counts).argmax().item() == t, i
        counts[t] += 1
    assert counts.max() > 1  # the penalty was in play: a token came back despite it


def test_frequency_penalty_stops_a_repetition(engine, tok):
    """A weaker property than "no token repeats" (which this model breaks at penalty 2: its
    newline logits lead by more than 2 nats, so " hello\n```\n\nThis is a" has three newlines):
    the token a greedy run loops on without the penalty comes at most once with
    frequency_penalty 2, and the run's most frequent token is rarer. The exact formula is checked
    against reference logits in test_frequency_penalty_follows_its_formula."""
    prompt = tok("Repeat after me: hello hello hello hello").input_ids
    [(plain, _, _)] = run(engine, prompt, max_new_tokens=8, end_id=None).values()
    looped = max(set(plain), key=plain.count)
    assert plain.count(looped) >= 4, plain  # the model loops on this prompt
    [(tokens, _, _)] = run(engine, prompt, max_new_tokens=8, end_id=None, frequency_penalty=2.0).values()
    assert tokens.count(looped) <= 1, tok.decode(tokens)
    assert max(tokens.count(t) for t in tokens) < plain.count(looped)


def test_min_tokens_bans_the_end_id_until_reached(engine, tok):
    prompt = tok("What is 2+2?").input_ids
    [(short, reason, _)] = run(engine, prompt, max_new_tokens=16).values()
    assert reason == "end_id" and len(short) < 6  # greedy ends at once here
    [(tokens, _, _)] = run(engine, prompt, max_new_tokens=16, min_tokens=6).values()
    assert len(tokens) >= 6 and EOS not in tokens


def test_min_tokens_bans_the_stop_tokens_it_is_given_until_reached(engine, tok):
    """min_tokens_stop_ids (the llm model's stop tokens, vLLM's min_tokens): banned as the end id
    is while fewer than min_tokens tokens were generated, ordinary tokens after. A token forced by
    logit_bias comes only from the min_tokens-th position on; without the ban it comes at once."""
    prompt = tok("The capital of France is").input_ids
    forced = tok(" banana").input_ids[0]
    bias = ((forced, 100.0),)
    [(plain, _, _)] = run(engine, prompt, max_new_tokens=6, min_tokens=4, logit_bias=bias).values()
    assert plain == [forced] * 6  # only the end id is banned
    [(tokens, _, _)] = run(engine, prompt, max_new_tokens=6, min_tokens=4, logit_bias=bias,
                           min_tokens_stops=(forced,)).values()
    assert forced not in tokens[:4] and tokens[4:] == [forced] * 2, tok.decode(tokens)
    # with n > 1 each sequence counts its own tokens; without min_tokens nothing is banned
    streams = run(engine, prompt, max_new_tokens=5, min_tokens=3, logit_bias=bias, min_tokens_stops=(forced,),
                  n=2, temperature=0.9, seed=3)
    assert [toks[3:] for toks, _, _ in streams.values()] == [[forced] * 2] * 2
    assert all(forced not in toks[:3] for toks, _, _ in streams.values())
    [(free, _, _)] = run(engine, prompt, max_new_tokens=3, logit_bias=bias, min_tokens_stops=(forced,)).values()
    assert free == [forced] * 3


def test_min_tokens_stop_ids_are_read_and_checked(engine):
    """The CPU engine's input min_tokens_stop_ids (1, K): read into the request; ids outside the
    vocabulary are a 400 naming it, as a float tensor is."""
    base = {"input_ids": np.array([[1, 2, 3]], np.int32), "request_output_len": np.array([[4]], np.int32),
            "min_tokens": np.array([[2]], np.int32)}
    req = request_from_tensors("a", {**base, "min_tokens_stop_ids": np.array([[7, 9]], np.int32)})
    assert req.min_tokens_stops == (7, 9)
    assert request_from_tensors("b", base).min_tokens_stops == ()
    with pytest.raises(InvalidRequestError, match="min_tokens_stop_ids") as bad:
        request_from_tensors("c", {**base, "min_tokens_stop_ids": np.array([[7.0]], np.float32)})
    assert bad.value.param == "min_tokens_stop_ids"
    vocab = engine.model.config.vocab_size
    wide = request_from_tensors("d", {**base, "min_tokens_stop_ids": np.array([[vocab]], np.int32)})
    with pytest.raises(InvalidRequestError, match=r"min_tokens_stop_ids contains ids outside") as out:
        wide.validate(vocab_size=vocab, max_seq_len=256)
    assert out.value.param == "min_tokens_stop_ids"


def test_an_embedding_bias_wider_than_the_vocabulary_is_a_400_naming_it():
    """The dense embedding_bias read back as allowed ids or as biased tokens: a token past the
    model's vocabulary is refused either way (one bound for both)."""
    base = {"input_ids": np.array([[1, 2, 3]], np.int32), "request_output_len": np.array([[4]], np.int32)}
    vocab = 100
    allowed = np.full((1, vocab + 5), DISALLOWED_BIAS, np.float32)
    allowed[0, [3, vocab + 2]] = 0.0  # allowed_token_ids (3, 102)
    biased = np.zeros((1, vocab + 5), np.float32)
    biased[0, vocab + 1] = 2.5  # logit_bias ((101, 2.5),)
    for bias, token in ((allowed, vocab + 2), (biased, vocab + 1)):
        req = request_from_tensors("w", {**base, "embedding_bias": bias})
        with pytest.raises(InvalidRequestError, match=f"entries at most .*got one for token {token}$") as out:
            req.validate(vocab_size=vocab, max_seq_len=256)
        assert out.value.param == "embedding_bias"
        req.validate(vocab_size=vocab + 5, max_seq_len=256)  # within a wider vocabulary: fine


def test_logit_bias_forces_and_bans(engine, tok):
    prompt = tok("The capital of France is").input_ids
    [(plain, _, _)] = run(engine, prompt, max_new_tokens=4).values()
    forced = tok(" banana").input_ids[0]
    [(tokens, _, _)] = run(engine, prompt, max_new_tokens=4, logit_bias=((forced, 100.0),)).values()
    assert tokens == [forced] * 4
    [(tokens, _, _)] = run(engine, prompt, max_new_tokens=4, logit_bias=((plain[0], -100.0),)).values()
    assert tokens[0] != plain[0]


def test_allowed_token_ids_keep_every_other_token_out(engine, tok):
    """vLLM's allowed_token_ids, as the llm model sends it (a dense embedding_bias with
    DISALLOWED_BIAS elsewhere) and the engine reads it back: sampled choices draw only allowed
    tokens; a logit_bias on an allowed token still applies."""
    from trident.engine_tensors import engine_inputs, read_sampling

    prompt = tok("The capital of France is").input_ids
    allowed = [tok(w).input_ids[0] for w in (" Paris", " London", " banana", " the", " a")]
    vocab = engine.model.config.vocab_size

    def sampled(**extra):
        params = SamplingParams(max_new_tokens=8, temperature=1.5, n=2, seed=5, **extra)
        got = read_sampling(engine_inputs(params, input_ids=prompt, end_id=EOS, pad_id=EOS, vocab_size=vocab))
        assert got.allowed_token_ids == tuple(sorted(extra.get("allowed_token_ids", ())))
        streams = run(engine, prompt, **{f: getattr(got, f) for f in ("max_new_tokens", "temperature", "n", "seed",
                                                                      "logit_bias", "allowed_token_ids")})
        return [tokens for tokens, _, _ in streams.values()]

    free = sampled()
    assert any(t not in allowed for tokens in free for t in tokens)  # unrestricted, they wander
    restricted = sampled(allowed_token_ids=tuple(allowed))
    assert len(restricted) == 2 and all(len(tokens) == 8 and set(tokens) <= set(allowed) for tokens in restricted)
    forced = sampled(allowed_token_ids=tuple(allowed), logit_bias=((allowed[2], 100.0), (tok(" Rome").input_ids[0], 100.0)))
    assert forced == [[allowed[2]] * 8] * 2


def test_min_p_one_is_greedy(engine, tok):
    prompt = tok("def fibonacci(n):").input_ids
    [(greedy, _, _)] = run(engine, prompt, max_new_tokens=10).values()
    [(tokens, _, _)] = run(engine, prompt, max_new_tokens=10, temperature=1.5, min_p=1.0, seed=9).values()
    assert tokens == greedy
    [(loose, _, _)] = run(engine, prompt, max_new_tokens=10, temperature=1.5, seed=9).values()
    assert loose != greedy  # the same draw without min_p wanders


# ---- guided decoding ----


def _validator():
    try:
        import jsonschema_rs

        return jsonschema_rs.validator_for(SCHEMA).is_valid
    except ImportError:
        import jsonschema

        return jsonschema.Draft202012Validator(SCHEMA).is_valid


def test_json_schema_guide_output_parses_and_validates(engine, tok):
    guide = Guide("json_schema", json.dumps(SCHEMA))
    valid = _validator()
    prompts = [chat(tok, "Describe a cat."), tok("Hello").input_ids]
    for prompt in prompts:
        for kw in (dict(temperature=0.0), dict(n=2, temperature=1.0, seed=5)):
            streams = run(engine, prompt, max_new_tokens=64, guide=guide, **kw)
            for tokens, reason, _ in streams.values():
                text = tok.decode(tokens)
                assert reason == "end_id", (reason, text)
                assert valid(json.loads(text)), text


def test_compiled_guides_are_kept_within_their_cache_limit(info_path):
    """Each new schema's compiled grammar (tens of KB against SmolLM2's vocabulary) is kept for
    reuse; bounded (guide_cache_mb), the least recently used are evicted, so a server that sees
    ever new schemas (tool sets, schemas that carry data) does not grow without end."""
    from trident.engine.guided import GuideCompiler

    def schema(i):
        return Guide("json_schema", json.dumps({"type": "object", "properties": {f"name_{i}": {"type": "string"}}}))

    bounded = GuideCompiler(info_path, vocab_size=49152, cache_bytes=400_000)
    unbounded = GuideCompiler(info_path, vocab_size=49152)
    none = GuideCompiler(info_path, vocab_size=49152, cache_bytes=0)
    assert bounded.cache_bytes() == 0  # nothing compiled yet
    for i in range(30):
        for compiler in (bounded, unbounded, none):
            compiler.compile(schema(i))
    assert 0 < bounded.cache_bytes() <= 400_000
    assert unbounded.cache_bytes() > 2 * 400_000  # ~37 KB a schema of one string field
    assert none.cache_bytes() == 0
    assert EngineConfig(checkpoint_dir="x").guide_cache_mb == 64
    with pytest.raises(ValueError, match="guide_cache_mb must be >= 0"):
        EngineConfig(checkpoint_dir="x", guide_cache_mb=-1)


def test_the_engine_reports_its_guide_cache(fp32, tok):
    before = fp32.stats()["guide_cache_bytes"]
    guide = Guide("json_schema", json.dumps({"type": "object", "properties": {"cache_probe": {"type": "boolean"}}}))
    run(fp32, tok("Answer:").input_ids, max_new_tokens=3, guide=guide, temperature=0.0)
    assert fp32.stats()["guide_cache_bytes"] > before


def test_a_bad_schema_is_an_error_naming_the_guide(fp32, tok):
    sink = Collector()
    bad = Guide("json_schema", '{"type": "object", "properties": {"a": {"type": "no-such-type"}}}')
    fp32.submit(GenerationRequest("bad-schema", [1, 2, 3], SamplingParams(max_new_tokens=4, guide=bad)), sink)
    [out] = sink.finished("bad-schema")
    assert out.finish_reason == "error" and out.error_type == "invalid_request_error"
    assert out.error_param == "guided_decoding_guide", out


# ---- the Triton adapter's tensors ----


def test_adapter_tensors_round_trip(int4, tok):
    prompt = tok("In 1492, Columbus").input_ids
    vocab = int4.model.config.vocab_size
    sampling = SamplingParams(max_new_tokens=6, temperature=0.8, seed=11, n=2, logprobs=3, min_tokens=2,
                              presence_penalty=0.3, frequency_penalty=0.2, logit_bias=((5, -2.0),), min_p=0.05)
    tensors = engine_inputs(sampling, input_ids=prompt, end_id=EOS, pad_id=EOS, vocab_size=vocab)
    request = request_from_tensors("adapter", tensors)
    assert request.sampling.n == 2 and request.sampling.logprobs == 3 and request.sampling.min_p == pytest.approx(0.05)
    assert request.sampling.logit_bias == ((5, -2.0),) and request.streaming
    sink = Collector()
    int4.submit(request, sink)
    outs = sink.finished("adapter")
    seen = defaultdict(list)
    for out in outs:
        arrays = response_arrays(out)
        back = read_response(arrays.get)
        assert back.token_ids == out.token_ids and back.sequence_index == out.sequence_index
        assert np.allclose(back.log_probs, out.log_probs)
        assert back.top_ids == (out.top_ids if out.token_ids else None)
        seen[back.sequence_index].extend(back.token_ids)
    assert sorted(seen) == [0, 1] and all(len(t) >= 2 for t in seen.values())
    plain = response_arrays(run(int4, prompt, max_new_tokens=2)[0][2][-1])
    assert set(plain) == {"output_ids", "sequence_length"}


def test_context_logprobs_adapter_tensors_round_trip(int4, tok):
    prompt = tok(CONTEXT_TEXT).input_ids
    L = len(prompt)
    tensors = engine_inputs(SamplingParams(max_new_tokens=4, temperature=0.0), input_ids=prompt, end_id=EOS,
                            pad_id=EOS)
    request = request_from_tensors("ctx-adapter", {**tensors, "num_context_log_probs": np.array([[4]], np.int32)})
    assert request.context_logprobs == 4 and request.streaming
    sink = Collector()
    int4.submit(request, sink)
    outs = sink.finished("ctx-adapter")
    arrays = [response_arrays(out) for out in outs]
    assert len(arrays) > 1 and all(not set(CONTEXT_OUTPUTS) & set(a) for a in arrays[1:])
    first = arrays[0]
    assert first[CONTEXT_LOG_PROBS].shape == (1, 1, L) and first[CONTEXT_LOG_PROBS].dtype == np.float32
    assert first[CONTEXT_TOP_LOG_PROBS].shape == (1, 1, L, 4) and first[CONTEXT_TOP_LOG_PROBS].dtype == np.float32
    assert first[CONTEXT_TOP_LOG_PROB_IDS].shape == (1, 1, L, 4)
    assert first[CONTEXT_TOP_LOG_PROB_IDS].dtype == np.int32
    assert np.array_equal(first[CONTEXT_LOG_PROBS].reshape(-1), outs[0].context_log_probs, equal_nan=True)
    assert first[CONTEXT_TOP_LOG_PROB_IDS][0, 0, 0].tolist() == [-1] * 4
    assert np.array_equal(first[CONTEXT_TOP_LOG_PROB_IDS].reshape(L, 4), outs[0].context_top_ids)
    assert first[CONTEXT_LOG_PROB_RANKS].shape == (1, 1, L) and first[CONTEXT_LOG_PROB_RANKS].dtype == np.int32
    back = read_response(first.get)
    assert back.token_ids == outs[0].token_ids
    assert back.context_ranks == outs[0].context_ranks.tolist() and back.context_ranks[0] == 0
    none = dict(tensors)  # k = 0: (1, 1, L, 0)
    request = request_from_tensors("ctx-0", {**none, "num_context_log_probs": np.array([[0]], np.int32)})
    sink = Collector()
    int4.submit(request, sink)
    first = response_arrays(sink.finished("ctx-0")[0])
    assert first[CONTEXT_TOP_LOG_PROBS].shape == first[CONTEXT_TOP_LOG_PROB_IDS].shape == (1, 1, L, 0)
    back = read_response(first.get)  # echo with logprobs 0: the prompt's tokens, no alternatives
    assert len(back.context_log_probs) == L and back.context_top_ids == back.context_top_log_probs == [[]] * L


@pytest.mark.parametrize("streaming", [False, True])
def test_exclude_input_in_output_false_puts_the_prompt_ids_in_front_of_a_non_streaming_output(int4, tok, streaming):
    """TensorRT-LLM's semantics (its inflight_batcher_llm_client.py sends beam_width and may send
    exclude_input_in_output): the request's input overrides the model's parameter, and a
    non-streaming output then holds the prompt's ids before the generated ones; streaming
    outputs never do. beam_width 1 is accepted, any other refused naming it."""
    prompt = tok("In 1492, Columbus").input_ids
    tensors = engine_inputs(SamplingParams(max_new_tokens=5, temperature=0.0), input_ids=prompt, end_id=EOS,
                            pad_id=EOS)
    tensors["streaming"] = np.array([[streaming]])
    tensors["beam_width"] = np.array([[1]], dtype=np.int32)
    generated = {}
    for exclude in (True, False):
        request = request_from_tensors(f"echo-{streaming}-{exclude}", {
            **tensors, "exclude_input_in_output": np.array([[exclude]])}, exclude_input=True)
        sink = Collector()
        int4.submit(request, sink)
        outs = sink.finished(request.request_id)
        arrays = [response_arrays(out) for out in outs]
        generated[exclude] = [t for a in arrays for t in a["output_ids"].reshape(-1).tolist()]
        assert arrays[-1]["sequence_length"].item() == len(outs[-1].token_ids)
    assert len(generated[True]) == 5
    assert generated[False] == (generated[True] if streaming else prompt + generated[True])
    # absent: the model's parameter decides
    assert request_from_tensors("p", tensors, exclude_input=False).include_input is not streaming
    assert not request_from_tensors("p", tensors, exclude_input=True).include_input
    with pytest.raises(InvalidRequestError, match="beam_width must be 1") as err:
        request_from_tensors("b", {**tensors, "beam_width": np.array([[2]], dtype=np.int32)})
    assert err.value.param == "beam_width"


def test_a_row_with_every_token_masked_ends_as_at_its_end_id():
    from trident.engine.sampling import NO_TOKEN, RowSampling, sample_step
    from trident.engine.sequence import Sequence

    request = GenerationRequest("dead", [1, 2], SamplingParams(max_new_tokens=4, temperature=1.0, seed=1), end_id=EOS)
    seq = Sequence.create(request, lambda out: None, vocab_size=8)
    seq.sampling.banned = list(range(8))
    seq.sampling.processed = True
    live = RowSampling(params=SamplingParams(temperature=0.0))
    tokens, _ = sample_step(torch.randn(2, 8), [seq.sampling, live])
    assert tokens[0] == NO_TOKEN and 0 <= tokens[1] < 8
    assert seq.append(tokens[0]) == "end_id" and seq.output == []


# -- the prefix cache's share of a prompt (return_num_cached_tokens) ------------------------------


def cached_run(engine, prompt, *, report=True, streaming=True, **sampling):
    """A request's outputs, checked that only its final one says how many prompt tokens came
    from the prefix cache (and that one only when asked)."""
    outs = outputs_of(engine, prompt, f"k{next(_ids)}", streaming=streaming, request={"report_cached": report},
                      **sampling)
    assert [o.cached_tokens is not None for o in outs] == [False] * (len(outs) - 1) + [report]
    return outs[-1].cached_tokens, outs


def test_the_final_output_says_how_many_prompt_tokens_came_from_the_prefix_cache(int4, fp32, tok):
    """The paged int4 batch: the first request of a prompt computes it all (0); the next reuses
    its whole blocks, all but the last token's (the hit the engine counts); n sequences report
    it once, on the request's final output. The fp32 slot batch has no prefix cache: 0."""
    prompt = tok("The prefix cache's share: " + CONTEXT_TEXT).input_ids
    block = int4.config.kv_block_size
    assert len(prompt) > 2 * block
    before = int4.stats()["prefix_cache_hit_tokens"]
    assert cached_run(int4, prompt)[0] == 0
    reused, _ = cached_run(int4, prompt, streaming=False)
    assert reused == (len(prompt) - 1) // block * block
    assert int4.stats()["prefix_cache_hit_tokens"] - before == reused
    assert cached_run(int4, prompt, n=2, max_new_tokens=4)[0] == reused
    longer = prompt + tok(" And one more sentence of its own.", add_special_tokens=False).input_ids
    assert reused <= cached_run(int4, longer)[0] <= len(prompt)  # its own tail is computed
    assert cached_run(int4, prompt, report=False)[0] is None
    assert cached_run(fp32, prompt)[0] == 0
    assert cached_run(fp32, prompt)[0] == 0


def test_a_cache_salt_shares_prefix_blocks_only_with_its_own_requests(int4, tok):
    """vLLM's cache_salt (the engine's cache_salt_id): the same prompt reuses the blocks of an
    earlier request with the same salt only; none from a request without a salt or with another,
    and a request without a salt none of a salted one's; the same tokens either way."""
    prompt = tok("Salted prefixes, one tenant's: " + CONTEXT_TEXT).input_ids
    reused = (len(prompt) - 1) // int4.config.kv_block_size * int4.config.kv_block_size

    def run(salt):
        tensors = engine_inputs(SamplingParams(max_new_tokens=3, temperature=0.0, cache_salt=salt), input_ids=prompt,
                                end_id=EOS, pad_id=EOS, report_cached=True)
        assert ("cache_salt_id" in tensors) == (salt is not None)
        request = request_from_tensors(f"salt-{next(_ids)}", tensors)
        sink = Collector()
        int4.submit(request, sink)
        outs = sink.finished(request.request_id)
        return outs[-1].cached_tokens, [t for o in outs for t in o.token_ids]

    first, tokens = run("tenant-a")
    assert first == 0
    assert run("tenant-a") == (reused, tokens)  # the same salt: its blocks
    assert run("tenant-b") == (0, tokens)  # another salt: none
    assert run(None) == (0, tokens)  # no salt: none of the salted ones
    assert run(None) == (reused, tokens)  # the unsalted chain is its own
    assert run("tenant-b")[0] == reused


def test_cache_salt_ids_are_64_bits_and_read_back():
    from trident.engine_tensors import cache_salt_id

    ids = {cache_salt_id(s) for s in ("a", "b", "tenant-é", "x" * 1024)}
    assert len(ids) == 4 and all(0 <= i < 2**64 for i in ids)
    tensors = engine_inputs(SamplingParams(max_new_tokens=1, cache_salt="tenant-é"), input_ids=[1, 2], end_id=EOS,
                            pad_id=EOS)
    assert tensors["cache_salt_id"].dtype == np.uint64 and tensors["cache_salt_id"].shape == (1, 1)
    assert request_from_tensors("r", tensors).cache_salt_id == cache_salt_id("tenant-é")
    with pytest.raises(InvalidRequestError, match="cache_salt_id"):
        request_from_tensors("r", {**tensors, "cache_salt_id": np.array([[1.5]], dtype=np.float32)})


def test_priority_is_sent_when_not_0_and_read_back():
    """0 is the engine's own default (and the only value a GPU deployment takes): not sent."""
    tensors = engine_inputs(SamplingParams(max_new_tokens=1, priority=-7), input_ids=[1, 2], end_id=EOS, pad_id=EOS)
    assert tensors["priority"].dtype == np.int32 and tensors["priority"].tolist() == [[-7]]
    assert request_from_tensors("r", tensors).priority == -7
    for default in (0, None):
        plain = engine_inputs(SamplingParams(max_new_tokens=1, priority=default), input_ids=[1, 2], end_id=EOS,
                              pad_id=EOS)
        assert "priority" not in plain and request_from_tensors("r", plain).priority == 0
    with pytest.raises(InvalidRequestError, match="priority"):
        request_from_tensors("r", {**tensors, "priority": np.array([[1.5]], dtype=np.float32)})


def test_num_cached_tokens_tensors_round_trip(int4, tok):
    """The engine model's tensors: the input asks, the final response carries (1, 1) int32, and
    llm's reader takes it."""
    prompt = tok("Round trip of the cached count: " + CONTEXT_TEXT).input_ids
    sampling = SamplingParams(max_new_tokens=2, temperature=0.0)
    tensors = engine_inputs(sampling, input_ids=prompt, end_id=EOS, pad_id=EOS, report_cached=True)
    request = request_from_tensors("rt-cached", tensors)
    assert request.report_cached
    assert not request_from_tensors("rt-plain", engine_inputs(sampling, input_ids=prompt, end_id=EOS,
                                                               pad_id=EOS)).report_cached
    cached_run(int4, prompt)  # the blocks are cached now
    sink = Collector()
    int4.submit(request, sink)
    outs = sink.finished("rt-cached")
    arrays = response_arrays(outs[-1])
    assert arrays[NUM_CACHED_TOKENS].shape == (1, 1) and arrays[NUM_CACHED_TOKENS].dtype == np.int32
    assert read_response(arrays.get).cached_tokens == outs[-1].cached_tokens > 0
    assert all(NUM_CACHED_TOKENS not in response_arrays(o) for o in outs[:-1])
