"""Preallocated KV cache: one K/V tensor per layer, one slot (row) per sequence.

Each layer owns its own tensor, updated in place: PERF_NOTES measured a single stacked cache
tensor making compiled code 10x slower. A layer's K and V live in one tensor (2, slots, ...) so
a decode step writes both with a single ``index_copy_``; ``k[i]``/``v[i]`` are views of it.
Active sequences are kept in slots 0..B-1 so a decode step reads plain views ``k[:B, :, :S]``
instead of gathered copies.
"""
from __future__ import annotations

import numpy as np
import torch


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Zeros whose pages the OS commits on first write (calloc -> mmap for large sizes).

    torch.zeros memsets, so a max_batch_size x max_seq_len cache would count fully in RSS from
    the start; this way RSS follows the positions actually used. Zeros (not torch.empty) matter:
    masked positions are still multiplied by 0 in the attention and must never hold NaN.
    """
    numel = int(np.prod(shape))
    itemsize = torch.empty((), dtype=dtype).element_size()
    return torch.from_numpy(np.zeros(numel * itemsize, dtype=np.uint8)).view(dtype).view(shape)


class KVCache:
    def __init__(self) -> None:
        self.kv: list[torch.Tensor] = []  # per layer (2, slots, n_kv, S, hd): K then V
        self.k: list[torch.Tensor] = []  # views kv[i][0]: (slots, n_kv, S, hd)
        self.v: list[torch.Tensor] = []
        self.shape: tuple[int, ...] | None = None
        self.dtype: torch.dtype | None = None

    def setup(
        self,
        *,
        num_layers: int,
        max_batch_size: int,
        num_kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        dtype: torch.dtype,
    ) -> None:
        """Allocate the cache; calling it again with the same geometry keeps the tensors."""
        shape = (max_batch_size, num_kv_heads, max_seq_len, head_dim)
        if self.shape == shape and self.dtype == dtype and len(self.k) == num_layers:
            return
        self.kv = [lazy_zeros((2, *shape), dtype) for _ in range(num_layers)]
        self.k = [kv[0] for kv in self.kv]
        self.v = [kv[1] for kv in self.kv]
        self.shape, self.dtype = shape, dtype

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.kv)

    def touch_all(self) -> None:
        """Write every page (what every slot at max_seq_len would make resident: memory reports)."""
        for kv in self.kv:
            kv.fill_(0)

    def write_prefill(self, layer: int, slot: int, k: torch.Tensor, v: torch.Tensor) -> None:
        # k, v: (n_kv, T, hd) for positions 0..T-1
        t = k.shape[1]
        self.k[layer][slot, :, :t] = k
        self.v[layer][slot, :, :t] = v

    def decode_index(self, positions: torch.Tensor) -> torch.Tensor:
        """Rows of ``kv[i].view(-1, hd)`` that a decode step writes, in (b, kv, head) order.

        positions: (B,) long, the position each slot 0..B-1 writes. Computed once per step and
        shared by all layers, so each layer's write is one index_copy_ (see write_decode).
        """
        slots, n_kv, S, _ = self.shape
        B = positions.shape[0]
        b = torch.arange(B)[:, None, None] * (n_kv * S)  # (B, 1, 1)
        kv = torch.arange(2)[None, :, None] * (slots * n_kv * S)  # (1, 2, 1)
        h = torch.arange(n_kv)[None, None, :] * S  # (1, 1, n_kv)
        return (b + kv + h + positions[:, None, None]).reshape(-1)  # (B*2*n_kv,)

    def write_decode(self, layer: int, index: torch.Tensor, kv: torch.Tensor) -> None:
        # kv: (B*2*n_kv, hd) rows in (b, kv, head) order (the layout of the fused QKV output),
        # index from decode_index
        self.kv[layer].view(-1, self.shape[-1]).index_copy_(0, index, kv)

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` positions of slot ``src`` into slot ``dst`` (compaction)."""
        for kv in self.kv:
            kv[:, dst, :, :length] = kv[:, src, :, :length]
