"""A Llama forward pass for CPU inference: batched one-token decode over a slot KV cache.

Numerics follow Hugging Face's LlamaForCausalLM (RMSNorm in fp32 then cast, RoPE tables cast to
the model dtype, softmax in fp32) so greedy outputs can be compared token for token.
"""
from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open

from .config import LlamaConfig
from .kv_cache import KVCache

log = logging.getLogger("trident.engine")

# Hugging Face tensor name -> our name; "{i}" is the layer index. Tensors not listed are ignored.
WEIGHT_MAP = {
    "model.embed_tokens.weight": "tok_embeddings",
    "model.norm.weight": "norm",
    "lm_head.weight": "lm_head",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attention_norm",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.ffn_norm",
    "model.layers.{i}.self_attn.q_proj.weight": "layers.{i}.wq",
    "model.layers.{i}.self_attn.k_proj.weight": "layers.{i}.wk",
    "model.layers.{i}.self_attn.v_proj.weight": "layers.{i}.wv",
    "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.wo",
    "model.layers.{i}.mlp.gate_proj.weight": "layers.{i}.w_gate",
    "model.layers.{i}.mlp.up_proj.weight": "layers.{i}.w_up",
    "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.w_down",
}
_PATTERNS = [
    (re.compile("^" + re.escape(src).replace(r"\{i\}", r"(\d+)") + "$"), dst)
    for src, dst in WEIGHT_MAP.items()
]


def map_weight_name(name: str) -> str | None:
    for pattern, dst in _PATTERNS:
        m = pattern.match(name)
        if m:
            return dst.replace("{i}", m.group(1)) if m.groups() else dst
    return None


