"""KV block bookkeeping for prefix reuse (trident/engine/block_pool.py, paged_cache.py): who holds
which block, what can be shared, what is evicted and when. No model, no kernels."""
from __future__ import annotations

import pytest
import torch

from trident.engine.block_pool import ROOT, BlockPool, OutOfBlocks
from trident.engine.paged_cache import PagedKVCache

BS = 4


def fill(pool, tokens, n_blocks=None):
    """A sequence that computed all of ``tokens``: its blocks, registered as they filled up."""
    blocks, parent = [], ROOT
    for i in range(n_blocks if n_blocks is not None else -(-len(tokens) // BS)):
        block = pool.allocate()
        blocks.append(block)
        if (i + 1) * BS <= len(tokens):
            parent = pool.register(block, parent, tuple(tokens[i * BS:(i + 1) * BS]))
    return blocks


def test_a_finished_prefix_is_found_again_and_counted():
    pool = BlockPool(16, cache_blocks=16)
    first = list(range(10))  # 2 full blocks + 2 tokens
    blocks = fill(pool, first)
    pool.release(blocks)
    assert pool.stats()["prefix_cache_blocks"] == 2  # the partial block went back to the free list
    found, chain = pool.match(first[:8] + [99, 98, 97], BS)
    assert found == blocks[:2] and len(chain) == 2 and all(pool.refs[b] == 1 for b in found)
    stats = pool.stats()
    assert stats["prefix_cache_hit_tokens"] == 8 and stats["prefix_cache_miss_tokens"] == 3
    assert stats["prefix_cache_hit_requests"] == 1 and stats["prefix_cache_miss_requests"] == 0
    assert stats["prefix_cache_blocks"] == 0  # in use again, not evictable


def test_the_last_prompt_token_is_never_taken_from_the_cache():
    """The prefill must compute at least the last token: its logits are the first output."""
    pool = BlockPool(8, cache_blocks=8)
    pool.release(fill(pool, list(range(8))))
    assert len(pool.match(list(range(8)), BS)[0]) == 1  # 8 tokens: one block, not two
    assert len(pool.match(list(range(9)), BS)[0]) == 2


def test_equal_blocks_after_different_prefixes_are_different_content():
    pool = BlockPool(16, cache_blocks=16)
    pool.release(fill(pool, [1, 2, 3, 4, 5, 6, 7, 8]))
    # the same second block after another first block: no match beyond the first block
    assert pool.match([9, 9, 9, 9, 5, 6, 7, 8, 0], BS)[0] == []
    assert len(pool.match([1, 2, 3, 4, 5, 6, 7, 8, 0], BS)[0]) == 2


def test_shared_blocks_are_released_only_when_the_last_holder_leaves():
    pool = BlockPool(8, cache_blocks=0)  # nothing stays cached once free
    prompt = list(range(9))
    a = fill(pool, prompt)
    b, _ = pool.match(prompt, BS)
    b += [pool.allocate()]  # b's own last block
    pool.release(a)  # a cancelled: b still holds the two shared blocks
    assert [pool.refs[x] for x in b] == [1, 1, 1]
    assert pool.stats()["kv_blocks_free"] == 8 - 3
    pool.release(b)
    assert pool.stats()["kv_blocks_free"] == 8 and all(r == 0 for r in pool.refs)


def test_lru_eviction_under_the_budget_takes_tails_first():
    pool = BlockPool(32, cache_blocks=3)
    old = fill(pool, list(range(12)))  # 3 full blocks
    pool.release(old)
    new = fill(pool, list(range(100, 108)))  # 2 full blocks
    pool.release(new)
    # 5 cached > 3: the oldest go, last block first (a chain is evicted from its tail)
    assert pool.stats()["prefix_cache_blocks"] == 3 and pool.stats()["prefix_cache_evicted"] == 2
    assert len(pool.match(list(range(12)) + [0], BS)[0]) == 1  # its first block survived
    assert len(pool.match(list(range(100, 108)) + [0], BS)[0]) == 2


def test_allocation_evicts_cached_blocks_when_nothing_is_free():
    pool = BlockPool(4, cache_blocks=4)
    pool.release(fill(pool, list(range(16))))
    assert pool.stats()["prefix_cache_blocks"] == 4
    taken = [pool.allocate() for _ in range(4)]
    assert sorted(taken) == [0, 1, 2, 3] and pool.stats()["prefix_cache_blocks"] == 0
    assert pool.match(list(range(16)), BS)[0] == []  # evicted content is never found again
    with pytest.raises(OutOfBlocks):
        pool.allocate()


def test_a_duplicate_block_stays_private_and_chains_through_the_first():
    """Two requests with the same prompt prefilled at once both compute its blocks; the second
    registration finds the first and keeps its own block private (freed when it finishes)."""
    pool = BlockPool(16, cache_blocks=16)
    a = fill(pool, list(range(8)))
    b = fill(pool, list(range(8)) + [50, 51, 52, 53])
    pool.release(b)
    assert pool.stats()["prefix_cache_blocks"] == 1  # only b's third block was new content
    pool.release(a)
    found, _ = pool.match(list(range(8)) + [50, 51, 52, 53, 0], BS)
    assert found == a + [b[2]]


def test_reuse_off_registers_nothing():
    pool = BlockPool(8, cache_blocks=8, reuse=False)
    pool.release(fill(pool, list(range(8))))
    assert pool.match(list(range(9)), BS)[0] == [] and pool.stats()["prefix_cache_blocks"] == 0


def test_paged_cache_tables_follow_the_slots():
    cache = PagedKVCache(num_layers=2, num_kv_heads=1, head_dim=16, max_slots=2, max_seq_len=16, block_size=BS,
                         dtype=torch.float16, cache_bytes=1 << 20)
    assert cache.kv.shape == (2, 8, 2, 1, BS, 16) and cache.kv.dtype == torch.float16
    assert cache.open(0, list(range(10))) == 0
    cache.extend(0, 10)
    assert cache.tables[0, :3].tolist() == [0, 1, 2] and cache.tables[0, 3] == -1
    cache.commit(0, 10, lambda: list(range(10)))
    cache.close(0)
    assert (cache.tables[0] == -1).all()
    assert cache.open(1, list(range(10)) + [7]) == 8  # two full blocks come back
    assert cache.tables[1, :2].tolist() == [0, 1]
    cache.extend(1, 11)
    assert cache.tables[1, 2] == 2  # the lowest free block


def test_salted_roots_are_their_own_chains():
    """block_pool.salted_root: each salt (and None) a root of its own, for ROOT and LONG_ROOT
    alike, never a chain id of a block (those count up from 1)."""
    from trident.engine.block_pool import LONG_ROOT, ROOT, salted_root

    roots = {salted_root(root, salt) for root in (ROOT, LONG_ROOT) for salt in (None, 0, 1, 2**64 - 1)}
    assert len(roots) == 8 and salted_root(ROOT, None) == ROOT and salted_root(LONG_ROOT, None) == LONG_ROOT
    assert all(r <= 0 for r in roots)
    pool = BlockPool(16, cache_blocks=16)
    tokens = list(range(9))
    pool.release(fill(pool, tokens))
    assert len(pool.match(tokens, BS)[0]) == 2
    assert pool.match(tokens, BS, root=salted_root(ROOT, 7)) == ([], [])
