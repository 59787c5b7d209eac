"""The int4 weight format, trident's own kernels (trident/engine/csrc/) and the fused model step.

Every kernel test that can runs on each integer dot-product path this CPU has: AVX2 always (the
AVX-512 VNNI path is switched off at run time, as on an AVX2-only CPU) and AVX-512 VNNI where
present; the two must give the same bits. TRIDENT_KERNEL_ISA=avx2 forces AVX2 for a whole run.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from trident.engine import kernels, quant
from trident.engine.config import LlamaConfig
from trident.engine.fused_llama import FusedLlama
from trident.engine.llama import apply_rope_, rms_norm_fp32
from trident.engine.paged_cache import PagedKVCache
from trident.engine.weights import build_model

try:
    kernels.load()
except kernels.KernelsUnavailable as exc:  # pragma: no cover - a CPU without AVX2, or no g++
    pytest.skip(f"int4 kernels unavailable: {exc}", allow_module_level=True)

OPS = torch.ops.trident
AVX2, VNNI = 0, 1
_DEFAULT_ISA = OPS.set_kernel_isa(-1)
ISAS = [AVX2] + ([VNNI] if OPS.set_kernel_isa(VNNI) == VNNI else [])
OPS.set_kernel_isa(_DEFAULT_ISA)


@contextlib.contextmanager
def kernel_isa(isa):
    before = OPS.set_kernel_isa(-1)
    assert OPS.set_kernel_isa(isa) == isa
    try:
        yield
    finally:
        OPS.set_kernel_isa(before)


def gguf_q4_1_values(n, k, g):
    """Weights as a Q4_1 GGUF dequantizes them: fp32 (d * q) + m with fp16 d, m; every block uses
    q = 0 and q = 15 (llama.cpp's quantizer maps the block min and max there)."""
    nb = k // 32
    d = (torch.rand(n, nb, 1, generator=g) * 0.01 + 1e-4).half().float()
    m = (-torch.rand(n, nb, 1, generator=g) * 0.08).half().float()
    q = torch.randint(0, 16, (n, nb, 32), generator=g).float()
    q[..., 0], q[..., 1] = 0, 15
    return (d * q + m).reshape(n, k)


def gguf_q8_0_values(n, k, g):
    nb = k // 32
    d = (torch.rand(n, nb, 1, generator=g) * 0.01 + 1e-4).half().float()
    q = torch.randint(-127, 128, (n, nb, 32), generator=g).float()
    q[..., 0] = 127
    return (d * q).reshape(n, k)


def reference_linear(x, w_dequant):
    """What the kernels compute: activations quantized per block of 32 to int8 (amax / 127, round
    half to even), exact integer block sums, fp32 scaling."""
    b, k = x.shape
    xb = x.reshape(b, k // 32, 32)
    dx = xb.abs().amax(-1, keepdim=True) / 127
    xq = torch.where(dx > 0, torch.round(xb / dx), 0.0) * dx
    return xq.reshape(b, k) @ w_dequant.T


def test_packing_recovers_gguf_blocks_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    w4 = gguf_q4_1_values(64, 576, g)
    packed, exact = quant.pack_q4(w4)
    assert exact == 1.0 and packed.shape == (8, 18 * 160)  # groups of 8 rows, 160 bytes a block
    assert torch.equal(OPS.q4_dequant(packed), w4)
    w8 = gguf_q8_0_values(64, 576, g)
    packed, exact = quant.pack_q8(w8)
    assert exact == 1.0 and packed.shape == (8, 18 * 272)
    assert torch.equal(OPS.q8_dequant(packed), w8)
    index = torch.tensor([0, 9, 63, 9, 7])
    assert torch.equal(OPS.q8_rows(packed, index), w8[index])  # the embedding lookup
    # any other weights are quantized (and say so): within half a step of their block
    w = torch.randn(64, 576, generator=g)
    packed, exact = quant.pack_q4(w)
    assert exact < 0.01
    step = (w.reshape(64, 18, 32).amax(-1) - w.reshape(64, 18, 32).amin(-1)) / 15
    assert ((OPS.q4_dequant(packed) - w).reshape(64, 18, 32).abs() <= step[..., None] * 0.51 + 1e-3).all()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kind", ["q4", "q8"])
@pytest.mark.parametrize("batch", [1, 3, 4, 9])
def test_linear_kernels_match_the_blockwise_reference(isa, kind, batch):
    g = torch.Generator().manual_seed(batch)
    n, k = 72, 1536
    w = gguf_q4_1_values(n, k, g) if kind == "q4" else gguf_q8_0_values(n, k, g)
    packed = (quant.pack_q4 if kind == "q4" else quant.pack_q8)(w)[0]
    x = torch.randn(batch, k, generator=g)
    with kernel_isa(isa):
        y = (OPS.q4_linear if kind == "q4" else OPS.q8_linear)(x, packed)
    assert y.shape == (batch, n)
    torch.testing.assert_close(y, reference_linear(x, w), rtol=1e-4, atol=1e-4)
    # and close to the exact fp32 product: activation quantization costs < 1 % here
    assert (y - x @ w.T).abs().max() < 0.01 * (x @ w.T).abs().max()


@pytest.mark.parametrize("kind", ["q4", "q8"])
def test_rows_do_not_depend_on_their_batch_thread_count_or_isa(kind):
    """Exact integer block sums and a fixed float order per output: a row is the same bits in a
    tile of 1 to 8 rows, on 1 or 2 threads, on the AVX2 or the AVX-512 VNNI path. This is why
    int4 greedy output is batch-invariant and the same on every CPU."""
    g = torch.Generator().manual_seed(1)
    w = gguf_q4_1_values(200, 576, g) if kind == "q4" else gguf_q8_0_values(200, 576, g)
    packed = (quant.pack_q4 if kind == "q4" else quant.pack_q8)(w)[0]
    linear = OPS.q4_linear if kind == "q4" else OPS.q8_linear
    x = torch.randn(19, 576, generator=g)
    threads = torch.get_num_threads()
    results = []
    try:
        for isa in ISAS:
            with kernel_isa(isa):
                torch.set_num_threads(2)
                results.append(linear(x, packed))
                torch.set_num_threads(1)
                results.append(torch.cat([linear(x[i:i + 1], packed) for i in range(19)]))
                results.append(torch.cat([linear(x[i:i + 5], packed) for i in range(0, 19, 5)]))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert torch.equal(results[0], other)


def test_kernels_refuse_bad_shapes():
    packed = quant.pack_q4(torch.randn(8, 64))[0]
    with pytest.raises(RuntimeError, match="float32"):
        OPS.q4_linear(torch.randn(2, 96), packed)
    with pytest.raises(RuntimeError, match="uint8"):
        OPS.q4_linear(torch.randn(2, 64), packed.float())
    with pytest.raises(ValueError, match="divisible by 32"):
        quant.pack_q4(torch.randn(8, 48))
    with pytest.raises(ValueError, match="multiple of 8 rows"):
        quant.pack_q4(torch.randn(12, 64))


def tiny_llama(weight_dtype):
    config = LlamaConfig.from_dict({
        "vocab_size": 96, "hidden_size": 128, "intermediate_size": 160, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 64, "tie_word_embeddings": True,
    })
    g = torch.Generator().manual_seed(3)
    h, i, kv = 128, 160, 2 * 32
    weights = {"tok_embeddings": torch.randn(96, h, generator=g) * 0.5, "norm": 1 + 0.1 * torch.randn(h, generator=g)}
    for layer in range(2):
        p = f"layers.{layer}."
        shapes = {"wq": (h, h), "wk": (kv, h), "wv": (kv, h), "wo": (h, h), "w_gate": (i, h), "w_up": (i, h),
                  "w_down": (h, i)}
        for name, shape in shapes.items():
            weights[p + name] = torch.randn(*shape, generator=g) * shape[1] ** -0.5
        weights[p + "attention_norm"] = 1 + 0.1 * torch.randn(h, generator=g)
        weights[p + "ffn_norm"] = 1 + 0.1 * torch.randn(h, generator=g)
    return build_model(config, weights, dtype=torch.float32, max_seq_len=64, weight_dtype=weight_dtype)

def tiny_cache(model, slots=3, *, dtype=torch.float16, block_size=4):
    c = model.config
    return PagedKVCache(num_layers=c.num_layers, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, max_slots=slots,
                        max_seq_len=64, block_size=block_size, dtype=dtype, cache_bytes=0, reuse=False)


def reference_step(model, cache, tokens, positions, slots, logit_rows):
    """forward_q4 rebuilt from the kernel's parts: its matmul, RMSNorm, attention and SwiGLU ops,
    RoPE, the K/V write and the residual adds as torch ops."""
    c, ops = model.config, OPS
    T, hd, q_size, kv_size = len(tokens), c.head_dim, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    x = ops.q8_rows(model.embed, tokens)
    cos, sin = model.cos[positions][:, None], model.sin_signed[positions][:, None]
    blocks = cache.tables[slots, positions // cache.block_size].long()
    offsets = positions % cache.block_size
    for layer in range(c.num_layers):
        qkv = ops.q4_linear(ops.rms_norm(x, model.attn_norm[layer], c.rms_norm_eps), model.wqkv[layer])
        apply_rope_(qkv[:, :q_size + kv_size].view(T, c.num_heads + c.num_kv_heads, hd), cos, sin)
        k = qkv[:, q_size:q_size + kv_size].view(T, c.num_kv_heads, hd)
        v = qkv[:, q_size + kv_size:].view(T, c.num_kv_heads, hd)
        cache.kv[layer, blocks, 0, :, offsets] = k.to(cache.dtype)
        cache.kv[layer, blocks, 1, :, offsets] = v.to(cache.dtype)
        o = ops.paged_attention(qkv[:, :q_size], cache.kv[layer], positions, slots, cache.tables, c.num_kv_heads,
                                model.scale)
        x = x + ops.q4_linear(o, model.wo[layer])
        h = ops.rms_norm(x, model.ffn_norm[layer], c.rms_norm_eps)
        x = x + ops.q4_linear(ops.swiglu(ops.q4_linear(h, model.w_gate_up[layer])), model.w_down[layer])
    return ops.q8_linear(ops.rms_norm(x[logit_rows], model.norm, c.rms_norm_eps), model.lm_head)


def step(model, cache, rows, fn=None):
    """rows: (slot, position, token) triples; logits of each slot's last row in this step."""
    slots, positions, tokens = (torch.tensor(v) for v in zip(*rows))
    last = {s: i for i, s in enumerate(slots.tolist())}
    logit_rows = torch.tensor(sorted(last.values()))
    for s, p in zip(slots.tolist(), positions.tolist()):
        cache.extend(s, p + 1)
    if fn is None:
        return model.forward(tokens, positions, slots, cache, logit_rows)
    return fn(model, cache, tokens, positions, slots, logit_rows)


@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.float32])
def test_fused_step_matches_its_reference_ops(kv_dtype):
    """forward_q4 (the whole model in one call: three prompts prefilled together, then decode
    steps that read what the previous ones wrote) against the same step built from the kernel's
    own ops: bit-identical, logits and cache. Every activation the matmuls quantize to int8 is
    computed by the same C++ code in both, and the rest are single correctly rounded float ops;
    any tolerance would hide a 1-ulp difference that flips an int8 rounding (measured: logits
    moved by up to 0.23 when torch's norm and softmax stood in for the kernel's)."""
    model = tiny_llama("int4")
    assert isinstance(model, FusedLlama)
    caches = [tiny_cache(model, dtype=kv_dtype) for _ in range(2)]
    prompts = {0: [5, 17, 3, 90, 44], 1: [(7 * i) % 96 for i in range(11)], 2: [60]}
    rows = [(s, p, t) for s, ids in prompts.items() for p, t in enumerate(ids)]
    positions = {s: len(ids) for s, ids in prompts.items()}
    for n in range(4):
        fused = step(model, caches[0], rows)
        ref = step(model, caches[1], rows, reference_step)
        assert torch.equal(fused, ref), f"step {n}: {(fused - ref).abs().max():.3g} apart"
        assert torch.equal(caches[0].kv, caches[1].kv), f"step {n}: caches differ"
        rows = [(s, positions[s], int(t)) for s, t in zip(sorted(prompts), fused.argmax(-1))]
        positions = {s: p + 1 for s, p in positions.items()}


def greedy_run(model, cache, slot, prompt, new_tokens, chunks=None, neighbour=None):
    """A sequence's logits: its prompt prefilled in chunks (None: one step), then greedy decode.
    neighbour: another slot one of whose rows rides along in every step (a batch to be invariant to)."""
    steps = iter(range(20, 64))  # the neighbour's positions

    def with_neighbour(rows):
        return ([(neighbour, next(steps), 11)] if neighbour is not None else []) + rows

    pos = 0
    for n in chunks or [len(prompt)]:
        logits = step(model, cache, with_neighbour([(slot, pos + i, prompt[pos + i]) for i in range(n)]))
        pos += n
    out = [logits[-1]]
    for _ in range(new_tokens):
        out.append(step(model, cache, with_neighbour([(slot, pos, int(out[-1].argmax()))]))[-1])
        pos += 1
    return torch.stack(out)


def test_a_sequence_is_the_same_alone_chunked_batched_on_any_thread_count_or_isa():
    """The same prompt and greedy continuation, prefilled in one step or in chunks spread over
    steps, alone or beside another sequence's rows, on 1 or 2 threads, on every ISA path: the
    same logits, bit for bit (what prefix reuse and batch invariance rest on)."""
    model = tiny_llama("int4")
    prompt = [(13 * i + 5) % 96 for i in range(13)]
    alone = greedy_run(model, tiny_cache(model), 0, prompt, 4)
    threads = torch.get_num_threads()
    try:
        for isa in ISAS:
            with kernel_isa(isa):
                for n_threads in (1, 2):
                    torch.set_num_threads(n_threads)
                    for chunks in ([13], [5, 5, 3], [1] * 13):
                        other = greedy_run(model, tiny_cache(model), 2, prompt, 4, chunks=chunks, neighbour=0)
                        assert torch.equal(alone, other), f"isa {isa}, {n_threads} threads, chunks {chunks}"
    finally:
        torch.set_num_threads(threads)


def test_fused_layer_steps_match_torch_to_float_rounding():
    """The kernel's RMSNorm, SwiGLU and paged attention (what the fused step runs between its
    matmuls) against torch's formulas, with no quantization in between: the differences are
    float rounding only (summation order, FMA, the kernel's polynomial exp vs SLEEF's), so the
    tolerances still catch a wrong eps, mask, GQA head, block or slot."""
    g = torch.Generator().manual_seed(0)
    # rows from large to tiny, where eps dominates the mean square
    x = torch.randn(6, 576, generator=g) * torch.tensor([30, 1, 0.1, 1e-2, 1e-3, 1e-4])[:, None]
    w = 1 + 0.1 * torch.randn(576, generator=g)
    torch.testing.assert_close(OPS.rms_norm(x, w, 1e-5), rms_norm_fp32(x, w, 1e-5), rtol=4e-6, atol=0)

    gate_up = torch.randn(5, 2 * 1536, generator=g) * 4
    expected = torch.nn.functional.silu(gate_up[:, :1536]) * gate_up[:, 1536:]
    torch.testing.assert_close(OPS.swiglu(gate_up), expected, rtol=2e-6, atol=1e-12)

    # SmolLM2's heads (9 query heads on 3 kv heads, head dim 64) in blocks of 16 positions,
    # 4 rows of 3 sequences (two rows share slot 1 at different positions), blocks shuffled;
    # positions past each row's own hold random (stale) data that must be masked out
    n_kv, n_heads, hd, bs = 3, 9, 64, 16
    kv = torch.randn(12, 2, n_kv, bs, hd, generator=g)
    tables = torch.randperm(12, generator=g).int().view(3, 4)
    positions, slots = torch.tensor([0, 7, 63, 20]), torch.tensor([0, 1, 2, 1])
    q = torch.randn(4, n_heads * hd, generator=g)
    # and with sliding windows (the last `window` positions: whole blocks before it skipped)
    for dtype, window in ((torch.float32, 0), (torch.float16, 0), (torch.float32, 1), (torch.float32, 5),
                          (torch.float16, 16), (torch.float32, 21)):
        cache = kv.to(dtype)
        o = OPS.paged_attention(q, cache, positions, slots, tables, n_kv, 0.125, window)
        for b, (pos, slot) in enumerate(zip(positions.tolist(), slots.tolist())):
            first = max(0, pos + 1 - window) if window else 0
            blocks = cache[tables[slot].long()].float()  # (4, 2, n_kv, bs, hd)
            keys = blocks[:, 0].permute(1, 0, 2, 3).reshape(n_kv, -1, hd)[:, first:pos + 1]
            values = blocks[:, 1].permute(1, 0, 2, 3).reshape(n_kv, -1, hd)[:, first:pos + 1]
            expected = torch.nn.functional.scaled_dot_product_attention(
                q[b].view(1, n_heads, 1, hd), keys[None], values[None], scale=0.125, enable_gqa=True)
            torch.testing.assert_close(o[b], expected.reshape(-1), rtol=1e-5, atol=3e-6)
    with pytest.raises(RuntimeError, match="window must be >= 0"):
        OPS.paged_attention(q, kv, positions, slots, tables, n_kv, 0.125, -1)


def test_engine_serves_float32_when_the_kernels_cannot_be_built(monkeypatch, caplog):
    """No compiler or no AVX2: the engine must still serve (float32 weights) and say why."""
    from pathlib import Path

    from trident.engine import Engine, EngineConfig
    from trident.engine.weights import kernels as loader_kernels

    ckpt = Path(__file__).resolve().parents[2] / ".cache" / "models" / "smollm2-135m-instruct"
    if not (ckpt / "model.safetensors").is_file():
        pytest.skip(f"no checkpoint in {ckpt}")

    def unavailable():
        raise kernels.KernelsUnavailable("the int4 kernels need a CPU with avx2")

    monkeypatch.setattr(loader_kernels, "load", unavailable)
    caplog.set_level("WARNING", logger="trident.engine")
    engine = Engine(EngineConfig(checkpoint_dir=str(ckpt), max_batch_size=2, max_seq_len=64, dtype="auto",
                                 weight_dtype="int4"))
    assert engine.config.weight_dtype == "auto" and engine.config.torch_dtype == torch.float32
    assert engine.model.weight_dtype == "auto" and not engine.model.batch_invariant
    assert any("serving float32 weights" in r.getMessage() and "avx2" in r.getMessage() for r in caplog.records)

def test_fused_step_refuses_bad_inputs():
    """Wrong weight shapes or block tables would read out of bounds: refused before any work."""
    model = tiny_llama("int4")
    c = model.config
    cache = tiny_cache(model)
    cache.extend(0, 8)
    args = dict(tokens=torch.tensor([1, 2]), positions=torch.tensor([0, 1]), row_slots=torch.tensor([0, 0]),
                logit_rows=torch.tensor([1]))

    def run(**overrides):
        a = {**args, **overrides}
        wqkv = overrides.get("wqkv", model.wqkv)
        return OPS.forward_q4(a["tokens"], a["positions"], a["row_slots"], cache.tables, a["logit_rows"], model.embed,
                              model.norm, model.lm_head, model.attn_norm, model.ffn_norm, wqkv, model.wo,
                              model.w_gate_up, model.w_down, a.get("qkv_bias", model.qkv_bias),
                              a.get("qk_norm", model.qk_norm), a.get("rope_layers", model.rope_layers), cache.kv,
                              model.cos, model.sin_signed, c.num_heads, c.num_kv_heads, c.rms_norm_eps, model.scale,
                              0, a.get("rope_rows", torch.empty(0, dtype=torch.long)))

    assert run().shape == (1, 96)
    with pytest.raises(RuntimeError, match="weight shapes do not match"):
        run(wqkv=model.wqkv[:, :-1].contiguous())
    with pytest.raises(RuntimeError, match="qkv_bias must be"):
        run(qkv_bias=torch.zeros(c.num_layers, 7))
    with pytest.raises(RuntimeError, match="qk_norm must be"):
        run(qk_norm=torch.ones(c.num_layers, 2, c.head_dim + 1))
    with pytest.raises(RuntimeError, match="rope_layers must be"):
        run(rope_layers=torch.ones(c.num_layers + 1, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="rope_layers must be"):
        run(rope_layers=torch.ones(c.num_layers, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="block table entry"):
        run(positions=torch.tensor([0, 9]))  # slot 0 has blocks for positions 0..7 only
    with pytest.raises(RuntimeError, match="position out of range"):
        run(positions=torch.tensor([0, 64]))
    with pytest.raises(RuntimeError, match="row slot out of range"):
        run(row_slots=torch.tensor([0, 3]))
    with pytest.raises(RuntimeError, match="logit_rows must increase"):
        run(logit_rows=torch.tensor([1, 0]))
    with pytest.raises(RuntimeError, match="rope_rows must be"):
        run(rope_rows=torch.tensor([0, 1, 2]))
    with pytest.raises(RuntimeError, match="rope_rows must be"):
        run(rope_rows=torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="position beyond the rope tables"):
        run(rope_rows=torch.tensor([0, model.cos.shape[0]]))
    # a row's table row is its position unless rope_rows says otherwise: the same rows, the same logits
    assert torch.equal(run(rope_rows=torch.tensor([0, 1])), run())


def test_packing_in_row_chunks_gives_the_same_bytes():
    """Q4/Q8 weights are packed PACK_ROWS rows at a time (bounded float32 temporaries): the same
    packed bytes and exact fraction as packing the whole tensor at once."""
    w = torch.randn(8 * 37, 96)
    w[:8] = torch.round(w[:8] * 4) / 4  # rows on a coarse grid: some weights kept exactly
    for pack in (quant.pack_q4, quant.pack_q8):
        whole, exact = pack(w)
        chunked, chunked_exact = quant.packed_in_chunks(pack, w, rows=16)
        assert torch.equal(chunked, whole) and chunked_exact == pytest.approx(exact)
