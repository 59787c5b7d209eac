"""Per-row token selection: penalties, bans, then greedy or temperature/top-k/top-p sampling.

Every row carries its own parameters and its own ``torch.Generator``; a row's draw consumes
exactly one uniform number from its generator, so a seeded request samples the same tokens
whatever else shares the batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from trident.contract import SamplingParams


@dataclass
class RowSampling:
    """The sampler's state for one sequence, for its whole life: its request's SamplingParams
    (the one parameters object, not a copy of its fields) plus what sampling accumulates."""

    params: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0.0))
    generator: torch.Generator | None = None
    # (V,) bool: tokens in the prompt or the output; only kept when repetition_penalty != 1
    seen: torch.Tensor | None = None
    banned: list[int] = field(default_factory=list)  # single-token bad words, always banned
    banned_now: list[int] = field(default_factory=list)  # last tokens of multi-token bad words

    temperature = property(lambda self: self.params.temperature)
    top_k = property(lambda self: self.params.top_k)
    top_p = property(lambda self: self.params.top_p)
    repetition_penalty = property(lambda self: self.params.repetition_penalty)

    @property
    def greedy(self) -> bool:
        return self.params.greedy

    @property
    def top_p_active(self) -> bool:
        return 0.0 < self.top_p < 1.0


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    if seed is None:
        g.seed()  # non-deterministic
    else:
        g.manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)
    return g


def apply_penalties(logits: torch.Tensor, rows: list[RowSampling]) -> None:
    """In place on logits (B, V) fp32."""
    for b, r in enumerate(rows):
        if r.seen is not None and r.repetition_penalty != 1.0:
            row = logits[b]
            # HF semantics: shrink positive logits, push negative ones further down
            penalized = torch.where(row > 0, row / r.repetition_penalty, row * r.repetition_penalty)
            logits[b] = torch.where(r.seen, penalized, row)
        if r.banned or r.banned_now:
            logits[b, r.banned + r.banned_now] = float("-inf")


def sample(logits: torch.Tensor, rows: list[RowSampling]) -> list[int]:
    """logits (B, V) fp32 (modified in place) -> one token id per row."""
    apply_penalties(logits, rows)
    out = [0] * len(rows)
    greedy = [b for b, r in enumerate(rows) if r.greedy]
    if greedy:
        ids = logits[greedy].argmax(dim=-1).tolist() if len(greedy) < len(rows) else logits.argmax(dim=-1).tolist()
        for b, t in zip(greedy, ids):
            out[b] = t
    sampled = [b for b, r in enumerate(rows) if not r.greedy]
    if sampled:
        ids = _sample_rows(logits[sampled], [rows[b] for b in sampled])
        for b, t in zip(sampled, ids):
            out[b] = t
    return out


def _sample_rows(logits: torch.Tensor, rows: list[RowSampling]) -> list[int]:
    R, V = logits.shape
    temps = torch.tensor([r.temperature for r in rows], dtype=torch.float32)[:, None]  # (R, 1)
    logits = logits / temps
    ks = [r.top_k if 0 < r.top_k < V else V for r in rows]
    if max(ks) < V and not any(r.top_p_active for r in rows):
        values, indices = logits.topk(max(ks), dim=-1)  # (R, K), sorted descending
    else:
        values, indices = logits.sort(dim=-1, descending=True)  # (R, V)
    K = values.shape[1]
    rank = torch.arange(K)[None, :]
    values = values.masked_fill(rank >= torch.tensor(ks)[:, None], float("-inf"))
    probs = torch.softmax(values, dim=-1)  # (R, K)
    if any(r.top_p_active for r in rows):
        top_p = torch.tensor([r.top_p if r.top_p_active else 2.0 for r in rows])[:, None]
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the strictly better tokens
        # keep the smallest prefix whose mass reaches top_p (HF / TensorRT-LLM semantics)
        probs = probs.masked_fill(mass_before >= top_p, 0.0)
    cdf = probs.cumsum(dim=-1)  # (R, K), unnormalized after top-p
    u = torch.cat([torch.rand(1, generator=r.generator) for r in rows])[:, None]  # (R, 1)
    choice = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)  # (R, 1)
    # kept tokens form a prefix of the sorted row; rounding must not step past it
    last_kept = (probs > 0).sum(dim=-1, keepdim=True) - 1
    choice = torch.minimum(choice, last_kept)
    return indices.gather(1, choice)[:, 0].tolist()
