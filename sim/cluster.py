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
ships it (it then decodes on) or at once to be recomputed there. Not yet here (issue 21, later):
the placement's prefetches and the disk tier.
"""

from __future__ import annotations

import heapq
import statistics
from dataclasses import dataclass, field, replace

from dlora.common.messages import MovePlan, PlanMethod, WorkerStats
from dlora.services.dispatcher.choose import DEFAULT_COSTS, DispatchCosts, DispatchMode
from dlora.services.dispatcher.state import DispatchState
from dlora.services.migrator.looks import Looks, cluster_snapshot, planner_settings
from dlora.services.migrator.planner import plan
from dlora.services.migrator.settings import MigratorSettings
from dlora.services.worker.engine.config import EngineConfig
from dlora.services.worker.lengths import OutputLengths
from dlora.services.worker.snapshot import worker_stats
from dlora.sim.cost import CostProfile
from dlora.sim.replica import SimEngine


@dataclass(frozen=True)
class SimRequest:
    request_id: str
    arrival_s: float
    adapter: str | None
    prompt_token_ids: list[int]
    output_len: int
    max_tokens: int = 0  # 0: the output length


@dataclass
class Served:
    """What became of one request."""

    request: SimRequest
    replica: str
    first_token_s: float | None = None
    finish_s: float | None = None
    tokens: int = 0
    finish_reason: str | None = None
    moves: int = 0  # times the migrator moved it

    @property
    def normalized_latency_s(self) -> float:
        """End-to-end latency over output tokens (the dLoRA paper's metric), seconds per token."""
        assert self.finish_s is not None
        return (self.finish_s - self.request.arrival_s) / max(1, self.tokens)


@dataclass(frozen=True)
class _Moving:
    """A request on its way to another replica, with the tokens it produced."""

    request_id: str
    to: str
    produced: list[int]
    ship_kv: bool


@dataclass
class Replica:
    name: str
    engine: SimEngine
    lengths: OutputLengths = field(default_factory=OutputLengths)
    stepping: bool = False  # a step event is pending
    incoming: list[float] = field(default_factory=list)  # heap: when requests dispatched or moved here join


class Cluster:
    """``replicas`` replicas of ``cost``'s engine, every adapter (name -> rank) in each one's host
    memory, dispatched by ``mode``."""

    def __init__(
        self,
        cost: CostProfile,
        replicas: int,
        adapters: dict[str, int],
        mode: DispatchMode = DispatchMode.PROACTIVE,
        config: EngineConfig | None = None,
        dispatch_costs: DispatchCosts = DEFAULT_COSTS,
        stats_interval_s: float = 0.5,
        heartbeat_ttl_s: float = 5.0,
        migrator: MigratorSettings | None = None,
        fast_forward: bool = True,
        planner_nodes: int = 20,
    ) -> None:
        self.replicas = [Replica(f"r{i:03d}", SimEngine(cost, config)) for i in range(replicas)]
        self._by_name = {r.name: r for r in self.replicas}
        for r in self.replicas:
            for name, rank in adapters.items():
                r.engine.add_adapter(name, rank)
        self.state = DispatchState(heartbeat_ttl_s, mode, dispatch_costs)
        self.ranks = dict(adapters)
        self.migrator = migrator
        self.looks = Looks(migrator.trigger) if migrator is not None else None
        self.heard: dict[str, WorkerStats] = {}  # the migrator's view: stats since its last plan
        self.plans: list[MovePlan] = []  # every solve that moved something
        # The planner is bounded by CBC nodes, not by time: the same run on any machine. Few: it
        # starts from the greedy plan, and 20 nodes gave the plans 1,000 did (bench snapshots, 32 x
        # 128 x 2,000 and 128 x 1,024 x 10,000) at a sixth of the wall time.
        self.planner_nodes = planner_nodes
        self.solve_seconds: list[float] = []  # wall time of every solve (this machine's)
        self.stats_interval_s = stats_interval_s
        self.fast_forward = fast_forward
        self.served: dict[str, Served] = {}
        self._events: list[tuple[float, int, str, object]] = []
        self._seq = 0
        self._arrivals: list[SimRequest] = []  # not yet dispatched, the next one last
        self._next_stats = self._next_look = 0.0

    def _push(self, at: float, kind: str, what: object) -> None:
        heapq.heappush(self._events, (at, self._seq, kind, what))
        self._seq += 1

    def run(self, requests: list[SimRequest], until: float | None = None) -> list[Served]:
        """Serve ``requests`` (by arrival) to the end, or until simulated time ``until`` (what is
        unfinished then has no ``finish_s``: a backlog that would take hours to drain need not be
        simulated); what became of each, in arrival order. Raises RuntimeError when one cannot be
        placed (no replica holds it)."""
        self._arrivals = sorted(requests, key=lambda r: r.arrival_s)[::-1]  # next last
        self._push(0.0, "stats", None)
        if self.migrator is not None:
            self._push(self.migrator.interval_s, "look", None)
        pending = len(requests)
        while self._events and pending and (until is None or self._events[0][0] <= until):
            now, _, kind, what = heapq.heappop(self._events)
            if kind == "stats":
                self._report(now)
                self._next_stats = now + self.stats_interval_s
                self._push(self._next_stats, "stats", None)
                self._dispatch_until(self._next_stats)
            elif kind == "join":
                assert isinstance(what, tuple)
                req, name = what
                self._join(req, name, now)
            elif kind == "look":
                self._look(now)
                self._next_look = now + self.migrator.interval_s  # type: ignore[union-attr]
                self._push(self._next_look, "look", None)
            elif kind == "moved":
                assert isinstance(what, _Moving)
                self._arrive_moved(what, now)
            else:
                assert isinstance(what, Replica)
                pending -= self._step(what, now)
        return [self.served.get(r.request_id) or Served(r, "") for r in requests]

    def _report(self, now: float) -> None:
        for r in self.replicas:
            st = worker_stats(r.name, r.engine, r.lengths)
            self.state.heard(st, now)
            self.heard[r.name] = st

    def _look(self, now: float) -> None:
        """The migrator's look: plan if its own decisions say so, and move what the plan moves."""
        assert self.migrator is not None and self.looks is not None
        snap = cluster_snapshot(list(self.heard.values()), self.ranks, self.migrator)
        if self.looks.look(snap, now) is None:
            return
        p = plan(snap, replace(planner_settings(self.migrator), max_nodes=self.planner_nodes))
        self.looks.solved(now)
        if p.method is not PlanMethod.NONE:  # nothing to plan (one worker, no request) is no solve
            self.solve_seconds.append(p.solve_seconds)
        if not p.moves:
            return
        self.plans.append(p)
        self.heard.clear()  # as the migrator does: its view is stale until the moved requests report
        for m in p.moves:
            self._move(m.request_id, m.to_worker, m.ship_kv, now)

    def _move(self, request_id: str, to: str, ship_kv: bool, now: float) -> None:
        served = self.served[request_id]
        source = self._replica(served.replica)
        seq = source.engine.seqs.get(request_id)
        if seq is None or to == source.name:
            return  # finished meanwhile
        produced, context = list(seq.output_ids), seq.total_len
        source.engine.abort(request_id)
        delay = source.engine.cost.kv_transfer_s_per_token * context if ship_kv else 0.0
        at = max(now, source.engine.now) + delay
        heapq.heappush(self._replica(to).incoming, at)
        self._push(at, "moved", _Moving(request_id, to, produced, ship_kv))

    def _arrive_moved(self, m: _Moving, now: float) -> None:
        served = self.served[m.request_id]
        req, replica = served.request, self._replica(m.to)
        replica.engine.add(
            m.request_id,
            req.prompt_token_ids,
            req.output_len,
            req.adapter,
            req.max_tokens or req.output_len,
            resumed=m.produced,
            shipped=m.ship_kv,
        )
        served.replica = m.to
        served.moves += 1
        heapq.heappop(replica.incoming)
        self._wake(replica, now)

    def _replica(self, name: str) -> Replica:
        return self._by_name[name]

    def _wake(self, replica: Replica, now: float) -> None:
        if not replica.stepping:
            replica.stepping = True
            self._push(max(now, replica.engine.now), "step", replica)

    def _dispatch_until(self, end: float) -> None:
        """Choose the replica of every request arriving before ``end`` (the next stats): the
        dispatcher's state changes only with stats and its own choices, so each is what it would
        choose at the request's arrival; the request joins its replica then. Known ahead, the
        joins bound how far each replica may run on alone (``_step``)."""
        while self._arrivals and self._arrivals[-1].arrival_s < end:
            req = self._arrivals.pop()
            name = self.state.choose(self.state.live(req.arrival_s), req.adapter)
            if name is None:
                raise RuntimeError(f"no live replica for {req.request_id}")
            self.served[req.request_id] = Served(req, name)
            heapq.heappush(self._replica(name).incoming, req.arrival_s)
            self._push(req.arrival_s, "join", (req, name))

    def _join(self, req: SimRequest, name: str, now: float) -> None:
        replica = self._replica(name)
        heapq.heappop(replica.incoming)
        replica.engine.add(
            req.request_id, req.prompt_token_ids, req.output_len, req.adapter, req.max_tokens or req.output_len
        )
        self._wake(replica, now)

    def _step(self, replica: Replica, now: float) -> int:
        """One step of ``replica`` starting at ``now``; how many requests it finished."""
        engine = replica.engine
        engine.now = max(engine.now, now)
        finished = 0
        for out in engine.step():
            s = self.served[out.request_id]
            if out.new_token_ids and s.first_token_s is None:
                s.first_token_s = engine.now
            s.tokens += len(out.new_token_ids)
            if out.finished:
                s.finish_s, s.finish_reason = engine.now, out.finish_reason
                if out.error is None:  # as the worker does: what the lengths estimate learns from
                    replica.lengths.observe(out.num_output_tokens, cut_off=out.finish_reason == "length")
                finished += 1
        replica.stepping = engine.has_unfinished()
        if replica.stepping:
            if self.fast_forward:
                # The steps that only repeat this one, up to the next thing that could change it: a
                # request joining, the stats the dispatcher and migrator read, the migrator's look.
                horizon = min([self._next_stats, *replica.incoming[:1], *([self._next_look] if self.migrator else [])])
                advanced, k = engine.fast_forward(horizon)
                for rid in advanced:
                    self.served[rid].tokens += k
            self._push(engine.now, "step", replica)
        return finished


def summary(served: list[Served], until: float | None = None) -> dict[str, float]:
    """Throughput (output tokens per second over the run) and normalized latency, mean and P90.
    A run cut at ``until`` counts the tokens made by then, and each unfinished request at its
    latency so far (a lower bound: an overloaded policy is not flattered by leaving out the
    requests it kept waiting)."""
    done = [s for s in served if s.finish_s is not None]
    start = min(s.request.arrival_s for s in served)
    cut = until is not None and len(done) < len(served)
    end = until if cut else max(s.finish_s for s in done if s.finish_s is not None)
    assert end is not None
    late = [(end - s.request.arrival_s) / max(1, s.tokens) for s in served if s.finish_s is None] if cut else []
    norm = sorted([s.normalized_latency_s for s in done] + late)
    return {
        "completed": len(done),
        "throughput_tok_s": sum(s.tokens for s in (served if cut else done)) / max(end - start, 1e-9),
        "norm_latency_mean_s": statistics.fmean(norm),
        "norm_latency_p90_s": norm[min(len(norm) - 1, int(0.9 * len(norm)))],
    }
