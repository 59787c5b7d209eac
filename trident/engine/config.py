"""Engine settings and the model hyper-parameters read from a checkpoint's config.json."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..hf_config import PHI3_DEFAULT_CONTEXT, every_layer_window

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
WEIGHT_DTYPES = ("auto", "float16", "int8", "int4")
KV_CACHE_DTYPES = {"auto": torch.float16, "float16": torch.float16, "float32": torch.float32}


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
    # Storage of the matmul weights: "auto" (= dtype), "float16" / "int8" packed for fbgemm with
    # float32 activations (2-3x faster decode here; see quant.py), or "int4" (the fused model,
    # fused_llama.py: the fastest). Not HF-identical.
    weight_dtype: str = "auto"
    num_threads: int | None = None  # None (or 0): torch's default
    # Steps over fewer rows than small_batch_size (decode rows, or prompt tokens for a prefill)
    # run on small_batch_threads threads (0: always num_threads). Measured through Triton on 2
    # vCPUs, int8: 1 thread gave 27 tok/s at concurrency 1 and 98 at 8 where 2 threads gave 16
    # and 75 (OpenMP barriers stall when Triton's own threads take a core), while 2 threads won
    # at 32 (172 vs 156). int4 steps are one kernel call: 1 thread still wins at concurrency 1
    # (115.7 vs 96.4 tok/s: a batch-1 step is memory-bound, ~90 % of one core's bandwidth on one
    # thread); at 8, 2 threads won with the previous int4 kernels (158 vs 133 tok/s). None: 4 for
    # int4 weights, 16 otherwise.
    small_batch_size: int | None = None
    small_batch_threads: int = 1
    max_queue_size: int = 256
    # Prompt tokens prefilled between two decode steps (at least one request is always admitted):
    # a burst of long prompts must not freeze the tokens of the sequences already decoding.
    prefill_token_budget: int = 1024
    # KV cache of the int4 engine (paged: blocks of kv_block_size positions). "auto" stores it in
    # float16 (half the memory of float32, same tokens on the test prompts: docs/cpu_engine.md);
    # the torch-ops formats keep their own dtype.
    kv_cache_dtype: str = "auto"  # "auto" | "float16" | "float32"
    kv_block_size: int = 16
    # Prefix reuse (int4): full KV blocks of finished requests stay cached, at most
    # prefix_cache_mb of them (least recently used evicted first), and a request whose prompt
    # starts with the same tokens skips their prefill. Outputs are the same with it on or off.
    prefix_reuse: bool = True
    prefix_cache_mb: int = 256
    # Seconds between two is_cancelled() polls of one request (each is an IPC round trip under
    # Triton); a waiting request is also polled right before it would be admitted.
    cancel_check_interval: float = 0.1
    # Guided decoding: XGrammar's description of the tokenizer (TensorRT-LLM's
    # xgrammar_tokenizer_info.json, trident.grammar.write_tokenizer_info); "": guides refused.
    xgrammar_tokenizer_info_path: str = ""
    # Compiled guides (each JSON schema, regex or grammar against the whole vocabulary: 35-75 KB for
    # a small schema with SmolLM2's 49,152 tokens) kept for reuse, least recently used evicted
    # first. Unbounded, a server that sees ever new schemas (tool sets, schemas carrying data)
    # grows without end. 0: none kept.
    guide_cache_mb: int = 64

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES and self.dtype != "auto":
            raise ValueError(f"dtype must be one of {sorted(DTYPES) + ['auto']}, got {self.dtype!r}")
        if self.weight_dtype not in WEIGHT_DTYPES:
            raise ValueError(f"weight_dtype must be one of {list(WEIGHT_DTYPES)}, got {self.weight_dtype!r}")
        if self.weight_dtype != "auto" and self.dtype == "bfloat16":
            raise ValueError(f"weight_dtype {self.weight_dtype} computes in float32: use dtype float32 or auto")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {list(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        for name in ("prefix_cache_mb", "guide_cache_mb"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("max_batch_size", "max_seq_len", "max_queue_size", "prefill_token_budget", "kv_block_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("num_threads", "small_batch_size", "small_batch_threads"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")

    @property
    def small_batch_rows(self) -> int:
        if self.small_batch_size is not None:
            return self.small_batch_size
        return 4 if self.weight_dtype == "int4" else 16

    @property
    def torch_dtype(self) -> torch.dtype:
        """The activation (and, with weight_dtype auto, weight) dtype."""
        if self.weight_dtype != "auto":
            return torch.float32
        if self.dtype == "auto":
            return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
        return DTYPES[self.dtype]


#: model_type (config.json) -> what the checkpoint adds to the Llama layer. Qwen2 / Qwen2.5 put a
#: bias on the q, k and v projections; Qwen3 an RMSNorm on each query and key head before RoPE
#: (and a head_dim of its own); Mistral is the Llama layer (with a sliding window in v0.1), Phi-3 /
#: Phi-4 too (Phi-3's window), with q/k/v and gate/up stored fused (weights.WEIGHT_MAP); SmolLM3
#: leaves RoPE out of some layers (``no_rope_layers``: every 4th by default, "NoPE"), read into
#: ``LlamaConfig.nope_layers``.
ARCHITECTURES = {
    "llama": {"qkv_bias": False, "qk_norm": False},
    "mistral": {"qkv_bias": False, "qk_norm": False},
    "phi3": {"qkv_bias": False, "qk_norm": False},
    "qwen2": {"qkv_bias": True, "qk_norm": False},
    "qwen3": {"qkv_bias": False, "qk_norm": True},
    "smollm3": {"qkv_bias": False, "qk_norm": False},
}
#: tie_word_embeddings where config.json leaves it out: transformers' default for the type
TIED_BY_DEFAULT = frozenset({"smollm3"})
#: Scaled RoPE the engine computes (Hugging Face's rope_type names): ``linear`` divides every
#: frequency by ``factor``; ``llama3`` (Llama 3.1 / 3.2 / 3.3) divides the low frequencies, keeps
#: the high ones and blends between; ``yarn`` (Qwen2.5 / Qwen3 / SmolLM3 past their pre-training
#: context) blends between divided and kept by dimension and scales cos and sin by its attention
#: factor; ``longrope`` (Phi-3-mini-128k, Phi-3.5-mini: their long context) has two sets of
#: per-dimension factors, the short one while a sequence is within the pre-training context and
#: the long one past it (see LlamaConfig.long_rope), and scales cos and sin by its attention
#: factor. ``dynamic`` (frequencies recomputed for every length) is refused, not approximated.
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")


@dataclass(frozen=True)
class RopeScaling:
    """A scaled RoPE's parameters (``rope_parameters`` of transformers 5, ``rope_scaling`` of 4)."""

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position_embeddings: int = 8192
    beta_fast: float = 32.0  # yarn: the rotation counts bounding the blend
    beta_slow: float = 1.0
    attention_factor: float = 1.0  # yarn, longrope: cos and sin are multiplied by it
    truncate: bool = True  # yarn: the blend's bounds rounded to whole dimensions
    short_factor: tuple[float, ...] = ()  # longrope: each frequency divided by its factor (rotary_dim / 2 of them)
    long_factor: tuple[float, ...] = ()


