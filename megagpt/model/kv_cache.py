"""Key/value cache for generation: each new token attends to stored keys instead of
recomputing them, so the work per generated token does not grow with the prompt."""

from __future__ import annotations

import torch


class KVCache:
    """Preallocated keys and values for every layer, filled left to right."""

    def __init__(
        self,
        n_layers: int,
        batch: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.lengths = [0] * n_layers
        self.max_len = max_len

    def length(self, layer: int) -> int:
        return self.lengths[layer]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, G, T, D) after the cached ones; return all keys and values."""
        start, end = self.lengths[layer], self.lengths[layer] + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} were requested")
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        self.lengths[layer] = end
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]
