"""The KV inbox alone: a cache assembled from chunks in any order, a late cache given up on, and
unclaimed caches swept."""

from __future__ import annotations

import asyncio

import torch

from dlora.common.messages import KVChunk
from dlora.services.worker.engine.kv_transfer import KVSnapshot
from dlora.services.worker.kv_inbox import KVInbox


def chunks(request_id: str, n: int = 3) -> tuple[KVSnapshot, list[KVChunk]]:
    kv = KVSnapshot(tokens=4, k=torch.randn(2, 4, 1, 8), v=torch.randn(2, 4, 1, 8))
    data = kv.to_bytes()
    size = -(-len(data) // n)
    return kv, [
        KVChunk(request_id=request_id, index=i, total=n, data=data[i * size : (i + 1) * size]) for i in range(n)
    ]


async def test_a_cache_comes_together_in_any_order() -> None:
    inbox = KVInbox(wait_s=2.0)
    kv, parts = chunks("r")
    waiting = asyncio.create_task(inbox.take("r"))  # the request may come before its chunks
    for c in reversed(parts):
        inbox.put(c)
    got = await waiting
    assert got is not None and got.tokens == 4 and torch.equal(got.k, kv.k) and torch.equal(got.v, kv.v)
    assert len(inbox) == 0


async def test_a_cache_that_does_not_complete_in_time_is_given_up() -> None:
    inbox = KVInbox(wait_s=0.05)
    _, parts = chunks("r")
    inbox.put(parts[0])
    assert await inbox.take("r") is None and len(inbox) == 0


async def test_unclaimed_caches_are_swept_when_the_next_arrives() -> None:
    inbox = KVInbox(stale_s=0.0)
    _, old = chunks("old")
    _, new = chunks("new")
    inbox.put(old[0])
    await asyncio.sleep(0.01)
    inbox.put(new[0])
    assert len(inbox) == 1