@dataclass(frozen=True)
class LlamaConfig:
    """The hyper-parameters of a Llama-layer checkpoint: Llama 2 / 3.x, Mistral, Qwen2 / 2.5, Qwen3,
    Phi-3 / Phi-4, SmolLM2 and SmolLM3 (see ARCHITECTURES)."""

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
    model_type: str = "llama"
    qkv_bias: bool = False
    qk_norm: bool = False
    rope_scaling: RopeScaling | None = None
    nope_layers: tuple[int, ...] = ()  # the layers that apply no RoPE (SmolLM3), increasing
    sliding_window: int | None = None  # each position attends to the last this many (itself included)
    # RoPE turns the first rotary_dim dimensions of each query and key head (Phi-4-mini: 3/4 of
    # them, partial_rotary_factor); the others pass unchanged. 0: the whole head.
    partial_rotary_dim: int = 0

    @property
    def rotary_dim(self) -> int:
        return self.partial_rotary_dim or self.head_dim

    @property
    def long_rope(self) -> int | None:
        """With ``longrope`` scaling, the pre-training context: a row of a sequence whose prompt
        or whose own position + 1 is longer rotates by the long factors, else by the short ones
        (llama.rope_rows), chosen per row so that neither chunking nor batching changes a
        sequence's numbers. With transformers' Phi-3 recomputation where a sequence grows past it
        (Sequence.grows_past), every step's logits are those of its whole sequence computed with
        the factors its length calls for. None without longrope."""
        s = self.rope_scaling
        return s.original_max_position_embeddings if s is not None and s.rope_type == "longrope" else None

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path) -> "LlamaConfig":
        raw = json.loads((Path(checkpoint_dir) / "config.json").read_text())
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict) -> "LlamaConfig":
        model_type = raw.get("model_type", "llama")
        if model_type not in ARCHITECTURES:
            raise ValueError(f"model_type {model_type!r} is not served by this engine; it serves "
                             f"{', '.join(sorted(ARCHITECTURES))}")
        layer = dict(ARCHITECTURES[model_type])
        if raw.get("attention_bias"):  # Llama's and Qwen3's option of a q/k/v (and o) bias
            raise ValueError("attention_bias is not supported")
        if raw.get("mlp_bias"):
            raise ValueError("mlp_bias is not supported")
        if raw.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {raw.get('hidden_act')!r} is not supported (silu only)")
        # Mistral v0.1 and Phi-3 / 3.5 attend, in every layer, to the last sliding_window positions
        # (a window no shorter than the context changes nothing).
        window = every_layer_window(raw)
        max_positions = int(raw.get("max_position_embeddings", 2048))
        window = window if window is not None and window < max_positions else None
        theta, scaling = _rope(raw)
        heads = int(raw["num_attention_heads"])
        hidden = int(raw["hidden_size"])
        num_layers = int(raw["num_hidden_layers"])
        head_dim = int(raw.get("head_dim") or hidden // heads)
        rotary_dim = _rotary_dim(raw, head_dim)
        if scaling is not None and scaling.rope_type == "longrope" and len(scaling.short_factor) != rotary_dim // 2:
            raise ValueError(f"longrope needs rotary dim / 2 = {rotary_dim // 2} factors, got {len(scaling.short_factor)}")
        return cls(
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=head_dim,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            max_position_embeddings=max_positions,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", model_type in TIED_BY_DEFAULT)),
            model_type=model_type,
            rope_scaling=scaling,
            nope_layers=_nope_layers(raw, num_layers) if model_type == "smollm3" else (),
            sliding_window=window,
            partial_rotary_dim=rotary_dim if rotary_dim != head_dim else 0,
            **layer,
        )


def _rotary_dim(raw: dict, head_dim: int) -> int:
    """The dimensions of a head RoPE turns: head_dim times ``partial_rotary_factor`` (the RoPE
    dict's, else config.json's top-level one, as transformers' standardize_rope_params takes
    it), rounded down as transformers rounds it."""
    params = {**(raw.get("rope_scaling") or {}), **(raw.get("rope_parameters") or {})}
    given = params.get("partial_rotary_factor", raw.get("partial_rotary_factor"))
    factor = 1.0 if given is None else float(given)
    dim = int(head_dim * factor)
    if not 0 < factor <= 1 or dim < 2 or dim % 2:
        raise ValueError(f"partial_rotary_factor {factor:g} of head_dim {head_dim} gives {dim} rotary dimensions: "
                         f"an even number from 2 to head_dim is needed")
    return dim


def _nope_layers(raw: dict, num_layers: int) -> tuple[int, ...]:
    """SmolLM3's layers without RoPE: ``no_rope_layers`` holds 1 for a layer that applies it and
    0 for one that does not; without the list, every ``no_rope_layer_interval``-th layer (4th)
    skips it (transformers' SmolLM3Config)."""
    flags = raw.get("no_rope_layers")
    if flags is None:
        interval = int(raw.get("no_rope_layer_interval", 4))
        if interval < 1:
            raise ValueError(f"no_rope_layer_interval must be >= 1, got {interval}")
        flags = [int((i + 1) % interval != 0) for i in range(num_layers)]
    if not isinstance(flags, list) or len(flags) != num_layers or any(f not in (0, 1) for f in flags):
        raise ValueError(f"no_rope_layers must be {num_layers} values of 0 or 1, got {flags!r}")
    return tuple(i for i, f in enumerate(flags) if not f)


def _rope(raw: dict) -> tuple[float, RopeScaling | None]:
    """The RoPE base and scaling of a config.json in either layout: transformers 5's
    ``rope_parameters`` (base and scaling in one dict) or 4's ``rope_theta`` + ``rope_scaling``."""
    params = {**(raw.get("rope_scaling") or {}), **(raw.get("rope_parameters") or {})}
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"unsupported rope type {rope_type!r} (served: {', '.join(ROPE_TYPES)}): {params}")
    if rope_type == "default":
        return theta, None
    needed = {"llama3": ("factor", "low_freq_factor", "high_freq_factor"),
              "longrope": ("short_factor", "long_factor")}.get(rope_type, ("factor",))
    if any(key not in params for key in needed):
        raise ValueError(f"rope type {rope_type!r} needs {', '.join(needed)}: {params}")
    if rope_type == "linear":
        return theta, RopeScaling("linear", float(params["factor"]))
    if rope_type == "yarn":
        return theta, _yarn(raw, params)
    if rope_type == "longrope":
        return theta, _longrope(raw, params)
    return theta, RopeScaling(
        "llama3", float(params["factor"]), float(params["low_freq_factor"]), float(params["high_freq_factor"]),
        _pretraining_context(raw, params, 8192))


