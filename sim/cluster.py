"""A simulated cluster: replicas (``SimEngine``) behind the dispatcher's own choice
(``DispatchState``), driven by a discrete-event loop on simulated time.

Each replica reports the stats a worker publishes (``worker_stats``, the worker's own snapshot)
every ``stats_interval_s``, and the dispatcher chooses from the latest it heard, as the services
do over NATS; a request goes to its replica at once and joins that replica's next step (its
replica is chosen at the stats before its arrival: the dispatcher's state changes only with
stats and its own choices, so the choice is the same). A replica whose last step repeats (every
request decoding, none waiting) runs the following steps up to the next thing that could change
them at once (``SimEngine.fast_forward``; ``fast_forward=False`` steps one by one). With
``migrator`` settings the migrator's own decisions (``looks``) and planner run every
``interval_s`` on the stats it heard, and a plan's moves go ahead: the request leaves its replica
and joins the destination with the tokens it produced, after its KV's transfer time when the plan
ships it (it then decodes on) or at once to be recomputed there. Adapters live on each replica's
disk, and in its host memory from the start where ``max_cpu_loras`` holds them all; else a replica
reads one in when a request of it joins (beside its steps, one read at a time: only that
adapter's requests wait; once host memory has room, as a worker's ``reads.has_room``), and the
dispatcher's placement
(``placement.decay`` and ``placement_of`` every ``placement_interval_s``, on the stats heard and
the requests dispatched) has each replica prefetch its adapters at that barrier. With every
adapter held the placement changes no choice (dispatch prices a load only where a worker lacks
the adapter), so it is not computed.

Replicas meet only there, at the stats and the looks (the barriers): between two, each runs on its
own, so the replicas are split into ``jobs`` shards (``shard.py``) that run each stretch in
parallel, each in a process of its own (``pool.py``); the results do not depend on the split.
"""

from __future__ import annotations

import functools
import math
import statistics
from dataclasses import replace

import msgspec

from dlora.common.messages import MovePlan, PlanMethod, WorkerStats
from dlora.services.dispatcher.choose import DEFAULT_COSTS, DispatchCosts, DispatchMode
from dlora.services.dispatcher.placement import decay, placement_of
from dlora.services.dispatcher.settings import DispatcherSettings
from dlora.services.dispatcher.state import DispatchState
from dlora.services.migrator.looks import Looks, cluster_snapshot, planner_settings
from dlora.services.migrator.planner import plan
from dlora.services.migrator.settings import MigratorSettings
from dlora.services.worker.engine.config import EngineConfig
from dlora.sim.cost import CostProfile, adapter_file_bytes
from dlora.sim.pool import ShardPool
from dlora.sim.shard import Moving, ReplicaSummary, Served, Shard, SimRequest

__all__ = ["Cluster", "ReplicaSummary", "Served", "SimRequest", "summary"]


# The dispatcher's (``Common.heartbeat_ttl_s``'s default): a replica whose stats are older is lost.
HEARTBEAT_TTL_S = 5.0
# The dispatcher's (``DispatcherSettings.placement_interval_s``'s default).
PLACEMENT_INTERVAL_S: float = next(
    f.default for f in msgspec.structs.fields(DispatcherSettings) if f.name == "placement_interval_s"
)


