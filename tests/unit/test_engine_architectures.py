"""The CPU engine on the Llama family beyond SmolLM2, against Hugging Face transformers.

Each case is a small checkpoint with random weights written by transformers itself
(``save_pretrained``, so its config.json is transformers' own): Llama 3.x's scaled RoPE
(``llama3``, at positions past the pre-training context, where the scaling changes the tables),
Qwen2's q/k/v biases, Qwen3's per-head query and key norms with a head_dim apart from hidden /
heads, Mistral (Llama's layer under another name), Phi-3 (Llama's layer, its projections stored
fused, with a sliding window) and SmolLM3 (a layer without RoPE). Every weight is drawn large
enough that each part moves the logits (transformers initialises biases to 0 and norms to 1,
which would test nothing), and the matmul weights are rounded through the int4 format first, so
the int4 engine runs the checkpoint's own values.

* float32 (torch ops, llama.py): the logits of every prompt position and of decode steps equal
  transformers' within float rounding, and the engine's greedy tokens are transformers' tokens;
* int4 (one kernel call a step, csrc/forward.cpp; activations quantized per block of 32, so not
  exact): within 3 % of transformers' logits, and more than 5 times farther from them when the
  kernel is handed the model without the part the architecture adds (so the check can fail).
  The float32 logits check fails without it too: each part moves the logits far more than 2e-4.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from trident.contract import SamplingParams
from trident.engine import Engine, EngineConfig, GenerationRequest, kernels
from trident.engine.config import LlamaConfig
from trident.engine.kv_cache import KVCache
from trident.engine.paged_cache import PagedKVCache
from trident.engine.weights import build_model, read_checkpoint
from engine_sink import Collector

transformers = pytest.importorskip("transformers")

VOCAB, HIDDEN, INTER, LAYERS, HEADS, KV_HEADS = 256, 64, 128, 2, 4, 2
PROMPT_LEN, MAX_SEQ_LEN, N_NEW = 96, 128, 12

CASES = {
    # Llama 3.x RoPE with a pre-training context of 16: prompts of 96 positions reach far past it
    "llama3_rope": ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                  "original_max_position_embeddings": 16}}),
    "qwen2": ("qwen2", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}, "tie_word_embeddings": True}),
    "qwen3": ("qwen3", {"head_dim": 32, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}),
    # YaRN (Qwen3's and SmolLM3's long context) from a pre-training context of 16: the blend of
    # divided and kept frequencies, and cos and sin scaled by its attention factor (1.14)
    "qwen3_yarn": ("qwen3", {"head_dim": 32, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                                                                 "original_max_position_embeddings": 16}}),
    # Mistral's layer is Llama's; its window (here wider than any sequence) changes nothing
    "mistral": ("mistral", {"sliding_window": 4096}),
    # Phi-3: Llama's layer with q/k/v and gate/up stored fused, and a sliding window (2047 in
    # Phi-3-mini; 24 here, under prompts of 96: a prefill and decode steps both pass it)
    "phi3": ("phi3", {"sliding_window": 24, "tie_word_embeddings": False}),
    # LongRoPE (Phi-3-mini-128k, Phi-3.5-mini) from a pre-training context of 16: per-dimension
    # short factors within it, long ones past it, cos and sin scaled by sqrt(1 + ln 8 / ln 16)
    "phi3_longrope": ("phi3", {"original_max_position_embeddings": 16, "tie_word_embeddings": False,
                               "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4,
                                                   "short_factor": [1.0, 1.02, 1.05, 1.1, 1.2, 1.3, 1.5, 1.7],
                                                   "long_factor": [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0]}}),
    # Phi-4-mini: LongRoPE over part of each head (3/4 in Phi-4-mini, 1/2 here: 8 of 16
    # dimensions turn, the others pass unchanged), embeddings tied
    "phi3_partial": ("phi3", {"original_max_position_embeddings": 16, "partial_rotary_factor": 0.5,
                              "tie_word_embeddings": True,
                              "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4,
                                                  "short_factor": [1.0, 1.1, 1.3, 1.6],
                                                  "long_factor": [1.0, 2.0, 4.0, 8.0]}}),
    # SmolLM3: the second layer applies no RoPE (NoPE; every 4th layer in the released model)
    "smollm3": ("smollm3", {"no_rope_layers": [1, 0], "rope_parameters": {"rope_type": "default",
                                                                           "rope_theta": 5e6}}),
}


def _config(model_type: str, extra: dict):
    cls = transformers.AutoConfig.for_model(model_type).__class__
    return cls(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
               num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=MAX_SEQ_LEN,
               rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1, pad_token_id=1, **extra)


def _int4_values(w: torch.Tensor) -> torch.Tensor:
    ops = kernels.ops()
    from trident.engine import quant

    return ops.q4_dequant(quant.pack_q4(w)[0])


@pytest.fixture(scope="module", params=sorted(CASES))
def checkpoint(request, tmp_path_factory):
    """(folder, transformers model) of one case."""
    return _checkpoint(request.param, tmp_path_factory)


def _checkpoint(name: str, tmp_path_factory):
    model_type, extra = CASES[name]
    torch.manual_seed(11)
    hf = transformers.AutoModelForCausalLM.from_config(_config(model_type, extra), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn_like(p))
            elif "embed_tokens" in name or "lm_head" in name:
                p.copy_(torch.randn_like(p))
            else:  # a matmul weight: N(0, 1/fan_in), on the int4 grid
                p.copy_(_int4_values(torch.randn_like(p) * p.shape[1] ** -0.5))
    folder = tmp_path_factory.mktemp(name)
    hf.save_pretrained(folder)
    return folder, hf


def _prompt(seed: int = 5, n: int = PROMPT_LEN) -> list[int]:
    return torch.randint(2, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.inference_mode()
def _hf_logits(hf, tokens: list[int]) -> torch.Tensor:
    return hf(torch.tensor([tokens])).logits[0].float()  # (T, V)


def _model(folder, weight_dtype: str):
    config = LlamaConfig.from_checkpoint(folder)
    return build_model(config, read_checkpoint(folder, torch.float32), dtype=torch.float32,
                       max_seq_len=MAX_SEQ_LEN, weight_dtype=weight_dtype)


def _paged_cache(c: LlamaConfig) -> PagedKVCache:
    return PagedKVCache(num_layers=c.num_layers, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, max_slots=1,
                        max_seq_len=MAX_SEQ_LEN, block_size=16, dtype=torch.float32, cache_bytes=0, reuse=False)


def _fused_logits(fused, tokens: list[int]) -> torch.Tensor:
    """The int4 model's logits (T, V) of every position of one prompt, in one step."""
    T = len(tokens)
    cache = _paged_cache(fused.config)
    cache.extend(0, T)
    with torch.inference_mode():
        return fused.forward(torch.tensor(tokens), torch.arange(T), torch.zeros(T, dtype=torch.long), cache,
                             torch.arange(T), torch.full((T,), T))


