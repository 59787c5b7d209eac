"""The int4 weight format and trident's own kernels (trident/engine/csrc/blockquant.cpp)."""
from __future__ import annotations

import pytest
import torch

from trident.engine import kernels, quant
from trident.engine.config import LlamaConfig
from trident.engine.kv_cache import KVCache
from trident.engine.llama import rms_norm_fp32
from trident.engine.weights import build_model

try:
    kernels.load()
except kernels.KernelsUnavailable as exc:  # pragma: no cover - a CPU without AVX2, or no g++
    pytest.skip(f"int4 kernels unavailable: {exc}", allow_module_level=True)

OPS = torch.ops.trident


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
    assert exact == 1.0 and packed.shape == (64, 18 * 20)
    assert torch.equal(OPS.q4_dequant(packed), w4)
    w8 = gguf_q8_0_values(64, 576, g)
    packed, exact = quant.pack_q8(w8)
    assert exact == 1.0 and packed.shape == (64, 18 * 34)
    assert torch.equal(OPS.q8_dequant(packed), w8)
    # any other weights are quantized (and say so): within half a step of their block
    w = torch.randn(64, 576, generator=g)
    packed, exact = quant.pack_q4(w)
    assert exact < 0.01
    step = (w.reshape(64, 18, 32).amax(-1) - w.reshape(64, 18, 32).amin(-1)) / 15
    assert ((OPS.q4_dequant(packed) - w).reshape(64, 18, 32).abs() <= step[..., None] * 0.51 + 1e-3).all()


@pytest.mark.parametrize("kind", ["q4", "q8"])
@pytest.mark.parametrize("batch", [1, 3, 4, 7])
def test_linear_kernels_match_the_blockwise_reference(kind, batch):
    g = torch.Generator().manual_seed(batch)
    n, k = 70, 1536  # n not a multiple of the kernels' row tiles
    w = gguf_q4_1_values(n, k, g) if kind == "q4" else gguf_q8_0_values(n, k, g)
    packed = (quant.pack_q4 if kind == "q4" else quant.pack_q8)(w)[0]
    x = torch.randn(batch, k, generator=g)
    y = (OPS.q4_linear if kind == "q4" else OPS.q8_linear)(x, packed)
    assert y.shape == (batch, n)
    torch.testing.assert_close(y, reference_linear(x, w), rtol=1e-4, atol=1e-4)
    # and close to the exact fp32 product: activation quantization costs < 1 % here
    assert (y - x @ w.T).abs().max() < 0.01 * (x @ w.T).abs().max()


