"""Request-adapter co-migration planned by an integer linear program over the whole cluster.

``plan(snapshot, settings) -> MovePlan`` is pure. Requests are grouped by (worker, adapter) and
split into bands of alike price per second of work and remaining work (``bands``, as fine as the
variable bound allows): requests of one group are interchangeable to the planner, so an integer
variable n[g, w] (how many of group g go to worker w) stands for |g| binary request->worker
choices, which keeps 2,000 requests x 32 workers solvable in well under a second. Binary y[a, w] says adapter a runs on
worker w (fixed to 1 where it already does).

    minimise  T + sum over moves of their cost + sum over new adapter copies of the load cost
    s.t.      each group's requests all land somewhere           sum_w n[g, w] = |g|
              a request goes only where its adapter is           n[g, w] <= |g| * y[a_g, w]
              adapter slots (one per adapter, any rank)          sum_a y[a, w] <= slots_w - running_w
              KV memory                                          sum_g n[g, w] kv_g <= blocks_w
              T bounds every worker's completion time            sum_g n[g, w] work_g,w <= T

KV demand above a pressure fraction of a worker's blocks (all of them by default) is priced as
the recompute of its tokens, since that is what the worker's preemptions will cost: a slack
s_w >= sum_g n[g, w] kv_g - fraction * blocks_w adds s_w * block_size * recompute cost to the
objective. A worker already over its blocks (waiting requests count) may stay there, not grow.

work_g,w is a request's remaining tokens times what w measured per token of g's adapter (its
mean where the adapter has not run there). running_w counts the adapters w has requests of: one
step runs at most slots_w adapters, so a new adapter may go only where fewer than that run (its
load from host memory or disk is paid where w does not hold it). A group's destinations are only
the workers where it could run (its adapter runs there or a slot is free). Where those make too
big a model, only groups on workers busier than the mean (or over their KV pressure) may leave
home, each to its few least loaded (or roomiest) destinations: what shortens the longest
completion is work moved from busy workers to idle ones, and the pruning keeps 128 workers x
10,000 requests a model of a few thousand variables. A move costs the cheaper of recomputing the
context and shipping its KV (nothing for a request holding no KV). A group's moved requests are
its cheapest per second of work taken away; one that costs more than that work (about to
finish) stays, unless its worker is past its KV pressure.

A greedy pass (single requests from the most loaded worker, to one needing no adapter read first,
while that shortens the longest completion) runs first, and its plan is the solver's starting solution (a MIP start):
CBC begins from an incumbent and improves on it within its bound, where alone it found none in
time at that size. If the solver ends without a solution (or fails), the greedy plan is taken. The
ILP counts a band by its mean (work, move cost, blocks): the requests its counts name are checked
against each destination's blocks (``named``), and where they do worse than the greedy plan by the
ILP's own objective (``costs.worth``), the greedy plan is taken. The plan taken goes out only
where it shortens the longest completion (its reads waited for) by more than its moves cost; where
it does not (or is empty) and the other one does, the other goes.
"""

from __future__ import annotations

import bisect
import math
import sys
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, replace

import pulp

from dlora.common.messages import IlpFallback, MovePlan, MoveRequest, PlanMethod
from dlora.common.versions import name_of
from dlora.services.migrator.bands import Group, band_of, grouped, price_of
from dlora.services.migrator.costs import (
    BASE,
    Standing,
    blocks_of,
    kv_demand,
    move_cost,
    read_price,
)
from dlora.services.migrator.costs import apply as apply  # (a plan's tests read it through here)
from dlora.services.migrator.mip_start import start_from
from dlora.services.migrator.named import fitting, within
from dlora.services.migrator.settings import CBC_OVERHEAD_S as _CBC_OVERHEAD_S  # (its comment says why)
from dlora.services.migrator.shared_slots import bound_slots, joins
from dlora.services.migrator.snapshot import ClusterSnapshot, RequestState, Running, WorkerState, runs_among, takes


@dataclass(frozen=True)
class PlannerSettings:
    # Solver time bound; the incumbent is taken when it expires. At or below ``_CBC_OVERHEAD_S`` it is a
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


