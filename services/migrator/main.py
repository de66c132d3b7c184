"""The migrator service: one leader (a lease in Redis) watches worker stats and, when load drifts
out of balance, publishes a co-migration plan; standbys wait to take the lease over."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import msgspec
from nats.aio.client import Client as NATS

from dlora.common import bus, log, subjects
from dlora.common.bus import connections, unless_stopped
from dlora.common.exporter import metrics_endpoint
from dlora.common.messages import WorkerStats
from dlora.common.reads import read_sizes
from dlora.common.state import StateStore
from dlora.services.migrator.looks import Looks, cluster_snapshot, planner_settings, unheard
from dlora.services.migrator.metrics import MigratorMetrics
from dlora.services.migrator.pace import RoundTrips
from dlora.services.migrator.planner import plan
from dlora.services.migrator.settings import MigratorSettings
from dlora.services.notify import notifier

logger = log.get("migrator")


class Migrator:
    def __init__(self, settings: MigratorSettings, nc: NATS, store: StateStore) -> None:
        self.s, self.nc, self.store = settings, nc, store
        self.stats: dict[str, tuple[WorkerStats, float]] = {}
        self.gaps: dict[str, float] = {}  # seconds between each worker's last two stats (``quiet``)
        self.leader = False
        self.asking = False  # the lease asked for, the answer not yet here
        self.epoch = 0  # the lease's, while leader
        self.plans = 0
        self.looks = Looks(settings.trigger)  # the trigger's patience and cool-down
        self.trips = RoundTrips()  # CBC's round trips at past plans: what the next keep back for it
        self.metrics = MigratorMetrics()
        # The lease's holder: the id and this process's own token. By id alone, two migrators on the
        # shipped config (migrator_id "migrator-0" everywhere) each renewed the one lease as theirs,
        # and both led and published plans from the same stats.
        self.holder = f"{settings.migrator_id}/{uuid.uuid4().hex[:8]}"
        self.tidied = False  # what older versions left unbounded in Redis, bounded once a lead
        self.said: int | None = None  # the lease's epoch the log last said it leads in (0: standing by)

    async def _on_stats(self, st: WorkerStats) -> None:
        now = time.monotonic()
        if (before := self.stats.get(st.worker)) is not None:
            self.gaps[st.worker] = now - before[1]
        self.stats[st.worker] = (st, now)
        if st.refused_moves and (freed := self.looks.refused(st.refused_moves)):
            logger.info(
                "moves refused by their source; its requests free for the next plan",
                worker=st.worker,
                requests=len(freed),
            )

    def quiet(self, now: float) -> set[str]:
        """Workers not yet forgotten whose silence leaves them out of a plan made now (``unheard``)."""
        heard = {w: at for w, (_, at) in self.stats.items()}
        said = {w: st.stats_interval_s for w, (st, _) in self.stats.items() if st.stats_interval_s > 0}
        return unheard(heard, self.gaps, now, self.s.heartbeat_ttl_s, self.s.solve_time_s, said)

    async def tick(self) -> None:
        """One look: keep or take the lease, and as leader plan if the cluster is out of balance."""
        now = time.monotonic()  # workers silent past the TTL forgotten (pod names that never come back)
        self.stats = {w: (st, at) for w, (st, at) in self.stats.items() if now - at <= self.s.heartbeat_ttl_s}
        self.gaps = {w: g for w, g in self.gaps.items() if w in self.stats}
        self.asking = True  # (a stop may break the ask off after Redis gave the lease: released too)
        self.epoch = await self.store.hold_lease("migrator", self.holder, self.s.lease_s)
        self.leader, self.asking = self.epoch > 0, False
        self.metrics.leads(self.leader)
        if self.epoch != self.said:  # the journal says who plans, and when that moved
            self._say_lead()
        if not self.leader:
            self.tidied = False
            return
        if not self.tidied:  # (the leader's chore: once each time it takes the lease)
            if bounded := await self.store.bound_policies():
                logger.info("policy checkpoints an older version left without expiry bounded", keys=bounded)
            self.tidied = True
        # A draining worker hands its requests back itself; moving them meanwhile would race that.
        quiet = self.quiet(now)
        live = [st for st, _ in self.stats.values() if not st.draining and st.worker not in quiet]
        file_bytes = read_sizes(await self.store.list_adapters())
        snap = cluster_snapshot(live, file_bytes, self.s)
        reason = self.looks.look(snap, now)
        if reason is None:
            return
        settings = planner_settings(self.s)
        try:
            p = await asyncio.to_thread(plan, self.looks.settled(snap, now), settings, self.trips)
        except Exception:  # one snapshot the planner cannot take must not end the migrator
            logger.exception("planning failed; the cluster is looked at again after the cool-down")
            self.looks.solved(now)
            return
        p = msgspec.structs.replace(p, trigger=reason)
        self.looks.solved(now)
        published = bool(p.moves) and await self._still_leader()
        if published:
            marks = {st.worker for st in live if st.marks_taken}  # recorded with each move (the poison guard)
            moves = [msgspec.structs.replace(m, to_marks_taken=m.to_worker in marks) for m in p.moves]
            sent = {st.worker: st.sent for st in live}  # (each worker judges the plan's age by its own clock)
            p = msgspec.structs.replace(p, epoch=self.epoch, created=time.time(), stats_sent=sent, moves=moves)
            await bus.publish(self.nc, subjects.MOVES, p)
            self.looks.moved(p.plan_id, (m.request_id for m in p.moves), now)
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

    def _say_lead(self) -> None:
        """One line when this migrator takes the lease (again: in a new epoch, another led meanwhile),
        loses it, or first finds another holding it: a standby that took over from a dead leader,
        or two that each think they plan, were not in the logs (only ``dlora_migrator_leader``)."""
        if self.leader:
            logger.info("migrator leads: it plans the moves", migrator=self.holder, epoch=self.epoch)
        elif self.said:
            logger.warning("migrator lost the lease: standing by", migrator=self.holder)
        else:
            logger.info("migrator standing by: another leads", migrator=self.holder)
        self.said = self.epoch

    async def _still_leader(self) -> bool:
        """The solve took a while: is the lease still ours, in the same epoch?"""
        return await self.store.hold_lease("migrator", self.holder, self.s.lease_s) == self.epoch

    async def run(self, stop: asyncio.Event) -> None:
        sub = await bus.subscribe(self.nc, subjects.STATS_ALL, WorkerStats, self._on_stats)
        logger.info("migrator ready", migrator=self.holder)
        ready = asyncio.create_task(
            notifier.ready_when(self.store.r.ping, f"migrator {self.s.migrator_id} watching load")
        )
        try:
            redis = bus.Outage("redis (migrator)")
            while not stop.is_set():
                try:
                    await unless_stopped(self.tick(), stop)
                    redis.succeeded()
                except bus.STATE_OUTAGE as e:  # Redis restarting: look again next interval
                    redis.failed(e)
                with contextlib.suppress(TimeoutError):  # asyncio.timeout: see the gateway's _relay
                    async with asyncio.timeout(self.s.interval_s):
                        await stop.wait()
        finally:
            ready.cancel()
            await bus.unsubscribe([sub])
            if self.leader or self.asking:  # (bounded: a hung Redis held it 20 s; unreleased, the lease expires)
                with contextlib.suppress(*bus.STATE_OUTAGE):
                    async with bus.StateBound()():
                        await self.store.release_lease("migrator", self.holder)


async def serve(s: MigratorSettings, stop: asyncio.Event) -> None:
    async with connections(s, stop) as (nc, store):
        migrator = Migrator(s, nc, store)
        async with metrics_endpoint(s, migrator.metrics.registry):
            await migrator.run(stop)
    log.stopped("migrator", led=migrator.leader)  # (it released the lease at the stop, Redis willing)
