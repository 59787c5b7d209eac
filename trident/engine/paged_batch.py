"""The running batch of the fused int4 model (fused_llama.FusedLlama) over the paged KV cache.

Admission only finds a sequence a slot and the cached blocks of its prompt's longest known
prefix (prefix reuse). Every step is then ONE kernel call over: the next token of each sequence
that is decoding, plus the next chunk of each prompt still being prefilled, at most
``prefill_token_budget`` prompt tokens a step (a long prompt is spread over several steps, so
running sequences keep getting tokens). Rows never influence each other (see fused_llama.py):
chunking, batching and reuse change no sequence's tokens.

A sequence that asks for its prompt's log-probabilities (context.py) gets a logits row for every
prompt position: it never takes cached blocks (it may still leave its own for others), and its
chunks share at most CONTEXT_ROWS_PER_STEP such rows a step.
"""
from __future__ import annotations

import heapq
from typing import Callable

import torch

from .block_pool import LONG_ROOT, ROOT, salted_root
from .context import CONTEXT_ROWS_PER_STEP
from .fused_llama import FusedLlama
from .paged_cache import PagedKVCache
from .sequence import Sequence


class PagedBatch:
    paged = True
    admission_budget = None  # prompts are chunked by the step instead

    def __init__(self, model: FusedLlama, cache: PagedKVCache, *, max_batch_size: int,
                 use_threads: Callable[[int], None], prefill_token_budget: int) -> None:
        self.model, self.cache = model, cache
        self.use_threads = use_threads
        self.prefill_token_budget = prefill_token_budget
        self.sequences: list[Sequence] = []
        self._free_slots = list(range(max_batch_size))  # a heap
        self.prompt_tokens = 0  # prompt tokens computed (the rest came from the prefix cache)
        self.recomputed = 0  # LongRoPE: sequences computed again past the pre-training context

    def has_room(self, slots: int = 1) -> bool:
        return len(self._free_slots) >= slots

    def add(self, seq: Sequence) -> None:
        """Admit a sequence; a group's leader also reserves the slots of its other members."""
        seq.slot = heapq.heappop(self._free_slots)
        if seq.group is not None:
            seq.group.reserved = [heapq.heappop(self._free_slots) for _ in range(seq.group.n - 1)]
        seq.cache_len = seq.cached_prompt = self.cache.open(seq.slot, seq.request.input_ids,
                                                            reuse=seq.context is None, root=self._root(seq))
        self.sequences.append(seq)

    def _root(self, seq: Sequence) -> int:
        """The prefix cache's chain its blocks belong to: with LongRoPE, a prompt longer than
        the pre-training context computes every position with the long factors, so its blocks
        are not those of the same tokens in a shorter prompt (block_pool.LONG_ROOT); with a
        cache_salt, that salt's own chain (block_pool.salted_root)."""
        context = self.model.config.long_rope
        root = LONG_ROOT if context is not None and len(seq.request.input_ids) > context else ROOT
        return salted_root(root, seq.request.cache_salt_id)  # a cache_salt's requests share their own chains

    def _recompute_long(self, seq: Sequence) -> None:
        """Sequence.grows_past: transformers' Phi-3 at this point drops its cache and computes the
        whole sequence again with the long factors (Phi3ForCausalLM.prepare_inputs_for_generation):
        so does the engine, as a prompt of the sequence's tokens in the long chains of the prefix
        cache (its short blocks stay cached for others). Its next logits come from that prefill's
        last row."""
        seq.long_ids = seq.request.input_ids + seq.output
        self.cache.close(seq.slot)
        seq.cache_len = self.cache.open(seq.slot, seq.long_ids, root=salted_root(LONG_ROOT, seq.request.cache_salt_id))
        self.recomputed += 1

    def fork(self, leader: Sequence, children: list[Sequence]) -> None:
        """The leader's prompt is prefilled: its other members take their reserved slots, sharing
        its KV blocks (the last, partial one copied)."""
        for seq, slot in zip(children, leader.group.reserved, strict=True):
            seq.slot = slot
            self.cache.fork(leader.slot, slot, leader.cache_len)
            self.sequences.append(seq)
        leader.group.reserved = []

    def prefill(self, seqs: list[Sequence]) -> None:
        return None  # prompts are prefilled by the next steps

    def step(self) -> tuple[list[Sequence], torch.Tensor | None]:
        """One kernel call; returns the sequences that got logits (a prompt's last chunk, or a
        decoding sequence) and those logits (R, V). The rows of prompt positions asked for
        their log-probabilities go to the sequences' ContextLogprobs instead."""
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logit_rows: list[int] = []
        with_logits: list[Sequence] = []
        sampled_rows: list[int] = []  # where with_logits' rows are among logit_rows
        context: list[tuple[Sequence, int, int, int]] = []  # (seq, first position, first logits row, rows)
        advanced: list[tuple[Sequence, int]] = []
        pretraining = self.model.config.long_rope  # LongRoPE's pre-training context (None: not LongRoPE)
        long_rope = pretraining is not None
        lengths: list[int] = []  # with LongRoPE: each row's prompt length (which picks its tables)
        budget = self.prefill_token_budget
        context_budget = CONTEXT_ROWS_PER_STEP
        for seq in self.sequences:
            if seq.grows_past(pretraining):
                self._recompute_long(seq)
            prompt = seq.long_ids or seq.request.input_ids
            start = seq.cache_len
            if start < len(prompt):  # prefilling: the next chunk, in admission order
                n = min(len(prompt) - start, budget)
                if seq.wants_context:
                    n = min(n, context_budget)
                if n <= 0:
                    continue
                budget -= n
                self.prompt_tokens += n
                tokens.extend(prompt[start:start + n])
            else:
                n = 1
                tokens.append(seq.last_token)
            self.cache.extend(seq.slot, start + n)
            positions.extend(range(start, start + n))
            slots.extend([seq.slot] * n)
            if long_rope:
                lengths.extend([len(prompt)] * n)
            if seq.wants_context:  # positions start.. give the log-probabilities of tokens start + 1..
                m = min(start + n, len(prompt) - 1) - start
                if m > 0:
                    context.append((seq, start, len(logit_rows), m))
                    logit_rows.extend(range(len(tokens) - n, len(tokens) - n + m))
                    context_budget -= m
            if start + n >= len(prompt):
                sampled_rows.append(len(logit_rows))
                logit_rows.append(len(tokens) - 1)
                with_logits.append(seq)
            advanced.append((seq, n))
        if not tokens:
            return [], None
        self.use_threads(len(tokens))
        logits = self.model.forward(torch.tensor(tokens), torch.tensor(positions), torch.tensor(slots), self.cache,
                                    torch.tensor(logit_rows, dtype=torch.long),  # (len(logit_rows), V)
                                    torch.tensor(lengths) if long_rope else None)
        for seq, n in advanced:
            seq.cache_len += n
            self.cache.commit(seq.slot, seq.cache_len, lambda seq=seq: seq.request.input_ids + seq.output)
        if context:
            for seq, first, row, m in context:
                seq.context.add(logits[row:row + m], first, seq.request.input_ids)
            logits = logits[sampled_rows]  # (R, V)
        return with_logits, logits

    def remove_finished(self) -> None:
        kept = []
        for seq in self.sequences:
            if seq.finished:
                self.cache.close(seq.slot)
                heapq.heappush(self._free_slots, seq.slot)
                if seq.group is not None and seq.group.reserved:  # a leader ended before its fork
                    for slot in seq.group.reserved:
                        heapq.heappush(self._free_slots, slot)
                    seq.group.reserved = []
            else:
                kept.append(seq)
        self.sequences[:] = kept

    def clear(self) -> None:
        for seq in self.sequences:
            seq.finished = True
        self.remove_finished()

    def stats(self) -> dict[str, int]:
        stats = {**self.cache.stats(), "prompt_tokens_prefilled": self.prompt_tokens}
        if self.model.config.long_rope is not None:
            stats["long_rope_recomputed"] = self.recomputed
        return stats
