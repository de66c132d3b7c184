"""A public report about the sending side of a move replayed against a worker (real NATS and
Redis, its loop driven by hand): its engine-level kind is ``tests/engine/test_migration_replays.py``."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
from redis.asyncio import Redis

from dlora.common.messages import GenerateRequest, SamplingParams
from dlora.common.state import StateStore
from dlora.model.make_tiny import TinyOutput
from dlora.services.servers import Server
from dlora.services.worker.engine import LLMEngine
from dlora.services.worker.engine.kv_transfer import KVSnapshot
from dlora.services.worker.move_out import move_out
from dlora.services.worker.moves import Move
from dlora.services.worker.settings import WorkerSettings
from tests.integration.conftest import small_engine, worker_by_hand

T = TypeVar("T")


async def test_a_shipped_cache_is_copied_off_the_device_and_into_bytes_beside_the_event_loop(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vllm-project/vllm-omni PR #4352 (a KV transfer's payload serialized layer by layer on the
    GPU worker's execution path: long worker stalls for large caches). The move's copy of the cache
    off the device and into bytes (~1 GiB for 8k tokens of an 8B model) ran on the worker's event
    loop, holding its heartbeats, stats, arrivals and incoming caches as long; the receiving side
    already read and checked a cache on a thread. Both copies now run on one."""
    threads: dict[str, threading.Thread] = {}  # each copy's, by the call that makes it
    for owner, name in ((LLMEngine, "export_kv"), (KVSnapshot, "to_bytes")):
        monkeypatch.setattr(owner, name, on_thread_recorded(getattr(owner, name), threads))
    ws = WorkerSettings(
        nats_url=nats_server.url, redis_url="unused", worker_id="w0", model=str(tiny_llama.model), engine=small_engine()
    )
    async with worker_by_hand(nats_server, StateStore(redis), ws) as (service, _):
        params = SamplingParams(max_tokens=8, ignore_eos=True)
        await service._on_request(
            GenerateRequest(request_id="r", reply_to="test.r", prompt_token_ids=[5, 6, 7], params=params)
        )
        await service._take(await service.commands.get())
        for _ in range(3):
            service.engine.step()
        await move_out(service, Move("r", "w1", ship_kv=True))
        assert "r" not in service.streams and "r" not in service.engine.seqs  # moved
        assert threads.keys() == {"export_kv", "to_bytes"} and threading.main_thread() not in threads.values()


def on_thread_recorded(call: Callable[..., T], threads: dict[str, threading.Thread]) -> Callable[..., T]:
    """``call``, recording in ``threads`` the thread it ran on, under its name."""

    def recorded(*args: Any) -> T:
        threads[call.__name__] = threading.current_thread()
        return call(*args)

    return recorded
