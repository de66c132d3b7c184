"""The Redis state store against a real redis-server."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from dlora.common.messages import AdapterEntry, GenerateRequest, WorkerStats
from dlora.common.state import StateStore


async def test_registry_placement_and_policy(redis: Redis) -> None:
    s = StateStore(redis)
    await s.put_adapter(AdapterEntry(name="b", path="/b", rank=8, created=1.0))
    await s.put_adapter(AdapterEntry(name="a", path="/a", rank=16, created=2.0))
    assert [e.name for e in await s.list_adapters()] == ["a", "b"]
    assert (await s.get_adapter("a")).rank == 16 and await s.get_adapter("zz") is None
    assert await s.delete_adapter("b") and not await s.delete_adapter("b")

    await s.set_placement("w1", ["a", "c"])
    await s.set_placement("w2", ["a"])
    await s.set_placement("w1", ["c"])
    assert await s.workers_with("a") == {"w2"} and await s.workers_with("c") == {"w1"}

    await s.save_policy("w1", {"r": 0.4, "credits": {"a": -1.5}})
    assert await s.load_policy("w1") == {"r": 0.4, "credits": {"a": -1.5}}
    assert await s.load_policy("w9") is None


async def test_heartbeats_expire(redis: Redis) -> None:
    s = StateStore(redis)
    stats = WorkerStats(worker="w1", running=1, waiting=0, free_blocks=1, total_blocks=2, block_size=16, max_loras=4)
    await s.heartbeat(stats, ttl_s=0.2)
    assert [w.worker for w in await s.live_workers()] == ["w1"]
    await asyncio.sleep(0.3)
    assert await s.live_workers() == []


async def test_inflight_progress(redis: Redis) -> None:
    s = StateStore(redis)
    req = GenerateRequest(request_id="r1", reply_to="x", prompt_token_ids=[1, 2])
    await s.put_inflight(req, "w1")
    await s.record_progress({"r1": 3, "unknown": 2}, [])
    await s.record_progress({"r1": 1}, [])
    worker, got, acked = await s.get_inflight("r1")
    assert (worker, got, acked) == ("w1", req, 4)
    assert await s.get_inflight("unknown") is None  # no half-record for a request without one
    await s.record_progress({}, ["r1"])
    assert await s.get_inflight("r1") is None