def test_the_config_is_read_as_transformers_wrote_it(checkpoint):
    folder, hf = checkpoint
    config = LlamaConfig.from_checkpoint(folder)
    assert config.model_type == hf.config.model_type
    assert config.head_dim == getattr(hf.config, "head_dim", HIDDEN // HEADS)
    assert config.qkv_bias == (config.model_type == "qwen2")
    assert config.qk_norm == (config.model_type == "qwen3")
    assert (config.rope_scaling is not None) == ("rope_type" in hf.config.rope_parameters
                                                 and hf.config.rope_parameters["rope_type"] != "default")
    assert config.nope_layers == ((1,) if config.model_type == "smollm3" else ())
    assert config.sliding_window == (24 if config.model_type == "phi3" and hf.config.sliding_window else None)
    assert config.tie_word_embeddings == hf.config.tie_word_embeddings
    assert config.rope_theta == hf.config.rope_parameters["rope_theta"]


def test_rope_frequencies_are_transformers_own(checkpoint):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from trident.engine.llama import inverse_frequencies, rope_tables

    folder, hf = checkpoint
    config = LlamaConfig.from_checkpoint(folder)
    rope_type = hf.config.rope_parameters["rope_type"]
    if rope_type == "default":
        expected = hf.model.rotary_emb.inv_freq
    else:
        expected, attention_factor = ROPE_INIT_FUNCTIONS[rope_type](hf.config, "cpu")
        assert config.rope_scaling.attention_factor == attention_factor
        assert (attention_factor != 1.0) == (rope_type in ("yarn", "longrope"))
    assert torch.equal(inverse_frequencies(config), expected)
    cos, sin_signed = rope_tables(config, MAX_SEQ_LEN, torch.float32)
    half = config.rotary_dim // 2
    sin = torch.cat((-sin_signed[:, :half], sin_signed[:, half:]), dim=-1)
    # and the tables: cos and sin of every position as transformers' rotary embedding gives them
    # for a sequence that long (LongRoPE: the long factors, the second half of the tables)
    positions = torch.arange(MAX_SEQ_LEN)[None]
    hf_cos, hf_sin = hf.model.rotary_emb(torch.zeros(1, dtype=torch.float32), positions)
    rows = slice(MAX_SEQ_LEN, None) if rope_type == "longrope" else slice(None)
    assert torch.equal(cos[rows], hf_cos[0]) and torch.equal(sin[rows], hf_sin[0])
    if rope_type == "longrope":  # and for one within the pre-training context: the short factors
        assert torch.equal(inverse_frequencies(config, long=True),
                           ROPE_INIT_FUNCTIONS[rope_type](hf.config, "cpu", seq_len=config.long_rope + 1)[0])
        hf_cos, hf_sin = hf.model.rotary_emb(torch.zeros(1, dtype=torch.float32), positions[:, :config.long_rope])
        assert torch.equal(cos[:config.long_rope], hf_cos[0]) and torch.equal(sin[:config.long_rope], hf_sin[0])
        assert not torch.equal(cos[:MAX_SEQ_LEN], cos[MAX_SEQ_LEN:])


def _against_transformers(checkpoint, weight_dtype: str):
    """The engine's model of the checkpoint, a prompt and transformers' logits for it."""
    folder, hf = checkpoint
    tokens = _prompt()
    return _model(folder, weight_dtype), tokens, _hf_logits(hf, tokens)


def test_float32_prefill_and_decode_match_transformers(checkpoint):
    model, tokens, expected = _against_transformers(checkpoint, "auto")
    c = model.config
    cache = KVCache()
    cache.setup(num_layers=c.num_layers, max_batch_size=1, num_kv_heads=c.num_kv_heads, max_seq_len=MAX_SEQ_LEN,
                head_dim=c.head_dim, dtype=torch.float32)
    with torch.inference_mode():
        hidden = model.prefill_hidden([torch.tensor(tokens[:-8])], [0], cache)
        torch.testing.assert_close(model.logits(hidden), expected[:-8], atol=2e-4, rtol=1e-4)
        for pos in range(len(tokens) - 8, len(tokens)):  # then one decode step at a time
            logits = model.decode(torch.tensor([tokens[pos]]), torch.tensor([pos]), cache)
            torch.testing.assert_close(logits[0], expected[pos], atol=2e-4, rtol=1e-4)


def test_engine_greedy_tokens_are_transformers_tokens(checkpoint):
    folder, hf = checkpoint
    prompts = [_prompt(seed, n) for seed, n in ((1, 40), (2, 90), (3, 7))]
    with torch.inference_mode():
        refs = [hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                            max_new_tokens=N_NEW, do_sample=False, eos_token_id=None, pad_token_id=1)[0, len(p):].tolist() for p in prompts]
    engine = Engine(EngineConfig(checkpoint_dir=str(folder), max_batch_size=4, max_seq_len=MAX_SEQ_LEN,
                                 dtype="float32"))
    engine.start()
    try:
        sink = Collector()
        for i, p in enumerate(prompts):
            engine.submit(GenerationRequest(request_id=str(i), input_ids=p,
                                            sampling=SamplingParams(max_new_tokens=N_NEW, temperature=0.0)), sink)
        sink.wait(*(str(i) for i in range(len(prompts))))
    finally:
        engine.stop()
    assert [sink.tokens(str(i)) for i in range(len(prompts))] == refs


