"""Resident memory of an engine at its configured maximum batch (``scripts/engine_memory.py``).

The KV cache is allocated lazily (see kv_cache.lazy_zeros): RSS grows with the positions that
sequences actually reach. So three numbers are reported: after loading, while all
``max_batch_size`` slots decode at once, and with every page of the cache touched, which is
the worst case of all slots at ``max_seq_len``.
"""
from __future__ import annotations

import os
import threading

from .config import EngineConfig
from .request import GenerationRequest
from .scheduler import Engine


def rss_bytes() -> int:
    """This process's resident set size, from /proc (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def resident_memory_at_max_batch(config: EngineConfig, *, prompt_len: int = 16, new_tokens: int = 4,
                                 timeout: float = 600.0) -> dict[str, int]:
    """Load an engine, fill all its slots at once, then touch its whole KV cache; RSS at each step."""
    before = rss_bytes()
    engine = Engine(config)
    loaded = rss_bytes()
    n = config.max_batch_size
    done = threading.Event()
    state = {"finished": 0, "peak_active": 0, "rss_active": 0}
    lock = threading.Lock()

    def on_output(out) -> None:  # engine thread
        active = engine.stats()["active"]
        if active > state["peak_active"]:
            state["peak_active"] = active
        if active == n:
            state["rss_active"] = max(state["rss_active"], rss_bytes())
        if out.finished:
            with lock:
                state["finished"] += 1
                if state["finished"] == n:
                    done.set()

    vocab = engine.model.config.vocab_size
    for i in range(n):
        ids = [(7919 * (i * prompt_len + j)) % vocab for j in range(prompt_len)]
        engine.submit(GenerationRequest(request_id=f"mem-{i}", input_ids=ids, max_new_tokens=new_tokens,
                                        streaming=True), on_output)
    engine.start()  # after submitting: all requests are admitted together
    try:
        if not done.wait(timeout):
            raise TimeoutError(f"{n} requests did not finish in {timeout:.0f}s")
    finally:
        engine.stop()
    for kv in engine.cache.kv:  # what all slots at max_seq_len would have written
        kv.fill_(0)
    return {
        "max_batch_size": n,
        "max_seq_len": engine.max_seq_len,
        "peak_active": state["peak_active"],
        "rss_before_bytes": before,
        "rss_loaded_bytes": loaded,
        "rss_all_slots_active_bytes": state["rss_active"],
        "rss_full_kv_cache_bytes": rss_bytes(),
        "kv_cache_bytes": engine.cache.nbytes(),
    }
