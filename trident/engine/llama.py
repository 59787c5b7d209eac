"""A Llama forward pass for CPU inference: batched one-token decode over a slot KV cache.

Numerics follow Hugging Face's LlamaForCausalLM (RMSNorm in fp32 then cast, RoPE tables cast to
the model dtype, softmax in fp32) so greedy outputs can be compared token for token.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from . import quant
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


def inverse_frequencies(config: LlamaConfig, *, long: bool = False) -> torch.Tensor:
    """RoPE's (rotary_dim / 2,) fp32 frequencies, scaled as config.rope_scaling says, in Hugging
    Face's operations and order (modeling_rope_utils), so the tables match its bit for bit.
    ``long``: longrope's long factors (else its short ones)."""
    c = config
    dim = c.rotary_dim
    scaling = c.rope_scaling
    powers = c.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if scaling is not None and scaling.rope_type == "longrope":
        factors = torch.tensor(scaling.long_factor if long else scaling.short_factor, dtype=torch.float32)
        return 1.0 / (factors * powers)
    inv_freq = 1.0 / powers
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type == "yarn":
        return _yarn_frequencies(c, scaling)
    # llama3: wavelengths longer than the pre-training context / low_freq_factor are stretched by
    # factor, shorter than context / high_freq_factor kept, those between blended linearly
    factor, low, high = scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor
    context = scaling.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < context / high) * ~(wavelen > context / low)
    return torch.where(medium, blended, scaled)


