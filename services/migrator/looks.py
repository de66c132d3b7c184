"""When the migrator plans, and from what: pure (the caller passes the clock), so the migrator
service and the cluster simulator (``dlora.sim``) run the same decisions.

``Looks`` keeps the trigger's patience and cool-down; ``unheard`` says which workers a plan leaves
out for their silence; ``cluster_snapshot`` turns the live workers' stats into the planner's view
with the move costs the settings fix or the workers measured; ``planner_settings`` is the planner's
bound from the trigger's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace

from dlora.common.messages import PlanTrigger, WorkerStats, likely_dead
from dlora.common.plans import PLAN_MAX_AGE_S
from dlora.services.migrator.planner import PlannerSettings
from dlora.services.migrator.settings import MigratorSettings
from dlora.services.migrator.snapshot import ClusterSnapshot
from dlora.services.migrator.trigger import TriggerBounds, snapshot_from_stats, triggered

# Move costs per token before any worker has measured them (a CPU-sized guess).
PRIOR_RECOMPUTE_S = 0.0005
PRIOR_KV_TRANSFER_S = 0.001


class Looks:
    """An imbalance is planned for once ``triggered`` has held ``patience`` looks in a row, and not
    within ``cooldown_s`` of the last solve."""

    def __init__(self, bounds: TriggerBounds) -> None:
        self.bounds = bounds
        self._imbalanced = 0
        self._last_solve = float("-inf")
        self._moved: dict[str, tuple[float, str]] = {}  # request id -> when a plan moved it, its id (``settled``)

    def look(self, snap: ClusterSnapshot, now: float) -> PlanTrigger | None:
        """The bound the cluster passed if it is time to plan for it now; else None."""
        reason = triggered(snap, self.bounds)
        if reason is None:
            self._imbalanced = 0
            return None
        self._imbalanced += 1
        if self._imbalanced < self.bounds.patience or now - self._last_solve < self.bounds.cooldown_s:
            return None
        return reason

    def moved(self, plan_id: str, request_ids: Iterable[str], now: float) -> None:
        """Plan ``plan_id``, moving ``request_ids``, went out at ``now``."""
        self._moved.update(dict.fromkeys(request_ids, (now, plan_id)))

    def refused(self, refusals: Mapping[str, Iterable[str]]) -> list[str]:
        """The moves a worker says it refused (plan id -> request ids, ``WorkerStats.refused_moves``):
        those requests never left it, so they are free for the next plan now, not pinned for
        ``settle_s`` (a move refused while its source's Redis writes lagged left its request where it
        was for 10 s: left by the last session). Only a refusal of the plan that moved a request last
        frees it: one said of an earlier plan leaves a later plan's move pinned. The ids freed."""
        freed = [r for plan, ids in refusals.items() for r in ids if (at := self._moved.get(r)) and at[1] == plan]
        for r in freed:
            del self._moved[r]
        return freed

    def settled(self, snap: ClusterSnapshot, now: float) -> ClusterSnapshot:
        """``snap`` with the requests moved within ``settle_s`` pinned where they are."""
        self._moved = {r: (at, p) for r, (at, p) in self._moved.items() if now - at < self.bounds.settle_s}
        if not self._moved:
            return snap
        reqs = [replace(r, pinned=True) if r.request_id in self._moved else r for r in snap.requests]
        return replace(snap, requests=reqs)

    def solved(self, now: float) -> None:
        """A solve ran (with moves or not): the cool-down starts. An imbalance no plan pays for
        (KV pressure on a loaded cluster is common) would otherwise cost a full solve every look."""
        self._last_solve = now


def unheard(
    heard: Mapping[str, float],
    gaps: Mapping[str, float],
    now: float,
    ttl_s: float,
    solve_s: float,
    intervals: Mapping[str, float] | None = None,
) -> set[str]:
    """The workers a plan made at ``now`` leaves out, of those ``heard`` (worker -> when its last stats
    came, monotonic seconds; ``gaps``: seconds between its last two, where two came; ``intervals``:
    the stats interval it says, seconds, where it says one, ``WorkerStats.stats_interval_s``): those
    silent past half the heartbeat TTL ``ttl_s`` and three of their gaps, each taken as at least
    their interval, likely dead or hung (``likely_dead``, dispatch's rule: ``DispatchState.quiet``
    says why the gap and the interval only under it; their last stats said them idle, so plans sent
    requests there to stall until a dispatcher recovered them elsewhere); and those whose last stats
    will be older, once a plan that takes ``solve_s`` reaches them, than a plan they accept
    (``PLAN_MAX_AGE_S`` past their stats interval, ``worker.moves.plan_max_age``): planned from them,
    their moves were dropped and then held moved for ``settle_s``, under a TTL over twice that age
    (left by the last session). That interval is the one the worker says; from an older worker that
    does not, its last gap (none before a second stats). The gap alone is loose by as much as a
    lost message (left by the last session's review): one lost at a 2 s interval reads as a 4 s
    gap, and a plan reaching the worker with its stats 7.5 s old is made, to be dropped past 7 s."""
    said = intervals or {}
    out = set()
    for w, at in heard.items():
        silent, gap = now - at, gaps.get(w, 0.0)
        interval = said.get(w) or gap
        if likely_dead(silent, ttl_s, gap, interval) or silent + solve_s > PLAN_MAX_AGE_S + interval:
            out.add(w)
    return out


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


def cluster_snapshot(
    live: list[WorkerStats],
    file_bytes: dict[str, int],
    s: MigratorSettings,
    held: Mapping[str, frozenset[str]] | None = None,
) -> ClusterSnapshot:
    """The planner's view of ``live`` workers (``file_bytes``: adapter -> its files' bytes, of the
    registry; ``held``: as ``snapshot_from_stats`` takes it)."""
    return snapshot_from_stats(
        live,
        file_bytes,
        held,
        recompute_seconds_per_token=_cost(live, "prefill", s.recompute_seconds_per_token, PRIOR_RECOMPUTE_S),
        kv_transfer_seconds_per_token=_cost(live, "kv_transfer", s.kv_transfer_seconds_per_token, PRIOR_KV_TRANSFER_S),
        adapter_load_seconds=s.adapter_load_seconds,
    )


def planner_settings(s: MigratorSettings) -> PlannerSettings:
    """A plan must bring at least the gain that makes an imbalance worth planning for."""
    bounds = s.trigger
    return PlannerSettings(
        s.solve_time_s,
        min_gain_s=bounds.min_gain_s,
        kv_pressure=bounds.kv_pressure if bounds.kv_pressure is not None else 1.0,
    )
