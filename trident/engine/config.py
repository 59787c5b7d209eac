"""Engine settings and the model hyper-parameters read from a checkpoint's config.json."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 dot-product instructions (AVX512-BF16 or AMX).

    Without them torch emulates bf16 matmuls: measured 12-18 GFLOP/s against ~120 for fp32 on an
    AVX2-only EPYC, so batched decode in bf16 is several times slower than in fp32 there.
    """
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass
class EngineConfig:
    """What an operator chooses; everything else comes from the checkpoint."""

    checkpoint_dir: str
    max_batch_size: int = 32
    max_seq_len: int = 2048  # capped by the model's max_position_embeddings
    dtype: str = "bfloat16"  # "bfloat16" | "float32" | "auto" (bfloat16 only where the CPU has it)
    num_threads: int | None = None  # None (or 0): torch's default
    max_queue_size: int = 256
    # Prompt tokens prefilled between two decode steps (at least one request is always admitted):
    # a burst of long prompts must not freeze the tokens of the sequences already decoding.
    prefill_token_budget: int = 1024

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES and self.dtype != "auto":
            raise ValueError(f"dtype must be one of {sorted(DTYPES) + ['auto']}, got {self.dtype!r}")
        for name in ("max_batch_size", "max_seq_len", "max_queue_size", "prefill_token_budget"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.num_threads is not None and self.num_threads < 0:
            raise ValueError(f"num_threads must be >= 0, got {self.num_threads!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
        return DTYPES[self.dtype]


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    eos_token_id: int | None

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path) -> "LlamaConfig":
        raw = json.loads((Path(checkpoint_dir) / "config.json").read_text())
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict) -> "LlamaConfig":
        if raw.get("model_type", "llama") != "llama":
            raise ValueError(f"only llama checkpoints are supported, got {raw.get('model_type')!r}")
        rope = raw.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default" or raw.get("rope_scaling"):
            # Scaled RoPE (llama3, yarn, ...) changes the frequencies; refuse rather than be wrong.
            raise ValueError(f"unsupported rope parameters: {rope or raw.get('rope_scaling')}")
        theta = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
        heads = int(raw["num_attention_heads"])
        hidden = int(raw["hidden_size"])
        eos = raw.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        return cls(
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            eos_token_id=None if eos is None else int(eos),
        )
