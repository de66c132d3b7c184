"""How the planner counts an adapter read: a wait for the requests moved for it, the same in the
greedy pass, the ILP, ``worth`` and the gain check, and one a move need not make is not made."""

from __future__ import annotations

from dataclasses import replace

import pytest

from dlora.common.messages import MoveRequest
from dlora.services.migrator.costs import Standing, worth
from dlora.services.migrator.greedy import greedy_moves
from dlora.services.migrator.planner import PlannerSettings, plan
from dlora.services.migrator.snapshot import ClusterSnapshot, RequestState
from tests.unit.planner_cases import reqs, worker

# Run as on a machine of its own: under its time bound the planner runs CBC only where the pace it
# measures leaves CBC time (``pace.Clock``; ``test_planner_pace`` fakes a loaded one).
pytestmark = pytest.mark.usefixtures("whole_core")


@pytest.mark.parametrize("solver", ["ilp", "greedy"])
def test_a_read_to_a_busy_worker_is_judged_as_the_gain_check_judges_it(solver: str) -> None:
    """x runs five 1 s requests of a; y runs 3.5 s of its own and lacks a (a read of 3 s). Moved
    there, one waits for the read beside y's steps and ends at 4.525 s (its recompute, 0.025 s,
    after the read too), before x's 5 s: the plan gains 0.5 s less its recompute, counted once
    (``worth``). Priced as work taken from y (3.5 + 3 + 1 s), the read made the move look worse
    than none to the greedy pass and to the ILP alike, and nothing went, though the gain check (the
    read waited for) passed it (left by the last session): now all three judge it alike."""
    own = [replace(r, pinned=True) for r in reqs("y", None, 7, remaining=50)]
    snap = ClusterSnapshot(
        workers=[worker("x", ["a"]), worker("y", [])],
        requests=reqs("x", "a", 5) + own,
        file_bytes={"a": 16},
        adapter_load_seconds=3.0,
    )
    settings = PlannerSettings(max_nodes=20) if solver == "ilp" else PlannerSettings(max_ilp_variables=1)
    p = plan(snap, settings)
    assert [m.to_worker for m in p.moves] == ["y"] and not p.no_gain
    assert p.makespan_after_s == pytest.approx(4.525)
    assert p.method == ("greedy" if solver == "greedy" else "ilp")
    assert worth(snap, p.moves, 1.0) == pytest.approx(5 - 4.5 - 50 * 0.0005)


def test_the_greedy_pass_moves_a_request_needing_no_read_before_one_that_reads() -> None:
    """x runs two 1 s requests of a and two of b; y, idle, holds b and lacks a (a read of 1 s). All
    alike in price, a's come first, and the pass read a on y for one of them, where b's could go
    there without a read and end as soon (at 2 s either way): it now moves b's (seed 167 of a fuzz,
    left by the last session)."""
    snap = ClusterSnapshot(
        workers=[worker("x", ["a", "b"]), worker("y", ["b"])],
        requests=reqs("x", "a", 2) + reqs("x", "b", 2),
        file_bytes={"a": 16, "b": 16},
        adapter_load_seconds=1.0,
    )
    moves = greedy_moves(Standing(snap, 1.0))
    assert sorted((m.request_id, m.to_worker) for m in moves) == [("x-b-0", "y"), ("x-b-1", "y")]
    p = plan(snap, PlannerSettings(max_ilp_variables=1))  # (the greedy plan, where the ILP does not solve)
    assert {m.adapter for m in p.moves} == {"b"} and p.makespan_after_s == pytest.approx(2.05)  # (and 2 recomputes)


