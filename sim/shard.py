"""Some of a simulated cluster's replicas and their events between two of the cluster's barriers
(the stats the dispatcher and migrator read, the migrator's looks): requests joining, steps,
moved requests arriving. Replicas meet only at barriers (the dispatcher chose every request's
replica from the stats of the last one, the migrator moves requests at its looks), so shards run
the time between two barriers apart, in this process or in others (``pool.py``), and a run is
the same whatever the split.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import msgspec

from dlora.common.messages import GenerateRequest, SamplingParams, WorkerStats
from dlora.services.worker.engine.config import EngineConfig
from dlora.services.worker.engine.stats import EngineStats
from dlora.services.worker.lengths import OutputLengths
from dlora.services.worker.reads import ReadCosts, ReadOrder, read_may_begin
from dlora.services.worker.snapshot import worker_stats
from dlora.sim.cost import CostProfile, adapter_file_bytes
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
class Moving:
    """A request on its way to another replica (``at``: when it arrives), with the tokens it
    produced and what became of it so far."""

    served: Served
    to: str
    at: float
    produced: list[int]
    ship_kv: bool


def _coming(m: Moving) -> GenerateRequest:
    """``m`` as a worker holds a moved request waiting on arrival: its prompt, the tokens it made."""
    req = m.served.request
    params = SamplingParams(max_tokens=req.max_tokens or req.output_len)
    return GenerateRequest(
        request_id=req.request_id,
        reply_to="",
        adapter=req.adapter,
        prompt_token_ids=req.prompt_token_ids,
        resume_token_ids=m.produced,
        params=params,
    )


@dataclass(frozen=True)
class ReplicaSummary:
    """What a run's reports read of one replica once it is over."""

    name: str
    stats: EngineStats
    fast_forwarded: int  # steps run by ``SimEngine.fast_forward`` (also in ``stats.steps``)
    disk_loads: int = 0  # adapters read from disk into host memory (``SimEngine.install``)


@dataclass
class Replica:
    name: str
    engine: SimEngine
    lengths: OutputLengths = field(default_factory=OutputLengths)
    stepping: bool = False  # a step event is pending
    incoming: list[float] = field(default_factory=list)  # heap: when requests dispatched or moved here join
    reads: ReadOrder = field(default_factory=ReadOrder)  # asked for, not begun: the worker's order
    reading: bool = False  # one at a time
    room_wait_s: float | None = None  # since when a read a request waits for has waited for room
    read_costs: ReadCosts = field(default_factory=ReadCosts)  # what its reads took, as a worker's stats say
    # Its stats as last built, while nothing here has changed since (no step, join or move): an
    # idle replica's are the same message, and building one lists every adapter it holds (160 µs
    # at 128 adapters, every half second of every replica: half an idle cluster's run).
    last_stats: WorkerStats | None = None
    # Requests moved here, on their way (their caches coming): reported as a worker reports those
    # waiting on arrival (``worker_stats``'s ``preparing``: their KV blocks and work), where unreported
    # the replica that had just taken a plan's moves looked as roomy as before to the next plan.
    on_way: dict[str, GenerateRequest] = field(default_factory=dict)


@dataclass(frozen=True)
class _Prefetch:
    """The placement's adapters for one replica to read into host memory."""

    replica: Replica
    adapters: list[str]


@dataclass(frozen=True)
class _Read:
    """An adapter read into one replica's host memory."""

    replica: Replica
    adapter: str


