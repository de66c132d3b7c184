"""A plan keeps to what its destinations hold, request by request: the ILP counts a group of
interchangeable requests by their mean, so the requests it then names must add up to no more."""

from __future__ import annotations

import random
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from dlora.common.messages import MoveRequest, RequestLoad, WorkerStats
from dlora.services.migrator import ilp, planner
from dlora.services.migrator.costs import Standing, running_adapters, worth
from dlora.services.migrator.greedy import greedy_moves
from dlora.services.migrator.pace import Clock
from dlora.services.migrator.planner import PlannerSettings, _settled, apply, kv_demand, plan
from dlora.services.migrator.snapshot import ClusterSnapshot, RequestState
from dlora.services.migrator.trigger import snapshot_from_stats
from tests.unit.planner_cases import reqs, worker

# Run as on a machine of its own: under its time bound the planner runs CBC only where the pace it
# measures leaves CBC time (``pace.Clock``; ``test_planner_pace`` fakes a loaded one).
pytestmark = pytest.mark.usefixtures("whole_core")


@pytest.mark.parametrize("solver", ["ilp", "greedy"])
def test_the_requests_a_plan_names_fit_the_blocks_it_counted(solver: str) -> None:
    """One group on x: a 160-token context with a long answer to go (10 blocks; the cheapest to move
    per second of work taken away) and three of one block about to finish: 4 blocks each by their
    mean. z has 5 blocks, so the ILP moved one request there, and the one named was the 10-block
    one: twice z's cache, which its preemptions then recompute over and over (or never run)."""
    snap = ClusterSnapshot(
        workers=[worker("x", ["a"]), worker("z", ["a"], kv_blocks=5)],
        requests=[
            RequestState("long", "x", "a", 160, 400),
            *(RequestState(f"short-{i}", "x", "a", 16, 30) for i in range(3)),
        ],
        file_bytes={"a": 16},
    )
    moves = plan(snap).moves if solver == "ilp" else greedy_moves(Standing(snap, 1.0))
    assert moves and kv_demand(apply(snap, moves))["z"] <= 5  # (short ones, in its place)


def test_a_plan_leaves_no_destination_fuller_than_its_blocks_or_than_it_was() -> None:
    """y's two requests of a (1 and 38 blocks: 20 each by their mean) are over its 20 blocks. The ILP
    counted the short one leaving as 20 blocks freed, room for x's 4-block request of a to arrive;
    it freed 1, and y, over its cache already, grew (39 -> 42). Found by a seeded fuzz of small
    clusters (a plan, then each destination's demand against max(its blocks, its demand before))."""
    snap = ClusterSnapshot(
        workers=[worker("x", ["a", "b", "c"], slots=1, kv_blocks=20), worker("y", ["a"], slots=2, kv_blocks=20)]
        + [worker("z", ["a", "b", "c"], slots=3)],
        requests=[
            RequestState("x-a-0", "x", "a", 50, 300),
            RequestState("x-a-1", "x", "a", 200, 50),
            RequestState("x-b", "x", "b", 600, 50),
            RequestState("x-c", "x", "c", 600, 5),
            RequestState("y-a-0", "y", "a", 10, 5),
            RequestState("y-a-1", "y", "a", 600, 50),
        ],
        file_bytes={"a": 16, "b": 16, "c": 16},
    )
    before = kv_demand(snap)
    assert before["y"] == 39
    moves = plan(snap).moves
    assert moves and kv_demand(apply(snap, moves))["y"] <= before["y"]


