"""The KV cache: one tensor per layer holding every running job's keys and values in a row."""
from __future__ import annotations

import torch


class KVSlots:
    """Keys and values per layer: (rows, kv_heads, capacity, head_dim), grown by doubling."""

    def __init__(self, layers: int, rows: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, capacity: int = 256) -> None:
        self.shape = (rows, kv_heads, capacity, head_dim)
        self.initial = capacity
        self.version = 0  # bumped whenever the tensors are replaced (captured graphs go stale)
        self.k = [torch.zeros(self.shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(self.shape, dtype=dtype, device=device) for _ in range(layers)]

    def reset(self) -> None:
        """Back to the initial capacity (only when no row is in use)."""
        self.k = [t.new_zeros(self.shape) for t in self.k]
        self.v = [t.new_zeros(self.shape) for t in self.v]
        self.version += 1

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def reserve(self, length: int) -> None:
        """Make room for `length` positions per row."""
        if length <= self.capacity:
            return
        cap = self.capacity
        while cap < length:
            cap *= 2
        for store in (self.k, self.v):
            for i, old in enumerate(store):
                new = old.new_zeros(old.shape[0], old.shape[1], cap, old.shape[3])
                new[:, :, : old.shape[2]] = old
                store[i] = new
        self.version += 1

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy row `src` (its first `length` positions) into row `dst`."""
        for store in (self.k, self.v):
            for t in store:
                t[dst, :, :length] = t[src, :, :length]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
