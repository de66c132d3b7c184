"""A running request's KV cache, out of one engine and into another, so a move need not recompute.

``KVSnapshot`` holds the K and V of a sequence's cached tokens for every layer, contiguous and on
the host; ``to_bytes`` / ``from_bytes`` (safetensors) are what travels over the bus.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from safetensors.torch import load, save


@dataclass
class KVSnapshot:
    tokens: int  # cached tokens: positions 0 .. tokens-1
    k: torch.Tensor  # (layers, tokens, kv_heads, head_dim)
    v: torch.Tensor

    def to_bytes(self) -> bytes:
        return save({"k": self.k.contiguous(), "v": self.v.contiguous()}, metadata={"tokens": str(self.tokens)})

    @classmethod
    def from_bytes(cls, data: bytes) -> KVSnapshot:
        t = load(data)
        return cls(tokens=t["k"].shape[1], k=t["k"], v=t["v"])
