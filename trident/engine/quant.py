"""Reduced-precision weights for the CPU engine.

Batch-1 decode is memory-bound (every step reads every weight) and the matmul kernels matter
more than the arithmetic. float16 and int8 use fbgemm's packed-weight kernels with fp32
activations; int4 uses trident's own kernels. Measured on the
2-vCPU AVX2 EPYC (decode step of the whole model, 2 threads, against fp32 F.linear / MKL):

- "float16": fp16 weights (``linear_dynamic_fp16``): ~2x faster at batch 1, 8 and 32; next-token
  distributions within KL 3e-6 of fp32 on 10 prompts; greedy followed the fp32 argmax on
  20/20 test prompts x 8 tokens (not guaranteed: fp16 rounding can flip an exact near-tie).
- "int8": per-output-channel int8 weights (``linear_dynamic``; activations quantized per tensor
  on the fly to 7 bits: ``reduce_range`` keeps AVX2's u8 x s8 pair sums inside int16), after
  SmoothQuant smoothing (see weights.to_int8); w_down stays fp16. ~2.1x at batch 1, ~2.5-3x
  at 8-32. Lossy: KL ~0.05 from fp32; greedy picks stay within 0.9 logits of the fp32 argmax
  but 14/20 test runs depart from it within 8 tokens. Along fp32's own continuations (same
  prefix, tests/unit/test_engine.py): mean KL 0.033-0.036 whether fbgemm, ATen and MKL run
  their AVX2 or AVX-512 kernels, though which near-ties flip (and so which greedy runs depart)
  changes with them. The activation scale is per tensor, so a row's result also depends on the
  other rows of its batch.
- "int4" (the CPU repository's default): GGUF Q4_1 blocks (32 weights, fp16 scale and minimum)
  for the matmuls and Q8_0 blocks for the tied embedding / lm_head, run by trident's AVX2
  kernels (csrc/blockquant.cpp) with activations quantized per block of 32 to int8, as
  llama.cpp does. SmolLM2's checkpoint comes from such a GGUF, so the packed weights are its
  exact values (checked at load, logged). ~4x fp32 at batch 1 (one fused kernel call per
  layer), ~1.6x at 32 (decode tok/s through Triton); next-token KL ~0.005 from fp32; greedy output does not depend on the batch.

Not ``torch.ops.aten._weight_int8pack_mm``: with fp32 activations it was 10-20x slower than
F.linear here (only its bf16 path is vectorised, and bf16 is emulated on AVX2). The quantized
tensor constructor used to pack int8 is deprecated in torch but present in the pinned 2.13;
its warning is silenced once, at load.
"""
from __future__ import annotations

import ctypes
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from . import kernels