def _settled(snapshot: ClusterSnapshot, kv_pressure: float) -> ClusterSnapshot:
    """``snapshot`` with the requests whose move costs more than the work it takes away pinned
    where they are (about to finish, mostly): moved, they add more than they relieve. Not on a
    worker past ``kv_pressure`` of its blocks: a move relieves that too (the ILP prices it)."""
    workers = {w.worker: w for w in snapshot.workers}
    demand = kv_demand(snapshot)
    calm = {w.worker for w in snapshot.workers if demand[w.worker] <= kv_pressure * w.kv_blocks}
    reqs = [
        replace(r, pinned=True)
        if not r.pinned and r.worker in calm and price_of(snapshot, workers[r.worker], r) >= 1
        else r
        for r in snapshot.requests
    ]
    return replace(snapshot, requests=reqs)


def _ship_kv(snapshot: ClusterSnapshot) -> bool:
    return snapshot.kv_transfer_seconds_per_token < snapshot.recompute_seconds_per_token


def plan(snapshot: ClusterSnapshot, settings: PlannerSettings = PlannerSettings()) -> MovePlan:
    """The moves that best balance the cluster, by ILP, or greedily when the solver finds nothing."""
    start = time.perf_counter()
    # A request listed by two workers (stats taken either side of a move, or one id sent to two)
    # is left out: the model counts each on one worker (it raised, and the migrator died).
    listed = Counter(r.request_id for r in snapshot.requests)
    if len(listed) < len(snapshot.requests):
        snapshot = replace(snapshot, requests=[r for r in snapshot.requests if listed[r.request_id] == 1])
    if len(snapshot.workers) < 2 or not snapshot.requests:
        return MovePlan(plan_id=uuid.uuid4().hex, method=PlanMethod.NONE, solve_seconds=0.0)
    # The greedy pass has the time bound too (not a node bound: the simulator plans alike anywhere):
    # unbounded, it once took 6 s, past the lease and a worker's plan age (``_greedy``).
    deadline = start + settings.time_limit_s if settings.max_nodes is None else None
    # One order whatever order the stats came in (a restarted migrator lists them anew): the model's
    # variables and constraints follow it, and with them the incumbent CBC finds in its bound.
    snapshot = replace(
        snapshot,
        workers=sorted(snapshot.workers, key=lambda w: w.worker),
        requests=sorted(snapshot.requests, key=lambda r: r.request_id),
    )
    snapshot = _settled(snapshot, settings.kv_pressure)
    standing = Standing(snapshot)
    greedy = _greedy(snapshot, settings, deadline, standing)
    # The greedy plan measured before CBC starts, within the time it is given: what runs after it
    # returns is kept to what its plan costs (its moves and the workers, ``Standing``), which the
    # time kept back for reading its solution (``_CBC_OVERHEAD_S``) covers.
    kept = fitting(snapshot, greedy, standing)
    value = standing.worth(kept, settings.kv_pressure)
    solved = _solve(snapshot, settings, greedy, start, standing)
    fallback: IlpFallback | None = None
    moves, method = kept, PlanMethod.GREEDY
    other: tuple[list[MoveRequest], PlanMethod] | None = None
    if isinstance(solved, IlpFallback):
        fallback = solved
    else:
        # Named from counts of each group at its mean, the ILP's moves can do worse than its start.
        named = fitting(snapshot, solved[0], standing)
        if standing.worth(named, settings.kv_pressure) >= value:
            (moves, method), other = (named, solved[1]), (kept, PlanMethod.GREEDY)
        else:
            other = (named, solved[1])
    after, no_gain = _gained(standing, moves, settings)
    # Chosen by worth (its reads summed as costs), a plan can bring too little where the other, its
    # reads waited for, brings enough: the ILP that moved one to a busy worker rather than read an
    # adapter on an idle one left no plan, where without it the greedy one went (a review). An empty
    # plan brings nothing: where the ILP's, worth 0 against a greedy plan's read, nothing went that
    # the greedy plan alone (the ILP unsolved) would have sent (a review: reads priced two ways).
    if (no_gain or not moves) and other and other[0] and not (alt := _gained(standing, other[0], settings))[1]:
        (moves, method), (after, no_gain) = other, alt
    return MovePlan(
        plan_id=uuid.uuid4().hex,
        moves=[] if no_gain else moves,
        method=method,
        ilp_fallback=fallback,
        no_gain=no_gain,
        solve_seconds=time.perf_counter() - start,
        makespan_before_s=standing.longest,
        makespan_after_s=after,
    )