class Cluster:
    """``replicas`` replicas of ``cost``'s engine with the adapters (name -> rank) on disk, in each
    one's host memory from the start where ``config.max_cpu_loras`` holds them all (256 without a
    config), dispatched by ``mode``; run in ``jobs`` processes (1: this one)."""

    def __init__(
        self,
        cost: CostProfile,
        replicas: int,
        adapters: dict[str, int],
        mode: DispatchMode = DispatchMode.PROACTIVE,
        config: EngineConfig | None = None,
        dispatch_costs: DispatchCosts = DEFAULT_COSTS,
        stats_interval_s: float = 0.5,
        heartbeat_ttl_s: float = HEARTBEAT_TTL_S,
        migrator: MigratorSettings | None = None,
        fast_forward: bool = True,
        planner_nodes: int = 20,
        jobs: int = 1,
        placement_interval_s: float = PLACEMENT_INTERVAL_S,
    ) -> None:
        self.names = [f"r{i:03d}" for i in range(replicas)]
        self._order = {name: i for i, name in enumerate(self.names)}
        jobs = max(1, min(jobs, replicas))
        groups = [self.names[j::jobs] for j in range(jobs)]
        self._shard_of = {name: j for j, group in enumerate(groups) for name in group}
        self._pool = ShardPool(
            [functools.partial(Shard, cost, group, adapters, config, fast_forward) for group in groups], jobs
        )
        self.cost = cost
        self.state = DispatchState(heartbeat_ttl_s, mode, dispatch_costs)
        self.ranks = dict(adapters)
        # (the dispatcher's and the migrator's, from the registry)
        self.file_bytes = {a: adapter_file_bytes(rank) for a, rank in adapters.items()}
        self.state.file_bytes = self.file_bytes
        self.migrator = migrator
        self.looks = Looks(migrator.trigger) if migrator is not None else None
        self.heard: dict[str, WorkerStats] = {}  # the migrator's view: stats since its last plan
        # The dispatcher's placement, where replicas cannot hold every adapter (see the module's doc)
        self.placing = len(adapters) > (config or EngineConfig()).max_cpu_loras
        self.placement_interval_s = placement_interval_s
        self.traffic: dict[str, float] = {}  # adapter -> requests dispatched, decayed (``decay``)
        self._prefetch: list[tuple[float, dict[str, list[str]]] | None] = [None for _ in groups]
        self.plans: list[MovePlan] = []  # every solve that moved something
        # The planner is bounded by CBC nodes, not by time: the same run on any machine. Few: it
        # starts from the greedy plan, and 20 nodes gave the plans 1,000 did (bench snapshots, 32 x
        # 128 x 2,000 and 128 x 1,024 x 10,000) at a sixth of the wall time.
        self.planner_nodes = planner_nodes
        self.solve_seconds: list[float] = []  # wall time of every solve (this machine's)
        self.stats_interval_s = stats_interval_s
        self.replica_summaries: list[ReplicaSummary] = []  # each replica's, in order, once a run is over
        self._where: dict[str, str] = {}  # request id -> the replica it was dispatched or moved to
        self._joins: list[list[Served]] = [[] for _ in groups]  # per shard: for the next stretch
        self._moved: list[list[Moving]] = [[] for _ in groups]
        self._arrivals: list[SimRequest] = []  # not yet dispatched, the next one last

    def run(self, requests: list[SimRequest], until: float | None = None) -> list[Served]:
        """Serve ``requests`` (by arrival) to the end, or until simulated time ``until`` (what is
        unfinished then has no ``finish_s``: a backlog that would take hours to drain need not be
        simulated); what became of each, in arrival order. Once: the shards' processes end with it.
        Raises RuntimeError when one cannot be placed (no replica holds it), or run again."""
        if self.replica_summaries or not len(self._pool):
            raise RuntimeError("a Cluster runs once; make another")
        self._arrivals = sorted(requests, key=lambda r: r.arrival_s)[::-1]  # next last
        pending = len(requests)
        t, next_stats, next_place = 0.0, 0.0, self.placement_interval_s
        next_look = self.migrator.interval_s if self.migrator is not None else math.inf
        try:
            stats = self._stretch(0.0, report=True)[1]  # each replica's before anything
            while pending and (until is None or t < until):
                # A barrier: the look first where both fall at once (it was due first, as in the services)
                looked = t == next_look and self._look(t)
                if t == next_look:
                    next_look = t + self.migrator.interval_s  # type: ignore[union-attr]
                if t == next_stats:
                    if looked:  # what the moves left
                        stats = [st for shard in self._pool.call("stats", [()] * len(self._pool)) for st in shard]
                    self._report(stats, t)
                    next_stats = t + self.stats_interval_s
                    if self.placing and t >= next_place:
                        self._place(t)
                        next_place = t + self.placement_interval_s
                    self._dispatch_until(next_stats)
                end = min(next_stats, next_look, math.inf if until is None else until)
                finished, stats = self._stretch(end, report=end == next_stats)
                pending -= finished
                t = end
            served, summaries = zip(*self._pool.call("results", [()] * len(self._pool)), strict=True)
        finally:
            self._pool.close()
        by_id = {s.request.request_id: s for part in served for s in part}
        by_id |= {m.served.request.request_id: m.served for part in self._moved for m in part}  # still on the way
        self.replica_summaries = sorted((r for part in summaries for r in part), key=lambda r: self._order[r.name])
        return [by_id.get(r.request_id) or Served(r, "") for r in requests]

    def _stretch(self, end: float, report: bool) -> tuple[int, list[WorkerStats]]:
        """Every shard runs to ``end`` with what was dispatched and moved to it (and the placement's
        prefetches); the requests finished, and (``report``) every replica's stats at ``end``."""
        args = [(j, m, end, report, p) for j, m, p in zip(self._joins, self._moved, self._prefetch)]
        self._joins, self._moved, self._prefetch = [[] for _ in args], [[] for _ in args], [None for _ in args]
        answers = self._pool.call("advance", args)
        return sum(n for n, _ in answers), [st for _, part in answers for st in part]

    def _report(self, stats: list[WorkerStats], now: float) -> None:
        for st in sorted(stats, key=lambda st: self._order[st.worker]):  # in replica order, however split
            self.state.heard(st, now)
            self.heard[st.worker] = st

    def _place(self, now: float) -> None:
        """The dispatcher's placement from the stats heard (``placement_of``): each replica
        prefetches its adapters from ``now`` on."""
        self.traffic = decay(self.traffic)
        placement = placement_of(self.traffic, self.state.live(now), self.ranks)
        if placement is None:
            return
        self.state.placement = placement
        parts: list[dict[str, list[str]]] = [{} for _ in self._prefetch]
        for name, adapters in placement.items():
            parts[self._shard_of[name]][name] = adapters
        self._prefetch = [(now, part) if part else None for part in parts]

    def _look(self, now: float) -> bool:
        """The migrator's look: plan if its own decisions say so, and move what the plan moves;
        whether something moved."""
        assert self.migrator is not None and self.looks is not None
        loads = self.state.loads  # the dispatcher's sums of the same messages: each one's adapters listed once
        held = {
            w: load.adapters for w, load in loads.items() if (st := self.heard.get(w)) is not None and load.stats is st
        }
        snap = cluster_snapshot(list(self.heard.values()), self.file_bytes, self.migrator, held)
        if self.looks.look(snap, now) is None:
            return False
        p = plan(self.looks.settled(snap, now), replace(planner_settings(self.migrator), max_nodes=self.planner_nodes))
        self.looks.solved(now)
        if p.method is not PlanMethod.NONE:  # nothing to plan (one worker, no request) is no solve
            self.solve_seconds.append(p.solve_seconds)
        if not p.moves:
            return False
        self.plans.append(p)
        self.looks.moved(p.plan_id, (m.request_id for m in p.moves), now)
        self.heard.clear()  # as the migrator does: its view is stale until the moved requests report
        moves: list[list[tuple[str, str, bool]]] = [[] for _ in self._joins]
        for m in p.moves:
            moves[self._shard_of[self._where[m.request_id]]].append((m.request_id, m.to_worker, m.ship_kv))
        kv_s = self.cost.kv_transfer_s_per_token
        taken = [m for part in self._pool.call("take", [(part, now, kv_s) for part in moves]) for m in part]
        order = {m.request_id: i for i, m in enumerate(p.moves)}
        # In the plan's order, however split: two arriving at once join their replica in it
        for moving in sorted(taken, key=lambda m: order[m.served.request.request_id]):
            self._moved[self._shard_of[moving.to]].append(moving)
            self._where[moving.served.request.request_id] = moving.to
        return True

    def _dispatch_until(self, end: float) -> None:
        """Choose the replica of every request arriving before ``end`` (the next stats): the
        dispatcher's state changes only with stats and its own choices, so each is what it would
        choose at the request's arrival; the request joins its replica then. Known ahead, the
        joins bound how far each replica may run on alone (``Shard._step``)."""
        while self._arrivals and self._arrivals[-1].arrival_s < end:
            req = self._arrivals.pop()
            tokens = self.state.price(req.max_tokens or req.output_len)  # as the dispatcher prices a request
            name = self.state.choose(self.state.live(req.arrival_s), req.adapter, tokens=tokens)
            if name is None:
                raise RuntimeError(f"no live replica for {req.request_id}")
            self._where[req.request_id] = name
            self._joins[self._shard_of[name]].append(Served(req, name))
            if req.adapter is not None:  # counted as the dispatcher counts them (placement's traffic)
                self.traffic[req.adapter] = self.traffic.get(req.adapter, 0.0) + 1.0


