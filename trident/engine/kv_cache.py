"""Preallocated KV cache: one K and one V tensor per layer, one slot (row) per sequence.

Each layer owns its own tensors, updated in place: PERF_NOTES measured a single stacked cache
tensor making compiled code 10x slower. Active sequences are kept in slots 0..B-1 so a decode
step reads plain views ``k[:B, :, :S]`` instead of gathered copies.
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
        self.k: list[torch.Tensor] = []
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
        self.k = [lazy_zeros(shape, dtype) for _ in range(num_layers)]  # (slots, n_kv, S, hd)
        self.v = [lazy_zeros(shape, dtype) for _ in range(num_layers)]
        self.shape, self.dtype = shape, dtype

    @property
    def max_batch_size(self) -> int:
        return self.shape[0] if self.shape else 0

    @property
    def max_seq_len(self) -> int:
        return self.shape[2] if self.shape else 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def write_prefill(self, layer: int, slot: int, k: torch.Tensor, v: torch.Tensor) -> None:
        # k, v: (n_kv, T, hd) for positions 0..T-1
        t = k.shape[1]
        self.k[layer][slot, :, :t] = k
        self.v[layer][slot, :, :t] = v

    def write_decode(
        self, layer: int, rows: torch.Tensor, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        # k, v: (B, n_kv, hd), written at each row's own position pos[b]
        self.k[layer][rows, :, pos] = k
        self.v[layer][rows, :, pos] = v

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` positions of slot ``src`` into slot ``dst`` (compaction)."""
        for k, v in zip(self.k, self.v):
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]
