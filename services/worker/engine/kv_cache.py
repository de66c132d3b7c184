"""Paged KV cache: a pure block manager (bookkeeping only) and the tensors it indexes.

A sequence's KV lives in fixed-size blocks scattered over one pool; its block table maps
logical block i (tokens [i*block_size, (i+1)*block_size)) to a physical block. Token t of a
sequence is stored at flat slot ``table[t // block_size] * block_size + t % block_size``.
"""

from __future__ import annotations

from collections import deque

import torch


class BlockManager:
    """Hands out physical blocks to sequences; no tensors, no I/O."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._tables: dict[str, list[int]] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def table(self, seq_id: str) -> list[int]:
        return self._tables.get(seq_id, [])

    def extra_blocks_needed(self, seq_id: str, num_tokens: int) -> int:
        """Blocks to add so ``seq_id`` can hold ``num_tokens`` tokens (0 if it already can)."""
        return max(0, self.blocks_for(num_tokens) - len(self.table(seq_id)))

    def can_grow(self, seq_id: str, num_tokens: int) -> bool:
        return self.extra_blocks_needed(seq_id, num_tokens) <= self.num_free

    def grow(self, seq_id: str, num_tokens: int) -> None:
        """Make ``seq_id`` hold ``num_tokens`` tokens; raises if blocks run out (check can_grow)."""
        need = self.extra_blocks_needed(seq_id, num_tokens)
        if need > self.num_free:
            raise MemoryError(f"{seq_id}: needs {need} blocks, {self.num_free} free")
        table = self._tables.setdefault(seq_id, [])
        table.extend(self._free.popleft() for _ in range(need))

    def free(self, seq_id: str) -> None:
        """Return every block of ``seq_id`` to the pool; a no-op for an unknown sequence."""
        self._free.extend(self._tables.pop(seq_id, []))

    def slots(self, seq_id: str, start: int, end: int) -> list[int]:
        """Flat cache slots of tokens [start, end) of ``seq_id``."""
        table, bs = self._tables[seq_id], self.block_size
        return [table[t // bs] * bs + t % bs for t in range(start, end)]


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
