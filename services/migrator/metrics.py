"""The migrator's Prometheus metrics (docs/metrics.md): the plans it made, why and how, the moves
it published and what the planner expected of them."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from dlora.common.messages import MovePlan, PlanMethod, PlanTrigger

# Solve times: a greedy pass takes milliseconds, the ILP up to its time bound (solve_time_s).
_SOLVE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class MigratorMetrics:
    """The registry a migrator serves on ``metrics_port``. Every migrator counts its own solves;
    only the leader solves, and one that loses the lease forgets its last plan's makespan."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.leader = Gauge("dlora_migrator_leader", "1 while this migrator holds the lease", registry=r)
        self.plans = Counter(
            "dlora_migration_plans",
            "Solves, published or not, by the bound that set them off and how they were found",
            ["trigger", "method"],
            registry=r,
        )
        self.moves = Counter(
            "dlora_migration_moves",
            "Requests a published plan moved: kv (cache shipped) or recompute",
            ["trigger", "method"],
            registry=r,
        )
        for trigger in PlanTrigger:  # served from 0: a rate over them is defined before the first plan
            for method in PlanMethod:
                self.plans.labels(trigger.value, method.value)
            for moved in ("kv", "recompute"):
                self.moves.labels(trigger.value, moved)
        self.solve = Histogram(
            "dlora_migration_plan_solve_seconds",
            "Seconds to find a plan",
            buckets=_SOLVE_BUCKETS,
            unit="seconds",
            registry=r,
        )
        self.makespan = Gauge(
            "dlora_migration_makespan_seconds",
            "The last plan's estimated longest completion time, before and after its moves",
            ["when"],
            unit="seconds",
            registry=r,
        )

    def leads(self, leader: bool) -> None:
        """Whether this migrator holds the lease now."""
        self.leader.set(leader)
        if not leader:  # the new leader's plans are the ones to read
            self.makespan.clear()

    def planned(self, p: MovePlan, published: bool) -> None:
        """A solve: ``p``, published (its moves go ahead) or not (no moves, or the lease lost)."""
        trigger = p.trigger.value if p.trigger else "none"
        self.plans.labels(trigger, p.method.value).inc()
        self.solve.observe(p.solve_seconds)
        self.makespan.labels("before").set(p.makespan_before_s)
        self.makespan.labels("after").set(p.makespan_after_s)
        if published:
            for m in p.moves:
                self.moves.labels(trigger, "kv" if m.ship_kv else "recompute").inc()
