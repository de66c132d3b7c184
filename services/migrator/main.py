"""The migrator service: one leader (a lease in Redis) watches worker stats and, when load drifts
out of balance, publishes a co-migration plan; standbys wait to take the lease over."""

from __future__ import annotations

import asyncio
import contextlib
import time

import msgspec
from nats.aio.client import Client as NATS

from dlora.common import bus, log, subjects
from dlora.common.bus import connections
from dlora.common.exporter import metrics_endpoint
from dlora.common.messages import WorkerStats
from dlora.common.state import StateStore
from dlora.services.migrator.metrics import MigratorMetrics
from dlora.services.migrator.planner import PlannerSettings, plan
from dlora.services.migrator.settings import MigratorSettings
from dlora.services.migrator.trigger import snapshot_from_stats, triggered
from dlora.services.notify import notifier

logger = log.get("migrator")


class Migrator:
    def __init__(self, settings: MigratorSettings, nc: NATS, store: StateStore) -> None:
        self.s, self.nc, self.store = settings, nc, store
        self.stats: dict[str, tuple[WorkerStats, float]] = {}
        self.leader = False
        self.epoch = 0  # the lease's, while leader
        self.plans = 0
        self._imbalanced_looks = 0
        self._last_solve = float("-inf")
        self.metrics = MigratorMetrics()

    async def _on_stats(self, st: WorkerStats) -> None:
        self.stats[st.worker] = (st, time.monotonic())

    async def tick(self) -> None:
        """One look: keep or take the lease, and as leader plan if the cluster is out of balance."""
        self.epoch = await self.store.hold_lease("migrator", self.s.migrator_id, self.s.lease_s)
        self.leader = self.epoch > 0
        self.metrics.leads(self.leader)
        if not self.leader:
            return
        now = time.monotonic()
        # A draining worker hands its requests back itself; moving them meanwhile would race that.
        live = [st for st, at in self.stats.values() if now - at <= self.s.heartbeat_ttl_s and not st.draining]
        ranks = {e.name: e.rank for e in await self.store.list_adapters()}
        snap = snapshot_from_stats(
            live,
            ranks,
            recompute_seconds_per_token=_cost(live, "prefill", self.s.recompute_seconds_per_token, _PRIOR_RECOMPUTE_S),
            kv_transfer_seconds_per_token=_cost(
                live, "kv_transfer", self.s.kv_transfer_seconds_per_token, _PRIOR_KV_TRANSFER_S
            ),
            adapter_load_seconds=self.s.adapter_load_seconds,
        )
        bounds = self.s.trigger
        reason = triggered(snap, bounds)
        if reason is None:
            self._imbalanced_looks = 0
            return
        self._imbalanced_looks += 1
        if self._imbalanced_looks < bounds.patience or now - self._last_solve < bounds.cooldown_s:
            return
        # A plan must bring at least the gain that makes an imbalance worth planning for.
        settings = PlannerSettings(
            self.s.solve_time_s,
            min_gain_s=bounds.min_gain_s,
            kv_pressure=bounds.kv_pressure if bounds.kv_pressure is not None else 1.0,
        )
        p = await asyncio.to_thread(plan, snap, settings)
        p = msgspec.structs.replace(p, trigger=reason)
        # A solve, with moves or not, starts the cool-down: an imbalance no plan pays for (KV
        # pressure on a loaded cluster is common) would otherwise cost a full solve every look.
        self._last_solve = now
        published = bool(p.moves) and await self._still_leader()
        if published:
            p = msgspec.structs.replace(p, epoch=self.epoch, created=time.time())
            await bus.publish(self.nc, subjects.MOVES, p)
            self.plans += 1
            # The moved requests are counted where they go from the next stats on; until then
            # this view is stale, so forget it rather than plan the same moves twice.
            self.stats.clear()
        logger.info(
            "plan",
            plan=p.plan_id,
            trigger=reason,
            method=p.method,
            moves=len(p.moves),
            seconds=round(p.solve_seconds, 3),
            makespan_before=round(p.makespan_before_s, 2),
            makespan_after=round(p.makespan_after_s, 2),
        )
        self.metrics.planned(p, published)

    async def _still_leader(self) -> bool:
        """The solve took a while: is the lease still ours, in the same epoch?"""
        return await self.store.hold_lease("migrator", self.s.migrator_id, self.s.lease_s) == self.epoch

    async def run(self, stop: asyncio.Event) -> None:
        sub = await bus.subscribe(self.nc, subjects.STATS_ALL, WorkerStats, self._on_stats)
        logger.info("migrator ready", migrator=self.s.migrator_id)
        notifier.ready(f"migrator {self.s.migrator_id} watching load")
        try:
            redis = bus.Outage("redis (migrator)")
            while not stop.is_set():
                try:
                    await self.tick()
                    redis.succeeded()
                except bus.STATE_OUTAGE as e:  # Redis restarting: look again next interval
                    redis.failed(e)
                with contextlib.suppress(TimeoutError):  # asyncio.timeout: see the gateway's _relay
                    async with asyncio.timeout(self.s.interval_s):
                        await stop.wait()
        finally:
            await sub.unsubscribe()
            if self.leader:
                with contextlib.suppress(*bus.STATE_OUTAGE):
                    await self.store.release_lease("migrator", self.s.migrator_id)


async def serve(s: MigratorSettings, stop: asyncio.Event) -> None:
    async with connections(s) as (nc, store):
        migrator = Migrator(s, nc, store)
        async with metrics_endpoint(s, migrator.metrics.registry):
            await migrator.run(stop)


# Move costs per token before any worker has measured them (a CPU-sized guess).
_PRIOR_RECOMPUTE_S = 0.0005
_PRIOR_KV_TRANSFER_S = 0.001


def _cost(stats: list[WorkerStats], measure: str, setting: float | None, prior: float) -> float:
    """A move cost per token: the setting where one is given, else what the workers measured
    (``{measure}_seconds_per_token`` of their stats, weighed by ``{measure}_tokens``), else the prior."""
    if setting is not None:
        return setting
    # A figure without its count (a worker older than the count) weighs as one token.
    seen = [
        (v, max(1, getattr(st, f"{measure}_tokens")))
        for st in stats
        if (v := getattr(st, f"{measure}_seconds_per_token")) > 0
    ]
    tokens = sum(n for _, n in seen)
    return sum(v * n for v, n in seen) / tokens if tokens else prior