def test_rows_do_not_depend_on_their_batch_or_thread_count():
    """Per-row activation scales and a fixed accumulation order: a sequence's logits are the same
    bits whatever else is in the batch, which is why int4 greedy output is batch-invariant."""
    g = torch.Generator().manual_seed(1)
    packed = quant.pack_q4(gguf_q4_1_values(200, 576, g))[0]
    x = torch.randn(9, 576, generator=g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        together = OPS.q4_linear(x, packed)
        torch.set_num_threads(1)
        alone = torch.cat([OPS.q4_linear(x[i:i + 1], packed) for i in range(9)])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(together, alone)


def test_kernels_refuse_bad_shapes():
    packed = quant.pack_q4(torch.randn(8, 64))[0]
    with pytest.raises(RuntimeError, match="float32"):
        OPS.q4_linear(torch.randn(2, 96), packed)
    with pytest.raises(RuntimeError, match="uint8"):
        OPS.q4_linear(torch.randn(2, 64), packed.float())
    with pytest.raises(ValueError, match="divisible by 32"):
        quant.pack_q4(torch.randn(8, 48))


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


def test_fused_decode_layer_matches_the_torch_ops_path():
    """The int4 decode step (one kernel call per layer: norms, QKV, RoPE, cache write, attention,
    MLP, residuals) against the same step unfused (Llama._decode_ops): the same int4 weights and
    Q4 matmul kernel, RoPE, the cache write and the residual adds as torch ops, and the kernel's
    own RMSNorm, attention and SwiGLU ops (checked against torch below).

    Bit-identical, on any CPU: every activation the matmuls quantize to int8 is computed by the
    same C++ function in both paths, and the rest are single correctly rounded float ops. Any
    tolerance would be wrong here: with torch's norm, softmax and SiLU in the reference, the
    inputs to the int8 quantization differed by ulps (torch's softmax differently on AVX-512 and
    AVX2), one int8 rounding flipped now and then, and logits moved by up to 0.23 (in 1 of 12
    weight seeds with torch's AVX2 kernels, 2 of 12 with its AVX-512 ones, this seed among them)."""
    model = tiny_llama("int4")
    c = model.config
    caches = []
    for _ in range(2):
        cache = KVCache()
        cache.setup(num_layers=2, max_batch_size=3, num_kv_heads=c.num_kv_heads, max_seq_len=64,
                    head_dim=c.head_dim, dtype=torch.float32)
        for slot, length in enumerate([5, 11, 1]):
            model.prefill(torch.arange(length) % 96, slot, cache)
        caches.append(cache)
    tokens, positions = torch.tensor([7, 50, 3]), torch.tensor([5, 11, 1])
    for step in range(3):  # three steps: each reads what the previous one wrote into the cache
        fused = model.decode(tokens, positions, caches[0])
        ops = model._decode_ops(tokens, positions, caches[1])
        assert torch.equal(fused, ops), f"step {step}: {(fused - ops).abs().max():.3g} apart"
        for kv_fused, kv_ops in zip(caches[0].kv, caches[1].kv):
            assert torch.equal(kv_fused, kv_ops), f"step {step}: caches differ"
        tokens, positions = fused.argmax(-1), positions + 1


def test_fused_layer_steps_match_torch_to_float_rounding():
    """The kernel's RMSNorm, decode attention and SwiGLU (what the fused layer runs between its
    matmuls) against torch's formulas, with no quantization in between: the differences are
    float rounding only (summation order, FMA, glibc vs SLEEF exp; measured <= 3 ulp for the
    norm over 400 random rows, <= 2 ulp for SwiGLU, < 3e-7 for attention outputs of magnitude
    ~3), so the tolerances are 4-11x that and still catch a wrong eps, mask, GQA head or slot."""
    g = torch.Generator().manual_seed(0)
    # rows from large to tiny, where eps dominates the mean square
    x = torch.randn(6, 576, generator=g) * torch.tensor([30, 1, 0.1, 1e-2, 1e-3, 1e-4])[:, None]
    w = 1 + 0.1 * torch.randn(576, generator=g)
    torch.testing.assert_close(OPS.rms_norm(x, w, 1e-5), rms_norm_fp32(x, w, 1e-5), rtol=4e-6, atol=0)

    gate_up = torch.randn(5, 2 * 1536, generator=g) * 4
    expected = torch.nn.functional.silu(gate_up[:, :1536]) * gate_up[:, 1536:]
    torch.testing.assert_close(OPS.swiglu(gate_up), expected, rtol=1e-6, atol=1e-12)

    # SmolLM2's heads (9 query heads on 3 kv heads, head dim 64); 4 rows in a 5-slot cache whose
    # positions past each row's own are random (stale) data that must be masked out
    slots, n_kv, n_heads, S, hd = 5, 3, 9, 40, 64
    kv = torch.randn(2, slots, n_kv, S, hd, generator=g)
    positions = torch.tensor([0, 7, 39, 20])
    q = torch.randn(4, n_heads * hd, generator=g)
    o = OPS.decode_attention(q, kv, positions, n_kv, 0.125)
    for b, pos in enumerate(positions.tolist()):
        keys, values = kv[0, b, :, :pos + 1][None], kv[1, b, :, :pos + 1][None]  # (1, n_kv, len, hd)
        expected = torch.nn.functional.scaled_dot_product_attention(
            q[b].view(1, n_heads, 1, hd), keys, values, scale=0.125, enable_gqa=True)
        torch.testing.assert_close(o[b], expected.reshape(-1), rtol=1e-5, atol=2e-6)


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


def test_fused_decode_layer_refuses_mismatched_weights():
    """A gate/up weight whose input size is not the hidden size would be read out of bounds."""
    model = tiny_llama("int4")
    c = model.config
    cache = KVCache()
    cache.setup(num_layers=2, max_batch_size=1, num_kv_heads=c.num_kv_heads, max_seq_len=64,
                head_dim=c.head_dim, dtype=torch.float32)
    layer = model.layers[0]
    wrong_gate_up = quant.pack_q4(torch.randn(2 * 160, 64))[0]  # K 64, hidden size 128
    with pytest.raises(RuntimeError, match="weight shapes do not match"):
        OPS.decode_layer_q4(torch.randn(1, 128), layer.attention_norm, layer.ffn_norm, layer.wqkv.packed,
                            layer.wo.packed, wrong_gate_up, layer.w_down.packed, cache.kv[0], torch.tensor([0]),
                            model.cos, model.sin_signed, c.num_heads, c.num_kv_heads, c.rms_norm_eps, model.scale)
