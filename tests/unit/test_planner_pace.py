"""The planner's time bound on a machine it shares: its reserves priced at the pace it runs at, the
greedy pass stopped at its deadline within a request looked at. Clocks are faked: no wall time."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import pulp
import pytest

from dlora.loadgen.bench_migration import snapshot as bench_snapshot
from dlora.services.migrator import greedy as greedy_pass
from dlora.services.migrator import pace, planner
from dlora.services.migrator.costs import Standing
from dlora.services.migrator.greedy import greedy_moves
from dlora.services.migrator.planner import PlannerSettings, plan
from dlora.services.migrator.settings import CBC_OVERHEAD_S
from dlora.services.migrator.snapshot import ClusterSnapshot
from tests.unit.planner_cases import reqs, worker


def test_a_planner_given_a_seventh_of_a_core_builds_no_model_cbc_could_not_solve_in_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under 6x oversubscription 32 x 128 x 2,000 ended ``ilp-failed`` in 1.13-1.18 s of its 1 s
    bound: CBC's start and read-back took past the 0.3 s kept back for them, and a model of 4,400
    variables took 0.7-0.8 s to build. Where this thread gets a seventh of the wall's seconds, that
    reserve is 2.1 s, more than the bound: the greedy plan is sent and no model is built."""
    wall = time.perf_counter()
    monkeypatch.setattr(time, "thread_time", lambda: (time.perf_counter() - wall) / 7)
    # a window long enough to be a share, not a stall (``pace.STALL_S``), however fast the greedy pass
    greedy = planner.greedy_moves
    monkeypatch.setattr(planner, "greedy_moves", lambda *a: time.sleep(0.1) or greedy(*a))
    built: list[Any] = []
    problem = pulp.LpProblem
    monkeypatch.setattr(pulp, "LpProblem", lambda *a, **k: built.append(a) or problem(*a, **k))
    p = plan(bench_snapshot(8, 64, 500), PlannerSettings(time_limit_s=1.0))
    assert (p.method, p.ilp_fallback) == ("greedy", "ilp-build-timeout") and p.moves
    assert built == []
    # given the whole core, the same snapshot is solved (a node bound: not timed at all)
    monkeypatch.setattr(time, "thread_time", lambda: time.perf_counter() - wall)
    p = plan(bench_snapshot(8, 64, 500), PlannerSettings(max_nodes=20))
    assert p.ilp_fallback is None and built


def test_the_greedy_pass_stops_at_its_deadline_within_one_request_looked_at(monkeypatch: pytest.MonkeyPatch) -> None:
    """x runs 1,000 requests and y has no KV room for any: the pass's one look for a move walks all
    1,000 before it ends, and its deadline was looked at once a move, so it ran 20-50 ms past it
    under 6x oversubscription. The clock here passes the deadline as soon as the pass has begun:
    one request more is looked at, not the 1,000."""
    snap = ClusterSnapshot(workers=[worker("x", ["a"]), worker("y", ["a"], kv_blocks=1)], requests=reqs("x", "a", 1000))
    now = iter([0.0])
    looked: list[Any] = []
    price_of = greedy_pass.price_of

    def clock() -> float:
        looked.append("clock")
        return next(now, 10.0)  # (the first read before the deadline, 5.0; every one after past it)

    monkeypatch.setattr(greedy_pass, "time", SimpleNamespace(perf_counter=clock))
    monkeypatch.setattr(greedy_pass, "price_of", lambda *a: (looked and looked.append("price")) or price_of(*a))
    assert greedy_moves(Standing(snap, 1.0), deadline=5.0) == []
    assert looked.count("price") <= 2