@pytest.mark.parametrize("solver", ["ilp", "greedy"])
def test_two_plans_in_a_row_leave_room_for_the_moves_still_on_their_way(solver: str) -> None:
    """x holds twenty 10-block requests of 1 s each; y, idle, has 60 blocks: the first plan moves 6.
    A moment later their caches are on their way: x lists the 14 left, and y lists none but counts
    the six waiting on arrival, their tokens (its load) and now their blocks. Counted nowhere, those
    blocks left y looking empty, and the next plan moved 4 more there: 100 blocks onto 60."""

    def stats(name: str, listed: list[str], arriving: int = 0) -> WorkerStats:
        loads = [RequestLoad(request_id=r, adapter=None, context_tokens=160, remaining_tokens=100) for r in listed]
        return WorkerStats(
            worker=name,
            running=len(loads),
            waiting=arriving,
            free_blocks=60,
            total_blocks=60,
            block_size=16,
            max_loras=2,
            seconds_per_token=0.01,
            requests=loads,
            unlisted_remaining_tokens=100 * arriving,
            unlisted_by_adapter={"": (0, arriving)},
            unlisted_by_version={"": (0, arriving)},
            unlisted_kv_blocks=10 * arriving,
        )

    def moves(snap: ClusterSnapshot) -> list[MoveRequest]:
        return plan(snap).moves if solver == "ilp" else greedy_moves(Standing(snap, 1.0))

    costs = {"recompute_seconds_per_token": 0.0001, "kv_transfer_seconds_per_token": 0.0001}
    held = [f"r{i:02d}" for i in range(20)]
    first = moves(snapshot_from_stats([stats("x", held), stats("y", [])], {}, **costs))
    assert len(first) == 6 and {m.to_worker for m in first} == {"y"}
    left = sorted(set(held) - {m.request_id for m in first})
    second = snapshot_from_stats([stats("x", left), stats("y", [], arriving=6)], {}, **costs)
    assert kv_demand(second)["y"] == 60
    assert not [m for m in moves(second) if m.to_worker == "y"]


def test_the_ilp_itself_leaves_room_for_the_blocks_on_their_way() -> None:
    """The test above, on the ILP's own moves (before ``fitting`` drops those over a destination's
    blocks, which passed it with the model's KV bounds blind to the blocks on their way): y's 60
    blocks are all taken by the six requests arriving, so the model moves none of x's there."""

    y = replace(worker("y", kv_blocks=60), unlisted_blocks=60, unlisted_tokens=600)
    snap = ClusterSnapshot([worker("x"), y], [RequestState(f"r{i:02d}", "x", None, 160, 100) for i in range(20)])
    solved = ilp.solve(snap, PlannerSettings(max_nodes=20), [], Clock(), Standing(snap, 1.0))
    assert isinstance(solved, tuple) and solved[0] == []
    # (with room for them, it moves some: the bound, not the balance, keeps them home)
    roomy = replace(snap, workers=[worker("x"), replace(y, kv_blocks=200)])
    solved = ilp.solve(roomy, PlannerSettings(max_nodes=20), [], Clock(), Standing(roomy, 1.0))
    assert isinstance(solved, tuple) and solved[0]


def test_a_request_longer_than_its_groups_mean_moves_where_there_is_room() -> None:
    """x's two requests of a (4 and 13 blocks: 9 by their mean) beside a pinned one: one each to y
    and z evens the three out. Named against the mean alone, the second (13 > 9) was passed over
    though z had 1,000 blocks free, and x kept twice the others' work."""
    snap = ClusterSnapshot(
        workers=[worker("x", ["a"]), worker("y", ["a"]), worker("z", ["a"])],
        requests=[
            RequestState("short", "x", "a", 50, 300),
            RequestState("long", "x", "a", 200, 300),
            RequestState("pinned", "x", None, 10, 300, pinned=True),
        ],
        file_bytes={"a": 16},
    )
    moves = plan(snap).moves
    assert {m.request_id for m in moves} == {"short", "long"}
    assert {m.to_worker for m in moves} == {"y", "z"}