def _passing_through() -> ClusterSnapshot:
    """w0 busy; w2 holds no adapter, nor w1; w3 runs a3 (a pinned request). Each read takes 3 s."""
    rows = [  # (id, worker, adapter, context, remaining tokens, pinned)
        ("r00", "w3", "a1", 172, 74.8, False),
        ("r01", "w0", "a3", 108, 152.9, False),
        ("r02", "w3", "a3", 289, 269.1, True),
        ("r03", "w0", None, 309, 81.6, False),
        ("r04", "w0", "a0", 314, 54.8, False),
        ("r05", "w1", "a3", 205, 176.9, False),
        ("r07", "w0", "a1", 290, 206.9, False),
        ("r08", "w1", None, 221, 282.9, False),
        ("r09", "w0", "a0", 139, 53.7, False),
    ]
    requests = [RequestState(i, w, a, c, t, pinned=p) for i, w, a, c, t, p in rows]
    workers = [worker("w0"), worker("w1"), worker("w2", kv_blocks=200), worker("w3", ["a2"])]
    return ClusterSnapshot(workers, requests, file_bytes={f"a{i}": 16 for i in range(4)}, adapter_load_seconds=3.0)


def test_a_read_counts_only_where_the_request_moved_for_it_stays() -> None:
    """The pass moves r01 (a3) from w0 to w3, which runs a3, then on to w2, reading a3 there (3 s),
    then on again to w1, which runs a3. Its read on w2 was counted there still, w2 looked 3 s busy
    with nothing to read, and r09 (a0) went to w1 to read a0 there, where w2 reading it ends
    sooner: the plan saved 1.43 s where it now saves 1.73 s (a seeded fuzz; left by the last
    session). The read is counted where the requests waiting for it are, and goes with the last."""
    snap = _passing_through()
    moves = greedy_moves(Standing(snap, 1.0))
    assert [(m.request_id, m.to_worker) for m in moves] == [("r01", "w1"), ("r08", "w2"), ("r09", "w2")]
    before = [MoveRequest(request_id=r, adapter=a, to_worker=w) for r, a, w in _BEFORE]
    assert worth(snap, moves, 1.0) > worth(snap, before, 1.0)


_BEFORE = [("r01", "a3", "w1"), ("r08", None, "w2"), ("r09", "a0", "w1")]


def test_a_slot_a_request_took_in_passing_is_free_again_once_it_moves_on() -> None:
    """w0 (two slots) runs a0 and holds a2 and a3; r00 (a2) passes through it to w2, and its slot on
    w0 stayed taken: r02 (a3) then went to w1 to read a3 there, not to w0, which holds it (the plan
    saved 2.18 s where it now saves 2.30 s; a seeded fuzz). A worker's slots hold its own requests'
    adapters and those of the requests moved there that stay."""
    rows = [  # (id, worker, adapter, context, remaining tokens, pinned)
        ("r00", "w3", "a2", 240, 251.1, False),
        ("r01", "w0", "a0", 94, 145.2, True),
        ("r02", "w2", "a3", 179, 80.6, False),
        ("r03", "w3", "a0", 61, 274.8, True),
        ("r04", "w1", "a0", 339, 205.9, False),
    ]
    requests = [RequestState(i, w, a, c, t, pinned=p) for i, w, a, c, t, p in rows]
    workers = [
        worker("w0", ["a2", "a3"], slots=2),
        worker("w1", [], slots=2, kv_blocks=50),
        worker("w2", [], slots=3, kv_blocks=50),
        worker("w3", ["a0", "a1"], slots=1, kv_blocks=50),
    ]
    snap = ClusterSnapshot(workers, requests, file_bytes={f"a{i}": 16 for i in range(4)}, adapter_load_seconds=0.2)
    moves = greedy_moves(Standing(snap, 1.0))
    assert [(m.request_id, m.to_worker) for m in moves] == [("r00", "w2"), ("r02", "w0")]
    before = [
        MoveRequest(request_id="r00", adapter="a2", to_worker="w2"),
        MoveRequest(request_id="r02", adapter="a3", to_worker="w1"),
    ]
    assert worth(snap, moves, 1.0) > worth(snap, before, 1.0)
