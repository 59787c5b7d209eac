"""Loading a checkpoint into the engine: read the safetensors, fuse the projections, convert the
weights to the configured format (quant.py), and fall back to float32 where int4 cannot run.

    model, config = load_model(EngineConfig(checkpoint_dir=..., weight_dtype="int4"))

The forward pass (llama.py) never sees a weight format: it calls ``quant.linear(x, w)`` and
``embeddings.rows(tokens)``, whatever object this module put there.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from . import kernels, quant
from .config import WEIGHT_DTYPES, EngineConfig, LlamaConfig, cpu_has_native_bf16
from .fused_llama import FusedLlama
from .kv_cache import KVCache
from .llama import Llama

log = logging.getLogger("trident.engine")

# Hugging Face tensor name -> our name; "{i}" is the layer index. Tensors not listed are ignored.
WEIGHT_MAP = {
    "model.embed_tokens.weight": "tok_embeddings",
    "model.norm.weight": "norm",
    "lm_head.weight": "lm_head",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attention_norm",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.ffn_norm",
    "model.layers.{i}.self_attn.q_proj.weight": "layers.{i}.wq",
    "model.layers.{i}.self_attn.k_proj.weight": "layers.{i}.wk",
    "model.layers.{i}.self_attn.v_proj.weight": "layers.{i}.wv",
    "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.wo",
    "model.layers.{i}.mlp.gate_proj.weight": "layers.{i}.w_gate",
    "model.layers.{i}.mlp.up_proj.weight": "layers.{i}.w_up",
    "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.w_down",
    # Phi-3 / Phi-4 store the projections fused, in the order fuse() concatenates them: q, k, v
    # rows; gate rows then up rows
    "model.layers.{i}.self_attn.qkv_proj.weight": "layers.{i}.wqkv",
    "model.layers.{i}.mlp.gate_up_proj.weight": "layers.{i}.w_gate_up",
    # Qwen2's q/k/v biases, Qwen3's per-head query and key norms (config.ARCHITECTURES)
    "model.layers.{i}.self_attn.q_proj.bias": "layers.{i}.bq",
    "model.layers.{i}.self_attn.k_proj.bias": "layers.{i}.bk",
    "model.layers.{i}.self_attn.v_proj.bias": "layers.{i}.bv",
    "model.layers.{i}.self_attn.q_norm.weight": "layers.{i}.q_norm",
    "model.layers.{i}.self_attn.k_norm.weight": "layers.{i}.k_norm",
}
_PATTERNS = [
    (re.compile("^" + re.escape(src).replace(r"\{i\}", r"(\d+)") + "$"), dst)
    for src, dst in WEIGHT_MAP.items()
]
MATMULS = ("wqkv", "wo", "w_gate_up", "w_down")


def map_weight_name(name: str) -> str | None:
    for pattern, dst in _PATTERNS:
        m = pattern.match(name)
        if m:
            return dst.replace("{i}", m.group(1)) if m.groups() else dst
    return None


def read_checkpoint(checkpoint_dir: str | Path, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Every tensor of WEIGHT_MAP in the checkpoint's *.safetensors, under our names, in dtype
    (None: as stored), all read now."""
    tensors = LazyTensors(checkpoint_dir, dtype)
    try:
        return {ours: tensors[ours] for ours in tensors}
    finally:
        tensors.close()


