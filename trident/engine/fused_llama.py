"""The int4 Llama-layer forward pass (Llama, Mistral, Qwen2, Qwen3, Phi-3 / Phi-4, SmolLM3) as one kernel
call per step (csrc/forward.cpp).

A step is any set of rows, each one token of one sequence at one position: the whole prompt (or
a chunk of it) of a sequence being prefilled, one token of each sequence decoding, or both at
once. Every row writes its K/V into the paged cache and attends to its own sequence, so the
rows never influence each other: a sequence's tokens do not depend on its batch, its chunking,
the thread count or the CPU's instruction set (tests/unit/test_engine_int4.py), and blocks
computed for one request can be reused by another (prefix reuse).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from . import kernels
from .config import LlamaConfig
from .llama import rope_rows, rope_tables
from .paged_cache import PagedKVCache

if TYPE_CHECKING:
    from .weights import ModelWeights


class FusedLlama:
    batch_invariant = True  # see the module docstring
    weight_dtype = "int4"

    def __init__(self, config: LlamaConfig, weights: "ModelWeights", *, max_seq_len: int) -> None:
        self.config = config
        self.dtype = torch.float32
        self.max_seq_len = max_seq_len
        w = weights
        # (layers, ...) stacks: one tensor per kind, so a step passes 15 tensors, not 6 x layers
        # (float32: the checkpoint may be read in its own dtype, weights.load_model)
        self.attn_norm = torch.stack([layer.attention_norm for layer in w.layers]).float().contiguous()  # (L, H)
        self.ffn_norm = torch.stack([layer.ffn_norm for layer in w.layers]).float().contiguous()
        self.wqkv, self.wo, self.w_gate_up, self.w_down = (
            torch.stack([getattr(layer, name).packed for layer in w.layers]).contiguous()  # (L, N / 8, bytes)
            for name in ("wqkv", "wo", "w_gate_up", "w_down"))
        self.embed = w.tok_embeddings.packed  # Q8 (V / 8, bytes); the tied lm_head is the same tensor
        self.lm_head = w.lm_head.packed
        # Qwen2's biases (L, q + 2*kv) and Qwen3's query / key norms (L, 2, head_dim); empty: none
        self.qkv_bias = (torch.stack([layer.bqkv for layer in w.layers]).float().contiguous() if config.qkv_bias
                         else torch.empty(0))
        self.qk_norm = (torch.stack([torch.stack([layer.q_norm, layer.k_norm]) for layer in w.layers]).float()
                        .contiguous() if config.qk_norm else torch.empty(0))
        # SmolLM3: whether each layer applies RoPE (L,); empty: every layer does
        self.rope_layers = (torch.tensor([i not in config.nope_layers for i in range(config.num_layers)])
                            if config.nope_layers else torch.empty(0, dtype=torch.bool))
        self.norm = w.norm.float().clone()  # not a view: that would keep the whole checkpoint resident
        self.cos, self.sin_signed = (t.contiguous() for t in rope_tables(config, max_seq_len, torch.float32))
        self._no_rows = torch.empty(0, dtype=torch.long)  # the tables' row of each row: its position
        self.scale = 1.0 / math.sqrt(config.head_dim)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, row_slots: torch.Tensor,
                cache: PagedKVCache, logit_rows: torch.Tensor, prompt_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """One step over T rows (tokens, positions, row_slots: (T,) int64), each slot's blocks
        already extended to its rows' positions; returns the logits (R, V) fp32 of logit_rows
        ((R,) int64, increasing). ``prompt_lengths`` (T,): each row's sequence's prompt length,
        which with LongRoPE picks the row's tables (llama.rope_rows); None: decode rows (their
        position + 1 picks them)."""
        c = self.config
        rows = self._no_rows
        if c.long_rope is not None:
            rows = rope_rows(c, positions, prompt_lengths, self.max_seq_len).contiguous()
        return kernels.ops().forward_q4(
            tokens, positions, row_slots, cache.tables, logit_rows, self.embed, self.norm, self.lm_head,
            self.attn_norm, self.ffn_norm, self.wqkv, self.wo, self.w_gate_up, self.w_down, self.qkv_bias,
            self.qk_norm, self.rope_layers, cache.kv, self.cos, self.sin_signed, c.num_heads, c.num_kv_heads,
            c.rms_norm_eps, self.scale, c.sliding_window or 0, rows)

    # The interface of llama.Llama, for one prompt or one token per slot (tests, measurements).

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, slot: int, cache: PagedKVCache) -> torch.Tensor:
        """A whole prompt at positions 0..T-1 of a slot; its last position's logits (V,)."""
        T = tokens.shape[0]
        cache.extend(slot, T)
        return self.forward(tokens.long(), torch.arange(T), torch.full((T,), slot), cache, torch.tensor([T - 1]),
                            torch.full((T,), T))[0]

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, cache: PagedKVCache) -> torch.Tensor:
        """One token for each of slots 0..B-1 at its position; logits (B, V)."""
        B = tokens.shape[0]
        for slot, pos in enumerate(positions.tolist()):
            cache.extend(slot, pos + 1)
        return self.forward(tokens.long(), positions.long(), torch.arange(B), cache, torch.arange(B))
