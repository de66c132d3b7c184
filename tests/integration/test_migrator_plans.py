"""The migrator service's plans from what workers report, over real NATS and Redis: the worker stats
are written by hand (no model), and the plans are read off the bus as workers read them. The
planner's own cases are unit-tested in ``tests/unit/test_planner_bounds.py``."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import msgspec
import nats
import pytest
import structlog
from redis.asyncio import Redis

from dlora.common import bus, subjects
from dlora.common.messages import AdapterResidency, MovePlan, RequestLoad, WorkerStats
from dlora.common.plans import IlpFallback
from dlora.common.state import StateStore
from dlora.services.migrator import ilp, planner
from dlora.services.migrator.main import Migrator
from dlora.services.migrator.settings import MigratorSettings
from dlora.services.migrator.trigger import TriggerBounds
from dlora.services.servers import Server
from tests.unit.planner_cases import whole_core


def _stats(name: str, loads: list[RequestLoad], held: tuple[str, ...] = (), **more: object) -> WorkerStats:
    return WorkerStats(
        worker=name,
        running=len(loads),
        waiting=0,
        free_blocks=1000,
        total_blocks=1000,
        block_size=16,
        max_loras=2,
        seconds_per_token=0.01,
        prefill_seconds_per_token=0.0001,
        requests=loads,
        adapters=[AdapterResidency(name=a, slot=None, merged=False) for a in held],
        unlisted_by_version={},
        **more,  # type: ignore[arg-type]
    )


async def _plans(nats_server: Server, redis: Redis, stats: list[WorkerStats]) -> list[MovePlan]:
    """The plans a leading migrator publishes on one look at ``stats``."""
    nc = await nats.connect(nats_server.url)
    plans: list[MovePlan] = []

    async def got(plan: MovePlan) -> None:
        plans.append(plan)

    sub = await bus.subscribe(nc, subjects.MOVES, MovePlan, got)
    try:
        trigger = TriggerBounds(patience=1, cooldown_s=0, min_gain_s=0.0)
        m = Migrator(MigratorSettings(nats_url=nats_server.url, trigger=trigger), nc, StateStore(redis))
        for st in stats:
            m.stats[st.worker] = (st, time.monotonic())
        await m.tick()
        await bus.flush(nc)
        async with asyncio.timeout(60):  # (1 s of looks: one plan not yet back on a loaded machine)
            while len(plans) < m.plans:
                await asyncio.sleep(0.02)
        assert len(plans) == m.plans
        return plans
    finally:
        await bus.unsubscribe([sub])
        await nc.drain()


def _busy(name: str, adapter: str | None, n: int = 12) -> list[RequestLoad]:
    return [
        RequestLoad(request_id=f"{name}-{i}", adapter=adapter, context_tokens=8, remaining_tokens=200) for i in range(n)
    ]


async def test_a_solver_that_fails_still_balances(
    nats_server: Server, redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CBC exiting in error (killed for memory, its files unwritable): the look logged a failure and
    published nothing, cool-down after cool-down, where the greedy plan was ready."""
    monkeypatch.setattr(ilp, "cbc_path", lambda: "/bin/false")
    whole_core(monkeypatch)
    plans = await _plans(nats_server, redis, [_stats("w0", _busy("w0", None)), _stats("w1", [])])
    assert len(plans) == 1 and plans[0].moves and {m.to_worker for m in plans[0].moves} == {"w1"}
    assert (plans[0].method, plans[0].ilp_fallback) == ("greedy", "ilp-failed")


@pytest.mark.parametrize("says", [True, False])
async def test_no_plan_is_made_from_stats_their_worker_would_find_too_old(
    nats_server: Server, redis: Redis, says: bool
) -> None:
    """w0 sends its stats every 2 s and one was lost: its last gap was 4 s. Taking that gap for its
    interval, the migrator planned from its stats 6.5 s old, a plan that reached w0 7.5 s after them,
    past the 7 s (``PLAN_MAX_AGE_S`` past its interval) after which w0 drops it: its moves were lost
    and then held moved for ``settle_s`` (left by the last session's review). w0 now says its
    interval (``says``) and is left out; an older worker that does not is judged by its gap."""
    nc = await nats.connect(nats_server.url)
    try:
        trigger = TriggerBounds(patience=1, cooldown_s=0, min_gain_s=0.0)
        settings = MigratorSettings(nats_url=nats_server.url, trigger=trigger, heartbeat_ttl_s=30.0)
        m = Migrator(settings, nc, StateStore(redis))  # (under 30 s, silent 6.5 s is not yet quiet)
        interval = {"stats_interval_s": 2.0} if says else {}
        now = time.monotonic()
        m.stats = {
            "w0": (_stats("w0", _busy("w0", None), **interval), now - 6.5),
            "w1": (_stats("w1", [], **interval), now),
        }
        m.gaps = {"w0": 4.0, "w1": 2.0}
        assert m.s.solve_time_s == 1.0
        await m.tick()
        assert m.leader and m.plans == (0 if says else 1)
    finally:
        await nc.drain()