def load_weights(checkpoint_dir: str | Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    files = sorted(Path(checkpoint_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {checkpoint_dir}")
    weights: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                ours = map_weight_name(name)
                if ours is not None:
                    weights[ours] = f.get_tensor(name).to(dtype)
    return weights


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # fp32 statistics, then back to the model dtype before the weight, as HF does
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # rotate_half convention (HF checkpoints store q/k in this layout)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Layer:
    __slots__ = ("attention_norm", "ffn_norm", "wqkv", "wo", "w_gate_up", "w_down")


class Llama:
    """Weights plus the two entry points the scheduler needs: ``prefill`` and ``decode``."""

    def __init__(
        self, config: LlamaConfig, weights: dict[str, torch.Tensor], *, dtype: torch.dtype, max_seq_len: int
    ) -> None:
        self.config = config
        self.dtype = dtype
        c = config
        self.tok_embeddings = weights.pop("tok_embeddings")  # (V, H)
        self.norm = weights.pop("norm")
        lm_head = weights.pop("lm_head", None)
        if lm_head is None:
            if not c.tie_word_embeddings:
                raise ValueError("checkpoint has no lm_head.weight and does not tie embeddings")
            lm_head = self.tok_embeddings
        self.lm_head = lm_head  # (V, H)
        self.layers: list[Layer] = []
        for i in range(c.num_layers):
            p = f"layers.{i}."
            layer = Layer()
            layer.attention_norm = weights.pop(p + "attention_norm")
            layer.ffn_norm = weights.pop(p + "ffn_norm")
            # One matmul instead of three (and two): fewer, larger GEMMs are faster on CPU.
            layer.wqkv = torch.cat([weights.pop(p + n) for n in ("wq", "wk", "wv")]).contiguous()
            layer.wo = weights.pop(p + "wo")
            layer.w_gate_up = torch.cat([weights.pop(p + "w_gate"), weights.pop(p + "w_up")]).contiguous()
            layer.w_down = weights.pop(p + "w_down")
            self.layers.append(layer)
        if weights:
            log.warning("unused weights: %s", sorted(weights)[:5])

        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float32) / c.head_dim))
        freqs = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)  # (S, hd)
        self.cos = emb.cos().to(dtype)
        self.sin = emb.sin().to(dtype)
        self.scale = 1.0 / math.sqrt(c.head_dim)
        self.q_size = c.num_heads * c.head_dim
        self.kv_size = c.num_kv_heads * c.head_dim

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path, *, dtype: torch.dtype, max_seq_len: int) -> "Llama":
        config = LlamaConfig.from_checkpoint(checkpoint_dir)
        return cls(config, load_weights(checkpoint_dir, dtype), dtype=dtype, max_seq_len=max_seq_len)

    def _mlp(self, layer: Layer, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, layer.w_gate_up).split(self.config.intermediate_size, dim=-1)
        return F.linear(F.silu(gate) * up, layer.w_down)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        x = rms_norm(x, self.norm, self.config.rms_norm_eps)
        return F.linear(x, self.lm_head).float()  # (B, V) fp32 for sampling

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, slot: int, cache: KVCache) -> torch.Tensor:
        """Run a whole prompt for one sequence, fill its cache slot; return last-position logits (V,)."""
        c = self.config
        T = tokens.shape[0]
        x = F.embedding(tokens, self.tok_embeddings)  # (T, H)
        cos, sin = self.cos[:T], self.sin[:T]  # (T, hd)
        for i, layer in enumerate(self.layers):
            h = rms_norm(x, layer.attention_norm, c.rms_norm_eps)
            q, k, v = F.linear(h, layer.wqkv).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = apply_rope(q.view(T, c.num_heads, c.head_dim).transpose(0, 1), cos, sin)  # (n_heads, T, hd)
            k = apply_rope(k.view(T, c.num_kv_heads, c.head_dim).transpose(0, 1), cos, sin)  # (n_kv, T, hd)
            v = v.view(T, c.num_kv_heads, c.head_dim).transpose(0, 1)  # (n_kv, T, hd)
            cache.write_prefill(i, slot, k, v)
            o = F.scaled_dot_product_attention(
                q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), is_causal=True, enable_gqa=True
            )  # (1, n_heads, T, hd)
            x = x + F.linear(o[0].transpose(0, 1).reshape(T, self.q_size), layer.wo)
            x = x + self._mlp(layer, rms_norm(x, layer.ffn_norm, c.rms_norm_eps))
        return self._logits(x[-1:])[0]

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One token for each of the sequences in slots 0..B-1; return logits (B, V).

        tokens, positions: (B,) long; row b attends to cache positions 0..positions[b].
        """
        c = self.config
        B = tokens.shape[0]
        group = c.num_heads // c.num_kv_heads
        S = int(positions.max()) + 1  # attend only over the longest live prefix, not max_seq_len
        rows = torch.arange(B)
        # Each row sees its own length; the rest of the cache view holds stale data.
        mask = torch.zeros(B, S, dtype=self.dtype).masked_fill_(
            torch.arange(S)[None, :] > positions[:, None], float("-inf")
        )[:, None, None, :]  # (B, 1, 1, S)
        cos, sin = self.cos[positions][:, None, :], self.sin[positions][:, None, :]  # (B, 1, hd)
        x = F.embedding(tokens, self.tok_embeddings)  # (B, H)
        for i, layer in enumerate(self.layers):
            h = rms_norm(x, layer.attention_norm, c.rms_norm_eps)
            q, k, v = F.linear(h, layer.wqkv).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = apply_rope(q.view(B, c.num_heads, c.head_dim), cos, sin)  # (B, n_heads, hd)
            k = apply_rope(k.view(B, c.num_kv_heads, c.head_dim), cos, sin)  # (B, n_kv, hd)
            cache.write_decode(i, rows, positions, k, v.view(B, c.num_kv_heads, c.head_dim))
            keys = cache.k[i][:B, :, :S]  # (B, n_kv, S, hd), a view
            values = cache.v[i][:B, :, :S]
            # Grouped-query attention as two matmuls: SDPA is slow for 1-token GQA decode on CPU.
            qg = q.view(B, c.num_kv_heads, group, c.head_dim) * self.scale  # (B, n_kv, group, hd)
            scores = torch.matmul(qg, keys.transpose(-1, -2)) + mask  # (B, n_kv, group, S)
            probs = torch.softmax(scores.float(), dim=-1).to(self.dtype)
            o = torch.matmul(probs, values).reshape(B, self.q_size)  # (B, n_heads*hd)
            x = x + F.linear(o, layer.wo)
            x = x + self._mlp(layer, rms_norm(x, layer.ffn_norm, c.rms_norm_eps))
        return self._logits(x)