def test_a_stall_of_a_few_ms_before_the_model_leaves_the_ilp_its_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """Beside the migrator's loop (holding the GIL up to its switch interval, 5 ms, as it decoded
    stats) a 2-worker plan had 1.5 ms of greedy pass and a 4-5 ms stall before its first check:
    read as pace 3.5-4.5, CBC's reserve (1-1.35 s) outgrew the 1 s bound and the greedy plan went
    (ilp-build-timeout), 5 plans of 60 (a loop taking 5 ms each 20 ms; 3 of 40 beside none, where
    the machine's other processes took the slices). Here the clocks say 1.5 ms run, then 5 ms
    stalled, at the ILP's first check, and a core of its own after it."""
    real = time.perf_counter
    at: list[float] = []  # (real) when planning began, and when the ILP began

    def wall() -> float:
        at[:] = at or [real()]
        return real() if len(at) == 1 else at[0] + 0.0065 + real() - at[1]

    def cpu() -> float:
        return real() - at[0] if len(at) == 1 else 0.0015 + real() - at[1]

    monkeypatch.setattr(pace, "time", SimpleNamespace(perf_counter=wall, thread_time=cpu))
    solve = planner.solve
    monkeypatch.setattr(planner, "solve", lambda *a: at.append(real()) or solve(*a))
    snap = ClusterSnapshot(workers=[worker("x", ["a"]), worker("y", ["a"])], requests=reqs("x", "a", 12))
    p = plan(snap, PlannerSettings(time_limit_s=1.0))
    assert len(at) == 2 and p.ilp_fallback is None and p.moves


def test_the_reserve_is_the_round_trip_past_plans_measured_at_this_pace() -> None:
    """A fixed 0.3 s at pace 9 is 2.7 s, past a 1 s bound: no model at all, where a small one's
    round trip takes a tenth of that. Measured (at pace 1), it is kept back with a margin, above a
    floor; before any plan has measured it, the fixed figure."""
    assert pace.reserve_s(9.0, None) == pytest.approx(2.7)
    assert pace.reserve_s(9.0, 0.02) == pytest.approx(9 * pace.RESERVE_FLOOR_S)  # (the floor)
    assert pace.reserve_s(2.0, 0.1) == pytest.approx(2 * 0.1 * pace.RESERVE_MARGIN)
    trips = pace.RoundTrips()
    trips.observe(elapsed=0.9, limit=0.6, stopped=True, pace=3.0)  # ran to its limit: 0.3 s past it
    assert trips.seconds == pytest.approx(0.1)
    trips.observe(elapsed=0.6, limit=0.8, stopped=False, pace=2.0)  # ended sooner: 0.3 s at most
    assert trips.seconds == pytest.approx(0.1)  # (so no news: the trip may be the 0.1 s kept)
    trips.observe(elapsed=0.05, limit=0.8, stopped=False, pace=1.0)  # 0.05 s at most: less than kept
    assert trips.seconds == pytest.approx(0.1 + pace.ROUND_TRIP_WEIGHT * (0.05 - 0.1))
    trips.observe(elapsed=0.5, limit=0.6, stopped=True, pace=1.0)  # (never less than nothing)
    assert 0 < trips.seconds < 0.1
    # counted from CBC's start to the plan's return (its checks after CBC too), once
    trips = pace.RoundTrips(solving=(10.0, 0.5, True, True))
    trips.done(10.8, pace=1.0)
    trips.done(11.8, pace=1.0)
    assert trips.seconds == pytest.approx(0.3) and trips.solving is None


def test_a_planner_at_pace_four_solves_where_its_round_trips_were_short(monkeypatch: pytest.MonkeyPatch) -> None:
    """At pace 4 the fixed reserve (1.2 s) leaves a 1 s bound no time for CBC; past plans that
    measured its round trip at 0.02 s keep back 0.2 s, and the ILP plans, its round trip kept."""
    wall = time.perf_counter()
    monkeypatch.setattr(time, "thread_time", lambda: (time.perf_counter() - wall) / 4)
    greedy = planner.greedy_moves
    monkeypatch.setattr(planner, "greedy_moves", lambda *a: time.sleep(0.05) or greedy(*a))
    snap = ClusterSnapshot(workers=[worker("x", ["a"]), worker("y", ["a"])], requests=reqs("x", "a", 12))
    p = plan(snap, PlannerSettings(time_limit_s=1.0))
    assert (p.method, p.ilp_fallback) == ("greedy", "ilp-build-timeout")
    trips = pace.RoundTrips(seconds=0.02)
    p = plan(snap, PlannerSettings(time_limit_s=1.0), trips)
    # (solved to optimum: its time bounds the round trip from above, so the figure rises no higher)
    assert p.ilp_fallback is None and p.moves and trips.solving is None and trips.seconds <= 0.02


