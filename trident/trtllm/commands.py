"""The argv of each TensorRT-LLM 1.2.1 build step, as pure functions (no GPU, no imports of it).

Flags checked against TensorRT-LLM's sources (docs/gpu.md lists the files and commits):
``examples/models/core/llama/convert_checkpoint.py`` and
``examples/models/core/qwen/convert_checkpoint.py`` (both: --model_dir --output_dir --dtype
{auto,float16,bfloat16,float32} --tp_size --pp_size) and ``tensorrt_llm/commands/build.py`` with
the plugin flags that ``tensorrt_llm/plugin/plugin.py::add_plugin_argument`` exposes.
"""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import Sequence

from .plan import EngineSettings


def convert_command(*, python: str, convert_script: Path, model_dir: Path, checkpoint_dir: Path,
                    engine: EngineSettings) -> list[str]:
    """HF checkpoint -> TensorRT-LLM checkpoint, one rank{N}.safetensors per GPU of tp x pp."""
    return [
        python, str(convert_script),
        "--model_dir", str(model_dir),
        "--output_dir", str(checkpoint_dir),
        # Explicit: "auto" would turn a float32 checkpoint (ours) into float16.
        "--dtype", engine.dtype,
        "--tp_size", str(engine.tp_size),
        "--pp_size", str(engine.pp_size),
    ]


def build_command(*, checkpoint_dir: Path, engine_dir: Path, engine: EngineSettings,
                  trtllm_build: str = "trtllm-build") -> list[str]:
    """TensorRT-LLM checkpoint -> engines (config.json + rank{N}.engine) for in-flight batching.

    * ``--kv_cache_type paged``: 1.2.1's spelling; ``--paged_kv_cache enable`` still parses but
      is deprecated there (build.py warns "use --kv_cache_type=paged/disabled instead").
    * ``--gpt_attention_plugin`` / ``--gemm_plugin auto``: plugins in the checkpoint's dtype;
      in-flight batching needs the attention plugin, paged KV cache and packed inputs
      (``--remove_input_padding enable``).
    * ``--use_paged_context_fmha enable``: needed for KV cache reuse (enable_kv_cache_reuse).
    * ``--workers``: build the ranks in parallel, one GPU each (trtllm-build caps it at the
      number of visible GPUs).
    """
    return [
        trtllm_build,
        "--checkpoint_dir", str(checkpoint_dir),
        "--output_dir", str(engine_dir),
        "--gemm_plugin", "auto",
        "--gpt_attention_plugin", "auto",
        "--kv_cache_type", "paged",
        "--remove_input_padding", "enable",
        "--context_fmha", "enable",
        "--use_paged_context_fmha", "enable",
        "--max_beam_width", "1",
        "--max_batch_size", str(engine.max_batch_size),
        "--max_input_len", str(engine.input_len),
        "--max_seq_len", str(engine.max_seq_len),
        "--max_num_tokens", str(engine.max_num_tokens),
        "--workers", str(engine.world_size),
    ]


def shell_line(argv: Sequence[str]) -> str:
    """The command exactly as it runs, quoted for a POSIX shell."""
    return shlex.join(str(a) for a in argv)
