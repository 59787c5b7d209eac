"""The paged KV cache of the fused int4 model: fixed-size blocks shared through a BlockPool.

    kv      (layers, blocks, 2, kv heads, block size, head dim): K then V of each block
    tables  (slots, blocks per sequence) int32: the blocks of the sequence in each slot, in order

A running sequence owns a slot (a row of ``tables``); its positions live in the blocks listed
there, some of them shared with other sequences (prefix reuse, see block_pool.py). The kernel
reads and writes through the table, so nothing ever moves when sequences come and go.

16-bit storage halves the cache (float16: 10-bit mantissa, K/V of SmolLM2 stay far below its
range); the pages of ``kv`` are committed by the OS only when first written (lazy_zeros).
"""
from __future__ import annotations

import torch

from .block_pool import ROOT, BlockPool
from .kv_cache import lazy_zeros


class PagedKVCache:
    def __init__(self, *, num_layers: int, num_kv_heads: int, head_dim: int, max_slots: int, max_seq_len: int,
                 block_size: int, dtype: torch.dtype, cache_bytes: int, reuse: bool = True) -> None:
        self.block_size = block_size
        self.max_blocks = -(-max_seq_len // block_size)  # per sequence
        # every slot at max_seq_len at once must fit: a running sequence never waits for blocks
        num_blocks = max_slots * self.max_blocks
        self.kv = lazy_zeros((num_layers, num_blocks, 2, num_kv_heads, block_size, head_dim), dtype)
        self.block_bytes = self.kv[:, 0].numel() * self.kv.element_size()  # one block, all layers
        self.pool = BlockPool(num_blocks, cache_blocks=cache_bytes // self.block_bytes, reuse=reuse)
        # -1: no block (the kernel refuses to touch one)
        self.tables = torch.full((max_slots, self.max_blocks), -1, dtype=torch.int32)
        self._blocks: list[list[int]] = [[] for _ in range(max_slots)]  # per slot, = its table row
        self._chains: list[list[int]] = [[] for _ in range(max_slots)]  # chain ids of its full blocks
        self._roots = [ROOT] * max_slots  # the chain id before each slot's first block

    @property
    def dtype(self) -> torch.dtype:
        return self.kv.dtype

    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def open(self, slot: int, prompt: list[int], *, reuse: bool = True, root: int = ROOT) -> int:
        """Start a sequence in a free slot: take the cached blocks of its longest known prefix
        (none when not ``reuse``) in the chains from ``root`` (block_pool.LONG_ROOT: K/V computed
        otherwise); returns how many prompt tokens they cover (positions the sequence need not
        compute)."""
        assert not self._blocks[slot], f"slot {slot} is in use"
        blocks, chain = self.pool.match(prompt, self.block_size, lookup=reuse, root=root)
        self._blocks[slot], self._chains[slot] = blocks, chain
        self._roots[slot] = root
        if blocks:
            self.tables[slot, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        return len(blocks) * self.block_size

    def extend(self, slot: int, length: int) -> None:
        """Make positions 0..length-1 of a slot writable (allocating its next blocks)."""
        blocks = self._blocks[slot]
        while len(blocks) * self.block_size < length:
            block = self.pool.allocate()
            self.tables[slot, len(blocks)] = block
            blocks.append(block)

    def commit(self, slot: int, length: int, tokens) -> None:
        """Positions 0..length-1 of the slot hold the K/V of tokens[:length]: register every block
        that became full, so that later requests can share it. ``tokens``: a callable returning
        the sequence's tokens (called only when a block filled up)."""
        chain = self._chains[slot]
        full = length // self.block_size
        if len(chain) >= full or not self.pool.reuse:
            return
        all_tokens = tokens()
        bs = self.block_size
        for i in range(len(chain), full):
            parent = chain[-1] if chain else self._roots[slot]
            chain.append(self.pool.register(self._blocks[slot][i], parent, tuple(all_tokens[i * bs:(i + 1) * bs])))

    def fork(self, src: int, dst: int, length: int) -> None:
        """Start slot ``dst`` as a copy of positions 0..length-1 of slot ``src`` (the sequences of
        one request after its prompt): full blocks are shared by reference, never written again;
        the last, partial block is copied (both sequences write their next positions into it)."""
        assert not self._blocks[dst], f"slot {dst} is in use"
        bs = self.block_size
        full = length // bs
        blocks = self._blocks[src][:full]
        for block in blocks:
            self.pool.share(block)
        if length % bs:
            block = self.pool.allocate()
            self.kv[:, block] = self.kv[:, self._blocks[src][full]]  # (layers, 2, kv heads, block size, head dim)
            blocks = blocks + [block]
        self._blocks[dst], self._chains[dst] = blocks, list(self._chains[src][:full])
        self._roots[dst] = self._roots[src]
        if blocks:
            self.tables[dst, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)

    def close(self, slot: int) -> None:
        """The slot's sequence finished or was cancelled: release its blocks."""
        self.pool.release(self._blocks[slot])
        self.tables[slot, :len(self._blocks[slot])] = -1
        self._blocks[slot], self._chains[slot] = [], []

    def stats(self) -> dict[str, int]:
        return self.pool.stats()

    def touch_all(self) -> None:
        """Write every page (what every slot at max_seq_len would resident: memory reports)."""
        self.kv.fill_(0)