def _gained(standing: Standing, moves: list[MoveRequest], settings: PlannerSettings) -> tuple[float, bool]:
    """The longest completion once ``moves`` are made, and whether they bring too little for it."""
    load, demand = standing.after(moves)
    # A read is waited for where it is made: the requests moved there for it start after it (their
    # longest completion, left out, passed a plan on 0.7 s saved that its read made 0.3 s).
    after, relief = max(standing.waited(moves, load).values()), standing.relief(demand, settings.kv_pressure)
    # The longest completion (and the preemptions KV pressure will cause) must shrink by more than
    # the moves cost in total: each move's recompute is real work taken from the destination. Not
    # by their ``worth`` (its reads summed as if work too): a read runs beside the destination's
    # steps, its cost the wait counted above. By worth, a greedy plan (the one sent where the ILP
    # does not solve) that brought the longest completion from 25.9 s to 21.25 s, its four reads
    # of 3 s waited for, was worth -4 s and would have been dropped (7 of 300 seeded clusters).
    gain = standing.longest - after + relief
    return after, bool(moves) and gain < max(settings.min_gain_s, standing.cost(moves))


def _destinations(
    snapshot: ClusterSnapshot,
    groups: list[Group],
    settings: PlannerSettings,
    start: dict[int, set[str]],
    standing: Standing,
) -> list[list[str]]:
    """Per group: home first, then the workers it may move to: ones whose context holds its
    requests that run its adapter (``standing.running``: worker -> adapters it runs) or have a free slot for
    it; where those make a model of more than ``max_ilp_variables``, pruned by ``max_destinations``
    (the module's docstring says how); and wherever ``start`` (group -> workers) moves some of it."""
    load, demand, active = standing.load, standing.demand, standing.running  # (not walked again)
    by_load = sorted(snapshot.workers, key=lambda w: load[w.worker])

    # The workers that take an adapter, once per adapter: for each group (bands and pinned ones
    # split an adapter's), 156,000 looks at 128 x 1,024 x 10,000, a tenth of the 1 s bound.
    taking: dict[str, list[WorkerState]] = {}

    def possible(g: Group) -> list[WorkerState]:
        if g.adapter not in taking:
            taking[g.adapter] = [w for w in by_load if takes(active[w.worker], g.adapter, w.slots)]
        return [w for w in taking[g.adapter] if w.worker != g.worker and w.worker in g.fits]

    every = [possible(g) for g in groups]
    most = settings.max_destinations
    if most is not None and len(groups) + sum(map(len, every)) > settings.max_ilp_variables:
        mean = sum(load.values()) / len(load)
        pressed = {w.worker for w in snapshot.workers if demand[w.worker] > settings.kv_pressure * w.kv_blocks}
        for i, g in enumerate(groups):
            here = load[g.worker]
            if here > mean:  # busy: to the least loaded
                away = [w for w in every[i] if load[w.worker] < here][:most]
            else:  # idle: only to trade places with a worker over its KV pressure (shorter contexts in)
                away = [w for w in every[i] if w.worker in pressed][:most]
            if g.worker in pressed:  # and to the roomiest
                away += sorted(every[i], key=lambda w: demand[w.worker] - w.kv_blocks)[:most]
            every[i] = away
    return [
        [g.worker, *dict.fromkeys([*(w.worker for w in every[i]), *sorted(start.get(i, ()))])]
        for i, g in enumerate(groups)
    ]


def _banded(
    snapshot: ClusterSnapshot, settings: PlannerSettings, standing: Standing, start: list[MoveRequest]
) -> list[list[Group]]:
    """The groups split in the finest bands (``band_of``) whose model fits ``max_ilp_variables``
    (pruned where the whole one does not), then unbanded. A band's destinations are its group's
    (they depend on its worker, adapter and the workers holding it alone), so a banded model's
    size is counted from the unbanded groups' destinations: built for each try, the 128 x 1,024 x
    10,000 snapshot took 2.7 s, past its 1 s bound, and fell back."""
    parents = grouped(snapshot)
    full: list[list[str]] = []
    pruned: list[list[str]] = []
    of = {(g.worker, g.adapter, g.fits): i for i, g in enumerate(parents)}
    workers = {w.worker: w for w in snapshot.workers}
    fine = {
        r.request_id: (i, band_of(price_of(snapshot, workers[g.worker], r), r, 2))
        for i, g in enumerate(parents)
        for r in g.requests
    }
    for bands in (2, 1):
        # A variable each at least: counted before they are built (0.2 s at 128 x 1,024 x 10,000)
        if len({(i, band[:bands]) for i, band in fine.values()}) > settings.max_ilp_variables:
            continue
        groups = grouped(snapshot, bands)
        if not full:
            full = _destinations(snapshot, parents, replace(settings, max_ilp_variables=sys.maxsize), {}, standing)
            pruned = _destinations(snapshot, parents, replace(settings, max_ilp_variables=0), {}, standing)
        at = [of[g.worker, g.adapter, g.fits] for g in groups]
        dests, size = full, sum(len(full[i]) for i in at)
        if size > settings.max_ilp_variables and settings.max_destinations is not None:
            dests, size = pruned, sum(len(pruned[i]) for i in at)
        # ``_destinations`` keeps where the start moves some of a band, pruned or not: one variable
        # more each (uncounted, bands offered under the bound were over it once listed)
        towards = {(i, band[:bands], m.to_worker) for m in start for i, band in [fine[m.request_id]]}
        size += sum(w not in dests[i] for i, _, w in towards)
        if size <= settings.max_ilp_variables:
            return [groups, parents]
    return [parents]


