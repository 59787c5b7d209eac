"""A Llama forward pass for CPU inference: batched one-token decode over a slot KV cache.

Numerics follow Hugging Face's LlamaForCausalLM (RMSNorm in fp32 then cast, RoPE tables cast to
the model dtype, softmax in fp32) so greedy outputs can be compared token for token.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from . import kernels, quant
from .config import LlamaConfig
from .kv_cache import KVCache

if TYPE_CHECKING:
    from .weights import LayerWeights, ModelWeights

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # fp32 statistics, then back to the model dtype before the weight, as HF does
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rms_norm_fp32(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # rms_norm without its no-op casts (bit-identical for fp32 x, checked in the tests). Not
    # F.rms_norm: also bit-identical, but its CPU kernel made a decode step 4-10 % slower.
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def apply_rope_(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, written into x (which may be a view of the QKV output).

    rotate_half(x) = cat(-x2, x1) is computed as flip(x1, x2) times a sin table whose first half
    is negated: negation is exact, so the result is bit-identical to HF's, in 4 ops instead of 7.
    x: (..., n, hd); cos, sin_signed broadcast to it.
    """
    *lead, n, hd = x.shape
    rotated = x.view(*lead, n, 2, hd // 2).flip(-2).view(*lead, n, hd).mul_(sin_signed)
    return torch.add(x * cos, rotated, out=x)


class Llama:
    """The forward pass, with the two entry points the engine needs: ``prefill`` and ``decode``.

    Weights come from weights.py in any format: a matmul is ``quant.linear(x, w)`` and an
    embedding lookup ``tok_embeddings.rows(tokens)``. With int4 weights a decode step runs each
    layer as one fused kernel call (csrc/blockquant.cpp).
    """

    def __init__(self, config: LlamaConfig, weights: "ModelWeights", *, dtype: torch.dtype, max_seq_len: int) -> None:
        self.config = config
        self.weights = weights
        self.dtype = dtype
        self.max_seq_len = max_seq_len
        c = config
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float32) / c.head_dim))
        freqs = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)  # (S, hd)
        self.cos = emb.cos().to(dtype)
        sin = emb.sin().to(dtype)
        half = c.head_dim // 2
        self.sin_signed = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)  # (S, hd), see apply_rope_
        self.scale = 1.0 / math.sqrt(c.head_dim)
        self.q_size = c.num_heads * c.head_dim
        self.kv_size = c.num_kv_heads * c.head_dim
        self._norm = rms_norm_fp32 if dtype == torch.float32 else rms_norm

    @property
    def weight_dtype(self) -> str:
        return self.weights.weight_dtype

    @property
    def layers(self):
        return self.weights.layers

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.weights.tok_embeddings.rows(tokens)  # (T, H)

    def _mlp(self, layer: "LayerWeights", x: torch.Tensor, swiglu=None) -> torch.Tensor:
        gate_up = quant.linear(x, layer.w_gate_up)  # (T, 2*I)
        if swiglu is not None:
            return quant.linear(swiglu(gate_up), layer.w_down)
        inter = self.config.intermediate_size
        return quant.linear(F.silu(gate_up[:, :inter]) * gate_up[:, inter:], layer.w_down)

    def _softmax(self, scores: torch.Tensor) -> torch.Tensor:
        if scores.dtype == torch.float32:
            return torch.softmax(scores, dim=-1)
        return torch.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        x = self._norm(x, self.weights.norm, self.config.rms_norm_eps)
        return quant.linear(x, self.weights.lm_head).float()  # (B, V) fp32 for sampling

    @property
    def batch_invariant(self) -> bool:
        """True when a row's results do not depend on the other rows computed with it, so that
        several prompts can be prefilled in one pass without changing any sequence's output:
        the int4 kernels (per-row activation scales, fixed accumulation order). MKL's fp32 GEMM
        may pick another blocking for another row count, and fbgemm's int8 scale is per tensor."""
        return self.weight_dtype == "int4"

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, slot: int, cache: KVCache) -> torch.Tensor:
        """Run a whole prompt for one sequence, fill its cache slot; return last-position logits (V,)."""
        return self.prefill_many([tokens], [slot], cache)[0]

    @torch.inference_mode()
    def prefill_many(self, prompts: list[torch.Tensor], slots: list[int], cache: KVCache) -> torch.Tensor:
        """Prefill several prompts in one pass: their rows go through every matmul together (one
        kernel call per weight instead of one per prompt), attention runs per prompt. Fills each
        prompt's cache slot; returns each prompt's last-position logits (n, V)."""
        c = self.config
        lengths = [int(p.shape[0]) for p in prompts]
        ends = torch.tensor(lengths).cumsum(0)
        T = int(ends[-1])
        qk_heads = c.num_heads + c.num_kv_heads
        positions = torch.cat([torch.arange(n) for n in lengths])
        x = self._embed(torch.cat(prompts))  # (T, H)
        cos, sin = self.cos[positions][:, None], self.sin_signed[positions][:, None]  # (T, 1, hd)
        for i, layer in enumerate(self.layers):
            h = self._norm(x, layer.attention_norm, c.rms_norm_eps)
            qkv = quant.linear(h, layer.wqkv)  # (T, q + 2*kv)
            apply_rope_(qkv[:, :self.q_size + self.kv_size].view(T, qk_heads, c.head_dim), cos, sin)
            outputs = []
            for slot, end, n in zip(slots, ends.tolist(), lengths):
                q, k, v = qkv[end - n:end].split([self.q_size, self.kv_size, self.kv_size], dim=-1)
                q = q.view(n, c.num_heads, c.head_dim).transpose(0, 1)  # (n_heads, n, hd)
                k = k.view(n, c.num_kv_heads, c.head_dim).transpose(0, 1)  # (n_kv, n, hd)
                v = v.view(n, c.num_kv_heads, c.head_dim).transpose(0, 1)  # (n_kv, n, hd)
                cache.write_prefill(i, slot, k, v)
                o = F.scaled_dot_product_attention(
                    q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), is_causal=True, enable_gqa=True
                )  # (1, n_heads, n, hd)
                outputs.append(o[0].transpose(0, 1).reshape(n, self.q_size))
            o = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
            x = x + quant.linear(o, layer.wo)
            x = x + self._mlp(layer, self._norm(x, layer.ffn_norm, c.rms_norm_eps))
        return self._logits(x[ends - 1])

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One token for each of the sequences in slots 0..B-1; return logits (B, V).

        tokens, positions: (B,) long; row b attends to cache positions 0..positions[b].
        At 135M parameters a step is ~30 layers of small ops, so per-op overhead dominates: what
        depends only on the positions (RoPE rows, mask, cache write index) is computed once per
        step, q and k are rotated together in place, K and V are written with one index_copy_,
        and the scale and mask ride in one baddbmm.
        """
        if self.weight_dtype == "int4":
            return self._decode_int4(tokens, positions, cache)
        return self._decode_ops(tokens, positions, cache)

    def _decode_ops(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """decode() as a sequence of ops (every weight format; the int4 reference).

        For int4 this is the fused kernel's reference, unfused: the same Q4 matmuls, RoPE, cache
        write and residual adds as torch ops, but the RMSNorms, the attention and the SwiGLU are
        the kernel's own (torch.ops.trident.{rms_norm, decode_attention, swiglu}, the functions
        decode_layer_q4 calls). Their outputs are the activations the matmuls quantize to int8
        per block of 32, where a 1-ulp difference can flip a rounding and move logits by ~0.01-0.2
        (measured). torch's versions differ from the kernel's by ulps (FMA dot vs pow + mean, glibc
        vs SLEEF exp), torch's softmax also by CPU (AVX-512 vs AVX2 reduction order), so a torch-op
        reference matched the fused layer only by luck. Those three steps are checked against
        torch (to float rounding) in tests/unit/test_engine_int4.py.
        """
        c = self.config
        kernel_ops = kernels.ops() if self.weight_dtype == "int4" else None
        norm = kernel_ops.rms_norm if kernel_ops is not None else self._norm
        swiglu = kernel_ops.swiglu if kernel_ops is not None else None
        B = tokens.shape[0]
        n_kv, hd = c.num_kv_heads, c.head_dim
        group = c.num_heads // n_kv
        qk_heads = c.num_heads + n_kv
        S = int(positions.max()) + 1  # attend only over the longest live prefix, not max_seq_len
        cos, sin = self.cos[positions][:, None, :], self.sin_signed[positions][:, None, :]  # (B, 1, hd)
        # Each row sees its own length; the rest of the cache view holds stale data.
        mask = torch.zeros(B, S, dtype=self.dtype).masked_fill_(
            torch.arange(S)[None, :] > positions[:, None], float("-inf")
        ).repeat_interleave(n_kv, dim=0)[:, None, :]  # (B*n_kv, 1, S)
        index = cache.decode_index(positions)  # (B*2*n_kv,)
        x = self._embed(tokens)  # (B, H)
        for i, layer in enumerate(self.layers):
            h = norm(x, layer.attention_norm, c.rms_norm_eps)
            qkv = quant.linear(h, layer.wqkv)  # (B, q + 2*kv)
            apply_rope_(qkv[:, :self.q_size + self.kv_size].view(B, qk_heads, hd), cos, sin)
            cache.write_decode(i, index, qkv[:, self.q_size:].reshape(B * 2 * n_kv, hd))
            if kernel_ops is not None:
                o = kernel_ops.decode_attention(qkv[:, :self.q_size], cache.kv[i], positions, n_kv, self.scale)
            else:
                kv = cache.kv[i]
                keys = kv[0, :B, :, :S].reshape(B * n_kv, S, hd)  # a view: slots and heads merge
                values = kv[1, :B, :, :S].reshape(B * n_kv, S, hd)
                # Grouped-query attention as two batched matmuls: SDPA is slow for 1-token GQA
                # decode on CPU. alpha= scales the product as HF eager attention does (and rounds
                # exactly like q * scale when the scale is a power of two: head_dim 64 gives 1/8).
                q = qkv[:, :self.q_size].reshape(B * n_kv, group, hd)  # (B*n_kv, group, hd)
                scores = torch.baddbmm(mask, q, keys.transpose(1, 2), alpha=self.scale)  # (B*n_kv, group, S)
                o = torch.bmm(self._softmax(scores), values).view(B, self.q_size)  # (B, n_heads*hd)
            x = x + quant.linear(o, layer.wo)
            x = x + self._mlp(layer, norm(x, layer.ffn_norm, c.rms_norm_eps), swiglu)
        return self._logits(x)

    def _decode_int4(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """decode() with int4 weights: one fused kernel call per layer (norm, QKV, RoPE, cache
        write, attention, output projection, norm, SwiGLU MLP, both residual adds)."""
        c = self.config
        op = kernels.ops().decode_layer_q4
        x = self._embed(tokens).contiguous()  # (B, H) fp32, updated in place layer by layer
        positions = positions.contiguous()
        for i, layer in enumerate(self.layers):
            op(x, layer.attention_norm, layer.ffn_norm, layer.wqkv.packed, layer.wo.packed,
               layer.w_gate_up.packed, layer.w_down.packed, cache.kv[i], positions, self.cos, self.sin_signed,
               c.num_heads, c.num_kv_heads, c.rms_norm_eps, self.scale)
        return self._logits(x)