@pytest.mark.parametrize("loaded", [False, True])
@pytest.mark.parametrize("counted", [True, False])
async def test_requests_a_worker_counts_but_does_not_list_keep_a_third_adapter_off_it(
    nats_server: Server, redis: Redis, monkeypatch: pytest.MonkeyPatch, counted: bool, loaded: bool
) -> None:
    """w1 lists one request of a@v1 and counts five of b@v2 past its list (``unlisted_by_version``):
    its two slots are taken, and w0's requests of c may not go there to wait for one. Listed alone,
    it looked to have one free and they went (as they do where nothing is counted past its list).
    By either plan: on a machine too loaded for CBC (``loaded``) the greedy one goes, which also
    sends w1's own request to w0 (asserted on, every move's destination failed at load 21)."""
    if loaded:
        monkeypatch.setattr(planner, "solve", lambda *a: IlpFallback.BUILD_TIMEOUT)
    short = [RequestLoad(request_id="w1-0", adapter="a", context_tokens=8, remaining_tokens=10, version="v1")]
    past = {"unlisted_requests": 5, "unlisted_remaining_tokens": 50, "unlisted_by_adapter": {"b": (0, 5)}}
    w1 = _stats("w1", short, ("a", "b", "c"), **(past if counted else {}))
    if counted:
        w1 = msgspec.structs.replace(w1, unlisted_by_version={"b@v2": (0, 5)})
    plans = await _plans(nats_server, redis, [_stats("w0", _busy("w0", "c"), ("c",)), w1])
    if counted:
        assert plans == []
    else:
        assert len(plans) == 1 and {m.to_worker for m in plans[0].moves if m.adapter == "c"} == {"w1"}


@contextlib.asynccontextmanager
async def _two_migrators(nats_server: Server, redis: Redis) -> AsyncIterator[tuple[StateStore, Migrator, Migrator]]:
    """Two migrators on one config (the shipped one names each "migrator-0"), not yet looking."""
    store = StateStore(redis)
    nc = await nats.connect(nats_server.url)
    try:
        same = MigratorSettings(nats_url=nats_server.url, lease_s=5.0)
        yield store, Migrator(same, nc, store), Migrator(same, nc, store)
    finally:
        await nc.drain()


async def test_two_migrators_of_one_id_elect_one_leader(nats_server: Server, redis: Redis) -> None:
    """The shipped config names every migrator "migrator-0": two started on it both held the
    lease as theirs (renewed under one name), both led and published plans from the same stats.
    The log says who leads, and when that moves (a standby took over from a killed one unsaid)."""
    async with _two_migrators(nats_server, redis) as (store, a, b):
        with structlog.testing.capture_logs() as logs:
            for _ in range(3):
                await a.tick()
                await b.tick()
                assert a.leader and not b.leader
            await store.release_lease("migrator", a.holder)  # a's lease lapsed (its process killed)
            await b.tick()
            await a.tick()
        said = [(e["migrator"], e["event"].split(":")[0][9:]) for e in logs if e["event"].startswith("migrator ")]
        assert said == [
            (a.holder, "leads"),
            (b.holder, "standing by"),
            (b.holder, "leads"),
            (a.holder, "lost the lease"),
        ]


async def test_a_leader_that_takes_the_lease_back_says_so(nats_server: Server, redis: Redis) -> None:
    """A leader paused past its lease (SIGSTOP, a partition): a standby took over and said so, then
    died, and the first one took the lease back in a new epoch unsaid, as it had led before: the
    journal's last word was that the dead one led."""
    async with _two_migrators(nats_server, redis) as (store, a, b):
        with structlog.testing.capture_logs() as logs:
            await a.tick()
            await store.release_lease("migrator", a.holder)  # a paused past its lease
            await b.tick()
            await store.release_lease("migrator", b.holder)  # b killed
            await a.tick()
        said = [(e["migrator"], e["epoch"]) for e in logs if e["event"].startswith("migrator leads")]
        assert [m for m, _ in said] == [a.holder, b.holder, a.holder]
        assert said[0][1] < said[1][1] < said[2][1] == a.epoch  # (epochs grow at each takeover)
