"""A simulated cluster: replicas (``SimEngine``) behind the dispatcher's own choice
(``DispatchState``), driven by a discrete-event loop on simulated time.

Each replica reports the stats a worker publishes (``worker_stats``, the worker's own snapshot)
every ``stats_interval_s``, and the dispatcher chooses from the latest it heard, as the services
do over NATS; a request goes to its replica at once and joins that replica's next step. Not yet
here (issue 21, later): the placement's prefetches, the migrator's trigger and planner, and moves.
"""

from __future__ import annotations

import heapq
import statistics
from dataclasses import dataclass, field

from dlora.services.dispatcher.choose import DEFAULT_COSTS, DispatchCosts, DispatchMode
from dlora.services.dispatcher.state import DispatchState
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

    @property
    def normalized_latency_s(self) -> float:
        """End-to-end latency over output tokens (the dLoRA paper's metric), seconds per token."""
        assert self.finish_s is not None
        return (self.finish_s - self.request.arrival_s) / max(1, self.tokens)


@dataclass
class Replica:
    name: str
    engine: SimEngine
    lengths: OutputLengths = field(default_factory=OutputLengths)
    stepping: bool = False  # a step event is pending


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
    ) -> None:
        self.replicas = [Replica(f"r{i:03d}", SimEngine(cost, config)) for i in range(replicas)]
        for r in self.replicas:
            for name, rank in adapters.items():
                r.engine.add_adapter(name, rank)
        self.state = DispatchState(heartbeat_ttl_s, mode, dispatch_costs)
        self.stats_interval_s = stats_interval_s
        self.served: dict[str, Served] = {}
        self._events: list[tuple[float, int, str, object]] = []
        self._seq = 0

    def _push(self, at: float, kind: str, what: object) -> None:
        heapq.heappush(self._events, (at, self._seq, kind, what))
        self._seq += 1

    def run(self, requests: list[SimRequest]) -> list[Served]:
        """Serve ``requests`` (by arrival) to the end; what became of each, in arrival order.
        Raises RuntimeError when one cannot be placed (no replica holds it)."""
        for r in requests:
            self._push(r.arrival_s, "arrive", r)
        self._push(0.0, "stats", None)
        pending = len(requests)
        while self._events and pending:
            now, _, kind, what = heapq.heappop(self._events)
            if kind == "stats":
                self._report(now)
                self._push(now + self.stats_interval_s, "stats", None)
            elif kind == "arrive":
                assert isinstance(what, SimRequest)
                self._dispatch(what, now)
            else:
                assert isinstance(what, Replica)
                pending -= self._step(what, now)
        return [self.served[r.request_id] for r in requests]

    def _report(self, now: float) -> None:
        for r in self.replicas:
            self.state.heard(worker_stats(r.name, r.engine, r.lengths), now)

    def _dispatch(self, req: SimRequest, now: float) -> None:
        name = self.state.choose(self.state.live(now), req.adapter)
        if name is None:
            raise RuntimeError(f"no live replica for {req.request_id}")
        replica = next(r for r in self.replicas if r.name == name)
        replica.engine.add(
            req.request_id, req.prompt_token_ids, req.output_len, req.adapter, req.max_tokens or req.output_len
        )
        self.served[req.request_id] = Served(req, name)
        if not replica.stepping:
            replica.stepping = True
            self._push(max(now, replica.engine.now), "step", replica)

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
            self._push(engine.now, "step", replica)
        return finished


def summary(served: list[Served]) -> dict[str, float]:
    """Throughput (output tokens per second over the run) and normalized latency, mean and P90."""
    done = [s for s in served if s.finish_s is not None]
    start = min(s.request.arrival_s for s in served)
    end = max(s.finish_s for s in done if s.finish_s is not None)
    norm = sorted(s.normalized_latency_s for s in done)
    return {
        "completed": len(done),
        "throughput_tok_s": sum(s.tokens for s in done) / max(end - start, 1e-9),
        "norm_latency_mean_s": statistics.fmean(norm),
        "norm_latency_p90_s": norm[min(len(norm) - 1, int(0.9 * len(norm)))],
    }
