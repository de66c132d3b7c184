"""The KV inbox alone: a cache assembled from chunks in any order, a late cache given up on, and
unclaimed caches swept."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from dlora.common.messages import KVChunk
from dlora.services.worker.engine import kv_transfer
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


async def test_unclaimed_caches_go_once_stale_with_no_other_coming() -> None:
    """Swept only when the next cache came, one whose request never came stayed for as long as
    no other move reached the worker (the worker sweeps between steps)."""
    inbox = KVInbox(stale_s=0.05)
    _, parts = chunks("r")
    inbox.put(parts[0])
    inbox.sweep()
    assert len(inbox) == 1  # not stale yet: its request may still come
    await asyncio.sleep(0.06)
    inbox.sweep()
    assert len(inbox) == 0


def shipment(request_id: str, transfer: str, tokens: int, n: int = 3) -> tuple[KVSnapshot, list[KVChunk]]:
    kv = KVSnapshot(tokens=tokens, k=torch.randn(2, tokens, 1, 8), v=torch.randn(2, tokens, 1, 8))
    data = kv.to_bytes()
    size = -(-len(data) // n)
    parts = [data[i * size : (i + 1) * size] for i in range(n)]
    return kv, [
        KVChunk(request_id=request_id, index=i, total=n, data=d, transfer=transfer) for i, d in enumerate(parts)
    ]


async def test_a_request_moved_back_takes_its_own_shipment_not_an_earlier_one_come_late() -> None:
    """Moved here, given up on its cache (it came too late), moved away and back: the first move's
    chunks, arriving meanwhile, are neither its cache nor mixed into the second's."""
    inbox = KVInbox(wait_s=0.05)
    _, first = shipment("r", "move-1", tokens=4)
    assert await inbox.take("r", "move-1") is None  # the first move's request gave up waiting
    for c in first[:2]:
        inbox.put(c)
    kv, second = shipment("r", "move-2", tokens=9)
    waiting = asyncio.create_task(inbox.take("r", "move-2"))
    inbox.put(first[2])  # the first shipment's last chunk: complete now, and not asked for
    for c in second:
        inbox.put(c)
    got = await waiting
    assert got is not None and got.tokens == 9 and torch.equal(got.k, kv.k)


async def test_bytes_that_are_not_a_cache_are_recomputed_not_raised() -> None:
    inbox = KVInbox(wait_s=2.0)
    inbox.put(KVChunk(request_id="r", index=0, total=1, data=b"not safetensors", transfer="t"))
    assert await inbox.take("r", "t") is None and len(inbox) == 0


async def test_a_cache_is_read_and_checked_in_the_workers_dtype_off_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A moved cache can be a gigabyte (8k tokens of an 8B model): its bytes read and its values
    converted and scanned on the event loop held every other request of the worker as long."""
    threads: list[threading.Thread] = []
    scan = kv_transfer.finite_in

    def finite_in(snapshot: KVSnapshot, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        threads.append(threading.current_thread())
        return scan(snapshot, dtype)

    monkeypatch.setattr(kv_transfer, "finite_in", finite_in)
    inbox = KVInbox(wait_s=2.0)
    kv, parts = chunks("r")
    for c in parts:
        inbox.put(c)
    got = await inbox.take("r", dtype=torch.float16)
    assert got is not None and got.finite and got.k.dtype == torch.float16
    assert torch.equal(got.k, kv.k.half()) and torch.equal(got.v, kv.v.half())
    assert threads and threading.main_thread() not in threads


async def test_a_cache_not_finite_in_the_workers_dtype_is_recomputed() -> None:
    """An fp32 worker's K past float16's 65,504 is infinity in an fp16 worker's cache."""
    inbox = KVInbox(wait_s=2.0)
    kv = KVSnapshot(tokens=4, k=torch.full((2, 4, 1, 8), 1e6), v=torch.randn(2, 4, 1, 8))
    inbox.put(KVChunk(request_id="r", index=0, total=1, data=kv.to_bytes()))
    assert await inbox.take("r", dtype=torch.float16) is None and len(inbox) == 0