class LazyTensors(MutableMapping):
    """The checkpoint's tensors of WEIGHT_MAP under our names, each read from its safetensors file
    only when taken (``pop``): int4 loading packs a layer before reading the next, so it holds one
    layer in the checkpoint's dtype at a time, not the whole checkpoint."""

    def __init__(self, checkpoint_dir: str | Path, dtype: torch.dtype | None = None) -> None:
        files = sorted(Path(checkpoint_dir).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors in {checkpoint_dir}")
        self.dtype = dtype
        self._files = [safe_open(str(path), framework="pt") for path in files]
        self._where: dict[str, tuple[object, str]] = {}
        for f in self._files:
            for name in f.keys():
                ours = map_weight_name(name)
                if ours is not None:
                    self._where[ours] = (f, name)

    def __getitem__(self, ours: str) -> torch.Tensor:
        f, name = self._where[ours]
        tensor = f.get_tensor(name)
        return tensor if self.dtype is None else tensor.to(self.dtype)

    def __contains__(self, ours: object) -> bool:  # (Mapping's would read the tensor)
        return ours in self._where

    def __setitem__(self, ours: str, value: torch.Tensor) -> None:
        raise TypeError("checkpoint tensors are read-only")

    def __delitem__(self, ours: str) -> None:
        del self._where[ours]

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def close(self) -> None:
        """Unmap the files (what was taken stays)."""
        self._where.clear()
        self._files.clear()


@dataclass
class LayerWeights:
    attention_norm: torch.Tensor
    ffn_norm: torch.Tensor
    wqkv: object  # (q + 2*kv, H): a tensor or a quant weight
    wo: object  # (H, q)
    w_gate_up: object  # (2*I, H)
    w_down: object  # (H, I)
    bqkv: torch.Tensor | None = None  # (q + 2*kv,): Qwen2's q/k/v biases
    q_norm: torch.Tensor | None = None  # (head_dim,): Qwen3's RMSNorm of each query head
    k_norm: torch.Tensor | None = None  # (head_dim,): and of each key head


@dataclass
class ModelWeights:
    """What the forward pass reads. ``weight_dtype`` names the format of the matmul weights."""

    tok_embeddings: object  # has rows(tokens) -> (T, H)
    norm: torch.Tensor
    lm_head: object  # (V, H)
    layers: list[LayerWeights]
    weight_dtype: str = "auto"


def fuse(config: LlamaConfig, tensors: MutableMapping[str, torch.Tensor], dtype: torch.dtype,
         on_layer: Callable[[LayerWeights], None] | None = None) -> ModelWeights:
    """Checkpoint tensors -> ModelWeights in dtype, with QKV and gate/up each concatenated into one
    matmul (fewer, larger GEMMs are faster on CPU). Consumes ``tensors``, a layer at a time;
    ``on_layer`` converts each layer before the next is read (int4 packing)."""
    table = tensors.pop("tok_embeddings")  # (V, H)
    lm_head = tensors.pop("lm_head", None)
    if lm_head is None:
        if not config.tie_word_embeddings:
            raise ValueError("checkpoint has no lm_head.weight and does not tie embeddings")
        lm_head = table
    layers = []
    needed = [*(("bq", "bk", "bv") if config.qkv_bias else ()), *(("q_norm", "k_norm") if config.qk_norm else ())]
    missing = [f"layers.{i}.{name}" for i in range(config.num_layers) for name in needed
               if f"layers.{i}.{name}" not in tensors]
    if missing:
        raise ValueError(f"a {config.model_type} checkpoint needs {', '.join(needed)} in every layer; "
                         f"missing {', '.join(missing[:4])}")
    for i in range(config.num_layers):
        p = f"layers.{i}."
        layers.append(layer := LayerWeights(
            attention_norm=tensors.pop(p + "attention_norm"),
            ffn_norm=tensors.pop(p + "ffn_norm"),
            wqkv=_fused(tensors, p, "wqkv", ("wq", "wk", "wv")),
            wo=tensors.pop(p + "wo"),
            w_gate_up=_fused(tensors, p, "w_gate_up", ("w_gate", "w_up")),
            w_down=tensors.pop(p + "w_down"),
            bqkv=torch.cat([tensors.pop(p + n) for n in ("bq", "bk", "bv")]) if config.qkv_bias else None,
            q_norm=tensors.pop(p + "q_norm") if config.qk_norm else None,
            k_norm=tensors.pop(p + "k_norm") if config.qk_norm else None,
        ))
        if on_layer is not None:
            on_layer(layer)
    norm = tensors.pop("norm")
    if tensors:
        log.warning("unused weights: %s", sorted(tensors)[:5])
    return ModelWeights(quant.DenseEmbedding(table, dtype), norm, lm_head, layers)


def _fused(tensors: MutableMapping[str, torch.Tensor], prefix: str, name: str, parts: tuple[str, ...]) -> torch.Tensor:
    """A layer's fused matmul weight: stored fused (Phi-3), or its parts concatenated by rows."""
    if prefix + name in tensors:
        return tensors.pop(prefix + name).contiguous()
    return torch.cat([tensors.pop(prefix + part) for part in parts]).contiguous()


def to_float16(w: ModelWeights) -> None:
    for layer in w.layers:
        for name in MATMULS:
            setattr(layer, name, quant.Fp16Weight(getattr(layer, name)))
    w.lm_head = quant.Fp16Weight(w.lm_head)
    # gathered rows go back to fp32 exactly
    w.tok_embeddings = quant.DenseEmbedding(w.tok_embeddings.table.half(), torch.float32)


def _to_int4_layer(layer: LayerWeights, exact: list[tuple[float, int]]) -> None:
    """A layer's matmul weights as 4-bit blocks (GGUF Q4_1); ``exact`` collects the fraction of
    each that packing kept exactly, and its size."""
    for name in MATMULS:
        dense = getattr(layer, name)
        weight = quant.Q4Weight(dense)
        exact.append((weight.exact, dense.numel()))
        setattr(layer, name, weight)


def _to_int4_embeddings(w: ModelWeights, exact: list[tuple[float, int]]) -> None:
    """The embedding table and lm_head as Q8_0 blocks, once every layer was packed
    (_to_int4_layer, ``exact``). For a checkpoint converted from a Q4_1 GGUF file this is the
    file's own quantization, so the weights used are exactly the checkpoint's (the fractions are
    logged)."""
    table = w.tok_embeddings.table
    head = quant.Q8Weight(w.lm_head)
    w.tok_embeddings = head if w.lm_head is table else quant.Q8Weight(table)
    w.lm_head = head
    fraction = sum(e * n for e, n in exact) / sum(n for _, n in exact)
    log.info("int4 weights: %.4f%% of matmul weights exact, %.4f%% of the embedding table",
             100 * fraction, 100 * w.tok_embeddings.exact)


def to_int8(model: Llama, calibration_tokens: list[int]) -> None:
    """Per-row int8 weights, after SmoothQuant smoothing calibrated on one prompt run by ``model``.

    Activations are quantized per tensor on the fly, so their outlier channels (largest in
    the SwiGLU output that feeds w_down) would crush every other channel: measured on 5
    prompts, plain int8 kept the fp32 top-1 token on 3 (KL 1.7). Dividing each input channel
    by s (folded into the preceding RMSNorm weight) and multiplying the weight's column by s
    is exact in real arithmetic and moves the outliers into the weights, whose rows are
    scaled separately. w_down stays fp16: even smoothed, its int8 version lost the top-1 token
    on 1-4 of 10 prompts (KL 0.16-0.37); in fp16 9-10/10 agree, KL ~0.05 (alpha 0.5).
    """
    c, w = model.config, model.weights
    tokens = torch.tensor(calibration_tokens[: 512], dtype=torch.long)
    for layer in w.layers:
        for name in ("wqkv", "w_gate_up", "w_down"):
            setattr(layer, name, quant.Observer(getattr(layer, name)))
    scratch = KVCache()
    scratch.setup(num_layers=c.num_layers, max_batch_size=1, num_kv_heads=c.num_kv_heads,
                  max_seq_len=len(tokens), head_dim=c.head_dim, dtype=model.dtype)
    model.prefill(tokens, 0, scratch)
    for layer in w.layers:
        obs_qkv, obs_gate_up, obs_down = layer.wqkv, layer.w_gate_up, layer.w_down
        s = quant.smooth_scales(obs_qkv.amax, obs_qkv.weight)
        layer.attention_norm = layer.attention_norm / s
        wqkv = obs_qkv.weight * s
        s = quant.smooth_scales(obs_gate_up.amax, obs_gate_up.weight)
        layer.ffn_norm = layer.ffn_norm / s
        w_gate_up = obs_gate_up.weight * s
        layer.w_down = quant.Fp16Weight(obs_down.weight)  # not int8: see the docstring
        layer.wqkv = quant.Int8Weight(wqkv)
        layer.w_gate_up = quant.Int8Weight(w_gate_up)
        layer.wo = quant.Int8Weight(layer.wo)
    w.lm_head = quant.Int8Weight(w.lm_head)
    # the table is only gathered from: int8 rows and a scale each (28 MB resident, not 113)
    w.tok_embeddings = quant.Int8Embedding(*quant.quantize_rows(w.tok_embeddings.table))


def build_model(config: LlamaConfig, tensors: MutableMapping[str, torch.Tensor], *, dtype: torch.dtype, max_seq_len: int,
                weight_dtype: str = "auto", calibration_tokens: list[int] | None = None) -> Llama | FusedLlama:
    """The model over checkpoint tensors (our names, see read_checkpoint) in the given weight
    format: int4 runs as FusedLlama (one kernel call a step), the others as Llama (torch ops)."""
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype must be one of {WEIGHT_DTYPES}, got {weight_dtype!r}")
    if weight_dtype != "auto" and dtype != torch.float32:
        raise ValueError(f"weight_dtype {weight_dtype} runs with float32 activations; use dtype float32")
    if weight_dtype == "int4":  # each layer packed as it is read: one dense layer at a time
        kernels.load()
        exact: list[tuple[float, int]] = []
        weights = fuse(config, tensors, dtype, on_layer=lambda layer: _to_int4_layer(layer, exact))
        _to_int4_embeddings(weights, exact)
        weights.weight_dtype = weight_dtype
        model = FusedLlama(config, weights, max_seq_len=max_seq_len)  # copies what it keeps
        del weights, tensors
        quant.release_free_memory()
        return model
    weights = fuse(config, tensors, dtype)
    if weight_dtype == "float16":
        to_float16(weights)
    model = Llama(config, weights, dtype=dtype, max_seq_len=max_seq_len)
    if weight_dtype == "int8":
        to_int8(model, calibration_tokens or list(range(1, 129)))
    weights.weight_dtype = weight_dtype
    if weight_dtype != "auto":
        # The norm weights are still views of the loaded checkpoint's storage, which would
        # keep all of it resident (measured: int4 865 MiB after loading, 352 MiB with copies).
        weights.norm = weights.norm.clone()
        for layer in weights.layers:
            layer.attention_norm, layer.ffn_norm = layer.attention_norm.clone(), layer.ffn_norm.clone()
            layer.q_norm, layer.k_norm = (None if t is None else t.clone() for t in (layer.q_norm, layer.k_norm))
        quant.release_free_memory()
    return model


def load_model(config: EngineConfig) -> tuple[Llama | FusedLlama, EngineConfig]:
    """The model an engine with this config serves, and the config it actually runs: int4 without
    its kernels (no AVX2/FMA/F16C, no compiler) falls back to float32 weights, with a warning."""
    if config.torch_dtype == torch.bfloat16 and not cpu_has_native_bf16():
        log.warning("dtype bfloat16 on a CPU without AVX512-BF16/AMX: matmuls are emulated and "
                    "batched decode is much slower than float32; consider dtype float32 or auto")
    if config.weight_dtype == "int4":
        try:
            kernels.load()
        except kernels.KernelsUnavailable as exc:
            # Serving slowly beats not serving: say so loudly, once.
            log.warning("weight_dtype int4 is unavailable (%s): serving float32 weights instead, "
                        "several times slower", exc)
            config = dataclasses.replace(config, weight_dtype="auto", dtype="float32")
    model_config = LlamaConfig.from_checkpoint(config.checkpoint_dir)
    calibration = quant.calibration_tokens(config.checkpoint_dir) if config.weight_dtype == "int8" else None
    # int4 packs each layer as it is read, from float32 a few rows at a time (quant.PACK_ROWS):
    # the checkpoint is read as stored (bfloat16 for most), so loading holds its embeddings, one
    # of its layers and the packed ones, never all of it, let alone in float32 (an 8B bfloat16
    # checkpoint: ~35 GB when read all as float32; the packed model is ~4.5 GB).
    tensors = LazyTensors(config.checkpoint_dir, None if config.weight_dtype == "int4" else config.torch_dtype)
    try:
        model = build_model(
            model_config,
            tensors,
            dtype=config.torch_dtype,
            max_seq_len=min(config.max_seq_len, model_config.max_position_embeddings),
            weight_dtype=config.weight_dtype,
            calibration_tokens=calibration,
        )
    finally:
        tensors.close()
    return model, config