BLOCK = 32  # input features per scale in the int4 (Q4_1) and Q8_0 formats


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: w (N, K) float -> (q (N, K) int8, scale (N,) fp32)."""
    scale = (w.float().abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8Weight:
    """(N, K) weight as per-row int8 in fbgemm's packed layout."""

    __slots__ = ("packed",)

    def __init__(self, w: torch.Tensor) -> None:
        q, scale = quantize_rows(w)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qw = torch._make_per_channel_quantized_tensor(
                q, scale.double(), torch.zeros(scale.shape, dtype=torch.long), 0)
            self.packed = torch.ops.quantized.linear_prepack(qw, None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic(x, self.packed, True)


class Fp16Weight:
    """(N, K) weight as fp16 in fbgemm's packed layout."""

    __slots__ = ("packed",)

    def __init__(self, w: torch.Tensor) -> None:
        self.packed = torch.ops.quantized.linear_prepack_fp16(w.float(), None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic_fp16(x, self.packed)


def _blocks(w: torch.Tensor) -> torch.Tensor:
    n, k = w.shape
    if k % BLOCK:
        raise ValueError(f"int4 weights need input sizes divisible by {BLOCK}, got {tuple(w.shape)}")
    return w.float().reshape(n, k // BLOCK, BLOCK)


GROUP = 8  # weight rows interleaved per group in the packed formats (csrc/common.h)


def _interleave(n: int, *parts: torch.Tensor) -> torch.Tensor:
    """Per-block byte fields (N, nb, bytes) -> the kernels' layout (N / 8, nb * group bytes):
    for each group of 8 rows and each block, every field of the 8 rows in turn. A field given as
    (N, nb, k, 4) interleaves its 4-byte chunks: chunk c of rows 0..7, then chunk c + 1."""
    if n % GROUP:
        raise ValueError(f"packed weights need a multiple of {GROUP} rows, got {n}")
    out = []
    for p in parts:
        p = p.contiguous().view(torch.uint8)
        if p.dim() == 4:  # (N, nb, k, 4) -> (G, nb, k, 8, 4)
            p = p.reshape(n // GROUP, GROUP, *p.shape[1:]).permute(0, 2, 3, 1, 4)
        else:  # (N, nb, bytes) -> (G, nb, 8, bytes)
            p = p.reshape(n // GROUP, GROUP, *p.shape[1:]).permute(0, 2, 1, 3)
        out.append(p.reshape(n // GROUP, p.shape[1], -1))
    return torch.cat(out, dim=2).reshape(n // GROUP, -1).contiguous()


def pack_q4(w: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(N, K) float -> GGUF Q4_1 blocks in the kernels' layout (csrc/common.h), and the fraction
    of weights that dequantize to exactly their input value.

    Per block of 32: m = the minimum, d = (max - m) / 15, both fp16; q = round((w - m) / d). On a
    checkpoint dequantized from a Q4_1 GGUF (SmolLM2's) every block is recovered bit for bit:
    the block minimum is the stored m, and the fp16 rounding of (max - m) / 15 is the stored d.
    """
    b = _blocks(w)
    n, nb = b.shape[:2]
    m = b.amin(-1).half()
    d = ((b.amax(-1) - m.float()) / 15).half()
    df, mf = d.float()[..., None], m.float()[..., None]
    q = torch.where(df > 0, torch.round((b - mf) / df.clamp(min=torch.finfo(torch.float16).tiny)), 0.0)
    q = q.clamp(0, 15).to(torch.uint8)
    exact = ((df * q.float() + mf) == b).float().mean().item()
    nibbles = q[..., :16] | (q[..., 16:] << 4)  # byte 4h + c: q[4h + c] low, q[16 + 4h + c] high
    return _interleave(n, d[..., None], m[..., None], nibbles.reshape(n, nb, 4, 4)), exact


def pack_q8(w: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(N, K) float -> GGUF Q8_0 blocks (per block of 32: fp16 d = amax / 127, int8 q) in the
    kernels' layout, and the fraction of weights recovered exactly (all of them for SmolLM2's
    Q8_0 embeddings)."""
    b = _blocks(w)
    n, nb = b.shape[:2]
    d = (b.abs().amax(-1) / 127).half()
    df = d.float()[..., None]
    q = torch.where(df > 0, torch.round(b / df.clamp(min=torch.finfo(torch.float16).tiny)), 0.0)
    q = q.clamp(-127, 127).to(torch.int8)
    exact = ((df * q.float()) == b).float().mean().item()
    return _interleave(n, d[..., None], q.reshape(n, nb, 8, 4)), exact


#: Rows packed at a time: packing works on float32 copies and temporaries of what it packs (about
#: five times the float32 size), so a whole embedding table (Llama 3's 128256 x 4096: 2 GB in
#: float32) would need ~10 GB for a moment. Rows are packed independently, in groups of GROUP.
PACK_ROWS = 2048


def packed_in_chunks(pack, w: torch.Tensor, rows: int = PACK_ROWS) -> tuple[torch.Tensor, float]:
    """``pack(w)`` (pack_q4 or pack_q8) done ``rows`` rows at a time: the same bytes, bounded
    temporaries."""
    n = w.shape[0]
    if n <= rows:
        return pack(w)
    parts, kept = [], 0.0
    for start in range(0, n, rows):
        part, exact = pack(w[start:start + rows])
        parts.append(part)
        kept += exact * min(rows, n - start)
    return torch.cat(parts), kept / n


class Q4Weight:
    """(N, K) weight as 4-bit blocks; products in int8 x int4 with per-block fp32 scales."""

    __slots__ = ("packed", "exact")

    def __init__(self, w: torch.Tensor) -> None:
        self.packed, self.exact = packed_in_chunks(pack_q4, w)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.ops().q4_linear(x, self.packed)


class Q8Weight:
    """(N, K) weight (the tied embedding / lm_head) as Q8_0 blocks; rows can be gathered."""

    __slots__ = ("packed", "exact")

    def __init__(self, w: torch.Tensor) -> None:
        self.packed, self.exact = packed_in_chunks(pack_q8, w)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.ops().q8_linear(x, self.packed)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Dequantized rows (an embedding lookup): (T,) -> (T, K) fp32."""
        return kernels.ops().q8_rows(self.packed, index)


class DenseEmbedding:
    """An embedding table as a plain tensor; gathered rows are cast to the activation dtype."""

    __slots__ = ("table", "dtype")

    def __init__(self, table: torch.Tensor, dtype: torch.dtype) -> None:
        self.table, self.dtype = table, dtype

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        return F.embedding(index, self.table).to(self.dtype)  # (T, H)


class Int8Embedding:
    """An embedding table as per-row int8 and a scale per row (see quantize_rows)."""

    __slots__ = ("q", "scale")

    def __init__(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        self.q, self.scale = q, scale

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        return F.embedding(index, self.q).float() * self.scale[index, None]  # (T, H) fp32


class Observer:
    """Stands in for a weight during calibration: runs it in fp32, records per-channel |x| max."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight
        self.amax = torch.zeros(weight.shape[1])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.amax = torch.maximum(self.amax, x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0).float())
        return F.linear(x, self.weight)


def linear(x: torch.Tensor, w) -> torch.Tensor:
    """F.linear for a plain weight tensor; a wrapped weight runs its own kernel."""
    if isinstance(w, torch.Tensor):
        return F.linear(x, w)
    return w(x)


def smooth_scales(act_amax: torch.Tensor, weight: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """SmoothQuant's per-input-channel factors s: x / s and W * s give the same product, with
    activation outliers moved into the (per-row quantized) weights. (K,) fp32."""
    w_amax = weight.float().abs().amax(dim=0).clamp(min=1e-5)
    return (act_amax.clamp(min=1e-5) ** alpha / w_amax ** (1 - alpha)).clamp(min=1e-2, max=1e2)


# Calibration text for int8 smoothing: prose, code and chat, like what the model serves.
CALIBRATION_TEXT = (
    "<|im_start|>user\nWhat is the capital of France? Answer in one sentence.<|im_end|>\n"
    "<|im_start|>assistant\nThe capital of France is Paris, a city on the Seine.<|im_end|>\n"
    "Once upon a time, in a small village by the sea, there lived an old fisherman who told "
    "stories about the stars. The history of the Roman Empire spans many centuries; its roads "
    "and aqueducts still stand. Water boils at 100 degrees Celsius at sea level.\n"
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n"
    "    return a\n\nimport numpy as np\nx = np.arange(10) ** 2\nprint(x.sum())\n"
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10. List three fruits: apple, banana, cherry."
)


def release_free_memory() -> None:
    """Hand the freed fp32 load-time copies back to the OS (glibc keeps fragmented heap: measured
    1.3 GB -> 1.1 GB resident for int8 weights)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def calibration_tokens(checkpoint_dir: str | Path) -> list[int] | None:
    """CALIBRATION_TEXT tokenized with the checkpoint's tokenizer.json (None if it has none)."""
    path = Path(checkpoint_dir) / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path)).encode(CALIBRATION_TEXT).ids