def test_int4_kernel_runs_the_architecture(checkpoint):
    model, tokens, expected = _against_transformers(checkpoint, "int4")
    c = model.config

    def error(got):  # relative to the spread of the logits themselves
        return float((got - expected).norm() / (expected - expected.mean(-1, keepdim=True)).norm())

    close = error(_fused_logits(model, tokens))
    assert close < 0.03
    # The same kernel without what the architecture adds (scaled RoPE, bias, head norms, layers
    # without RoPE) is several times farther off: the check above sees each of them.
    if c.long_rope is not None:  # the short factors' tables for the long rows too
        model.cos, model.sin_signed = (torch.cat((t[:MAX_SEQ_LEN], t[:MAX_SEQ_LEN])).contiguous()
                                       for t in (model.cos, model.sin_signed))
    elif c.rope_scaling is not None:  # plain RoPE tables
        from trident.engine.llama import rope_tables

        plain = dataclasses.replace(c, rope_scaling=None)
        model.cos, model.sin_signed = (t.contiguous() for t in rope_tables(plain, MAX_SEQ_LEN, torch.float32))
    elif c.qkv_bias:
        model.qkv_bias = torch.zeros_like(model.qkv_bias)
    elif c.qk_norm:
        model.qk_norm = torch.empty(0)
    elif c.nope_layers:  # RoPE in every layer, as Llama
        model.rope_layers = torch.empty(0, dtype=torch.bool)
    elif c.sliding_window:  # every earlier position seen
        model.config = dataclasses.replace(c, sliding_window=None)
    else:  # Mistral adds nothing to the computation: Llama's layer
        return
    assert error(_fused_logits(model, tokens)) > 5 * close


