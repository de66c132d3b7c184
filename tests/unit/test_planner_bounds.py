"""A plan keeps to what its destinations hold, request by request: the ILP counts a group of
interchangeable requests by their mean, so the requests it then names must add up to no more."""

from __future__ import annotations

import pytest

from dlora.services.migrator.planner import PlannerSettings, _greedy, apply, kv_demand, plan
from dlora.services.migrator.snapshot import ClusterSnapshot, RequestState
from tests.unit.test_planner import worker


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
    moves = plan(snap).moves if solver == "ilp" else _greedy(snap, PlannerSettings())
    assert moves and kv_demand(apply(snap, moves))["z"] <= 5  # (short ones, in its place)
