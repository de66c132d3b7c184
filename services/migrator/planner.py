"""Request-adapter co-migration planned by an integer linear program over the whole cluster.

``plan(snapshot, settings) -> MovePlan`` is pure (but for the clocks, and the ``RoundTrips`` a
caller passes to be kept): the ILP (``ilp``) and the greedy pass (``greedy``) plan, and this module
chooses between their plans.

A greedy pass (single requests from the most loaded worker, to one needing no adapter read first,
and a request needing no read before one that reads where its destination ends as soon, while
that shortens the longest completion; a swap off a worker over its KV pressure where no single
move does) runs first, and its plan is the solver's starting solution (a MIP start):
CBC begins from an incumbent and improves on it within its bound, where alone it found none in
time at that size. If the solver ends without a solution (or fails), the greedy plan is taken. The
ILP counts a band by its mean (work, move cost, blocks): the requests its counts name are checked
against each destination's blocks (``named``), and where they do worse than the greedy plan by the
ILP's own objective (``costs.worth``), the greedy plan is taken. The plan taken goes out only
where it shortens the longest completion by more than its moves cost (and by ``min_gain_s``);
where it does not (or is empty) and the other one does, the other goes.

One model of KV pressure holds throughout: a worker's demand over ``kv_pressure`` of its blocks
costs it the recompute of its preempted requests, in its completion time (``costs.overflow_seconds``).
One model of an adapter read holds throughout (DESIGN.md): it runs beside the destination's steps,
one read after another, and only the requests moved there for it wait for it. The greedy pass,
the ILP's T, ``worth`` and the gain check all count a destination's completion as
max(its other work, its reads) + the work waiting for them (``Standing.waited``).
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from dataclasses import replace

from dlora.common.messages import IlpFallback, MovePlan, MoveRequest, PlanMethod
from dlora.services.migrator.bands import price_of
from dlora.services.migrator.costs import Standing, kv_demand
from dlora.services.migrator.costs import apply as apply  # (a plan's tests read it through here)
from dlora.services.migrator.greedy import greedy_moves
from dlora.services.migrator.ilp import solve
from dlora.services.migrator.named import fitting
from dlora.services.migrator.pace import Clock, RoundTrips
from dlora.services.migrator.settings import GREEDY_WRAP_UP_S
from dlora.services.migrator.settings import PlannerSettings as PlannerSettings  # (its callers read it here)
from dlora.services.migrator.snapshot import ClusterSnapshot


def _settled(snapshot: ClusterSnapshot, kv_pressure: float) -> Standing:
    """The ``Standing`` of ``snapshot`` with the requests whose move costs more than the work it
    takes away pinned where they are (about to finish, mostly): moved, they add more than they
    relieve. Not on a worker past ``kv_pressure`` of its blocks: a move spares its preemptions'
    recompute too, its time (``costs.overflow_seconds``). Returned as the standing its plans are
    measured against, so the pressure that frees those requests is the one their plans are priced
    at: each passed on its own, it was two arguments that could differ."""
    workers = {w.worker: w for w in snapshot.workers}
    demand = kv_demand(snapshot)
    calm = {w.worker for w in snapshot.workers if demand[w.worker] <= kv_pressure * w.kv_blocks}
    reqs = [
        replace(r, pinned=True)
        if not r.pinned and r.worker in calm and price_of(snapshot, workers[r.worker], r) >= 1
        else r
        for r in snapshot.requests
    ]
    return Standing(replace(snapshot, requests=reqs), kv_pressure)


_DEFAULT = PlannerSettings()


def plan(snapshot: ClusterSnapshot, settings: PlannerSettings = _DEFAULT, trips: RoundTrips | None = None) -> MovePlan:
    """The moves that best balance the cluster, by ILP, or greedily when the solver finds nothing.
    ``trips``: CBC's round trips at the caller's past plans, which the time bound keeps back for
    (``pace.reserve_s``), updated by this one's; None: the fixed reserve."""
    clock = Clock(trips=trips)
    if trips is not None:  # (a solve a plan that raised left behind is not this one's)
        trips.solving = None
    # A request listed by two workers (stats taken either side of a move, or one id sent to two)
    # is left out: the model counts each on one worker (it raised, and the migrator died).
    listed = Counter(r.request_id for r in snapshot.requests)
    if len(listed) < len(snapshot.requests):
        snapshot = replace(snapshot, requests=[r for r in snapshot.requests if listed[r.request_id] == 1])
    if len(snapshot.workers) < 2 or not snapshot.requests:
        return MovePlan(plan_id=uuid.uuid4().hex, method=PlanMethod.NONE, solve_seconds=0.0)
    # The greedy pass has the time bound too (not a node bound: the simulator plans alike anywhere):
    # unbounded, it once took 6 s, past the lease and a worker's plan age (``greedy``). Less the
    # time its plan's checks take once it returns (``GREEDY_WRAP_UP_S``).
    deadline = clock.wall + settings.time_limit_s - GREEDY_WRAP_UP_S if settings.max_nodes is None else None
    # One order whatever order the stats came in (a restarted migrator lists them anew): the model's
    # variables and constraints follow it, and with them the incumbent CBC finds in its bound.
    snapshot = replace(
        snapshot,
        workers=sorted(snapshot.workers, key=lambda w: w.worker),
        requests=sorted(snapshot.requests, key=lambda r: r.request_id),
    )
    standing = _settled(snapshot, settings.kv_pressure)
    snapshot = standing.snapshot
    greedy = greedy_moves(standing, deadline)
    # The greedy plan measured before CBC starts, within the time it is given: what runs after it
    # returns is kept to what its plan costs (its moves and the workers, ``Standing``), which the
    # time kept back for reading its solution (``Clock.reserve``) covers.
    kept = fitting(snapshot, greedy, standing)
    value = standing.worth(kept)
    solved = solve(snapshot, settings, greedy, clock, standing)
    fallback: IlpFallback | None = None
    moves, method, worth = kept, PlanMethod.GREEDY, value
    other: tuple[list[MoveRequest], PlanMethod, float] | None = None
    if isinstance(solved, IlpFallback):
        fallback = solved
    else:
        # Named from counts of each group at its mean, the ILP's moves can do worse than its start.
        named = fitting(snapshot, solved[0], standing)
        if (named_worth := standing.worth(named)) >= value:
            (moves, method, worth), other = (named, solved[1], named_worth), (kept, PlanMethod.GREEDY, value)
        else:
            other = (named, solved[1], named_worth)
    no_gain = _too_little(standing, moves, worth, settings)
    # Chosen by worth (the gain less the moves' cost), a plan can still bring less than min_gain_s
    # where the other, costing more, brings enough: then the other goes. (Where worth summed the
    # reads as costs and the gain check waited for them, an empty ILP plan, worth 0 against a
    # greedy plan's read, sent nothing the greedy plan alone would have sent: a review.)
    if (no_gain or not moves) and other and other[0] and not _too_little(standing, other[0], other[2], settings):
        (moves, method, _), no_gain = other, False
    after = standing.makespan(moves)  # (each move's cost charged where its request ends: reported, not judged)
    if clock.trips is not None:  # (what the next plans keep back for CBC)
        clock.trips.done(time.perf_counter(), clock.pace())
    return MovePlan(
        plan_id=uuid.uuid4().hex,
        moves=[] if no_gain else moves,
        method=method,
        ilp_fallback=fallback,
        no_gain=no_gain,
        solve_seconds=time.perf_counter() - clock.wall,
        makespan_before_s=standing.longest,
        makespan_after_s=after,
    )


def _too_little(standing: Standing, moves: list[MoveRequest], worth: float, settings: PlannerSettings) -> bool:
    """Whether ``moves``, worth ``worth`` (``Standing.worth``, already measured: the walks are the
    time-bounded part after CBC returns), bring too little for what they cost: their gain (the
    longest completion's drop, the adapter reads they make waited for where they are made, and
    each worker's preemptions' recompute in its own: ``worth`` plus their cost) must pass both ``min_gain_s``
    and their recomputes or KV shipped in all, each counted once. A read is no such cost: it runs
    beside the destination's steps, its cost the wait counted in the gain (summed as work, a
    greedy plan that brought the longest completion from 25.9 s to 21.25 s, its four reads of 3 s
    waited for, was worth -4 s and would have been dropped: 7 of 300 seeded clusters)."""
    cost = standing.cost(moves)
    return bool(moves) and worth + cost < max(settings.min_gain_s, cost)