def p90(values: list[float]) -> float:
    """The 90th percentile of ``values`` (at least one), interpolated as numpy's percentile is, as
    the measured runs' (loadgen/metrics.py): the rank taken was one high (the maximum at ten
    requests: a helper's finding), and ``bench simulate --experiment validate`` compares the two
    within 10 %."""
    return statistics.quantiles(values, n=10, method="inclusive")[8] if len(values) > 1 else values[0]


def summary(served: list[Served], until: float | None = None) -> dict[str, float]:
    """Throughput (output tokens per second over the run) and normalized latency, mean and P90.
    A run cut at ``until`` counts the tokens made by then, and each request that arrived by then
    unfinished at a lower bound of its normalized latency: its wait so far over every token it
    asked for (it ends later, with at most those), so an overloaded policy is not flattered by
    leaving out the requests it kept waiting. A request arriving after the cut is not counted.
    (Its wait over the tokens made so far, as this once read, is no bound: a request queued with
    none read its whole wait as seconds per token, 10-40x its real figure in a user's trial, and
    one arriving after the cut read negative.)"""
    done = [s for s in served if s.finish_s is not None]
    start = min(s.request.arrival_s for s in served)
    cut = until is not None and len(done) < len(served)
    end = until if cut else max(s.finish_s for s in done if s.finish_s is not None)
    assert end is not None
    late = [
        (end - s.request.arrival_s) / max(1, s.request.output_len, s.tokens)
        for s in served
        if s.finish_s is None and s.request.arrival_s < end
    ]
    norm = sorted([s.normalized_latency_s for s in done] + (late if cut else []))
    return {
        "completed": len(done),
        "throughput_tok_s": sum(s.tokens for s in (served if cut else done)) / max(end - start, 1e-9),
        "norm_latency_mean_s": statistics.fmean(norm),
        "norm_latency_p90_s": p90(norm),
    }