def _yarn_frequencies(c: LlamaConfig, scaling) -> torch.Tensor:
    """YaRN: dimensions that turn fewer than beta_slow times over the pre-training context are
    divided by factor, those that turn more than beta_fast times kept, a linear ramp between."""
    dim, base, context = c.rotary_dim, c.rope_theta, scaling.original_max_position_embeddings

    def dimension(rotations: float) -> float:  # the dimension that turns that many times
        return dim * math.log(context / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dimension(scaling.beta_fast), dimension(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    kept = 1 - ramp
    return (1.0 / (scaling.factor * pos_freqs)) * (1 - kept) + (1.0 / pos_freqs) * kept


def rope_tables(config: LlamaConfig, max_seq_len: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (max_seq_len, rotary_dim) as Hugging Face computes them (fp32, times YaRN's or
    LongRoPE's attention factor, then cast), sin with its first half negated (see apply_rope_).
    With longrope, (2 * max_seq_len, rotary_dim): the short factors' rows, then the long ones'
    (:func:`rope_rows` picks a row's)."""
    c = config
    if c.long_rope is not None:
        short, long = (_tables(c, inverse_frequencies(c, long=long), max_seq_len, dtype) for long in (False, True))
        return torch.cat((short[0], long[0])), torch.cat((short[1], long[1]))
    return _tables(c, inverse_frequencies(c), max_seq_len, dtype)


def _tables(c: LlamaConfig, inv_freq: torch.Tensor, max_seq_len: int, dtype: torch.dtype):
    freqs = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)  # (S, rotary_dim)
    cos, sin = emb.cos(), emb.sin()
    if c.rope_scaling is not None and c.rope_scaling.attention_factor != 1.0:
        cos, sin = cos * c.rope_scaling.attention_factor, sin * c.rope_scaling.attention_factor
    sin = sin.to(dtype)
    half = c.rotary_dim // 2
    return cos.to(dtype), torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)


def rope_rows(config: LlamaConfig, positions: torch.Tensor, lengths: torch.Tensor | None,
              max_seq_len: int) -> torch.Tensor:
    """The rope_tables row of each row of a step: its position, or with longrope, past the
    short rows when the row's sequence is longer than the pre-training context, that is when
    its prompt (``lengths``, per row; None: decode rows, whose position is past their prompt)
    or its own position + 1 is (LlamaConfig.long_rope)."""
    context = config.long_rope
    if context is None:
        return positions
    longest = positions + 1 if lengths is None else torch.maximum(lengths, positions + 1)
    return positions + max_seq_len * (longest > context)


def rotate_(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """apply_rope_ over the first cos.shape[-1] dimensions of each head of x (all of them but
    with partial rotary embeddings, whose other dimensions pass unchanged, as transformers
    splits them)."""
    rotary = cos.shape[-1]
    if rotary == x.shape[-1]:
        return apply_rope_(x, cos, sin_signed)
    part = x[..., :rotary]
    part.copy_(apply_rope_(part.contiguous(), cos, sin_signed))
    return x


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
    """The forward pass in torch ops, with the two entry points the engine needs: ``prefill``
    and ``decode`` over a slot KV cache (kv_cache.py).

    Weights come from weights.py in float32 / bfloat16, float16 or int8: a matmul is
    ``quant.linear(x, w)`` and an embedding lookup ``tok_embeddings.rows(tokens)``. (int4 runs
    as fused_llama.FusedLlama.)
    """

    def __init__(self, config: LlamaConfig, weights: "ModelWeights", *, dtype: torch.dtype, max_seq_len: int) -> None:
        self.config = config
        self.weights = weights
        self.dtype = dtype
        self.max_seq_len = max_seq_len
        c = config
        self.cos, self.sin_signed = rope_tables(c, max_seq_len, dtype)  # (S, hd) each
        self.scale = 1.0 / math.sqrt(c.head_dim)
        self.q_size = c.num_heads * c.head_dim
        self.kv_size = c.num_kv_heads * c.head_dim
        self._norm = rms_norm_fp32 if dtype == torch.float32 else rms_norm
        self._nope = frozenset(c.nope_layers)  # layers that apply no RoPE (SmolLM3)

    @property
    def weight_dtype(self) -> str:
        return self.weights.weight_dtype

    @property
    def layers(self):
        return self.weights.layers

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.weights.tok_embeddings.rows(tokens)  # (T, H)

    def _qkv(self, layer: "LayerWeights", h: torch.Tensor) -> torch.Tensor:
        """The rows' queries, keys and values before RoPE (T, q + 2*kv): the fused projection, then
        Qwen2's bias or Qwen3's per-head norms where the checkpoint has them."""
        qkv = quant.linear(h, layer.wqkv)
        if layer.bqkv is not None:
            qkv += layer.bqkv
        if layer.q_norm is not None:
            c, T = self.config, qkv.shape[0]
            q = qkv[:, :self.q_size].view(T, c.num_heads, c.head_dim)
            k = qkv[:, self.q_size:self.q_size + self.kv_size].view(T, c.num_kv_heads, c.head_dim)
            q.copy_(self._norm(q, layer.q_norm, c.rms_norm_eps))
            k.copy_(self._norm(k, layer.k_norm, c.rms_norm_eps))
        return qkv

    def _prefill_mask(self, n: int) -> dict:
        """SDPA's mask over a prompt of n positions: causal, and within the sliding window when the
        model has one (key j seen from query i when i - window < j <= i, as transformers masks)."""
        window = self.config.sliding_window
        if window is None or window >= n:
            return {"is_causal": True}
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        return {"attn_mask": (j <= i) & (j > i - window)}

    def _mlp(self, layer: "LayerWeights", x: torch.Tensor) -> torch.Tensor:
        gate_up = quant.linear(x, layer.w_gate_up)  # (T, 2*I)
        inter = self.config.intermediate_size
        return quant.linear(F.silu(gate_up[:, :inter]) * gate_up[:, inter:], layer.w_down)

    def _softmax(self, scores: torch.Tensor) -> torch.Tensor:
        if scores.dtype == torch.float32:
            return torch.softmax(scores, dim=-1)
        return torch.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = self._norm(x, self.weights.norm, self.config.rms_norm_eps)
        return quant.linear(x, self.weights.lm_head).float()  # (B, V) fp32 for sampling

    # A row's results depend on the other rows computed with it (MKL's fp32 GEMM may pick another
    # blocking for another row count; fbgemm's int8 scale is per tensor): prompts are prefilled
    # one at a time. The int4 model (fused_llama.py) is batch-invariant.
    batch_invariant = False

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, slot: int, cache: KVCache) -> torch.Tensor:
        """Run a whole prompt for one sequence, fill its cache slot; return last-position logits (V,)."""
        return self.prefill_many([tokens], [slot], cache)[0]

    @torch.inference_mode()
    def prefill_many(self, prompts: list[torch.Tensor], slots: list[int], cache: KVCache) -> torch.Tensor:
        """Prefill several prompts in one pass: their rows go through every matmul together (one
        kernel call per weight instead of one per prompt), attention runs per prompt. Fills each
        prompt's cache slot; returns each prompt's last-position logits (n, V)."""
        ends = torch.tensor([int(p.shape[0]) for p in prompts]).cumsum(0)
        return self.logits(self.prefill_hidden(prompts, slots, cache)[ends - 1])

    @torch.inference_mode()
    def prefill_hidden(self, prompts: list[torch.Tensor], slots: list[int], cache: KVCache) -> torch.Tensor:
        """prefill_many's pass, returning the last layer's output (T, H) of every prompt position,
        prompts one after the other: :meth:`logits` of any of its rows (context.py)."""
        c = self.config
        lengths = [int(p.shape[0]) for p in prompts]
        ends = torch.tensor(lengths).cumsum(0)
        T = int(ends[-1])
        qk_heads = c.num_heads + c.num_kv_heads
        positions = torch.cat([torch.arange(n) for n in lengths])
        x = self._embed(torch.cat(prompts))  # (T, H)
        prompt_lengths = torch.cat([torch.full((n,), n) for n in lengths]) if c.long_rope is not None else None
        rows = rope_rows(c, positions, prompt_lengths, self.max_seq_len)
        cos, sin = self.cos[rows][:, None], self.sin_signed[rows][:, None]  # (T, 1, hd)
        masks = [self._prefill_mask(n) for n in lengths]  # each prompt's, the same in every layer
        for i, layer in enumerate(self.layers):
            qkv = self._qkv(layer, self._norm(x, layer.attention_norm, c.rms_norm_eps))  # (T, q + 2*kv)
            if i not in self._nope:
                rotate_(qkv[:, :self.q_size + self.kv_size].view(T, qk_heads, c.head_dim), cos, sin)
            outputs = []
            for slot, end, n, mask in zip(slots, ends.tolist(), lengths, masks):
                q, k, v = qkv[end - n:end].split([self.q_size, self.kv_size, self.kv_size], dim=-1)
                q = q.view(n, c.num_heads, c.head_dim).transpose(0, 1)  # (n_heads, n, hd)
                k = k.view(n, c.num_kv_heads, c.head_dim).transpose(0, 1)  # (n_kv, n, hd)
                v = v.view(n, c.num_kv_heads, c.head_dim).transpose(0, 1)  # (n_kv, n, hd)
                cache.write_prefill(i, slot, k, v)
                o = F.scaled_dot_product_attention(
                    q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), enable_gqa=True, **mask
                )  # (1, n_heads, n, hd)
                outputs.append(o[0].transpose(0, 1).reshape(n, self.q_size))
            o = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
            x = x + quant.linear(o, layer.wo)
            x = x + self._mlp(layer, self._norm(x, layer.ffn_norm, c.rms_norm_eps))
        return x

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One token for each of the sequences in slots 0..B-1; return logits (B, V).

        tokens, positions: (B,) long; row b attends to cache positions 0..positions[b].
        At 135M parameters a step is ~30 layers of small ops, so per-op overhead dominates: what
        depends only on the positions (RoPE rows, mask, cache write index) is computed once per
        step, q and k are rotated together in place, K and V are written with one index_copy_,
        and the scale and mask ride in one baddbmm.
        """
        c = self.config
        B = tokens.shape[0]
        n_kv, hd = c.num_kv_heads, c.head_dim
        group = c.num_heads // n_kv
        qk_heads = c.num_heads + n_kv
        S = int(positions.max()) + 1  # attend only over the longest live prefix, not max_seq_len
        rows = rope_rows(c, positions, None, self.max_seq_len)
        cos, sin = self.cos[rows][:, None, :], self.sin_signed[rows][:, None, :]  # (B, 1, hd)
        # Each row sees its own length (the rest of the cache view holds stale data), or the last
        # sliding_window positions of it.
        hidden = torch.arange(S)[None, :] > positions[:, None]
        if c.sliding_window is not None:
            hidden |= torch.arange(S)[None, :] <= positions[:, None] - c.sliding_window
        mask = torch.zeros(B, S, dtype=self.dtype).masked_fill_(
            hidden, float("-inf")
        ).repeat_interleave(n_kv, dim=0)[:, None, :]  # (B*n_kv, 1, S)
        index = cache.decode_index(positions)  # (B*2*n_kv,)
        x = self._embed(tokens)  # (B, H)
        for i, layer in enumerate(self.layers):
            qkv = self._qkv(layer, self._norm(x, layer.attention_norm, c.rms_norm_eps))  # (B, q + 2*kv)
            if i not in self._nope:
                rotate_(qkv[:, :self.q_size + self.kv_size].view(B, qk_heads, hd), cos, sin)
            cache.write_decode(i, index, qkv[:, self.q_size:].reshape(B * 2 * n_kv, hd))
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
            x = x + self._mlp(layer, self._norm(x, layer.ffn_norm, c.rms_norm_eps))
        return self.logits(x)
