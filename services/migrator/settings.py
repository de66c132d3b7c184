"""The migrator's settings (``[migrator]`` in ``dlora.toml``); see ``dlora.common.settings``."""

from __future__ import annotations

from dataclasses import dataclass

from dlora.common.plans import PLAN_MAX_AGE_S
from dlora.common.settings import Common, Problems, nested_problems
from dlora.services.migrator.trigger import TriggerBounds

# CBC runs as a subprocess: writing the model, starting it and reading its solution back (0.2-0.25 s
# at 32 x 128 x 2,000 here), kept out of its time limit so the plan lands inside the bound (times
# the pace the planner runs at) until past plans measured that round trip (``pace.reserve_s``). A
# solve bound at or below it never runs the ILP at first (the greedy pass plans alone): refused.
CBC_OVERHEAD_S = 0.3
# Kept back from the greedy pass's deadline for its plan's checks once it returns (named, worth, the
# gain check: 15-40 ms at 500 moves under 7x oversubscription), where it takes the whole bound.
GREEDY_WRAP_UP_S = 0.05


@dataclass(frozen=True)
class PlannerSettings:
    # Solver time bound; the incumbent is taken when it expires. At or below ``CBC_OVERHEAD_S`` it is a
    # bound spent (as where the greedy pass took it: tests set it so), not refused; ``solve_time_s`` is.
    time_limit_s: float = 1.0
    # Above this many request->worker variables, building the model (about 0.06 ms each here) does
    # not fit a 1 s bound: it is pruned (``max_destinations``), and if still larger the greedy pass
    # plans instead.
    max_ilp_variables: int = 5_000
    # Where the full model has more variables than ``max_ilp_variables``: the destinations a group
    # on a busy worker keeps (its least loaded possible ones; as many roomiest again on a worker
    # over its KV pressure). None: never pruned.
    max_destinations: int | None = 4
    min_gain_s: float = 0.0  # a plan must shorten the longest completion time by at least this
    # (and always by more than the summed cost of its moves)
    kv_pressure: float = 1.0  # KV demand above this fraction of a worker's blocks is priced (see above)
    # A bound by work instead of time: CBC (one thread) stops after this many branch-and-bound
    # nodes, ``time_limit_s`` not applying, so a snapshot gives the same plan on any machine and
    # under any load (the simulator's setting). None: the time bound, as a migrator runs.
    max_nodes: int | None = None


class MigratorSettings(Common, kw_only=True, forbid_unknown_fields=True):
    # Names this migrator in the logs and the leader lease (with a token of its process: two
    # migrators of one id, as on one shared dlora.toml, still elect one leader).
    migrator_id: str = "migrator-0"
    # Seconds between looks at the cluster.
    interval_s: float = 1.0
    # Leader lease in Redis, seconds: the leader renews it every interval; a standby takes over
    # when it expires.
    lease_s: float = 3.0
    # Solver time bound, seconds: more than the 0.3 s kept back for starting the solver and reading
    # its plan until a solve has measured that round trip (at or below it none ever runs to measure
    # it: the ILP never runs, only the greedy pass), and under ``PLAN_MAX_AGE_S`` (a plan taking it
    # reached the workers stale).
    solve_time_s: float = 1.0
    # Move costs the planner weighs (seconds per token moved; per load for adapters). Recompute and
    # KV transfer: unset, what the workers measured (prefill speed; a shipped cache's export plus the
    # receiver's stall), with a prior until one has; a number fixes the cost (and so the choice).
    recompute_seconds_per_token: float | None = None
    kv_transfer_seconds_per_token: float | None = None
    adapter_load_seconds: float = 0.05
    # [migrator.trigger]: when the cluster is out of balance enough to plan.
    trigger: TriggerBounds = TriggerBounds()

    def check(self) -> Problems:
        bad = Common.check(self) + nested_problems("trigger", self.trigger.check())
        for field in ("interval_s", "lease_s", "solve_time_s"):
            if getattr(self, field) <= 0:
                bad.append((field, getattr(self, field), "must be > 0"))
        if 0 < self.solve_time_s <= CBC_OVERHEAD_S:
            # Still so with the round trip measured (``pace.RoundTrips``): only a CBC run measures it,
            # and none runs before one has, the reserve being CBC_OVERHEAD_S (times the pace) till then.
            why = (
                f"until a solve has measured the solver's round trip, {CBC_OVERHEAD_S:g} s of the bound is kept "
                "back for starting it and reading its plan, so no solve runs to measure it: the ILP would "
                "never run, only the greedy pass"
            )
            bad.append(("solve_time_s", self.solve_time_s, f"must be > {CBC_OVERHEAD_S:g} ({why})"))
        if self.solve_time_s >= PLAN_MAX_AGE_S:
            # A plan is as old as its stats when it reaches a worker, its solve included: one taking
            # this bound was ignored by every worker as stale (``common.plans.PLAN_MAX_AGE_S``).
            why = f"a worker ignores a plan made from stats it sent over stats_interval_s + {PLAN_MAX_AGE_S:g} s ago"
            bad.append(("solve_time_s", self.solve_time_s, f"must be < {PLAN_MAX_AGE_S:g} ({why})"))
        return bad
