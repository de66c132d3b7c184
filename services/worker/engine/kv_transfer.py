"""A running request's KV cache, out of one engine and into another, so a move need not recompute.

``KVSnapshot`` holds the K and V of a sequence's cached tokens for every layer, contiguous and on
the host; ``to_bytes`` / ``from_bytes`` (safetensors) are what travels over the bus.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from safetensors.torch import load, save

from dlora.services.worker.engine.block_manager import BlockManager
from dlora.services.worker.engine.kv_cache import KVCache
from dlora.services.worker.engine.outputs import RequestError
from dlora.services.worker.engine.sequence import Sequence, Status


@dataclass
class KVSnapshot:
    tokens: int  # cached tokens: positions 0 .. tokens-1
    k: torch.Tensor  # (layers, tokens, kv_heads, head_dim)
    v: torch.Tensor
    finite: bool = False  # K and V known finite in their dtype (``checked_in``): not scanned again

    def to_bytes(self) -> bytes:
        return save({"k": self.k.contiguous(), "v": self.v.contiguous()}, metadata={"tokens": str(self.tokens)})

    @classmethod
    def from_bytes(cls, data: bytes) -> KVSnapshot:
        t = load(data)
        return cls(tokens=t["k"].shape[1], k=t["k"], v=t["v"])


def export_kv(seq: Sequence, blocks: BlockManager, kv: KVCache) -> KVSnapshot:
    """The K and V of ``seq``'s cached tokens, on the host."""
    slots = torch.tensor(blocks.slots(seq.request_id, 0, seq.num_cached), dtype=torch.int64, device=kv.k.device)
    return KVSnapshot(tokens=seq.num_cached, k=kv.k[:, slots].cpu(), v=kv.v[:, slots].cpu())


def import_kv(seq: Sequence, snapshot: KVSnapshot, blocks: BlockManager, kv: KVCache) -> None:
    """Write a moved request's cache into blocks of its own and make it a decoding sequence. Its
    blocks are not prefix-cached: which weights computed them is not known here. RequestError when
    the snapshot's shape is not ``seq``'s context but one token in this cache's layout, or blocks
    run out."""
    layers, _, kv_heads, head_dim = kv.k.shape
    expected = (layers, seq.total_len - 1, kv_heads, head_dim)
    if tuple(snapshot.k.shape) != expected or tuple(snapshot.v.shape) != expected:
        raise RequestError(f"moved KV has shape {tuple(snapshot.k.shape)}, expected {expected}")
    ready = snapshot.finite and snapshot.k.dtype == kv.k.dtype  # (checked on arrival, off the loop)
    k, v = (snapshot.k, snapshot.v) if ready else finite_in(snapshot, kv.k.dtype)
    adopt(seq, snapshot.tokens, blocks)
    kv.zero_blocks(blocks.take_fresh())  # its last block's slots past the context too
    slots = torch.tensor(blocks.slots(seq.request_id, 0, snapshot.tokens), dtype=torch.int64, device=kv.k.device)
    for layer in range(layers):
        kv.write(layer, k[layer].to(kv.k.device), v[layer].to(kv.k.device), slots)


def finite_in(snapshot: KVSnapshot, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The snapshot's K and V in ``dtype``, on the host. RequestError when any is not finite there:
    workers of one cluster may serve in different precisions and a plan ships a cache whatever
    they are, so an fp32 worker's K/V past float16's 65,504 would be infinity in an fp16 worker's
    cache (and its attention NaN); refused, the worker recomputes it in its own precision. A NaN
    the source wrote is refused alike."""
    k, v = snapshot.k.to(dtype), snapshot.v.to(dtype)
    if not (bool(k.isfinite().all()) and bool(v.isfinite().all())):
        came = str(snapshot.k.dtype).removeprefix("torch.")
        raise RequestError(
            f"moved KV ({came}) is not finite in this worker's {str(dtype).removeprefix('torch.')}: recomputed instead"
        )
    return k, v


def checked_in(snapshot: KVSnapshot, dtype: torch.dtype) -> KVSnapshot:
    """``snapshot`` in ``dtype``, known finite there (``finite_in``'s RequestError otherwise): done
    where the cache arrives, on a thread, so ``import_kv`` only copies. Scanned on the event loop,
    an 8B model's 8k-token cache (~1 GiB) held every other request for as long."""
    return KVSnapshot(snapshot.tokens, *finite_in(snapshot, dtype), finite=True)


def adopt(seq: Sequence, tokens: int, blocks: BlockManager) -> None:
    """The block bookkeeping of a moved cache (no tensors: the cluster simulator's move too): blocks
    for ``tokens`` cached tokens, kept out of the prefix cache, and ``seq`` a decoding sequence.
    RequestError when blocks run out."""
    if not blocks.can_grow(seq.request_id, tokens):
        raise RequestError("no free KV blocks for the moved cache")
    blocks.grow(seq.request_id, tokens)
    blocks.stop_caching(seq.request_id)
    seq.num_cached = tokens
    seq.status = Status.RUNNING
