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
    model_type, extra = CASES[request.param]
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
    folder = tmp_path_factory.mktemp(request.param)
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
                             torch.arange(T))


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
    assert config.sliding_window == (24 if config.model_type == "phi3" else None)
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
        assert (attention_factor != 1.0) == (rope_type == "yarn")
    assert torch.equal(inverse_frequencies(config), expected)
    # and the tables: cos and sin of every position as transformers' rotary embedding gives them
    positions = torch.arange(MAX_SEQ_LEN)[None]
    hf_cos, hf_sin = hf.model.rotary_emb(torch.zeros(1, dtype=torch.float32), positions)
    cos, sin_signed = rope_tables(config, MAX_SEQ_LEN, torch.float32)
    half = config.head_dim // 2
    assert torch.equal(cos, hf_cos[0])
    assert torch.equal(torch.cat((-sin_signed[:, :half], sin_signed[:, half:]), dim=-1), hf_sin[0])


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
    if c.rope_scaling is not None:  # plain RoPE tables
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
    the sliding window where there is one) gives the logits of the prompt in one step, bit for bit."""
    model, tokens, _ = _against_transformers(checkpoint, "int4")
    whole = _fused_logits(model, tokens)
    cache = _paged_cache(model.config)
    parts, start = [], 0
    with torch.inference_mode():
        for end in (5, 37, 38, 80, len(tokens)):
            cache.extend(0, end)
            parts.append(model.forward(torch.tensor(tokens[start:end]), torch.arange(start, end),
                                       torch.zeros(end - start, dtype=torch.long), cache, torch.arange(end - start)))
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
