"""The paged KV cache's tensors: one pool of blocks per layer, indexed by flat slot (the block
manager, ``block_manager.py``, says which slots are whose)."""

from __future__ import annotations

import torch

from dlora.kernels.host import to_device
from dlora.model.config import ModelConfig


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

    def zero_blocks(self, blocks: list[int]) -> None:
        """Zero every layer's K and V in ``blocks`` (blocks just given to sequences: ``take_fresh``)."""
        if blocks:
            at = to_device(blocks, torch.int64, self.k.device)
            for pool in (self.k, self.v):
                pool.view(pool.shape[0], -1, self.block_size * pool[0, 0].numel()).index_fill_(1, at, 0)

    @classmethod
    def sized(
        cls,
        cfg: ModelConfig,
        block_size: int,
        num_blocks: int | None,
        budget_bytes: int,
        dtype: torch.dtype,
        device: torch.device,
        scratch_blocks: int = 0,
    ) -> tuple[KVCache, int]:
        """A cache of ``num_blocks`` blocks, or (None) as many as ``budget_bytes`` holds, at least
        one, and that number; the pad block 0 before them (``block_manager.py``: no sequence's)
        and ``scratch_blocks`` after them, for writes no sequence owns."""
        per_block = block_size * cls.bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype)
        n = num_blocks or max(1, budget_bytes // per_block)
        kv = cls(cfg.num_layers, 1 + n + scratch_blocks, block_size, cfg.num_kv_heads, cfg.head_dim, dtype, device)
        return kv, n

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8
