#!/usr/bin/env python3
"""Resident memory of the CPU engine at its maximum batch: load, fill every slot, touch the cache.

    .venv/bin/python scripts/engine_memory.py --max-batch-size 32 --max-seq-len 2048 --weight-dtype int8
"""
import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trident.engine import EngineConfig  # noqa: E402
from trident.engine.config import WEIGHT_DTYPES  # noqa: E402
from trident.engine.memory import resident_memory_at_max_batch  # noqa: E402


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
    print(f"  RSS after loading            {report['rss_loaded_bytes'] / mib:8.0f} MiB")
    print(f"  RSS, all {report['peak_active']:>3} slots decoding  {report['rss_all_slots_active_bytes'] / mib:8.0f} MiB")
    print(f"  RSS, whole KV cache touched  {report['rss_full_kv_cache_bytes'] / mib:8.0f} MiB "
          f"(KV cache {report['kv_cache_bytes'] / mib:.0f} MiB: every slot at max_seq_len)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