def test_int4_logits_do_not_depend_on_how_the_prompt_is_chunked(checkpoint):
    """A prompt prefilled in chunks (each attending to the cache the earlier ones wrote, through
    the sliding window where there is one; with LongRoPE each told the prompt's length, as the
    engine's batch does) gives the logits of the prompt in one step, bit for bit."""
    model, tokens, _ = _against_transformers(checkpoint, "int4")
    whole = _fused_logits(model, tokens)
    cache = _paged_cache(model.config)
    parts, start = [], 0
    with torch.inference_mode():
        for end in (5, 37, 38, 80, len(tokens)):
            cache.extend(0, end)
            parts.append(model.forward(torch.tensor(tokens[start:end]), torch.arange(start, end),
                                       torch.zeros(end - start, dtype=torch.long), cache, torch.arange(end - start),
                                       torch.full((end - start,), len(tokens))))
            start = end
    assert torch.equal(torch.cat(parts), whole)


def test_int4_reads_a_bfloat16_checkpoint_a_layer_at_a_time_and_packs_the_same_weights(checkpoint, tmp_path,
                                                                                       monkeypatch):
    """int4 loading reads the checkpoint lazily, in its own dtype, and packs each layer before it
    reads the next (scripts/engine_memory.py gives the peak), from float32 a tensor at a time:
    the model is bit for bit the one built from float32 tensors."""
    from trident.engine import weights

    events = []  # ("read", our name, dtype) and ("packed", layer)
    read = weights.LazyTensors.__getitem__
    pack = weights._to_int4_layer

    def reading(self, ours):
        tensor = read(self, ours)
        events.append(("read", ours, tensor.dtype))
        return tensor

    def packing(layer, exact):
        pack(layer, exact)
        events.append(("packed",))

    monkeypatch.setattr(weights.LazyTensors, "__getitem__", reading)
    monkeypatch.setattr(weights, "_to_int4_layer", packing)
    _, hf = checkpoint
    folder = tmp_path / "bf16"
    hf.to(torch.bfloat16).save_pretrained(folder)
    hf.to(torch.float32)
    loaded, _ = weights.load_model(EngineConfig(checkpoint_dir=str(folder), dtype="float32", weight_dtype="int4",
                                                max_seq_len=MAX_SEQ_LEN))
    assert {e[2] for e in events if e[0] == "read"} == {torch.bfloat16}  # never all of it in float32
    layer_of_reads = [int(e[1].split(".")[1]) if e[0] == "read" and e[1].startswith("layers.") else None
                      for e in events]
    packed_at = [i for i, e in enumerate(events) if e[0] == "packed"]
    assert len(packed_at) >= LAYERS
    for layer in range(1, LAYERS):  # layer N is read only after layer N-1 was packed
        first_read = layer_of_reads.index(layer)
        assert packed_at[layer - 1] < first_read
    reference = _model(folder, "int4")  # from float32 tensors, read all at once
    tokens = _prompt(n=40)
    assert torch.equal(_fused_logits(loaded, tokens), _fused_logits(reference, tokens))


# ---------------------------------------------------------------- LongRoPE's switch


@pytest.fixture(scope="module")
def longrope(tmp_path_factory):
    return _checkpoint("phi3_longrope", tmp_path_factory)


@torch.inference_mode()
def _hf_generate_logits(hf, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """transformers' greedy tokens and the logits (n, V) it chose each from, with its KV cache:
    the prompt in one call, then one call per token (each call picks LongRoPE's factors)."""
    out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                      max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=1,
                      output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, len(prompt):].tolist(), torch.cat(out.logits).float()


