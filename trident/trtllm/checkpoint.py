"""The Hugging Face checkpoint as TensorRT-LLM 1.2.1's converter and its image's tokenizer see it.

Two things in a checkpoint written by transformers 5 break the 1.2.1 path silently or loudly:

* ``config.json`` keeps the RoPE base only in ``rope_parameters.rope_theta``. TensorRT-LLM's
  ``LLaMAConfig.from_hugging_face`` reads ``getattr(hf_config, "rope_theta", 10000.0)``, and the
  image's transformers (4.57.3, pinned by TensorRT-LLM 1.2.1) ignores ``rope_parameters``: the
  engine would be built with base 10000 instead of the model's (100000 for SmolLM2), with no error.
* ``tokenizer_config.json`` names ``"tokenizer_class": "TokenizersBackend"``, a transformers 5
  class; transformers 4.57.3 refuses to load it, so the llm model could not start.

``write_compat_view`` writes a folder beside the engines with those two files rewritten and the
rest linked (weights) or copied (small tokenizer files). ``check_converted`` then reads the
TensorRT-LLM checkpoint that ``convert_checkpoint.py`` wrote and refuses a build whose RoPE base,
shape or parallel mapping differ from the source model.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Mapping

from ..hf_config import PHI3_DEFAULT_CONTEXT, every_layer_window

# Weight files are linked, never copied (they can be tens of GB); everything else is copied so
# the tokenizer keeps working after the build even if the source folder goes away.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# transformers 5 tokenizer classes -> the class transformers 4.x loads for the same tokenizer.json.
TOKENIZER_CLASS_COMPAT = {"TokenizersBackend": "PreTrainedTokenizerFast"}


#: Hugging Face architectures this build drives -> TensorRT-LLM's converter family (its
#: ``examples/models/core/<family>/convert_checkpoint.py``). Both converters keep the HF name as
#: the TensorRT-LLM checkpoint's ``architecture`` (``architecture=hf_config.architectures[0]``),
#: which ``trtllm-build`` looks up in ``tensorrt_llm.models.MODEL_MAP``; the Qwen one also writes
#: ``qwen_type`` (the HF ``model_type``), which turns on Qwen2's q/k/v bias or Qwen3's q/k norms.
#: Mistral is the Llama layer: ``MODEL_MAP`` sends ``MistralForCausalLM`` to ``LLaMAForCausalLM``
#: and the Llama converter reads its checkpoint (``LLaMAConfig.from_hugging_face``); its sliding
#: window is not in the converted checkpoint but a runtime setting of the backend
#: (``max_attention_window_size``, :func:`attention_window`).
#: Phi-3 / 3.5-mini and Phi-4 / 4-mini have their own converter (``examples/models/core/phi``,
#: ``Phi3Config.from_hugging_face``: LongRoPE, partial rotary as ``rotary_pct``; no pipeline
#: parallelism), checked by :func:`check_converted` as the others.
FAMILIES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Phi3ForCausalLM": "phi",
            "Qwen2ForCausalLM": "qwen", "Qwen3ForCausalLM": "qwen"}
#: TensorRT-LLM's Phi3Config.from_hugging_face builds LongRoPE only for a model of at least this
#: many positions (``if hf_config.max_position_embeddings >= 128000``); below, plain RoPE.
PHI3_LONG_ROPE_MIN_POSITIONS = 128000


class CheckpointError(ValueError):
    """The checkpoint cannot be built as asked; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What the build plan needs to know about the source model (from its config.json)."""

    architecture: str
    num_attention_heads: int
    num_key_value_heads: int
    num_hidden_layers: int
    hidden_size: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    model_type: str = "llama"
    # A scaled RoPE (Llama 3.1+'s llama3, linear, yarn...): its type and factor, else None
    rope_scaling: tuple[str, float] | None = None
    # Sliding-window attention in every layer (Mistral v0.1: 4096): each position attends to the
    # last this many positions, itself included; None for none
    sliding_window: int | None = None
    # The share of each head that RoPE turns (Phi-4-mini: 0.75)
    partial_rotary_factor: float = 1.0
    # Phi-3's LongRoPE: (short factors, long factors, pre-training context), else None
    long_rope: tuple[tuple[float, ...], tuple[float, ...], int] | None = None

    @property
    def family(self) -> str:
        """The TensorRT-LLM converter that reads this checkpoint (FAMILIES)."""
        return FAMILIES[self.architecture]


def _rope_theta(config: Mapping) -> float:
    if "rope_theta" in config:
        return float(config["rope_theta"])
    params = config.get("rope_parameters") or {}
    if "rope_theta" in params:
        return float(params["rope_theta"])
    return 10000.0  # the Llama default, as transformers and TensorRT-LLM assume


def read_model_shape(model_dir: Path) -> ModelShape:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} not found: --model-dir must be a Hugging Face checkpoint folder")
    config = json.loads(path.read_text())
    architectures = config.get("architectures") or []
    if len(architectures) != 1 or architectures[0] not in FAMILIES:
        raise CheckpointError(
            f"{path}: architectures {architectures}; this build step drives TensorRT-LLM's Llama, Phi "
            f"and Qwen converters and supports {', '.join(FAMILIES)}")
    try:
        window = every_layer_window(config)  # read as the CPU engine reads it
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    heads = int(config["num_attention_heads"])
    compat = compat_config(config)
    partial, long_rope = 1.0, None
    if config.get("model_type") == "phi3":
        partial, long_rope = _phi3_rope(path, compat, head_dim=int(config["hidden_size"]) // heads)
    return ModelShape(
        architecture=architectures[0],
        num_attention_heads=heads,
        num_key_value_heads=int(config.get("num_key_value_heads") or heads),
        num_hidden_layers=int(config["num_hidden_layers"]),
        hidden_size=int(config["hidden_size"]),
        vocab_size=int(config["vocab_size"]),
        max_position_embeddings=int(config.get("max_position_embeddings") or 2048),
        rope_theta=_rope_theta(config),
        model_type=str(config.get("model_type") or "llama"),
        rope_scaling=_rope_scaling(compat.get("rope_scaling")),
        sliding_window=window,
        partial_rotary_factor=partial,
        long_rope=long_rope,
    )


def _phi3_rope(path: Path, compat: Mapping, *, head_dim: int):
    """(partial rotary factor, LongRoPE) of a Phi-3 config as transformers 4.57's Phi3Config and
    TensorRT-LLM's Phi3Config.from_hugging_face read it (the compat view: rope_scaling of three
    fields, the context and the factor at config.json's top level). Refuses what the converter
    would refuse, and a LongRoPE it would silently build as plain RoPE."""
    partial = float(compat.get("partial_rotary_factor", 1.0))
    given = compat.get("rope_scaling")
    if given is None:
        return partial, None
    pairs = int(head_dim * partial) // 2
    scaling = dict(given) if isinstance(given, Mapping) else {}
    if scaling.get("type") in ("su", "yarn"):  # Phi3Config's _rope_scaling_adjustment
        scaling["type"] = "longrope"
    short, long = scaling.get("short_factor"), scaling.get("long_factor")
    if scaling.get("type") != "longrope" or set(scaling) != {"type", "short_factor", "long_factor"} or not all(
            isinstance(f, list) and len(f) == pairs and all(isinstance(x, (int, float)) for x in f)
            for f in (short, long)):
        raise CheckpointError(
            f"{path}: Phi-3's rope_scaling must be LongRoPE with {pairs} short and {pairs} long factors "
            f"(transformers 4.57's Phi3Config refuses anything else), got {given!r}")
    positions = int(compat.get("max_position_embeddings") or 0)
    if positions < PHI3_LONG_ROPE_MIN_POSITIONS:
        raise CheckpointError(
            f"{path}: LongRoPE with max_position_embeddings {positions}: TensorRT-LLM's Phi3Config builds "
            f"LongRoPE only from {PHI3_LONG_ROPE_MIN_POSITIONS} positions up and would build plain RoPE")
    context = int(compat.get("original_max_position_embeddings") or PHI3_DEFAULT_CONTEXT)
    return partial, (tuple(map(float, short)), tuple(map(float, long)), context)


def attention_window(shape: ModelShape, max_seq_len: int) -> int | None:
    """The backend's ``max_attention_window_size`` for this model: its sliding window when that is
    shorter than the engine's sequences, else None (the backend's default, the whole sequence).
    TensorRT-LLM keeps the last that many positions of each sequence in its KV cache."""
    window = shape.sliding_window
    return window if window is not None and window < max_seq_len else None


def _rope_scaling(scaling) -> tuple[str, float] | None:
    """(type, factor) of a RoPE scaling dict, in either spelling of its type (TensorRT-LLM's
    attention reads ``type``, else ``rope_type``); None for none or the default."""
    if not isinstance(scaling, Mapping):
        return None
    kind = scaling.get("type", scaling.get("rope_type", "default"))
    return None if kind == "default" else (str(kind), float(scaling.get("factor", 1.0)))


def compat_config(config: Mapping) -> dict:
    """config.json as transformers 4.57 + TensorRT-LLM 1.2.1 read it (same model, older keys)."""
    out = dict(config)
    params = dict(config.get("rope_parameters") or {})
    if "rope_theta" not in out:
        out["rope_theta"] = _rope_theta(config)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if out.get("model_type") == "phi3":
        # transformers 4.57's Phi3Config reads these at the top level only (defaults 4096 and 1.0)
        for key in ("original_max_position_embeddings", "partial_rotary_factor"):
            if key not in out and key in params:
                out[key] = params[key]
        if rope_type != "default" and out.get("rope_scaling") is None:
            # and refuses a rope_scaling of other than these three fields
            out["rope_scaling"] = {"type": rope_type, "short_factor": params.get("short_factor"),
                                   "long_factor": params.get("long_factor")}
    elif rope_type != "default" and out.get("rope_scaling") is None:
        # transformers 4.x spells a scaled RoPE as rope_scaling = {rope_type, factor, ...}; a
        # null one beside rope_parameters would hide the scaling from it.
        out["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
    if "torch_dtype" not in out and "dtype" in out:
        out["torch_dtype"] = out["dtype"]
    return out


def compat_tokenizer_config(config: Mapping) -> dict:
    out = dict(config)
    cls = out.get("tokenizer_class")
    if cls in TOKENIZER_CLASS_COMPAT:
        out["tokenizer_class"] = TOKENIZER_CLASS_COMPAT[cls]
    return out


def write_compat_view(*, model_dir: Path, out_dir: Path) -> Path:
    """Write ``out_dir``: the checkpoint with config.json / tokenizer_config.json made 4.57-safe.

    Safe to call again (the folder is rewritten). Returns ``out_dir``.
    """
    model_dir = Path(model_dir).resolve()
    out_dir = Path(out_dir)
    if out_dir.resolve() == model_dir:
        raise CheckpointError("the compat view must not be written into the source checkpoint")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    for src in sorted(model_dir.iterdir()):
        if src.is_dir():
            continue  # checkpoints are flat; sub-folders (.cache, original/) are not read
        dest = out_dir / src.name
        if src.name == "config.json":
            dest.write_text(json.dumps(compat_config(json.loads(src.read_text())), indent=2) + "\n")
        elif src.name == "tokenizer_config.json":
            dest.write_text(json.dumps(compat_tokenizer_config(json.loads(src.read_text())), indent=2) + "\n")
        elif src.suffix in WEIGHT_SUFFIXES or src.name in WEIGHT_INDEXES:
            os.symlink(src, dest)
        else:
            shutil.copy2(src, dest)
    return out_dir


def _brief(value) -> str:
    """A value for an error message: a long factor list by its length and ends."""
    if isinstance(value, list) and len(value) > 6:
        return f"[{value[0]!r}, {value[1]!r}, ... {value[-1]!r}] ({len(value)} values)"
    return repr(value)


def check_converted(*, checkpoint_dir: Path, shape: ModelShape, tp_size: int, pp_size: int,
                    dtype: str) -> dict:
    """Compare the TensorRT-LLM checkpoint's config.json with the source model; return it."""
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"the converter wrote no {path}")
    config = json.loads(path.read_text())
    mapping = config.get("mapping") or {}
    expected = {
        "architecture": shape.architecture,
        "dtype": dtype,
        "num_hidden_layers": shape.num_hidden_layers,
        "num_attention_heads": shape.num_attention_heads,
        "hidden_size": shape.hidden_size,
        # The silent one: a wrong RoPE base builds and serves, and generates worse text.
        "rotary_base": shape.rope_theta,
    }
    if shape.family == "qwen":
        # the Qwen layer variant (q/k/v bias for qwen2, q/k norms for qwen3) follows qwen_type
        expected["qwen_type"] = shape.model_type
    if shape.family == "phi":
        # Phi3Config.from_hugging_face: partial rotary as rotary_pct, LongRoPE as its own
        # position embedding type with both factor lists and the pre-training context
        expected["rotary_pct"] = shape.partial_rotary_factor
        expected["position_embedding_type"] = "rope_gpt_neox" if shape.long_rope is None else "long_rope"
        if shape.long_rope is not None:
            short, long, context = shape.long_rope
            expected.update(longrope_scaling_short_factors=list(short), longrope_scaling_long_factors=list(long),
                            original_max_position_embeddings=context)
    wrong = [f"{key}: {_brief(config.get(key))}, expected {_brief(value)}"
             for key, value in expected.items() if config.get(key) != value]
    # Also silent: RoPE built unscaled (Llama 3.1+ then degrades past its pre-training context).
    # The Llama and Qwen converters copy the HF rope_scaling into rotary_scaling whole (Phi-3's
    # LongRoPE is checked above).
    if shape.family != "phi" and _rope_scaling(config.get("rotary_scaling")) != shape.rope_scaling:
        wrong.append(f"rotary_scaling: {config.get('rotary_scaling')!r}, expected type and factor "
                     f"{shape.rope_scaling!r}")
    for key, value in (("tp_size", tp_size), ("pp_size", pp_size), ("world_size", tp_size * pp_size)):
        if mapping.get(key) != value:
            wrong.append(f"mapping.{key}: {mapping.get(key)!r}, expected {value!r}")
    missing = [f"rank{r}.safetensors" for r in range(tp_size * pp_size)
               if not (Path(checkpoint_dir) / f"rank{r}.safetensors").is_file()]
    if missing:
        wrong.append(f"missing weight files: {', '.join(missing)}")
    if wrong:
        raise CheckpointError(f"{path} does not match the source model:\n  " + "\n  ".join(wrong))
    return config