def _solve(
    snapshot: ClusterSnapshot,
    settings: PlannerSettings,
    start: list[MoveRequest],
    started: float,
    standing: Standing,
) -> tuple[list[MoveRequest], PlanMethod] | IlpFallback:
    """The ILP's moves, begun from ``start``'s (a feasible plan, the greedy one), or why it gave
    none; ``started``: when planning began (perf_counter), which the time bound counts from;
    ``standing``: the snapshot's figures (KV demand)."""
    # Where the greedy pass (or, below, the banding) took the bound, no model: built all the same, it
    # was thrown away once built, and the plan came past its bound by the building (a greedy plan
    # in 1.4-2 s of a 1 s bound at 128 x 1,024 x 10,000 on a loaded machine).
    if _left(settings, started) <= _CBC_OVERHEAD_S:
        return IlpFallback.BUILD_TIMEOUT
    workers = {w.worker: w for w in snapshot.workers}
    active = standing.running
    for groups in _banded(snapshot, settings, standing, start):
        group_of = {r.request_id: i for i, g in enumerate(groups) for r in g.requests}
        moved = Counter((group_of[m.request_id], m.to_worker) for m in start)
        towards: dict[int, set[str]] = defaultdict(set)
        for i, w in moved:
            towards[i].add(w)
        dests = _destinations(snapshot, groups, settings, towards, standing)
        if sum(map(len, dests)) <= settings.max_ilp_variables:
            break
    else:
        return IlpFallback.TOO_LARGE
    if _left(settings, started) <= _CBC_OVERHEAD_S:
        return IlpFallback.BUILD_TIMEOUT
    prob = pulp.LpProblem("co_migration", pulp.LpMinimize)
    T = prob.add_variable("T", lowBound=0)
    # Variables are named by index: worker names need not be LP-safe (PuLP maps "-" to "_").
    index = {w: k for k, w in enumerate(workers)}
    n = {
        (i, w): prob.add_variable(f"n_{i}_{index[w]}", lowBound=0, upBound=g.size, cat="Integer")
        for i, g in enumerate(groups)
        for w in dests[i]
    }
    y: dict[tuple[str, str], int | pulp.LpVariable] = {}
    for i, g in enumerate(groups):
        for w in dests[i]:
            if (g.adapter, w) not in y:
                running = g.adapter == BASE or runs_among(active[w], g.adapter) and not joins(active[w], g.adapter)
                y[g.adapter, w] = 1 if running else prob.add_variable(f"y_{len(y)}", cat="Binary")
    # Expressions are built from (variable, coefficient) pairs at once: PuLP's operators make an
    # intermediate expression per product, which was most of the build time.
    objective: list[tuple[pulp.LpVariable, float]] = [(T, 1.0)]
    overs: dict[str, pulp.LpVariable] = {}
    work_of: dict[str, list[tuple[pulp.LpVariable, float]]] = {}
    kv_of: dict[str, list[tuple[pulp.LpVariable, int]]] = {}
    per_worker: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        prob += pulp.LpAffineExpression((n[i, w], 1) for w in dests[i]) == g.size
        unit = sum(move_cost(snapshot, r) for r in g.requests) / g.size  # (k alike cost about k times it)
        for w in dests[i]:
            per_worker[w].append(i)
            if w != g.worker:
                if not isinstance(y[g.adapter, w], int):  # where it runs, n's bound says it all
                    prob += pulp.LpAffineExpression([(n[i, w], 1), (y[g.adapter, w], -g.size)]) <= 0
                objective.append((n[i, w], unit))
    arriving = {(groups[i].adapter, w) for (i, w), k in moved.items() if k}  # by the start's plan
    for w, ws in workers.items():
        new = [(a, v) for (a, x), v in y.items() if x == w and not isinstance(v, int)]
        if new:
            joining = {a for a, _ in new if joins(active[w], a)}  # (no read: as where it runs)
            coming = {a for a, _ in new if (a, w) in arriving}
            bound_slots(prob, new, index[w], coming, ws.slots - active[w].slots, joining)
            for a, v in new:
                if a not in joining and (price := read_price(snapshot, ws, a)):
                    objective.append((v, price))
        here = per_worker[w]
        kv = [(n[i, w], groups[i].mean_blocks(ws.block_size)) for i in here]
        # A worker already over its blocks (by the same count) may stay there, not grow: no move fits.
        # What it counts but does not list (moves on their way here among it) stays whatever the plan.
        home = sum(groups[i].size * c for (_, c), i in zip(kv, here) if groups[i].worker == w)
        prob += pulp.LpAffineExpression(kv) <= max(ws.kv_blocks - ws.unlisted_blocks, home)
        over = overs[w] = prob.add_variable(f"over_{index[w]}", lowBound=0)
        prob += pulp.LpAffineExpression([*kv, (over, -1)]) <= settings.kv_pressure * ws.kv_blocks - ws.unlisted_blocks
        objective.append((over, ws.block_size * snapshot.recompute_seconds_per_token))
        work = [(n[i, w], groups[i].mean_remaining * ws.cost(name_of(groups[i].adapter))) for i in here]
        work_of[w], kv_of[w] = work, kv
        prob += pulp.LpAffineExpression([*work, (T, -1)]) <= -ws.unlisted_seconds()
    prob += pulp.LpAffineExpression(objective)
    start_from(moved, groups, dests, n, y, T, overs, work_of, kv_of, settings.kv_pressure, workers)
    if settings.max_nodes is not None:
        # No cuts: a node bound does not bound CBC's cut rounds at the root, which took up to 28 s
        # a solve in the simulator's 32-replica runs; without them, the same plans at 20 nodes in
        # a third of the time (bench snapshots up to 128 x 1,024 x 10,000).
        solver = pulp.COIN_CMD(
            path=_cbc_path(),
            msg=False,
            maxNodes=settings.max_nodes,
            threads=1,
            warmStart=True,
            options=["cuts off"],
        )
    else:
        remaining = _left(settings, started)
        if remaining <= _CBC_OVERHEAD_S:  # building took the bound: no time left to solve
            return IlpFallback.BUILD_TIMEOUT
        # No cuts either: with them CBC spent the bound in its root's cut rounds at 128 x 1,024 x
        # 10,000 (even at 3 s) and gave back its start, whose named plan lost to greedy's; without,
        # it branches from the start and its plan won there and at 32 x 128 x 2,000 within 1 s.
        solver = pulp.COIN_CMD(
            path=_cbc_path(),
            msg=False,
            timeLimit=max(0.1, remaining - _CBC_OVERHEAD_S),
            warmStart=True,
            options=["cuts off"],
        )
    try:
        prob.solve(solver)
    except pulp.PulpSolverError:  # CBC killed (out of memory), or its files unwritable: as no solution
        return IlpFallback.FAILED
    if prob.sol_status not in (pulp.LpSolutionIntegerFeasible, pulp.LpSolutionOptimal):
        return IlpFallback.FAILED
    moves: list[MoveRequest] = []
    room = {w: workers[w].kv_blocks - d for w, d in standing.demand.items()}  # (arrivals take it)
    for i, g in enumerate(groups):
        left = g.requests
        for w in dests[i][1:]:  # (home first)
            k, size = int(round(n[i, w].value() or 0)), workers[w].block_size
            if not k:
                continue
            named, left = within(left, k, k * g.mean_blocks(size), size, room, w)
            moves.extend(
                MoveRequest(request_id=r.request_id, adapter=r.adapter, to_worker=w, ship_kv=_ship_kv(snapshot))
                for r in named
            )
    optimal = prob.sol_status == pulp.LpSolutionOptimal
    return moves, PlanMethod.ILP if optimal else PlanMethod.ILP_INCUMBENT