def test_the_ilp_plan_is_taken_only_where_it_does_better_than_the_greedy_one() -> None:
    """x's four requests of a: one with 300 tokens to go, three with 50 (112.5 by their mean). The
    ILP moved two (half the work, by the mean) and named the cheapest per second of work: the long
    one and a short one, 3.5 s on y where moving the long one alone, the greedy plan it began from,
    leaves 3 s. Found by a seeded fuzz: the ILP's named plan did worse than the greedy pass by its
    own objective in 75 of 150 small clusters, and in the 128 x 10,000 snapshot at 20 nodes. Split
    in bands (the long one alone in its own), the ILP moves the long one itself; a variable bound
    of 3 leaves the group whole (4 variables banded, 2 not), as at 128 x 1,024 x 10,000."""
    snap = ClusterSnapshot(
        workers=[worker("x", ["a"]), worker("y", ["a"])],
        requests=[
            RequestState("long", "x", "a", 10, 300),
            *(RequestState(f"short-{i}", "x", "a", 10, 50) for i in range(3)),
        ],
        file_bytes={"a": 16},
    )
    p = plan(snap, PlannerSettings(max_ilp_variables=3))
    # (3 s on y, and its move's recompute there: 10 tokens at 0.0005 s)
    assert p.makespan_after_s == pytest.approx(3.005) and [m.request_id for m in p.moves] == ["long"]
    assert (p.method, p.ilp_fallback) == ("greedy", None)
    p = plan(snap)
    assert [m.request_id for m in p.moves] == ["long"] and p.method == "ilp"


