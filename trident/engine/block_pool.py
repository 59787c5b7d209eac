"""KV cache blocks: who holds which, which full blocks can be shared, which to evict.

A block holds the K/V of ``block_size`` consecutive positions of one sequence. Once full, it is
registered under its content: the tokens it covers and the identity of the block before it
(a chain from the first block, so equal keys mean equal prefixes, not just equal slices). A
later request whose prompt starts with the same tokens takes the registered blocks instead of
prefilling them (prefix reuse); the fused kernels compute a position's K/V from the tokens up to
it alone, so a shared block is the same bits the request would have computed.

Blocks are reference counted. When a sequence finishes or is cancelled, its registered blocks
whose count drops to 0 stay cached (least recently used first out, at most ``cache_blocks`` of
them); the others return to the free list at once. Allocation takes the lowest free block (so
resident memory follows the high-water mark of blocks in use), else evicts the least recently
used cached block. A sequence releases its blocks last to first, so a chain is evicted from its
tail and a cached prefix outlives its continuations.
"""
from __future__ import annotations

import heapq
from collections import OrderedDict

ROOT = 0  # the chain id before a sequence's first block
#: the chain id before the first block of a sequence whose K/V were computed otherwise than those
#: of the same tokens from ROOT (LongRoPE's long factors, paged_batch.PagedBatch._root): its
#: blocks are found only by such sequences
LONG_ROOT = -1


def salted_root(root: int, salt_id: int | None) -> int:
    """The chain id before the first block of a sequence with cache_salt ``salt_id`` (None: ``root``
    itself): one of its own for each salt (and for each of ROOT and LONG_ROOT), below the other
    roots, so that only sequences with the same salt find its blocks."""
    if salt_id is None:
        return root
    return -2 - (salt_id << 1) - (root == LONG_ROOT)


class OutOfBlocks(RuntimeError):
    pass


class BlockPool:
    def __init__(self, num_blocks: int, *, cache_blocks: int, reuse: bool = True) -> None:
        self.num_blocks = num_blocks
        self.cache_blocks = cache_blocks if reuse else 0
        self.reuse = reuse
        self.refs = [0] * num_blocks
        self._free = list(range(num_blocks))  # a heap: the lowest id first
        self._table: dict[tuple[int, tuple[int, ...]], int] = {}  # (parent chain id, tokens) -> block
        self._key: dict[int, tuple[int, tuple[int, ...]]] = {}  # registered block -> its key
        self._chain_id: dict[int, int] = {}  # registered block -> its chain id (never reused)
        self._next_id = ROOT + 1
        self._lru: OrderedDict[int, None] = OrderedDict()  # cached blocks (refs 0), oldest first
        self.counters = dict.fromkeys(("hit_tokens", "miss_tokens", "hit_requests", "miss_requests", "evicted"), 0)

    # ---- lookups and allocation ----

    def match(self, tokens: list[int], block_size: int, *, lookup: bool = True,
              root: int = ROOT) -> tuple[list[int], list[int]]:
        """The registered blocks that cover a prefix of ``tokens`` (taking a reference on each)
        and their chain ids. At most (len - 1) // block_size blocks: the last token is always
        computed, its logits are the point of the prefill. ``lookup`` False: none (a request
        that needs every position computed), counted as a miss."""
        blocks: list[int] = []
        chain: list[int] = []
        if self.reuse and lookup:
            parent = root
            for i in range((len(tokens) - 1) // block_size):
                block = self._table.get((parent, tuple(tokens[i * block_size:(i + 1) * block_size])))
                if block is None:
                    break
                self._take(block)
                blocks.append(block)
                parent = self._chain_id[block]
                chain.append(parent)
        hit = len(blocks) * block_size
        self.counters["hit_tokens"] += hit
        self.counters["miss_tokens"] += len(tokens) - hit
        self.counters["hit_requests" if blocks else "miss_requests"] += 1
        return blocks, chain

    def allocate(self) -> int:
        if self._free:
            block = heapq.heappop(self._free)
        elif self._lru:
            block = self._evict_oldest(to_free=False)
        else:
            raise OutOfBlocks(f"all {self.num_blocks} KV blocks are in use")
        self.refs[block] = 1
        return block

    def share(self, block: int) -> None:
        """One more holder of a block in use (the sequences of one request share its prompt)."""
        assert self.refs[block] > 0, f"block {block} is not in use"
        self.refs[block] += 1

    def register(self, block: int, parent: int, tokens: tuple[int, ...]) -> int:
        """Make a full block findable under (parent chain id, tokens); return the chain id of
        that content (another block's, if it was registered first: then this one stays private)."""
        if not self.reuse:
            return ROOT
        key = (parent, tokens)
        known = self._table.get(key)
        if known is not None:
            return self._chain_id[known]
        if block in self._key:  # already registered (a shared block): nothing to do
            return self._chain_id[block]
        self._table[key] = block
        self._key[block] = key
        self._chain_id[block] = self._next_id
        self._next_id += 1
        return self._chain_id[block]

    def release(self, blocks: list[int]) -> None:
        """Drop one reference on each block, last to first."""
        for block in reversed(blocks):
            self.refs[block] -= 1
            if self.refs[block] > 0:
                continue
            if block in self._key:
                self._lru[block] = None
                self._lru.move_to_end(block)
            else:
                heapq.heappush(self._free, block)
        while len(self._lru) > self.cache_blocks:
            self._evict_oldest(to_free=True)

    # ---- bookkeeping ----

    def stats(self) -> dict[str, int]:
        return {
            "kv_blocks_total": self.num_blocks,
            "kv_blocks_free": len(self._free) + len(self._lru),
            "prefix_cache_blocks": len(self._lru),
            **{f"prefix_cache_{k}": v for k, v in self.counters.items()},
        }

    def _take(self, block: int) -> None:
        if self.refs[block] == 0:
            self._lru.pop(block, None)
        self.refs[block] += 1

    def _evict_oldest(self, *, to_free: bool) -> int:
        block, _ = self._lru.popitem(last=False)
        del self._table[self._key.pop(block)]
        del self._chain_id[block]
        self.counters["evicted"] += 1
        if to_free:
            heapq.heappush(self._free, block)
        return block
