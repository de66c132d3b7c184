"""The paged KV cache's tensors: one pool of blocks per layer, indexed by flat slot (the block
manager, ``block_manager.py``, says which slots are whose)."""

from __future__ import annotations

import torch


class KVCache:
    """Per-layer K and V pools of shape (num_blocks * block_size, num_kv_heads, head_dim)."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (num_layers, num_blocks * block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """Store k, v (T, kv_heads, head_dim) at flat ``slots`` (T,)."""
        self.k[layer, slots] = k
        self.v[layer, slots] = v

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8
