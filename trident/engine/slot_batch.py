"""The running batch of the torch-ops model (llama.Llama: float32 / bfloat16, float16, int8) over
the contiguous slot KV cache: a sequence's index in ``sequences`` is its cache slot.

Prompts are prefilled when admitted (one at a time: this model is not batch-invariant), then
every step decodes one token for all of them. A finished sequence's slot is filled by moving the
last one, so a decode step reads plain views of slots 0..B-1. A prompt's log-probabilities
(context.py) come from its prefill's hidden states, CONTEXT_ROWS_PER_STEP logits rows at a time.
"""
from __future__ import annotations

from typing import Callable

import torch

from .context import CONTEXT_ROWS_PER_STEP
from .kv_cache import KVCache
from .llama import Llama
from .sequence import Sequence


class SlotBatch:
    paged = False

    def __init__(self, model: Llama, cache: KVCache, *, max_batch_size: int, use_threads: Callable[[int], None],
                 prefill_token_budget: int) -> None:
        self.model, self.cache = model, cache
        self.max_batch_size = max_batch_size
        self.use_threads = use_threads
        self.admission_budget = prefill_token_budget  # prompt tokens prefilled per admission round
        self.sequences: list[Sequence] = []
        self._reserved = 0  # slots promised to the other members of admitted groups
        self.prompt_tokens = 0  # prompt tokens prefilled
        self.recomputed = 0  # LongRoPE: sequences computed again past the pre-training context

    def has_room(self, slots: int = 1) -> bool:
        return len(self.sequences) + self._reserved + slots <= self.max_batch_size

    def add(self, seq: Sequence) -> None:
        """Admit a sequence; a group's leader also reserves the slots of its other members."""
        self.sequences.append(seq)
        if seq.group is not None:
            seq.group.reserved = [-1] * (seq.group.n - 1)
            self._reserved += seq.group.n - 1

    def fork(self, leader: Sequence, children: list[Sequence]) -> None:
        """The leader's prompt is prefilled: its other members take the next slots, each a copy
        of the leader's cache slot."""
        assert len(children) == len(leader.group.reserved)
        src = next(i for i, s in enumerate(self.sequences) if s is leader)
        for seq in children:
            self.cache.move(src, len(self.sequences), leader.cache_len)
            self.sequences.append(seq)
        self._reserved -= len(children)
        leader.group.reserved = []

    def prefill(self, seqs: list[Sequence]) -> torch.Tensor:
        """Prefill just-added sequences; their last positions' logits (n, V)."""
        slots = [next(i for i, s in enumerate(self.sequences) if s is seq) for seq in seqs]
        prompts = [torch.tensor(seq.request.input_ids, dtype=torch.long) for seq in seqs]
        self.use_threads(sum(len(p) for p in prompts))
        self.prompt_tokens += sum(len(p) for p in prompts)
        if not any(seq.wants_context for seq in seqs):
            logits = self.model.prefill_many(prompts, slots, self.cache)  # (n, V)
        else:
            hidden = self.model.prefill_hidden(prompts, slots, self.cache)  # (T, H)
            ends = torch.tensor([len(p) for p in prompts]).cumsum(0)
            logits = self.model.logits(hidden[ends - 1])  # (n, V): what prefill_many returns
            for seq, end in zip(seqs, ends.tolist()):
                if seq.wants_context:
                    self._context(seq, hidden[end - len(seq.request.input_ids):end])
        for seq in seqs:
            seq.cache_len = len(seq.request.input_ids)
        return logits

    def _context(self, seq: Sequence, hidden: torch.Tensor) -> None:
        """The prompt's log-probabilities from its positions' hidden states (L, H): the logits
        of positions 0..L-2, CONTEXT_ROWS_PER_STEP rows at a time (memory stays bounded)."""
        prompt = seq.request.input_ids
        for first in range(0, len(prompt) - 1, CONTEXT_ROWS_PER_STEP):
            last = min(first + CONTEXT_ROWS_PER_STEP, len(prompt) - 1)
            seq.context.add(self.model.logits(hidden[first:last]), first, prompt)  # (rows, V)

    def step(self) -> tuple[list[Sequence], torch.Tensor | None]:
        """One decode step for every sequence: (the sequences, their logits (B, V))."""
        active = list(self.sequences)
        tokens = torch.tensor([s.last_token for s in active], dtype=torch.long)  # (B,)
        positions = torch.tensor([s.cache_len for s in active], dtype=torch.long)  # (B,)
        self.use_threads(len(active))
        logits = self.model.decode(tokens, positions, self.cache)  # (B, V) fp32
        context = self.model.config.long_rope
        if context is not None:
            # LongRoPE (Sequence.grows_past): the sequence is computed again, whole, with the long
            # factors; its decode row above is replaced
            for slot, s in enumerate(active):
                if s.grows_past(context):
                    s.long_ids = s.request.input_ids + s.output
                    logits[slot] = self.model.prefill_many([torch.tensor(s.long_ids)], [slot], self.cache)[0]
                    self.recomputed += 1
        for s in active:
            s.cache_len += 1
        return active, logits

    def remove_finished(self) -> None:
        # Descending order: the slot moved into a hole is never itself a finished one.
        active = self.sequences
        for seq in active:
            if seq.finished and seq.group is not None and seq.group.reserved:  # a leader ended before its fork
                self._reserved -= len(seq.group.reserved)
                seq.group.reserved = []
        for slot in sorted((i for i, s in enumerate(active) if s.finished), reverse=True):
            last = active.pop()
            if slot < len(active):
                self.cache.move(len(active), slot, last.cache_len)
                active[slot] = last

    def clear(self) -> None:
        self.sequences.clear()
        self._reserved = 0

    def stats(self) -> dict[str, int]:
        stats = {"prompt_tokens_prefilled": self.prompt_tokens}
        if self.model.config.long_rope is not None:
            stats["long_rope_recomputed"] = self.recomputed
        return stats
