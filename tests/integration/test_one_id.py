"""One process per worker id (services/worker/one_id.py): a second worker under an id that another
live worker beats under refuses to start, naming the id, the other incarnation and the fix; one
that follows a crash (the key still there, no longer rewritten) starts; so does an ordinary one,
at once."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import nats
import pytest
from redis.asyncio import Redis

from dlora.common import subjects
from dlora.common.messages import WorkerStats
from dlora.common.state import StateStore
from dlora.model.make_tiny import TinyOutput
from dlora.services.run import StartupError
from dlora.services.servers import Server
from dlora.services.worker.one_id import refuse_if_taken
from dlora.services.worker.settings import WorkerSettings
from tests.integration.conftest import worker_by_hand

TTL_S = 2.0


def beat(incarnation: str) -> WorkerStats:
    return WorkerStats(
        worker="w-a",
        incarnation=incarnation,
        running=0,
        waiting=0,
        free_blocks=1,
        total_blocks=1,
        block_size=16,
        max_loras=1,
        sent=time.time(),
    )


def another_id() -> WorkerStats:
    return WorkerStats(
        worker="w-b", running=0, waiting=0, free_blocks=1, total_blocks=1, block_size=16, max_loras=1, sent=time.time()
    )


@contextlib.asynccontextmanager
async def live_worker(store: StateStore, incarnation: str = "other1") -> AsyncIterator[None]:
    """Another process under "w-a": its heartbeat rewritten every 0.1 s (its stats interval)."""

    async def beats() -> None:
        while True:
            await store.heartbeat(beat(incarnation), TTL_S)
            await asyncio.sleep(0.1)

    task = asyncio.create_task(beats())
    await asyncio.sleep(0.05)
    try:
        yield
    finally:
        task.cancel()


def settings() -> WorkerSettings:
    return WorkerSettings(redis_url="unused", worker_id="w-a", model="m", heartbeat_ttl_s=TTL_S, stats_interval_s=0.1)


async def test_an_id_nobody_beats_under_starts_at_once(redis: Redis) -> None:
    store = StateStore(redis)
    await store.heartbeat(another_id(), TTL_S)  # another id's beat is no matter
    started = time.monotonic()
    await refuse_if_taken(store, settings())
    assert time.monotonic() - started < 0.1


async def test_an_id_a_live_worker_beats_under_is_refused(redis: Redis) -> None:
    store = StateStore(redis)
    async with live_worker(store):
        started = time.monotonic()
        with pytest.raises(StartupError) as refused:
            await refuse_if_taken(store, settings())
        assert time.monotonic() - started < TTL_S / 2  # told at its next beat
    said = str(refused.value)
    assert "'w-a'" in said and "other1" in said and "--worker-id" in said and "worker_id" in said


async def test_a_restart_after_a_crash_starts(redis: Redis) -> None:
    """The dead incarnation's key is still there (systemd restarts at once) but never rewritten."""
    store = StateStore(redis)
    await store.heartbeat(beat("dead1"), 60.0)  # a long TTL (the fencing tests'): not waited out
    started = time.monotonic()
    await refuse_if_taken(store, settings())
    assert 0.3 < time.monotonic() - started < 0.8  # 4 stats intervals of quiet
    # and one whose key is already that quiet starts after one interval
    await redis.pexpire("dlora:worker:w-a", 59_000)
    started = time.monotonic()
    await refuse_if_taken(store, settings())
    assert time.monotonic() - started < 0.3


async def test_a_second_worker_under_a_live_id_does_not_subscribe(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput
) -> None:
    """The probe's case: both processes took every request sent to "w-a", and ran it twice."""
    store = StateStore(redis)
    ws = WorkerSettings(
        nats_url=nats_server.url,
        redis_url="unused",
        worker_id="w-a",
        model=str(tiny_llama.model),
        heartbeat_ttl_s=TTL_S,
        stats_interval_s=0.1,
    )
    # (the worker first: its engine is built with the loop held, which would hold the other's beats)
    async with worker_by_hand(nats_server, store, ws) as (service, _), live_worker(store):
        with pytest.raises(StartupError, match="'w-a' is in use"):
            await asyncio.wait_for(service.run(asyncio.Event()), 10)
        nc = await nats.connect(nats_server.url)
        try:  # nobody took the id's subject: a request sent there finds no responder
            with pytest.raises(nats.errors.NoRespondersError):
                await nc.request(subjects.worker_requests("w-a"), b"{}", timeout=1)
        finally:
            await nc.close()
        assert (await store.beat_of("w-a", 60.0))[0].incarnation == "other1"  # its key left alone
