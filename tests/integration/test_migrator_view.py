"""What the migrator plans from, against real NATS and Redis: the workers it leaves out of a plan."""

from __future__ import annotations

import asyncio
import time

import nats
from redis.asyncio import Redis

from dlora.common import bus, subjects
from dlora.common.messages import MovePlan, RequestLoad, WorkerStats
from dlora.common.state import StateStore
from dlora.services.migrator.main import Migrator
from dlora.services.migrator.settings import MigratorSettings
from dlora.services.migrator.trigger import TriggerBounds
from dlora.services.servers import Server


def _stats(name: str, n: int) -> WorkerStats:
    reqs = [
        RequestLoad(request_id=f"{name}-{i}", adapter=None, context_tokens=8, remaining_tokens=200) for i in range(n)
    ]
    return WorkerStats(
        worker=name,
        running=n,
        waiting=0,
        free_blocks=1000,
        total_blocks=1000,
        block_size=16,
        max_loras=4,
        seconds_per_token=0.01,
        prefill_seconds_per_token=0.0001,
        requests=reqs,
    )


async def test_no_request_moves_to_a_worker_gone_quiet(nats_server: Server, redis: Redis) -> None:
    """A worker killed or hung stays in the migrator's view until the TTL: its last stats said it
    idle, so a plan sent requests there, to stall until a dispatcher recovered them elsewhere."""
    nc = await nats.connect(nats_server.url)
    plans: list[MovePlan] = []

    async def got(plan: MovePlan) -> None:
        plans.append(plan)

    sub = await bus.subscribe(nc, subjects.MOVES, MovePlan, got)
    try:
        trigger = TriggerBounds(patience=1, cooldown_s=0, min_gain_s=0.0)
        m = Migrator(
            MigratorSettings(nats_url=nats_server.url, heartbeat_ttl_s=5.0, trigger=trigger), nc, StateStore(redis)
        )
        now = time.monotonic()
        # w-quiet: silent 3 s (past half the TTL; its stats came every half second until then)
        for name, n, heard in (("w0", 12, now), ("w-quiet", 0, now - 3.0), ("w-live", 0, now)):
            m.stats[name] = (_stats(name, n), heard)
        await m.tick()
        await nc.flush()
        for _ in range(50):
            if plans:
                break
            await asyncio.sleep(0.05)
        assert m.plans == 1 and plans and plans[0].moves
        assert {mv.to_worker for mv in plans[0].moves} == {"w-live"}
    finally:
        await bus.unsubscribe([sub])
        await nc.drain()