def _pretraining_context(raw: dict, params: dict, default: int) -> int:
    """The context of pre-training that llama3 / yarn scaling starts from, as transformers reads
    it for the types served here (standardize_rope_params): the RoPE dict's
    ``original_max_position_embeddings``, else the model's context. A top-level one is not read
    (only configuration classes that declare it take it: Phi-3's, see _longrope)."""
    return int(params.get("original_max_position_embeddings") or raw.get("max_position_embeddings", default))


def _yarn(raw: dict, params: dict) -> RopeScaling:
    """YaRN's parameters, with transformers' defaults (modeling_rope_utils: _compute_yarn_parameters,
    standardize_rope_params): beta_fast 32, beta_slow 1, bounds truncated, and an attention factor
    of 0.1 ln(factor) + 1 (or the ratio of two such with DeepSeek's ``mscale`` / ``mscale_all_dim``)
    unless given."""
    factor = float(params["factor"])
    original = _pretraining_context(raw, params, 2048)
    attention = params.get("attention_factor")
    if attention is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention = _yarn_mscale(factor, float(mscale)) / _yarn_mscale(factor, float(mscale_all_dim))
        else:
            attention = _yarn_mscale(factor)
    return RopeScaling("yarn", factor, original_max_position_embeddings=original,
                       beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1),
                       attention_factor=float(attention), truncate=bool(params.get("truncate", True)))


def _longrope(raw: dict, params: dict) -> RopeScaling:
    """LongRoPE's parameters as transformers reads them (_compute_longrope_parameters): Phi-3's
    configuration keeps the pre-training context at its top level (4096 when absent) and that
    wins over the RoPE dict's; ``factor`` defaults to the context over it, and the attention
    factor to sqrt(1 + ln(factor) / ln(pre-training context)) (1 when factor <= 1)."""
    if raw.get("model_type") == "phi3":
        original = int(raw.get("original_max_position_embeddings") or PHI3_DEFAULT_CONTEXT)
    else:
        original = _pretraining_context(raw, params, 4096)
    factor = params.get("factor")
    if factor is None:
        factor = int(raw.get("max_position_embeddings", original)) / original
    attention = params.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    short, long = (tuple(float(f) for f in params[name]) for name in ("short_factor", "long_factor"))
    if len(short) != len(long):
        raise ValueError(f"longrope's short_factor and long_factor differ in length ({len(short)}, {len(long)})")
    return RopeScaling("longrope", float(factor), original_max_position_embeddings=original,
                       attention_factor=float(attention), short_factor=short, long_factor=long)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0