def test_a_solver_that_fails_leaves_the_greedy_plan(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """CBC runs as a subprocess: killed (out of memory) or unable to write its files, PuLP raised,
    and the migrator's look planned nothing where the greedy plan was ready (the module's docstring:
    where the solver ends without a solution, the greedy plan is taken). Nor are the model's files
    left behind: PuLP deletes them only after a solution is read, and a failing CBC left two in
    the temporary directory a plan."""
    monkeypatch.setattr(ilp, "cbc_path", lambda: "/bin/false")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    snap = ClusterSnapshot(
        workers=[worker("x", ["a"]), worker("y", ["a"])], requests=reqs("x", "a", 10), file_bytes={"a": 16}
    )
    p = plan(snap)
    assert (p.method, p.ilp_fallback) == ("greedy", "ilp-failed") and p.moves
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("settings", [PlannerSettings(), PlannerSettings(max_ilp_variables=1)], ids=["ilp", "greedy"])
def test_no_plan_moves_work_onto_a_worker_whose_read_of_its_adapter_costs_more(settings: PlannerSettings) -> None:
    """y lacks a, and reads an adapter in 3 s; half of x's 4 s would save 2 s. The ILP prices the
    read and moves nothing; the greedy pass (the fallback where the model is too large, and the
    ILP's start) did not, and moved two requests there to wait 3 s for their adapter."""
    snap = ClusterSnapshot(
        workers=[worker("x", ["a"]), worker("y", [])],
        requests=reqs("x", "a", 4),
        file_bytes={"a": 16},
        adapter_load_seconds=3.0,
    )
    assert plan(snap, settings).moves == []
    # where y holds a, the same moves go
    assert len(plan(replace(snap, workers=[worker("x", ["a"]), worker("y", ["a"])]), settings).moves) == 2


def test_a_plans_gain_counts_the_wait_for_the_reads_its_moves_make() -> None:
    """x runs four 1 s requests of a; y lacks a and reads it in 2.5 s. Where the ILP does not solve,
    the greedy plan moves one (3.525 s on y with its read, under x's 4 s): the longest completion
    goes from 4 s to 3.5 s, not to 3 s as counted without the read, so under a min_gain_s of 0.75
    it moved for a gain it did not bring. Where the gain asked is less it still goes: a read runs
    beside y's steps, so it is priced as the wait it is, not as work taken from y (``plan`` says
    why), and its worth is that gain less its move (by ``worth`` the read was once a cost too)."""
    snap = ClusterSnapshot(
        workers=[worker("x", ["a"]), worker("y", [])],
        requests=reqs("x", "a", 4),
        file_bytes={"a": 16},
        adapter_load_seconds=2.5,
    )
    greedy = PlannerSettings(max_ilp_variables=1, min_gain_s=0.75)
    p = plan(snap, greedy)
    assert p.no_gain and p.moves == [] and p.makespan_after_s == pytest.approx(3.525)
    p = plan(snap, replace(greedy, min_gain_s=0.25))
    assert len(p.moves) == 1 and p.makespan_after_s == pytest.approx(3.525)
    # (the moves' cost counted once, in the total: not in the longest completion it judges)
    assert worth(snap, p.moves, 1.0) == pytest.approx(4 - 3.5 - 50 * 0.0005)


def test_a_read_delays_the_requests_moved_for_it_not_the_destinations_own() -> None:
    """x runs ten 1 s requests of a; y runs six 1 s requests of its own and lacks a (a read of 1 s).
    The ILP moves two to y: y's own streams step on while a is read (DESIGN.md: "every other
    stream steps on"), the two start after it, and both workers end at 8 s (y 0.05 s later, their
    recomputes), 2 s before x did. The
    gain check added the read to all of y's work (9 s), and under a min_gain_s of 1.5 dropped it."""
    snap = ClusterSnapshot(
        workers=[worker("x", ["a"]), worker("y", [])],
        requests=reqs("x", "a", 10) + [replace(r, pinned=True) for r in reqs("y", None, 6)],
        file_bytes={"a": 16},
        adapter_load_seconds=1.0,
    )
    p = plan(snap, PlannerSettings(max_nodes=20, min_gain_s=1.5))
    assert not p.no_gain and sorted(m.to_worker for m in p.moves) == ["y", "y"]
    assert p.makespan_after_s == pytest.approx(8.05)
    # where y is idle, the two wait for the read all the same (1 s, then 2 s of work)
    idle = replace(snap, requests=reqs("x", "a", 4))
    p = plan(idle, PlannerSettings(max_nodes=20, max_ilp_variables=1))
    assert len(p.moves) == 1 and p.makespan_after_s == pytest.approx(3.0)


def test_where_the_plan_chosen_by_worth_brings_too_little_the_other_one_goes() -> None:
    """x runs four 1 s requests of a; y, idle, lacks a (a read of 1.4 s); z holds a beside 2.5 s of
    its own pinned work. The greedy plan moves one to y: the longest completion goes from 4 s to 3 s,
    the read waited for. The ILP, pricing the read as a cost, moved one to z instead (4 s to 3.5 s),
    and by worth its plan was chosen, then dropped as too little under a min_gain_s of 0.6: where the
    ILP did not solve, the greedy plan went; where it did, nothing went (a review). The ILP waits
    for a read now too, and moves it to y itself."""
    snap = ClusterSnapshot(
        workers=[worker("x", ["a"]), worker("y", []), worker("z", ["a"])],
        requests=reqs("x", "a", 4) + [replace(r, pinned=True) for r in reqs("z", None, 5, remaining=50)],
        file_bytes={"a": 16},
        adapter_load_seconds=1.4,
    )
    settings = PlannerSettings(max_nodes=20, min_gain_s=0.6)
    p = plan(snap, replace(settings, max_ilp_variables=1))  # (no ILP: the greedy plan)
    assert [(m.request_id, m.to_worker) for m in p.moves] == [("x-a-0", "y")] and not p.no_gain
    p = plan(snap, settings)
    assert p.ilp_fallback is None and not p.no_gain
    assert [(m.request_id, m.to_worker) for m in p.moves] == [("x-a-0", "y")]
    assert p.makespan_after_s == pytest.approx(3.0)


def _cluster(seed: int) -> ClusterSnapshot:
    """2 to 4 workers of 20, 50 or 1,000 blocks and 1 to 3 slots; up to 25 requests of three
    adapters (one at two versions) or the base model, of contexts and answers far apart."""
    rng = random.Random(seed)
    ws = [
        worker(f"w{i}", ["a", "b", "c"], slots=rng.randint(1, 3), kv_blocks=rng.choice([20, 50, 1000]))
        for i in range(rng.randint(2, 4))
    ]
    keys = [("a", "v1"), ("a", "v2"), ("b", ""), ("c", ""), (None, "")]
    rs = []
    for k in range(rng.randint(3, 25)):
        adapter, version = rng.choice(keys)
        home = rng.choice(ws[:-1]).worker  # (the last starts idle)
        context, remaining = rng.choice([10, 50, 200, 600]), rng.choice([5, 50, 300])
        rs.append(RequestState(f"r{k}", home, adapter, context, remaining, running=rng.random() < 0.8, version=version))
    return ClusterSnapshot(ws, rs, {"a": 16, "b": 16, "c": 16})


@pytest.mark.parametrize("seed", range(8))
def test_plans_of_small_random_clusters_keep_every_bound(seed: int) -> None:
    """The seeded fuzz that found the faults above, kept small: each request moved once, never home;
    no destination over max(its blocks, its demand before); no new adapter version where its slots
    are taken; and the plan no worse than the greedy one by the ILP's objective. Without this
    session's naming and choice, 5 of these 8 seeds broke one (40 of 60)."""
    snap = _cluster(seed)
    p = plan(snap)
    workers = {w.worker: w for w in snap.workers}
    home = {r.request_id: r.worker for r in snap.requests}
    assert len({m.request_id for m in p.moves}) == len(p.moves)
    assert all(home[m.request_id] != m.to_worker for m in p.moves)
    before, after = kv_demand(snap), kv_demand(apply(snap, p.moves))
    running, moved = running_adapters(snap), running_adapters(apply(snap, p.moves))
    for w in {m.to_worker for m in p.moves}:
        assert after[w] <= max(workers[w].kv_blocks, before[w])
        arriving = moved[w] - running[w]
        assert not arriving or moved[w].slots <= max(workers[w].slots, running[w].slots)
    greedy = greedy_moves(_settled(snap, 1.0))
    assert worth(snap, p.moves, 1.0) >= worth(snap, greedy, 1.0) - 1e-9 or p.no_gain


def test_the_moves_a_full_destination_sends_back_are_each_sorted_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """B has 10 blocks and 200 of A's requests arrive there: 190 go back home, and each one sent home
    to A had A's own 200 arrivals (from C) sorted again, though A was not over its blocks: 40,000
    sorted at 200 moves each way, 3 s at 3,000 (the ILP names 10,000 at the bench's largest)."""
    from dlora.common.messages import MoveRequest
    from dlora.services.migrator import named

    sorted_ = []
    monkeypatch.setattr(named, "sorted", lambda xs, **kw: sorted_.append(len(xs)) or sorted(xs, **kw), raising=False)
    n = 200
    snap = ClusterSnapshot(
        workers=[worker("A", kv_blocks=10**6), worker("B", kv_blocks=10), worker("C", kv_blocks=10**6)],
        requests=[RequestState(f"{w}{i}", w, None, 16, 10) for w in "AC" for i in range(n)],
    )
    moves = [MoveRequest(request_id=f"A{i}", adapter=None, to_worker="B") for i in range(n)]
    moves += [MoveRequest(request_id=f"C{i}", adapter=None, to_worker="A") for i in range(n)]
    kept = named.fitting(snap, moves, Standing(snap, 1.0))
    assert kv_demand(apply(snap, kept))["B"] == 10 and len(kept) == n + 10
    assert sum(sorted_) <= len(moves)


def _rolling(seed: int) -> ClusterSnapshot:
    """As ``_cluster``, in a rolling upgrade: requests of a by name alone beside its versions, workers
    counting requests past their lists (their adapters' slots taken) and holding some adapters only."""
    rng = random.Random(seed)
    ws = [
        replace(
            worker(f"w{i}", [a for a in "abc" if rng.random() < 0.6], rng.randint(1, 3), rng.choice([20, 50, 1000])),
            seconds_per_token=rng.choice([0.01, 0.02]),
            unlisted_tokens=rng.choice([0, 0, 500]),
            unlisted_keys=frozenset(k for k in ("a@v1", "a", "b", "c") if rng.random() < 0.2),
        )
        for i in range(rng.randint(2, 5))
    ]
    keys = [("a", "v1"), ("a", "v2"), ("a", ""), ("b", ""), ("c", ""), (None, "")]
    rs = []
    for k in range(rng.randint(3, 30)):
        adapter, version = rng.choice(keys)
        home = rng.choice(ws[:-1]).worker
        context, remaining = rng.choice([10, 50, 200, 600]), rng.choice([5, 50, 300])
        rs.append(RequestState(f"r{k}", home, adapter, context, remaining, running=rng.random() < 0.8, version=version))
    return ClusterSnapshot(ws, rs, {"a": 16, "b": 16, "c": 16}, adapter_load_seconds=rng.choice([0.05, 0.5, 3.0]))


@pytest.mark.parametrize("seed", [*range(16), 31, 166])
def test_plans_of_small_clusters_in_a_rolling_upgrade_keep_their_slots_and_blocks(seed: int) -> None:
    """The bounds above, by a node bound (the same plan under any load), in the full model and one
    pruned to a destination a group. Without a second slot for two versions arriving beside a name
    alone (a 2nd version there joined its slot too), seeds 31 and 166 of 200 broke the slots."""
    snap = _rolling(seed)
    workers = {w.worker: w for w in snap.workers}
    pruned = PlannerSettings(max_nodes=20, max_ilp_variables=12, max_destinations=1)
    for settings in (PlannerSettings(max_nodes=20), pruned):
        moves = plan(snap, settings).moves
        before, after = kv_demand(snap), kv_demand(apply(snap, moves))
        running, moved = running_adapters(snap), running_adapters(apply(snap, moves))
        for w in {m.to_worker for m in moves}:
            assert after[w] <= max(workers[w].kv_blocks, before[w])
            assert not moved[w] - running[w] or moved[w].slots <= max(workers[w].slots, running[w].slots)


def test_after_cbc_returns_the_plan_costs_its_moves_not_the_clusters_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    """The time bound keeps 0.3 s back for CBC's start-up and reading its solution; what ran after it
    returned (naming the moves, then the comparison with the greedy plan and the gain check) walked
    every request of the snapshot a dozen times over (completion times, KV demand, the snapshot
    after each plan), and at 128 x 1,024 x 10,000 a plan took 1.01-1.08 s of its 1 s bound. Counted,
    not timed: the requests' fields read after CBC returns, a few dozen a move (87 a request before)."""
    import pulp

    from dlora.loadgen.bench_migration import snapshot as bench_snapshot

    solved, reads = [False], [0]
    solve = pulp.LpProblem.solve

    def solving(prob: pulp.LpProblem, *args: Any, **kwargs: Any) -> Any:
        status = solve(prob, *args, **kwargs)
        solved[0] = True
        return status

    def reading(r: RequestState, name: str) -> Any:
        reads[0] += solved[0]
        return object.__getattribute__(r, name)

    snap = bench_snapshot(8, 64, 500)
    monkeypatch.setattr(pulp.LpProblem, "solve", solving)
    monkeypatch.setattr(RequestState, "__getattribute__", reading)
    p = plan(snap, PlannerSettings(max_nodes=20))
    monkeypatch.undo()
    assert solved[0] and p.ilp_fallback is None and len(p.moves) > 20
    assert reads[0] <= 50 * len(p.moves)


def test_a_time_bound_spent_before_the_solve_builds_no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """The greedy pass runs within the time bound; where it took the bound, the model was listed and
    built all the same, then thrown away (no time left to solve), and the plan came past its bound
    by the building: a greedy plan in 1.4-2 s of 1 s at 128 x 1,024 x 10,000 on a loaded machine.
    Counted, not timed: with no time left, no group's destinations listed and no model built."""
    problem, destinations = ilp.pulp.LpProblem, ilp.destinations
    built: list[object] = []
    listed: list[object] = []
    monkeypatch.setattr(ilp.pulp, "LpProblem", lambda *a, **k: built.append(a) or problem(*a, **k))
    monkeypatch.setattr(ilp, "destinations", lambda *a, **k: listed.append(a) or destinations(*a, **k))
    snap = ClusterSnapshot(
        workers=[worker("x", ["a"]), worker("y", ["a"])], requests=reqs("x", "a", 10), file_bytes={"a": 16}
    )
    assert plan(snap, PlannerSettings(time_limit_s=0.0)).ilp_fallback == "ilp-build-timeout"
    assert built == [] and listed == []
    assert plan(snap, PlannerSettings(max_nodes=20)).ilp_fallback is None and len(built) == 1  # (untimed: built)


def test_the_greedy_pass_moves_to_a_worker_holding_the_adapter_where_it_ends_as_soon() -> None:
    """x runs one 1 s request of a beside 4 s of its own pinned work; y, idle, lacks a (a read of
    1 s); z holds a beside 1 s of its own. Moved to either, the request ends at 2 s: the greedy pass
    took y, the least loaded before the move, and read a there for nothing (a review); a destination
    is now one needing no read first (as the ILP prices a read), then the one that ends first."""
    own = [replace(r, pinned=True) for r in reqs("x", None, 4) + reqs("z", None, 1)]
    snap = ClusterSnapshot(
        workers=[worker("x", ["a"]), worker("y", []), worker("z", ["a"])],
        requests=[*own, RequestState("moving", "x", "a", 10, 100)],
        file_bytes={"a": 16},
        adapter_load_seconds=1.0,
    )
    moves = greedy_moves(Standing(snap, 1.0))
    assert [(m.request_id, m.to_worker) for m in moves] == [("moving", "z")]
    p = plan(snap, PlannerSettings(max_ilp_variables=1))  # (the greedy plan, where the ILP does not solve)
    assert [m.to_worker for m in p.moves] == ["z"] and p.makespan_after_s == pytest.approx(4.0)


def test_where_the_ilps_plan_is_empty_the_greedy_one_goes_if_it_gains_enough() -> None:
    """The snapshot of the gain test above (y reads a in 2.5 s), planned with the ILP: pricing the
    read as a cost, it moved nothing (worth 0 against the greedy plan's negative worth), and an
    empty plan brings "too little" of nothing, so the greedy plan that goes where the ILP does not
    solve (4 s to 3.5 s, the read waited for) went nowhere once it did (a review). Either plan
    moves it now, the read waited for by both."""
    snap = ClusterSnapshot(
        workers=[worker("x", ["a"]), worker("y", [])],
        requests=reqs("x", "a", 4),
        file_bytes={"a": 16},
        adapter_load_seconds=2.5,
    )
    p = plan(snap, PlannerSettings(max_nodes=20, min_gain_s=0.25))
    assert (p.ilp_fallback, p.no_gain) == (None, False)
    assert len(p.moves) == 1 and p.makespan_after_s == pytest.approx(3.525)
    # asked for more than it brings, nothing goes, by either
    p = plan(snap, PlannerSettings(max_nodes=20, min_gain_s=0.75))
    assert p.moves == []


def test_a_plan_sums_the_clusters_requests_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """``Standing`` sums each worker's completion time, KV demand and adapters once, before the greedy
    pass; the greedy pass and each listing of the groups' destinations (three, banded) walked every
    request again for the same sums, inside the time bound (a review). Counted: one walk each."""
    from dlora.services.migrator import costs

    walks: dict[str, int] = {}
    sums = {name: getattr(costs, name) for name in ("completion_times", "running_adapters")}
    for name in sums:

        def counted(snap: ClusterSnapshot, name: str = name) -> Any:
            walks[name] = walks.get(name, 0) + 1
            return sums[name](snap)

        monkeypatch.setattr(costs, name, counted)
        monkeypatch.setattr(planner, name, counted, raising=False)  # (where it read them itself)
    snap = _cluster(3)
    p = plan(snap, PlannerSettings(max_nodes=20))
    assert p.ilp_fallback is None and p.moves
    assert walks == {"completion_times": 1, "running_adapters": 1}