class Shard:
    """Replicas ``names`` of ``cost``'s engine and their events (a heap on simulated time). The
    adapters (name -> rank) are on each one's disk, and in its host memory from the start where
    ``max_cpu_loras`` holds them all (a warm cluster); else each is read into host memory when a
    request or the placement's prefetch asks for it (``_hold``)."""

    def __init__(
        self,
        cost: CostProfile,
        names: list[str],
        adapters: dict[str, int],
        config: EngineConfig | None,
        fast_forward: bool,
    ) -> None:
        self.replicas = {name: Replica(name, SimEngine(cost, config)) for name in names}
        self.ranks = adapters
        for r in self.replicas.values():
            if len(adapters) <= r.engine.config.max_cpu_loras:
                for adapter, rank in adapters.items():
                    r.engine.add_adapter(adapter, rank)
        self.fast_forward = fast_forward
        self.served: dict[str, Served] = {}  # the requests dispatched or moved here
        self._events: list[tuple[float, int, str, object]] = []
        self._seq = 0

    def _push(self, at: float, kind: str, what: object) -> None:
        heapq.heappush(self._events, (at, self._seq, kind, what))
        self._seq += 1

    def advance(
        self,
        joins: list[Served],
        moved: list[Moving],
        end: float,
        report: bool,
        prefetch: tuple[float, dict[str, list[str]]] | None = None,
    ) -> tuple[int, list[WorkerStats]]:
        """Take the requests dispatched here (each ``Served`` names its replica; it joins at its
        arrival) and those moved here, and the placement's adapters for each replica here to
        prefetch at a time (``prefetch``), then run every event before ``end`` (the next barrier).
        The requests finished, and (``report``) each replica's stats at ``end``, as a worker
        publishes them."""
        if prefetch is not None:
            at, placed = prefetch
            for name, adapters in placed.items():
                if (r := self.replicas.get(name)) is not None and any(a not in r.engine.adapters for a in adapters):
                    heapq.heappush(r.incoming, at)  # (a change to what it runs: fast-forwards stop there)
                    self._push(at, "prefetch", _Prefetch(r, adapters))
        for s in joins:
            self.served[s.request.request_id] = s
            heapq.heappush(self.replicas[s.replica].incoming, s.request.arrival_s)
            self._push(s.request.arrival_s, "join", s)
        for m in moved:
            self.served[m.served.request.request_id] = m.served
            heapq.heappush(self.replicas[m.to].incoming, m.at)
            self.replicas[m.to].on_way[m.served.request.request_id] = _coming(m)
            self.replicas[m.to].last_stats = None
            self._push(m.at, "moved", m)
        finished = 0
        while self._events and self._events[0][0] < end:
            now, _, kind, what = heapq.heappop(self._events)
            if kind == "join":
                assert isinstance(what, Served)
                self._join(what, now)
            elif kind == "moved":
                assert isinstance(what, Moving)
                self._arrive_moved(what, now)
            elif kind == "prefetch":
                assert isinstance(what, _Prefetch)
                self._prefetch(what.replica, what.adapters, now)
            elif kind == "read":
                assert isinstance(what, _Read)
                self._read(what, now)
            else:
                assert isinstance(what, Replica)
                finished += self._step(what, now, end)
        return finished, self.stats() if report else []

    def stats(self) -> list[WorkerStats]:
        """Each replica's stats now, as a worker publishes them (``sent``, the wall clock's, only
        when last built: nothing here reads it)."""
        for r in self.replicas.values():
            if r.last_stats is None:
                stats = worker_stats(r.name, r.engine, r.lengths, preparing=list(r.on_way.values()))
                r.last_stats = msgspec.structs.replace(stats, **r.read_costs.stats())
        return [r.last_stats for r in self.replicas.values() if r.last_stats is not None]

    def take(self, moves: list[tuple[str, str, bool]], now: float, kv_s_per_token: float) -> list[Moving]:
        """The requests of ``moves`` (request id, destination, whether its KV cache is shipped)
        taken off their replicas here at ``now``, each on its way: it arrives after its cache's
        transfer (``kv_s_per_token`` seconds a token) when shipped, else at once to be
        recomputed. One finished meanwhile, or moved to where it is, stays."""
        out = []
        for request_id, to, ship_kv in moves:
            served = self.served.get(request_id)
            source = self.replicas.get(served.replica) if served is not None else None
            seq = source.engine.seqs.get(request_id) if source is not None else None
            if served is None or source is None or seq is None or to == source.name:  # on its way, or over
                continue
            produced, context = list(seq.output_ids), seq.total_len
            source.engine.abort(request_id)
            source.last_stats = None
            del self.served[request_id]  # it goes with the move
            at = max(now, source.engine.now) + (kv_s_per_token * context if ship_kv else 0.0)
            out.append(Moving(served, to, at, produced, ship_kv))
        return out

    def results(self) -> tuple[list[Served], list[ReplicaSummary]]:
        """What became of the requests here, and each replica's summary."""
        summaries = [
            ReplicaSummary(r.name, r.engine.stats, r.engine.fast_forwarded, r.engine.disk_loads)
            for r in self.replicas.values()
        ]
        return list(self.served.values()), summaries

    def _hold(self, replica: Replica, adapter: str | None, now: float, prefetch: bool = False) -> None:
        """``adapter`` asked for on ``replica`` at ``now``: read from disk if its host memory lacks it
        and no read of it is under way, beside the steps, one read at a time, those requests wait
        for before prefetches (``WorkerAdapters.ensure``): in at the read's end, a "read" event.
        Its requests join at once and wait (``LLMEngine.loading``)."""
        engine = replica.engine
        if adapter is None or engine.ask(adapter):
            return
        if adapter in engine.loading:
            if adapter in replica.reads:  # not begun: a request's goes ahead of the prefetches
                replica.reads.ask(adapter, prefetch)
            return
        engine.loading.add(adapter)
        replica.reads.ask(adapter, prefetch)
        if not replica.reading:
            self._next_read(replica, now)

    def _next_read(self, replica: Replica, now: float) -> None:
        """Begin ``replica``'s next read asked for, if any, once host memory has room for it or a
        request's has waited ``READ_ROOM_WAIT_S``, as a worker's (``WorkerAdapters._read_queued``);
        looked at again after each step, join and move, as a worker does (its end: an event, and
        a change to what the replica runs, where fast-forwards stop)."""
        if replica.reading:
            return
        may, replica.room_wait_s = read_may_begin(replica.engine, replica.reads, replica.room_wait_s, now)
        if not may:
            return
        replica.reading = (adapter := replica.reads.next()) is not None
        if adapter is not None:
            done = now + replica.engine.cost.host_load_seconds(self.ranks[adapter])
            heapq.heappush(replica.incoming, done)
            self._push(done, "read", _Read(replica, adapter))

    def _read(self, r: _Read, now: float) -> None:
        """An adapter's read ended: in host memory, its waiting requests run; the next read begins."""
        replica, rank = r.replica, self.ranks[r.adapter]
        heapq.heappop(replica.incoming)
        replica.engine.install(r.adapter, rank)
        replica.read_costs.observe(replica.engine.cost.host_load_seconds(rank), adapter_file_bytes(rank))
        replica.last_stats = None
        replica.reading = False
        self._wake(replica, now)
        self._next_read(replica, now)

    def _prefetch(self, replica: Replica, adapters: list[str], now: float) -> None:
        """The placement's adapters for ``replica`` read into its host memory (``WorkerAdapters.prefetch``)."""
        heapq.heappop(replica.incoming)
        for adapter in (a for a in adapters if a not in replica.engine.adapters):
            self._hold(replica, adapter, now, prefetch=True)

    def _arrive_moved(self, m: Moving, now: float) -> None:
        served, replica = m.served, self.replicas[m.to]
        req = served.request
        self._hold(replica, req.adapter, now)
        replica.engine.add(
            req.request_id,
            req.prompt_token_ids,
            req.output_len,
            req.adapter,
            req.max_tokens or req.output_len,
            resumed=m.produced,
            shipped=m.ship_kv,
        )
        served.replica = m.to
        served.moves += 1
        replica.on_way.pop(req.request_id, None)
        heapq.heappop(replica.incoming)
        replica.last_stats = None
        self._next_read(replica, now)
        self._wake(replica, now)

    def _join(self, served: Served, now: float) -> None:
        replica, req = self.replicas[served.replica], served.request
        heapq.heappop(replica.incoming)
        self._hold(replica, req.adapter, now)
        replica.engine.add(
            req.request_id, req.prompt_token_ids, req.output_len, req.adapter, req.max_tokens or req.output_len
        )
        replica.last_stats = None
        self._next_read(replica, now)
        self._wake(replica, now)

    def _wake(self, replica: Replica, now: float) -> None:
        if not replica.stepping and replica.engine.runnable():
            replica.stepping = True
            self._push(max(now, replica.engine.now), "step", replica)

    def _step(self, replica: Replica, now: float, end: float) -> int:
        """One step of ``replica`` starting at ``now``; how many requests it finished."""
        engine = replica.engine
        engine.now = max(engine.now, now)
        replica.last_stats = None
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
        engine.evict()  # past max_cpu_loras while every adapter was busy: those done since go
        self._next_read(replica, engine.now)  # a request ended: room for a read waiting (``tidy``)
        replica.stepping = engine.runnable()  # (requests waiting only for their adapter: a read wakes it)
        if replica.stepping:
            if self.fast_forward:
                # The steps that only repeat this one, up to the next thing that could change it: a
                # request joining, the next barrier (the stats the dispatcher and migrator read,
                # the migrator's look).
                advanced, k = engine.fast_forward(min([end, *replica.incoming[:1]]))
                for rid in advanced:
                    self.served[rid].tokens += k
            self._push(engine.now, "step", replica)
        return finished
