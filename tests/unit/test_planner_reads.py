"""How the planner counts an adapter read: a wait for the requests moved for it, the same in the
greedy pass, the ILP, ``worth`` and the gain check, and one a move need not make is not made."""

from __future__ import annotations

from dataclasses import replace

import pytest

from dlora.services.migrator.costs import worth
from dlora.services.migrator.greedy import greedy_moves
from dlora.services.migrator.planner import PlannerSettings, plan
from dlora.services.migrator.snapshot import ClusterSnapshot
from tests.unit.planner_cases import reqs, worker

# Run as on a machine of its own: under its time bound the planner runs CBC only where the pace it
# measures leaves CBC time (``pace.Clock``; ``test_planner_pace`` fakes a loaded one).
pytestmark = pytest.mark.usefixtures("whole_core")


@pytest.mark.parametrize("solver", ["ilp", "greedy"])
def test_a_read_to_a_busy_worker_is_judged_as_the_gain_check_judges_it(solver: str) -> None:
    """x runs five 1 s requests of a; y runs 3.5 s of its own and lacks a (a read of 3 s). Moved
    there, one waits for the read beside y's steps and ends at 4.5 s, before x's 5 s: the plan
    gains 0.5 s. Priced as work taken from y (3.5 + 3 + 1 s), the read made the move look worse
    than none to the greedy pass and to the ILP alike, and nothing went, though the gain check
    (the read waited for) passed it (left by the last session): now all three judge it alike."""
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
    assert p.makespan_after_s == pytest.approx(4.5)
    assert p.method == ("greedy" if solver == "greedy" else "ilp")
    assert worth(snap, p.moves, 1.0) == pytest.approx(0.5 - 50 * 0.0005)


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
    moves = greedy_moves(snap)
    assert sorted((m.request_id, m.to_worker) for m in moves) == [("x-b-0", "y"), ("x-b-1", "y")]
    p = plan(snap, PlannerSettings(max_ilp_variables=1))  # (the greedy plan, where the ILP does not solve)
    assert {m.adapter for m in p.moves} == {"b"} and p.makespan_after_s == pytest.approx(2.0)