def _run(engine: Engine, runs: list[tuple[str, list[int]]], n: int) -> dict[str, tuple[list[int], list[float], int]]:
    """Greedy requests one after the other (each finds the blocks the earlier ones left):
    per request id its tokens, their log-probabilities and its prompt tokens from the prefix cache."""
    results = {}
    engine.start()
    try:
        for rid, prompt in runs:
            sink = Collector()
            engine.submit(GenerationRequest(request_id=rid, input_ids=prompt, report_cached=True,
                                            sampling=SamplingParams(max_new_tokens=n, temperature=0.0, logprobs=0)),
                          sink)
            sink.wait(rid)
            outputs = sink.outputs[rid]
            results[rid] = (sink.tokens(rid), [lp for o in outputs for lp in o.log_probs or []],
                            next(o.cached_tokens for o in outputs if o.finished))
    finally:
        engine.stop()
    return results


def test_longrope_engine_switches_to_the_long_factors_as_transformers_does(longrope):
    """float32 engine (torch ops): a prompt within the pre-training context (16) is computed with
    the short factors; when its sequence grows past it, the whole sequence is computed again with
    the long ones (transformers' Phi-3 drops its cache there); a longer prompt is long from its
    first position. Each generated token and its log-probability are transformers' (generate,
    with its cache), prompts of 6, 16 (the switch at the first decode step) and 17."""
    folder, hf = longrope
    prompts = {"6": _prompt(7, 6), "16": _prompt(8, 16), "17": _prompt(9, 17)}
    engine = Engine(EngineConfig(checkpoint_dir=str(folder), max_batch_size=4, max_seq_len=MAX_SEQ_LEN,
                                 dtype="float32"))
    results = _run(engine, list(prompts.items()), 14)
    for rid, prompt in prompts.items():
        tokens, logits = _hf_generate_logits(hf, prompt, 14)
        expected = torch.log_softmax(logits, -1)[torch.arange(len(tokens)), torch.tensor(tokens)]
        assert results[rid][0] == tokens, rid
        torch.testing.assert_close(torch.tensor(results[rid][1]), expected, atol=2e-4, rtol=1e-4, msg=rid)
    assert engine.stats()["long_rope_recomputed"] == 2  # the prompts of 6 and 16


def test_int4_engine_picks_longropes_tables_per_sequence_and_keeps_their_blocks_apart(longrope):
    """The int4 engine (chunked prefill, batching, prefix reuse) over sequences on both sides of
    the pre-training context: each generated token's log-probability equals the one the fused
    model gives for the sequence so far computed in one step, with the short factors while it
    is within the context and the long ones past it (the kernel is bit-exact: chunking,
    batching and the recomputation change nothing). Prefix reuse keeps the two apart: a prompt
    within the context reuses the blocks of shorter prompts, a longer one those computed with the
    long factors (a long prompt's, or a recomputed sequence's), never the other kind (checked by
    the log-probabilities: the other kind's K/V would move them)."""
    folder, _ = longrope
    engine = Engine(EngineConfig(checkpoint_dir=str(folder), max_batch_size=4, max_seq_len=MAX_SEQ_LEN,
                                 dtype="float32", weight_dtype="int4", kv_cache_dtype="float32", kv_block_size=8,
                                 prefill_token_budget=24))
    base = _prompt(9, 64)
    runs = [("short", base[:12]),  # recomputed at 17 tokens: base[:8]'s block in both kinds
            ("short_again", base[:14]), ("long", base[:40]), ("extends_long", base[:56]),
            ("short_after_long", base[:15]), ("at_the_context", base[:16])]
    results = _run(engine, runs, 10)
    model = _model(folder, "int4")
    context = model.config.long_rope
    for rid, prompt in runs:
        tokens, logprobs, _ = results[rid]
        sequence = prompt + tokens[:-1]
        T = len(sequence)
        rows = torch.arange(len(prompt) - 1, T)
        both = []
        for lengths in (context, T):  # every row short (within the context), every row long
            cache = _paged_cache(model.config)
            cache.extend(0, T)
            with torch.inference_mode():
                both.append(model.forward(torch.tensor(sequence), torch.arange(T), torch.zeros(T, dtype=torch.long),
                                          cache, rows, torch.full((T,), lengths)))
        logits = torch.where((rows + 1 > context)[:, None], both[1], both[0])  # the sequence's length then
        expected = torch.log_softmax(logits, -1)[torch.arange(len(tokens)), torch.tensor(tokens)]
        torch.testing.assert_close(torch.tensor(logprobs), expected, atol=1e-5, rtol=0, msg=rid)
        assert tokens == logits.argmax(-1).tolist(), rid
    cached = {rid: r[2] for rid, r in results.items()}
    assert cached == {"short": 0, "short_again": 8, "long": 8, "extends_long": 40, "short_after_long": 8,
                      "at_the_context": 8}
    assert engine.stats()["long_rope_recomputed"] == 4  # all but long and extends_long
