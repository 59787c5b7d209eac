#!/usr/bin/env python3
"""What a 16-bit KV cache costs in quality: the int4 model with a float16 cache and with a float32
cache, each against the float32 reference (Hugging Face, float32 weights), given the same prefixes.

For each prompt: the reference's greedy continuation, then each int4 variant fed that same
continuation (teacher forcing), comparing every next-token distribution with the reference's:
mean KL(reference || variant), top-1 agreement, and how far below the reference's argmax (in
reference logits) the variant's top token lies. Also the two caches against each other: the
int4 model quantizes every activation to int8, so a perturbation of an ulp anywhere (here the
cache's rounding) flips some int8 roundings downstream; two equally good variants then differ by
about as much as each differs from the reference.

    .venv/bin/python scripts/kv_cache_quality.py --tokens 64
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trident.engine import Engine, EngineConfig  # noqa: E402

PROMPTS = [
    "The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
    "The history of the Roman Empire spans many centuries.", "Water boils at", "In 1492, Columbus",
    "import numpy as np\n", "The best way to learn programming is",
    "<|im_start|>user\nExplain gravity in one sentence.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
]


def logits_along(engine: Engine, prompt: list[int], continuation: list[int]) -> torch.Tensor:
    """Next-token logits after the prompt and after each continuation token: (len(cont) + 1, V)."""
    model, cache = engine.model, engine.cache
    rows = [model.prefill(torch.tensor(prompt), 0, cache)]
    for k, token in enumerate(continuation):
        rows.append(model.decode(torch.tensor([token]), torch.tensor([len(prompt) + k]), cache)[0])
    return torch.stack(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=ROOT / ".cache/models/smollm2-135m-instruct")
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model_dir)
    hf = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    engines = {dtype: Engine(EngineConfig(checkpoint_dir=str(args.model_dir), max_batch_size=1, max_seq_len=512,
                                          dtype="float32", weight_dtype="int4", kv_cache_dtype=dtype))
               for dtype in ("float32", "float16")}
    kl = {d: [] for d in engines}
    gap = {d: [] for d in engines}
    pair_kl = []
    with torch.inference_mode():
        for text in PROMPTS:
            prompt = tok(text).input_ids
            seq = list(prompt)
            for _ in range(args.tokens):
                seq.append(int(hf(torch.tensor([seq])).logits[0, -1].argmax()))
            cont = seq[len(prompt):]
            ref = hf(torch.tensor([seq])).logits[0, len(prompt) - 1:-1]  # (tokens, V)
            got = {d: logits_along(e, prompt, cont[:-1]) for d, e in engines.items()}
            for d, logits in got.items():
                kl[d].append(torch.nn.functional.kl_div(logits.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                                        reduction="none").sum(-1))
                gap[d].append(ref.max(-1).values - ref.gather(-1, logits.argmax(-1, keepdim=True))[:, 0])
            pair_kl.append(torch.nn.functional.kl_div(got["float16"].log_softmax(-1), got["float32"].log_softmax(-1),
                                                      log_target=True, reduction="none").sum(-1))
    n = len(PROMPTS) * args.tokens
    print(f"int4 weights against the float32 reference (Hugging Face), {len(PROMPTS)} prompts x {args.tokens} "
          "positions along its greedy continuation:")
    for d in engines:
        k, g = torch.cat(kl[d]), torch.cat(gap[d])
        print(f"  KV cache {d:8}: mean KL {k.mean():.2e} (max {k.max():.2e}), top-1 {int((g == 0).sum())}/{n}, "
              f"worst gap {g.max():.3f} logits")
    print(f"  float16 vs float32 cache: mean KL {torch.cat(pair_kl).mean():.2e}")
    for d, e in engines.items():
        per_token = e.cache.block_bytes / e.cache.block_size
        print(f"  {d} cache at max_batch_size 32 x max_seq_len 2048: {per_token * 32 * 2048 / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
