"""What to build and where: the engine settings, checked against the model before any GPU work."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from ..repo_builder import DEFAULT_NVIDIA_NAMES, TemplateError, check_nvidia_names
from .checkpoint import ModelShape

DTYPES = ("bfloat16", "float16")
SCHEDULER_POLICIES = ("guaranteed_no_evict", "max_utilization")


class PlanError(ValueError):
    """The requested build cannot work; the message names the knob to change."""


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    """trtllm-build's shape knobs. ``max_input_len`` None means ``max_seq_len - 1``.

    That default keeps the engine and the llm model in agreement: the llm model accepts any
    prompt with ``len(prompt) + max_new_tokens <= max_seq_len`` (so at most max_seq_len - 1
    prompt tokens); a smaller max_input_len would let the engine refuse requests the llm model
    accepted.
    """

    dtype: str = "bfloat16"
    tp_size: int = 1
    pp_size: int = 1
    max_batch_size: int = 32
    max_seq_len: int = 2048
    max_input_len: Optional[int] = None
    max_num_tokens: int = 8192

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def input_len(self) -> int:
        return self.max_input_len if self.max_input_len is not None else self.max_seq_len - 1


@dataclasses.dataclass(frozen=True)
class ServingSettings:
    """Runtime parameters of the tensorrt_llm model (config.pbtxt), not baked into engines."""

    kv_cache_free_gpu_mem_fraction: float = 0.9
    enable_kv_cache_reuse: bool = True
    batch_scheduler_policy: str = "guaranteed_no_evict"
    max_new_tokens_limit: Optional[int] = None  # None: max_seq_len - 1
    max_concurrent: int = 256
    stream_interval: int = 1  # engine tokens per streamed response of the llm model
    llm_instances: int = 1  # processes of the llm model (its per-token work per core: docs/operations.md)
    # NVIDIA's names served as copies of the llm model (trident.repo_builder.NVIDIA_NAMES)
    nvidia_names: tuple[str, ...] = DEFAULT_NVIDIA_NAMES


def check_plan(*, engine: EngineSettings, serving: ServingSettings, shape: ModelShape) -> list[str]:
    """Raise PlanError for a build that cannot work; return warnings for one that may disappoint."""
    problems = []
    if engine.dtype not in DTYPES:
        problems.append(f"--dtype {engine.dtype}: choose one of {', '.join(DTYPES)}")
    for name in ("tp_size", "pp_size", "max_batch_size", "max_seq_len", "max_num_tokens"):
        if getattr(engine, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be at least 1, got {getattr(engine, name)}")
    tp, heads, kv = engine.tp_size, shape.num_attention_heads, shape.num_key_value_heads
    if tp >= 1 and heads % tp:
        divisors = [d for d in range(1, heads + 1) if heads % d == 0 and (kv % d == 0 or d % kv == 0)]
        problems.append(
            f"--tp-size {tp}: the model has {heads} attention heads, which tensor parallelism must "
            f"split evenly; tp sizes that work for this model: {divisors}")
    elif tp >= 1 and kv % tp and tp % kv:
        problems.append(
            f"--tp-size {tp}: the model has {kv} key/value heads; tp must divide them or be a "
            "multiple of them (TensorRT-LLM then replicates each kv head)")
    if engine.pp_size > shape.num_hidden_layers:
        problems.append(f"--pp-size {engine.pp_size} is more than the model's {shape.num_hidden_layers} layers")
    if shape.family == "phi" and engine.pp_size != 1:
        problems.append(f"--pp-size {engine.pp_size}: TensorRT-LLM's Phi converter has no pipeline parallelism "
                        "(its convert_checkpoint.py asserts pp_size == 1); use --tp-size")
    if not 1 <= engine.input_len < engine.max_seq_len:
        problems.append(
            f"--max-input-len {engine.input_len} must be at least 1 and below --max-seq-len "
            f"{engine.max_seq_len} (a prompt must leave room for one generated token)")
    if engine.max_num_tokens < engine.input_len:
        problems.append(
            f"--max-num-tokens {engine.max_num_tokens} is below --max-input-len {engine.input_len}: "
            "without chunked context one prompt must fit in one engine step")
    if not 0.0 < serving.kv_cache_free_gpu_mem_fraction <= 1.0:
        problems.append(
            f"--kv-cache-free-gpu-mem-fraction {serving.kv_cache_free_gpu_mem_fraction} must be in (0, 1]")
    if serving.batch_scheduler_policy not in SCHEDULER_POLICIES:
        problems.append(f"--batch-scheduler-policy {serving.batch_scheduler_policy}: choose one of "
                        f"{', '.join(SCHEDULER_POLICIES)}")
    limit = new_tokens_limit(engine=engine, serving=serving)
    if not 1 <= limit < engine.max_seq_len:
        problems.append(f"--max-new-tokens-limit {limit} must be between 1 and --max-seq-len - 1")
    if serving.max_concurrent < 1:
        problems.append(f"--max-concurrent must be at least 1, got {serving.max_concurrent}")
    if serving.stream_interval < 1:
        problems.append(f"--stream-interval must be at least 1, got {serving.stream_interval}")
    if serving.llm_instances < 1:
        problems.append(f"--llm-instances must be at least 1, got {serving.llm_instances}")
    try:
        check_nvidia_names(serving.nvidia_names)
    except TemplateError as exc:
        problems.append(f"--nvidia-names: {exc}")
    if problems:
        raise PlanError("cannot build this engine:\n  " + "\n  ".join(problems))

    warnings = []
    if engine.max_seq_len > shape.max_position_embeddings:
        warnings.append(f"--max-seq-len {engine.max_seq_len} is above the model's "
                        f"max_position_embeddings ({shape.max_position_embeddings}): quality may drop")
    if engine.input_len < engine.max_seq_len - 1:
        warnings.append(f"--max-input-len {engine.input_len} < --max-seq-len - 1: prompts longer than "
                        f"{engine.input_len} tokens pass the llm model's check but the engine refuses them")
    return warnings


def new_tokens_limit(*, engine: EngineSettings, serving: ServingSettings) -> int:
    if serving.max_new_tokens_limit is not None:
        return serving.max_new_tokens_limit
    return engine.max_seq_len - 1


@dataclasses.dataclass(frozen=True)
class BuildLayout:
    """Everything one build writes, under one folder (a Docker volume in the GPU image)."""

    root: Path

    @property
    def hf_dir(self) -> Path:
        """The source checkpoint as the 1.2.1 converter and tokenizer read it (checkpoint.py)."""
        return self.root / "hf"

    @property
    def checkpoint_dir(self) -> Path:
        """TensorRT-LLM checkpoint: an intermediate, removed after a successful engine build."""
        return self.root / "trtllm_checkpoint"

    @property
    def engine_dir(self) -> Path:
        return self.root / "engines"

    @property
    def repository_dir(self) -> Path:
        return self.root / "model_repository"

    @property
    def stamp(self) -> Path:
        """What was built (settings, versions, GPU); a build whose stamp matches is skipped."""
        return self.root / "build.json"

    @classmethod
    def under(cls, root: Path) -> "BuildLayout":
        return cls(Path(root).resolve())
