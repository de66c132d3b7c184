"""The co-migration ILP over the whole cluster (``solve``), begun from the greedy plan. Pure but for
CBC, which runs as a subprocess.

Requests are grouped by (worker, adapter) and
split into bands of alike price per second of work and remaining work (``bands``, as fine as the
variable bound allows): requests of one group are interchangeable to the planner, so an integer
variable n[g, w] (how many of group g go to worker w) stands for |g| binary request->worker
choices, which keeps 2,000 requests x 32 workers solvable in well under a second. Binary y[a, w] says adapter a runs on
worker w (fixed to 1 where it already does).

    minimise  T + sum over moves of their cost (+ a tie-break on reads and recompute, ``READ_TIE``)
    s.t.      each group's requests all land somewhere           sum_w n[g, w] = |g|
              a request goes only where its adapter is           n[g, w] <= |g| * y[a_g, w]
              adapter slots (one per adapter, any rank)          sum_a y[a, w] <= slots_w - running_w
              KV memory                                          sum_g n[g, w] kv_g <= blocks_w
              T bounds every worker's completion time            sum_g n[g, w] work_g,w + s_w c_w <= T
              and its reads, waited for by what they bring       sum_a y[a, w] read_a,w
                                                                   + sum_{g moved for a read} n[g, w] work_g,w <= T

KV demand above a pressure fraction of a worker's blocks (all of them by default) is priced as
the recompute of its tokens, since that is what the worker's preemptions will cost it: a slack
s_w >= sum_g n[g, w] kv_g - fraction * blocks_w adds s_w c_w (c_w = block_size * recompute cost) to w's
completion time in T's bound (where it acts, as ``Standing.worth`` counts it), and READ_TIE of it to
the objective: among plans as good by T and the moves' cost, the one preempting least (with T alone,
the ILP moved a busy worker's requests onto a pressed one and left there a waiting request that
could move for nothing, and at 32 x 128 x 2,000 its 20-node plan was 1.9 s worse by ``worth``
than with the recompute summed). A worker already over its blocks (waiting requests count) may
stay there, not grow.

work_g,w is a request's remaining tokens times what w measured per token of g's adapter (its mean
where the adapter has not run there): T is ``Standing.after``'s measure uncharged, each move's cost
counted once, in the objective's sum (as ``worth``; in T too, a move to the slowest worker paid
twice). running_w counts the adapters w has requests of: one step runs at most slots_w adapters, so
a new adapter may go only where fewer than that run (its read from host memory or disk is waited for
where w does not hold it). A group's destinations are only the workers where it could run (its
adapter runs there or a slot is free). Where those make too big a model, only groups on workers
busier than the mean (or over their KV pressure) may leave home, each to its few least loaded (or
roomiest) destinations: what shortens the longest completion is work moved from busy workers to idle
ones, and the pruning keeps 128 workers x 10,000 requests a model of a few thousand variables. A
move costs the cheaper of recomputing the context and shipping its KV (nothing for a request holding
no KV). A group's moved requests are its cheapest per second of work taken away; one that costs more
than that work (about to finish) stays, unless its worker is past its KV pressure.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import replace

import pulp

from dlora.common.messages import IlpFallback, MoveRequest, PlanMethod
from dlora.common.versions import name_of
from dlora.services.migrator.bands import Group, band_of, grouped, price_of
from dlora.services.migrator.costs import BASE, Standing, move_cost, read_price, ship_kv
from dlora.services.migrator.mip_start import start_from
from dlora.services.migrator.named import within
from dlora.services.migrator.pace import BUILD_S_PER_VARIABLE, Clock
from dlora.services.migrator.settings import PlannerSettings
from dlora.services.migrator.shared_slots import bound_slots, joins
from dlora.services.migrator.snapshot import ClusterSnapshot, WorkerState, runs_among, takes

# A read's seconds, this fraction of them in the objective: only T counts a read (a wait), so among
# plans as good by it the one reading no adapter it need not read is taken, by a margin no plan's
# worth (``Standing.worth``, in which a read is a wait alone) notices. So too a worker's recompute
# of its KV over pressure, counted in T only where that worker ends last.
READ_TIE = 1e-3


def destinations(
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
        pressed = {w.worker for w in snapshot.workers if demand[w.worker] > standing.kv_pressure * w.kv_blocks}
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


def banded(
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
            full = destinations(snapshot, parents, replace(settings, max_ilp_variables=sys.maxsize), {}, standing)
            pruned = destinations(snapshot, parents, replace(settings, max_ilp_variables=0), {}, standing)
        at = [of[g.worker, g.adapter, g.fits] for g in groups]
        dests, size = full, sum(len(full[i]) for i in at)
        if size > settings.max_ilp_variables and settings.max_destinations is not None:
            dests, size = pruned, sum(len(pruned[i]) for i in at)
        # ``destinations`` keeps where the start moves some of a band, pruned or not: one variable
        # more each (uncounted, bands offered under the bound were over it once listed)
        towards = {(i, band[:bands], m.to_worker) for m in start for i, band in [fine[m.request_id]]}
        size += sum(w not in dests[i] for i, _, w in towards)
        if size <= settings.max_ilp_variables:
            return [groups, parents]
    return [parents]


def solve(
    snapshot: ClusterSnapshot,
    settings: PlannerSettings,
    start: list[MoveRequest],
    clock: Clock,
    standing: Standing,
) -> tuple[list[MoveRequest], PlanMethod] | IlpFallback:
    """The ILP's moves, begun from ``start``'s (a feasible plan, the greedy one), or why it gave
    none; ``clock``: when planning began, which the time bound counts from (and the pace it runs at);
    ``standing``: the snapshot's figures (KV demand, and the ``kv_pressure`` its plans are measured at)."""
    # Where the greedy pass (or, below, the banding) took the bound, no model: built all the same, it
    # was thrown away once built, and the plan came past its bound by the building (a greedy plan
    # in 1.4-2 s of a 1 s bound at 128 x 1,024 x 10,000 on a loaded machine).
    if clock.left(settings) <= clock.reserve():
        return IlpFallback.BUILD_TIMEOUT
    workers = {w.worker: w for w in snapshot.workers}
    active = standing.running
    for groups in banded(snapshot, settings, standing, start):
        group_of = {r.request_id: i for i, g in enumerate(groups) for r in g.requests}
        moved = Counter((group_of[m.request_id], m.to_worker) for m in start)
        towards: dict[int, set[str]] = defaultdict(set)
        for i, w in moved:
            towards[i].add(w)
        dests = destinations(snapshot, groups, settings, towards, standing)
        if sum(map(len, dests)) <= settings.max_ilp_variables:
            break
    else:
        return IlpFallback.TOO_LARGE
    # The build is not cut short: where it would end past the time CBC needs, none. At 7x
    # oversubscription 32 x 128 x 2,000's 4,400 variables took 0.7-0.8 s to build, and the plan
    # was thrown away once built, past its bound.
    building = sum(map(len, dests)) * BUILD_S_PER_VARIABLE * clock.pace()
    if clock.left(settings) <= clock.reserve() + building:
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
    reads_of: dict[str, list[tuple[pulp.LpVariable, float]]] = {}
    for w, ws in workers.items():
        new = [(a, v) for (a, x), v in y.items() if x == w and not isinstance(v, int)]
        joining = {a for a, _ in new if joins(active[w], a)}  # (no read: as where it runs)
        if new:
            coming = {a for a, _ in new if (a, w) in arriving}
            bound_slots(prob, new, index[w], coming, ws.slots - active[w].slots, joining)
        reads = [(v, price) for a, v in new if a not in joining and (price := read_price(snapshot, ws, a))]
        objective.extend((v, READ_TIE * price) for v, price in reads)
        here = per_worker[w]
        kv = [(n[i, w], groups[i].mean_blocks(ws.block_size)) for i in here]
        # A worker already over its blocks (by the same count) may stay there, not grow: no move fits.
        # What it counts but does not list (moves on their way here among it) stays whatever the plan.
        home = sum(groups[i].size * c for (_, c), i in zip(kv, here) if groups[i].worker == w)
        prob += pulp.LpAffineExpression(kv) <= max(ws.kv_blocks - ws.unlisted_blocks, home)
        over = overs[w] = prob.add_variable(f"over_{index[w]}", lowBound=0)
        prob += pulp.LpAffineExpression([*kv, (over, -1)]) <= standing.kv_pressure * ws.kv_blocks - ws.unlisted_blocks
        work = [(n[i, w], groups[i].mean_remaining * ws.cost(name_of(groups[i].adapter))) for i in here]
        work_of[w], kv_of[w] = work, kv
        # its preemptions' recompute is its own time (``overflow_seconds``): in its row, not the sum's;
        # in the sum only as a tie-break, which also pins ``over`` to the overflow where T is not w's
        per_block = ws.block_size * snapshot.recompute_seconds_per_token
        prob += pulp.LpAffineExpression([*work, (over, per_block), (T, -1)]) <= -ws.unlisted_seconds()
        objective.append((over, READ_TIE * per_block))
        if reads:
            # A read is waited for (``Standing.waited``): the requests moved here for one start once
            # the reads made here end (one after another), beside this worker's own steps, so T
            # bounds both its work and its reads plus the work waiting for them: a max, linear
            # as two rows. Summed into the objective instead, a read to a busy worker made a move
            # that gained look worse than none (the commit's test).
            unread = {a for a, _ in new if a not in joining and not ws.has(a)}
            waiting = [(v, c) for (v, c), i in zip(work, here) if groups[i].worker != w and groups[i].adapter in unread]
            reads_of[w] = [*reads, *waiting]
            prob += pulp.LpAffineExpression([*reads_of[w], (T, -1)]) <= 0
    prob += pulp.LpAffineExpression(objective)
    start_from(moved, groups, dests, n, y, T, overs, work_of, kv_of, standing, reads_of)
    if settings.max_nodes is not None:
        # No cuts: a node bound does not bound CBC's cut rounds at the root, which took up to 28 s
        # a solve in the simulator's 32-replica runs; without them, the same plans at 20 nodes in
        # a third of the time (bench snapshots up to 128 x 1,024 x 10,000).
        solver = pulp.COIN_CMD(
            path=cbc_path(),
            msg=False,
            maxNodes=settings.max_nodes,
            threads=1,
            warmStart=True,
            options=["cuts off"],
        )
    else:
        remaining, reserve = clock.left(settings), clock.reserve()
        if remaining <= reserve:  # building took the bound: no time left to solve
            return IlpFallback.BUILD_TIMEOUT
        # No cuts either: with them CBC spent the bound in its root's cut rounds at 128 x 1,024 x
        # 10,000 (even at 3 s) and gave back its start, whose named plan lost to greedy's; without,
        # it branches from the start and its plan won there and at 32 x 128 x 2,000 within 1 s.
        solver = pulp.COIN_CMD(
            path=cbc_path(),
            msg=False,
            timeLimit=max(0.1, remaining - reserve),
            warmStart=True,
            options=["cuts off"],
        )
    began = time.perf_counter()
    # PuLP deletes its model and start files only when CBC answers: where it raises, they stayed
    # in /tmp, two a failed solve, for a migrator's whole life. A directory of our own goes either way.
    with tempfile.TemporaryDirectory(prefix="dlora-cbc-") as files:
        solver.tmpDir = files
        try:
            prob.solve(solver)
        except pulp.PulpSolverError:  # CBC killed (out of memory), or its files unwritable: as no solution
            return IlpFallback.FAILED
    solved = prob.sol_status in (pulp.LpSolutionIntegerFeasible, pulp.LpSolutionOptimal)
    if clock.trips is not None and solver.timeLimit is not None:  # (observed once the plan returns)
        clock.trips.solving = (began, solver.timeLimit, prob.sol_status != pulp.LpSolutionOptimal, solved)
    if not solved:
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
                MoveRequest(request_id=r.request_id, adapter=r.adapter, to_worker=w, ship_kv=ship_kv(snapshot))
                for r in named
            )
    optimal = prob.sol_status == pulp.LpSolutionOptimal
    return moves, PlanMethod.ILP if optimal else PlanMethod.ILP_INCUMBENT


def cbc_path() -> str:
    # CBC comes with the cbcbox wheel (pulp[cbc]); ask it rather than PATH, which need not hold the venv.
    import cbcbox

    return str(cbcbox.cbc_bin_path())