def test_a_round_trip_measured_long_keeps_back_no_more_than_the_fixed_reserve(monkeypatch: pytest.MonkeyPatch) -> None:
    """A figure past the bound built no model, so no CBC run measured the round trip again: one
    solve counted whole (0.7 s, ended at optimum) kept a 1 s bound greedy at every later plan."""
    assert pace.reserve_s(1.0, 0.7) == pytest.approx(pace.reserve_s(1.0, None))
    wall = time.perf_counter()
    monkeypatch.setattr(time, "thread_time", lambda: time.perf_counter() - wall)  # (pace 1: a whole core)
    snap = ClusterSnapshot(workers=[worker("x", ["a"]), worker("y", ["a"])], requests=reqs("x", "a", 12))
    trips = pace.RoundTrips(seconds=0.7)
    p = plan(snap, PlannerSettings(time_limit_s=1.0), trips)
    assert p.ilp_fallback is None and p.moves and trips.seconds != 0.7


def test_a_solve_that_gave_no_solution_does_not_lower_the_round_trip(monkeypatch: pytest.MonkeyPatch) -> None:
    """CBC ends at once on an infeasible model, long before its limit. Read as a run to its limit
    (its status not optimal), it counted a round trip of 0 and lowered the figure the next plans keep
    back (left by the last session). Here a row no solution meets is added to the model before real
    CBC solves it: the plan falls back, and the figure stays. A run with no solution may raise it."""
    wall = time.perf_counter()
    monkeypatch.setattr(time, "thread_time", lambda: time.perf_counter() - wall)  # (pace 1: a whole core)
    solve = pulp.LpProblem.solve

    def infeasible(prob: pulp.LpProblem, *args: Any, **kwargs: Any) -> Any:
        never = prob.add_variable("never", lowBound=0, upBound=1)
        prob += pulp.LpAffineExpression([(never, 1)]) >= 2
        return solve(prob, *args, **kwargs)

    monkeypatch.setattr(pulp.LpProblem, "solve", infeasible)
    snap = ClusterSnapshot(workers=[worker("x", ["a"]), worker("y", ["a"])], requests=reqs("x", "a", 12))
    trips = pace.RoundTrips(seconds=0.1)
    p = plan(snap, PlannerSettings(time_limit_s=1.0), trips)
    assert (p.method, p.ilp_fallback) == ("greedy", "ilp-failed") and trips.seconds == 0.1
    trips.observe(elapsed=0.9, limit=0.6, stopped=True, pace=1.0, solved=False)  # 0.3 s past its limit
    assert trips.seconds == pytest.approx(0.1 + pace.ROUND_TRIP_WEIGHT * (0.3 - 0.1))
    fresh = pace.RoundTrips()
    fresh.observe(elapsed=0.9, limit=0.6, stopped=True, pace=1.0, solved=False)
    assert fresh.seconds is None  # (nor set the first: the fixed reserve stands until a solve)


def test_a_bound_at_the_fixed_reserve_never_measures_the_round_trip(monkeypatch: pytest.MonkeyPatch) -> None:
    """Why ``solve_time_s`` <= ``CBC_OVERHEAD_S`` is still refused now that past plans measure CBC's
    round trip: only a CBC run measures it, and until one has the fixed reserve is kept back, which
    such a bound cannot hold. Plan after plan, even on a core of its own, no model is built and the
    figure stays unmeasured, so the ILP would never run."""
    wall = time.perf_counter()
    monkeypatch.setattr(time, "thread_time", lambda: time.perf_counter() - wall)  # (pace 1: a whole core)
    snap = ClusterSnapshot(workers=[worker("x", ["a"]), worker("y", ["a"])], requests=reqs("x", "a", 12))
    trips = pace.RoundTrips()
    for _ in range(3):
        p = plan(snap, PlannerSettings(time_limit_s=CBC_OVERHEAD_S), trips)
        assert (p.method, p.ilp_fallback, trips.seconds) == ("greedy", "ilp-build-timeout", None) and p.moves