def _left(settings: PlannerSettings, started: float) -> float:
    """Seconds of the time bound left since ``started`` (perf_counter); a node bound is not timed."""
    if settings.max_nodes is not None:
        return math.inf
    return settings.time_limit_s - (time.perf_counter() - started)


def _cbc_path() -> str:
    # CBC comes with the cbcbox wheel (pulp[cbc]); ask it rather than PATH, which need not hold the venv.
    import cbcbox

    return str(cbcbox.cbc_bin_path())


def _greedy(
    snapshot: ClusterSnapshot,
    settings: PlannerSettings,
    deadline: float | None = None,
    standing: Standing | None = None,
) -> list[MoveRequest]:
    """One request at a time from the most loaded worker to one with its adapter or a free slot, and KV room,
    while the longest completion shrinks by more than it costs; at ``deadline``, the moves so far."""
    standing = standing or Standing(snapshot)  # (the caller's sums: not walked again in the time bound)
    workers, load, demand = standing.workers, dict(standing.load), dict(standing.demand)
    held = {w: Running(keys, keys.by_version) for w, keys in standing.running.items()}  # (moves add to it)

    def price(r: RequestState) -> float:
        return price_of(snapshot, workers[r.worker], r)

    on: dict[str, list[RequestState]] = defaultdict(list)
    for r in sorted(snapshot.requests, key=price):
        on[r.worker].append(r)  # each worker's cheapest first, kept so (sorted for each move: 6 s)
    to: dict[str, str] = {}
    for _ in range(len(snapshot.requests)):
        if deadline is not None and time.perf_counter() > deadline:
            break
        src = max(load, key=lambda w: load[w])
        order = sorted(load, key=lambda w: load[w])
        pick: tuple[float, float, str] | None = None  # (read, end, destination)
        for i, r in enumerate(on[src]):  # noqa: B007 (the one picked: read after the loop)
            if price(r) >= 1:  # (and every one after it) adds more than it relieves
                break
            a, moving = r.key, move_cost(snapshot, r)
            # One needing no read first (as the ILP prices one), then the one ending first: the least
            # loaded read an adapter where one holding it ended as soon (a review; the commit's numbers).
            pick = None
            for dst in order:
                bound = pick[1] if pick and not pick[0] else load[src]
                if load[dst] > bound:  # (in load order: none after it ends as soon)
                    break
                if dst == src:
                    continue
                # The cheapest checks first, each only where the last passed: priced for every one
                # looked at, they took 0.7 s of the 1 s bound at 128 x 1,024 x 10,000 (the ILP none).
                arrives = load[dst] + r.remaining_tokens * workers[dst].cost(r.adapter) + moving
                if arrives > bound:  # (a read only adds to it)
                    continue
                if demand[dst] + blocks_of(r.context_tokens, workers[dst].block_size) > workers[dst].kv_blocks:
                    continue
                if not (workers[dst].holds(r) and takes(held[dst], a, workers[dst].slots)):
                    continue
                # a read it makes is waited for (unpriced, a fallback plan moved 2 s of work where a
                # read took 3 s); priced until one passes (about once a move), then none is taken
                needs = a and not (runs_among(held[dst], a) or workers[dst].has(a))
                if needs and pick:
                    continue
                read = read_price(snapshot, workers[dst], a) if needs else 0.0
                if arrives + read < load[src] and (pick is None or (read, arrives + read) < pick[:2]):
                    pick = (read, arrives + read, dst)
            if pick:
                break
        if pick is None:
            break
        read, _, dst = pick
        load[src] -= r.remaining_tokens * workers[src].cost(r.adapter)
        load[dst] += r.remaining_tokens * workers[dst].cost(r.adapter) + move_cost(snapshot, r) + read
        demand[src] -= blocks_of(r.context_tokens, workers[src].block_size)
        demand[dst] += blocks_of(r.context_tokens, workers[dst].block_size)
        del on[src][i]
        bisect.insort(on[dst], r, key=price)
        if r.adapter:  # (the source keeps counting it, as the ILP does: its plan is the ILP's start)
            held[dst].add(r.key)
        to[r.request_id] = dst
    # A request moved on again counts once, to where it ended (nowhere, if back home).
    return [
        MoveRequest(request_id=r.request_id, adapter=r.adapter, to_worker=to[r.request_id], ship_kv=_ship_kv(snapshot))
        for r in snapshot.requests
        if to.get(r.request_id, r.worker) != r.worker
    ]
