#!/usr/bin/env python3
"""Resident memory of the CPU engine at its maximum batch: load, fill every slot, touch the cache.

The KV cache is allocated lazily (see kv_cache.lazy_zeros): RSS grows with the positions that
sequences actually reach. So three numbers are reported: after loading, while all
``max_batch_size`` slots decode at once, and with every page of the cache touched, which is
the worst case of all slots at ``max_seq_len``.

    .venv/bin/python scripts/engine_memory.py --max-batch-size 32 --max-seq-len 2048 --weight-dtype int8

It also gives the peak of loading (anonymous memory, sampled): with int4 the checkpoint is read
in its own dtype and packed a layer at a time, so a bfloat16 checkpoint peaks below its file's
size (docs/cpu_engine.md, Memory), not at twice it (all read as float32).
"""
import argparse
import json
import os
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trident.contract import SamplingParams  # noqa: E402
from trident.engine import Engine, EngineConfig, GenerationRequest  # noqa: E402
from trident.engine.config import WEIGHT_DTYPES  # noqa: E402


def rss_bytes() -> int:
    """This process's resident set size, from /proc (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def anonymous_bytes() -> int:
    """This process's anonymous resident memory (RssAnon): what loading allocates, without the
    checkpoint file's pages mapped while it is read (page cache the kernel can drop)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


def resident_memory_at_max_batch(config: EngineConfig, *, prompt_len: int = 16, new_tokens: int = 4,
                                 timeout: float = 600.0) -> dict[str, int]:
    """Load an engine (its anonymous memory sampled every 2 ms meanwhile: the peak of loading),
    fill all its slots at once, then touch its whole KV cache; RSS at each step."""
    before = rss_bytes()
    anon_before, peak, loading = anonymous_bytes(), [0], threading.Event()

    def sample() -> None:
        while not loading.wait(0.002):
            peak[0] = max(peak[0], anonymous_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        engine = Engine(config)
    finally:
        loading.set()
        sampler.join()
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
        engine.submit(GenerationRequest(request_id=f"mem-{i}", input_ids=ids, streaming=True,
                                        sampling=SamplingParams(max_new_tokens=new_tokens, temperature=0.0)),
                      on_output)
    engine.start()  # after submitting: all requests are admitted together
    try:
        if not done.wait(timeout):
            raise TimeoutError(f"{n} requests did not finish in {timeout:.0f}s")
    finally:
        engine.stop()
    engine.cache.touch_all()  # what all slots at max_seq_len would have written
    return {
        "max_batch_size": n,
        "max_seq_len": engine.max_seq_len,
        "peak_active": state["peak_active"],
        "rss_before_bytes": before,
        "rss_loaded_bytes": loaded,
        "anon_peak_loading_bytes": max(peak[0], anonymous_bytes()) - anon_before,
        "rss_all_slots_active_bytes": state["rss_active"],
        "rss_full_kv_cache_bytes": rss_bytes(),
        "kv_cache_bytes": engine.cache.nbytes(),
    }


def checkpoint_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=ROOT / ".cache/models/smollm2-135m-instruct")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    parser.add_argument("--weight-dtype", default="auto", choices=list(WEIGHT_DTYPES))
    parser.add_argument("--json", action="store_true", help="print the raw numbers as JSON")
    args = parser.parse_args()
    config = EngineConfig(checkpoint_dir=str(args.model_dir), max_batch_size=args.max_batch_size,
                          max_seq_len=args.max_seq_len, dtype=args.dtype, weight_dtype=args.weight_dtype)
    report = resident_memory_at_max_batch(config)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    mib = 2**20
    print(f"engine: max_batch_size {report['max_batch_size']}, max_seq_len {report['max_seq_len']}, "
          f"dtype {args.dtype}, weight_dtype {args.weight_dtype}")
    print(f"  RSS before loading           {report['rss_before_bytes'] / mib:8.0f} MiB (python + torch)")
    print(f"  peak while loading           {report['anon_peak_loading_bytes'] / mib:8.0f} MiB more (anonymous; "
          f"checkpoint files {checkpoint_bytes(args.model_dir) / mib:.0f} MiB)")
    print(f"  RSS after loading            {report['rss_loaded_bytes'] / mib:8.0f} MiB")
    print(f"  RSS, all {report['peak_active']:>3} slots decoding  {report['rss_all_slots_active_bytes'] / mib:8.0f} MiB")
    print(f"  RSS, whole KV cache touched  {report['rss_full_kv_cache_bytes'] / mib:8.0f} MiB "
          f"(KV cache {report['kv_cache_bytes'] / mib:.0f} MiB: every slot at max_seq_len)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
