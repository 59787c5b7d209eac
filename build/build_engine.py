#!/usr/bin/env python3
"""Build TensorRT-LLM 1.2.1 engines from a Hugging Face checkpoint (Llama, Mistral, Phi-3 / Phi-4,
Qwen2 / Qwen3: trident/trtllm/checkpoint.py's FAMILIES) and fill the trtllm model repository:
convert_checkpoint.py -> trtllm-build -> model_repository/ (flavour trtllm).

Everything lands under --out: hf/ (the checkpoint as 1.2.1 reads it), engines/,
model_repository/ and build.json. --dry-run prints every command and writes the configs
without a GPU or tensorrt_llm. Serve the result with scripts/launch_triton_gpu.py.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trident.repo_builder import NVIDIA_NAMES, TemplateError, parse_nvidia_names  # noqa: E402
from trident.trtllm.build import BuildError, run_build  # noqa: E402
from trident.trtllm.checkpoint import FAMILIES, CheckpointError  # noqa: E402
from trident.trtllm.plan import DTYPES, SCHEDULER_POLICIES, EngineSettings, PlanError, ServingSettings  # noqa: E402

defaults, serving_defaults = EngineSettings(), ServingSettings()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True, type=Path, help="HF checkpoint + tokenizer, its architecture one of: " + ", ".join(FAMILIES))
    p.add_argument("--out", required=True, type=Path, help="folder for engines and the model repository")
    p.add_argument("--dtype", choices=DTYPES, default=defaults.dtype)
    p.add_argument("--tp-size", type=int, default=defaults.tp_size, help="tensor-parallel GPUs")
    p.add_argument("--pp-size", type=int, default=defaults.pp_size, help="pipeline-parallel GPUs")
    p.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size,
                   help="requests in the engine's running batch")
    p.add_argument("--max-input-len", type=int, default=None, help="prompt tokens (default: max-seq-len - 1)")
    p.add_argument("--max-seq-len", type=int, default=defaults.max_seq_len, help="prompt + generated tokens")
    p.add_argument("--max-num-tokens", type=int, default=defaults.max_num_tokens,
                   help="tokens of all requests in one engine step")
    p.add_argument("--kv-cache-free-gpu-mem-fraction", type=float,
                   default=serving_defaults.kv_cache_free_gpu_mem_fraction,
                   help="share of free GPU memory (after weights) for the paged KV cache")
    p.add_argument("--enable-kv-cache-reuse", action=argparse.BooleanOptionalAction,
                   default=serving_defaults.enable_kv_cache_reuse, help="reuse KV blocks of shared prompt prefixes")
    p.add_argument("--batch-scheduler-policy", choices=SCHEDULER_POLICIES,
                   default=serving_defaults.batch_scheduler_policy)
    p.add_argument("--max-new-tokens-limit", type=int, default=None,
                   help="largest max_new_tokens a request may ask for (default: max-seq-len - 1)")
    p.add_argument("--max-concurrent", type=int, default=serving_defaults.max_concurrent,
                   help="requests the llm model serves at once")
    p.add_argument("--stream-interval", type=int, default=serving_defaults.stream_interval,
                   help="engine tokens per streamed response of the llm model (1: every token)")
    p.add_argument("--llm-instances", type=int, default=serving_defaults.llm_instances,
                   help="processes of the llm model: more spread its per-token work over more cores")
    p.add_argument("--nvidia-names", default=",".join(serving_defaults.nvidia_names),
                   help="NVIDIA's names for the llm model to serve too, each a copy of it (a stub process): "
                        f"comma-separated, of {', '.join(NVIDIA_NAMES)}; empty for none")
    p.add_argument("--convert-script", default=None,
                   help="TensorRT-LLM's examples/models/core/<family>/convert_checkpoint.py for the "
                        "model's family (default: $TRIDENT_TRTLLM_CONVERT_SCRIPT or the image's copy)")
    p.add_argument("--skip-existing", action="store_true",
                   help="keep engines whose build.json matches this build (the container entrypoint)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, write only the configs")
    args = p.parse_args()
    try:
        nvidia_names = parse_nvidia_names(args.nvidia_names)
    except TemplateError as exc:
        p.error(f"--nvidia-names: {exc}")

    engine = EngineSettings(dtype=args.dtype, tp_size=args.tp_size, pp_size=args.pp_size,
                            max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len,
                            max_input_len=args.max_input_len, max_num_tokens=args.max_num_tokens)
    serving = ServingSettings(kv_cache_free_gpu_mem_fraction=args.kv_cache_free_gpu_mem_fraction,
                              enable_kv_cache_reuse=args.enable_kv_cache_reuse,
                              batch_scheduler_policy=args.batch_scheduler_policy,
                              max_new_tokens_limit=args.max_new_tokens_limit, max_concurrent=args.max_concurrent,
                              stream_interval=args.stream_interval, llm_instances=args.llm_instances,
                              nvidia_names=nvidia_names)

    def log(message: str) -> None:
        print(f"[build-engine] {message}", flush=True)

    try:
        layout = run_build(model_dir=args.model_dir, out_dir=args.out, engine=engine, serving=serving,
                           dry_run=args.dry_run, skip_existing=args.skip_existing,
                           convert_script=args.convert_script, log=log)
    except (BuildError, PlanError, CheckpointError) as exc:
        print(f"[build-engine] error: {exc}", file=sys.stderr, flush=True)
        return 1
    log(f"repository: {layout.repository_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
