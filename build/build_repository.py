#!/usr/bin/env python3
"""Fill model_repository/ templates into a runnable Triton model repository (CPU flavour)."""
import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trident.contract import ENGINE_FEATURES  # noqa: E402
from trident.engine.config import WEIGHT_DTYPES, LlamaConfig  # noqa: E402
from trident.grammar import write_tokenizer_info  # noqa: E402
from trident.prompt_limits import max_prompt_chars  # noqa: E402
from trident.repo_builder import (DEFAULT_NVIDIA_NAMES, NVIDIA_NAMES, TOKENIZER_INFO, TemplateError,  # noqa: E402
                                  build_repository, model_vocab_size, parse_nvidia_names)


def cpu_values(args) -> dict:
    model_dir = str(Path(args.model_dir).resolve())
    out = Path(getattr(args, "out", None) or ".").resolve()
    return {
        "tokenizer_dir": model_dir,
        "checkpoint_dir": model_dir,
        "engine_model": "tensorrt_llm",
        "max_context": args.max_seq_len,
        "max_new_tokens_limit": args.max_new_tokens_limit,
        "max_prompt_chars": getattr(args, "max_prompt_chars", None) or max_prompt_chars(model_dir, args.max_seq_len),
        "llm_max_batch_size": 64,
        "llm_max_concurrent": args.max_concurrent,
        "llm_instances": getattr(args, "llm_instances", 1),
        "stream_interval": getattr(args, "stream_interval", 1),
        "engine_max_batch_size": args.max_batch_size,
        "max_seq_len": args.max_seq_len,
        "engine_dtype": args.dtype,
        "engine_weight_dtype": getattr(args, "weight_dtype", "auto"),
        "num_threads": args.num_threads,
        "max_queue_size": args.max_queue_size,
        "vocab_size": model_vocab_size(model_dir),
        "engine_features": ",".join(ENGINE_FEATURES),
        "xgrammar_tokenizer_info_path": str(out / TOKENIZER_INFO),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", required=True, type=Path, help="HF checkpoint + tokenizer")
    parser.add_argument("--out", required=True, type=Path, help="repository folder to write")
    parser.add_argument("--max-batch-size", type=int, default=32, help="engine's running batch")
    parser.add_argument("--max-seq-len", type=int, default=2048, help="prompt + generated tokens")
    parser.add_argument("--max-new-tokens-limit", type=int, default=2048)
    parser.add_argument("--max-prompt-chars", type=int, default=0,
                        help="prompt characters allowed before tokenizing (0: context x the longest token)")
    parser.add_argument("--max-queue-size", type=int, default=256, help="waiting requests")
    parser.add_argument("--max-concurrent", type=int, default=256, help="llm model's workers")
    parser.add_argument("--llm-instances", type=int, default=1,
                        help="instances (processes) of the llm model: more spread its per-token work "
                             "over more cores (docs/operations.md)")
    parser.add_argument("--stream-interval", type=int, default=1,
                        help="engine tokens per streamed response: 1 streams each token; N sends the "
                             "first text at once, then every N tokens (docs/operations.md)")
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                        help="auto: bfloat16 where the CPU has AVX512-BF16 or AMX, else float32")
    parser.add_argument("--weight-dtype", choices=list(WEIGHT_DTYPES), default="int4",
                        help="engine weights: int4 (4-bit blocks, trident's AVX2 kernels; exact for a "
                             "checkpoint converted from a Q4_1 GGUF; the default), auto (= dtype; float32 "
                             "is HF-identical), or float16/int8 packed for fbgemm")
    parser.add_argument("--num-threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--nvidia-names", default=",".join(DEFAULT_NVIDIA_NAMES),
                        help=f"NVIDIA's names for the llm model to serve too, each a copy of it (a stub process): "
                             f"comma-separated, of {', '.join(NVIDIA_NAMES)}; empty for none (docs/architecture.md)")
    args = parser.parse_args()
    try:
        nvidia_names = parse_nvidia_names(args.nvidia_names)
    except TemplateError as exc:
        parser.error(f"--nvidia-names: {exc}")
    if args.stream_interval < 1:
        parser.error(f"--stream-interval must be at least 1, got {args.stream_interval}")
    if args.llm_instances < 1:
        parser.error(f"--llm-instances must be at least 1, got {args.llm_instances}")
    logging.basicConfig(level=logging.INFO, format="[build-repository] %(message)s")
    try:  # the engine's own reading of the checkpoint: refused here, not when Triton loads it
        model = LlamaConfig.from_checkpoint(args.model_dir)
    except (OSError, ValueError, KeyError) as exc:
        parser.error(f"--model-dir {args.model_dir}: the CPU engine cannot serve this checkpoint: {exc!r}")
    if not any(Path(args.model_dir).glob("*.safetensors")):
        parser.error(f"--model-dir {args.model_dir}: no *.safetensors weights (the CPU engine reads safetensors)")
    logging.info("model: %s, %d layers, hidden %d, %d heads (%d kv), head_dim %d", model.model_type,
                 model.num_layers, model.hidden_size, model.num_heads, model.num_kv_heads, model.head_dim)
    out = build_repository(flavour="cpu", values=cpu_values(args), out_dir=args.out, nvidia_names=nvidia_names)
    write_tokenizer_info(args.model_dir, out / TOKENIZER_INFO)
    logging.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
