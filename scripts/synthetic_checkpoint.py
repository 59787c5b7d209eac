#!/usr/bin/env python3
"""A checkpoint of a model's real shape with random weights, to size it before downloading it.

Give it the model's ``config.json`` (copied from its model page); it writes that config and random
bfloat16 weights under the tensor names transformers saves for the architecture, in safetensors
shards, so the CPU engine loads it as it would the real checkpoint. Memory and speed depend on
the shapes only, not on the values:

    .venv/bin/python scripts/synthetic_checkpoint.py --config smollm3-config.json --out /tmp/smollm3-synth
    .venv/bin/python scripts/engine_memory.py --model-dir /tmp/smollm3-synth --weight-dtype int4 --dtype float32
    make serve CHECKPOINT=/tmp/smollm3-synth   # with --tokenizer-dir: serves (nonsense text)

docs/cpu_engine.md ("Sizing a model") has the figures of a 3B model measured this way.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

TOKENIZER_FILES = ("tokenizer", "special_tokens", "vocab", "merges", "chat_template", "generation_config")


def parameter_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """The tensors transformers saves for this config (tied weights once), without allocating them."""
    import transformers

    hf_config = transformers.AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def random_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Norm weights 1, biases 0, matrices N(0, 0.02): values of a trained model's scale."""
    if "norm" in name:
        return torch.ones(shape, dtype=torch.bfloat16)
    if name.endswith("bias"):
        return torch.zeros(shape, dtype=torch.bfloat16)
    return (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)


def write(config: dict, out: Path, *, shard_mb: int = 2048, seed: int = 0) -> list[Path]:
    """config.json, the shards (each written once full, so at most one is in memory) and their
    index under out; returns the shard files."""
    out.mkdir(parents=True, exist_ok=True)
    shapes = parameter_shapes(config)
    (out / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16"}, indent=2))
    generator = torch.Generator().manual_seed(seed)
    files: list[Path] = []
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}

    def flush() -> None:
        path = out / f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, str(path), metadata={"format": "pt"})
        weight_map.update({name: path.name for name in shard})
        files.append(path)
        shard.clear()

    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * int(torch.Size(shape).numel())
        if shard and size + nbytes > shard_mb * 2**20:
            flush()
            size = 0
        shard[name] = random_tensor(name, shape, generator)
        size += nbytes
    flush()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return files


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, required=True, help="the model's config.json")
    p.add_argument("--out", type=Path, required=True, help="folder to write (created)")
    p.add_argument("--tokenizer-dir", type=Path, help="copy its tokenizer files, so the folder can be served")
    p.add_argument("--shard-mb", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    config = json.loads(args.config.read_text())
    files = write(config, args.out, shard_mb=args.shard_mb, seed=args.seed)
    if args.tokenizer_dir:
        for f in args.tokenizer_dir.iterdir():
            if f.is_file() and f.name.startswith(TOKENIZER_FILES):
                shutil.copy(f, args.out / f.name)
    total = sum(f.stat().st_size for f in files)
    print(f"wrote {args.out}: {len(files)} shard(s), {total / 2**30:.2f} GiB of bfloat16 weights")
    return 0


if __name__ == "__main__":
    sys.exit(main())
