"""KV pressure where it acts: a worker's demand over ``kv_pressure`` of its blocks costs it the
recompute of its preempted requests, counted in that worker's completion time by ``worth``, the
greedy pass and the ILP alike (``costs.overflow_seconds``), not as work saved across the cluster."""

from __future__ import annotations

import dataclasses

import pulp
import pytest

from dlora.common.messages import MoveRequest
from dlora.services.migrator import costs
from dlora.services.migrator.costs import Standing, worth
from dlora.services.migrator.greedy import greedy_moves
from dlora.services.migrator.ilp import READ_TIE
from dlora.services.migrator.planner import PlannerSettings, plan
from dlora.services.migrator.snapshot import ClusterSnapshot
from tests.unit.planner_cases import reqs, worker


def _early_pressed() -> ClusterSnapshot:
    """w0's five requests need 95 of its 100 blocks (15 over a 0.8 bound: 0.24 s of recompute) but
    end at 0.74 s; w1's ten take 10 s; w2 is idle. A w0 request's cache ships in 0.152 s."""
    return ClusterSnapshot(
        workers=[worker("w0", kv_blocks=100), worker("w1"), worker("w2")],
        requests=reqs("w0", None, 5, remaining=10, context=19 * 16) + reqs("w1", None, 10, remaining=100, context=16),
        recompute_seconds_per_token=0.001,
        kv_transfer_seconds_per_token=0.0005,
    )


def test_relieving_a_pressed_worker_that_ends_early_saves_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Summed as work saved across the cluster, relieving w0 was worth 0.24 s less its 0.152 s
    shipping, though no completion came sooner, and the ILP shipped w0's requests to w2 beside
    w1's (left by the last session). The recompute is w0's time, and w0 ends first anyway: the
    move is worth its cost, negative, and the plan balances w1 alone. The ILP's objective is T
    plus the moves' cost, the longest completion before less ``worth``, and its recompute
    tie-break (``ilp.READ_TIE`` of the recompute the plan leaves)."""
    snap = _early_pressed()
    off_w0 = [MoveRequest(request_id="w0-None-0", adapter=None, to_worker="w2", ship_kv=True)]
    assert worth(snap, off_w0, 0.8) == pytest.approx(-0.152)
    solved: list[pulp.LpProblem] = []
    solve = pulp.LpProblem.solve
    monkeypatch.setattr(pulp.LpProblem, "solve", lambda prob, *a, **k: solved.append(prob) or solve(prob, *a, **k))
    settings = PlannerSettings(kv_pressure=0.8, max_nodes=50)
    p = plan(snap, settings)
    assert p.method == "ilp" and p.moves and all(m.request_id.startswith("w1") for m in p.moves)
    standing = Standing(snap, 0.8)
    left = standing.pressed(*standing.after(p.moves))
    tie = READ_TIE * sum(left[w] - load for w, load in standing.after(p.moves)[0].items())
    assert pulp.value(solved[0].objective) == pytest.approx(10.0 - worth(snap, p.moves, 0.8) + tie)


def test_a_pressed_worker_s_recompute_makes_it_the_one_the_greedy_pass_relieves() -> None:
    """w0's four requests take 4 s and need 96 of its 100 blocks: 16 over a 0.8 bound, 2.56 s of
    recompute, so it ends at 6.56 s, after w1's 5 s. Judged by its work alone, the pass took w1 for
    the busiest, could send nothing to w0 that ended before 5 s, and moved nothing (left by the
    last session). Counted, one of w0's requests goes to w1 (ending at 6.38 s, its shipping
    charged), taking w0 under its bound."""
    snap = ClusterSnapshot(
        workers=[worker("w0", kv_blocks=100), worker("w1")],
        requests=reqs("w0", None, 4, context=24 * 16) + reqs("w1", None, 5, context=16),
        recompute_seconds_per_token=0.01,
        kv_transfer_seconds_per_token=0.001,
    )
    moves = greedy_moves(Standing(snap, 0.8))
    assert any(m.request_id.startswith("w0") and m.to_worker == "w1" for m in moves)
    assert Standing(snap, 0.8).worth(moves) > 0
    assert greedy_moves(Standing(snap, 1.0)) == []  # (under its blocks: no recompute, w1 the busiest)
    # The makespans a plan reports count it too: without, the "before" was w1's 5 s, and the plan
    # that took w0 from 6.56 s read as lengthening the longest completion.
    p = plan(snap, PlannerSettings(kv_pressure=0.8, max_nodes=20))
    assert p.moves and p.makespan_before_s == pytest.approx(6.56) and p.makespan_after_s < 6.56


def test_of_plans_as_short_the_ilp_takes_the_one_preempting_least() -> None:
    """As in ``_early_pressed``, w0's demand is over its bound, but one of its requests waits (no
    KV: moved for nothing) and w1's load goes partly onto w0. Counted in w0's row alone, its
    recompute made no difference to the objective where w0 ends before T: the ILP left the waiting
    request there and w0 preempting (and at 32 x 128 x 2,000 its 20-node plan was 1.9 s worse by
    ``worth`` than with the recompute summed). With the tie-break it goes to w2, w0 back under its
    bound, the longest completion the same."""
    snap = _early_pressed()
    waiting = dataclasses.replace(snap.requests[4], running=False)
    snap = dataclasses.replace(snap, requests=[*snap.requests[:4], waiting, *snap.requests[5:]])
    p = plan(snap, PlannerSettings(kv_pressure=0.8, max_nodes=50))
    assert p.method == "ilp" and (waiting.request_id, "w2") in {(m.request_id, m.to_worker) for m in p.moves}
    standing = Standing(snap, 0.8)
    assert standing.pressed(*standing.after(p.moves))["w0"] == standing.after(p.moves)[0]["w0"]


def test_a_standing_counts_the_longest_completion_before_any_plan_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The longest completion as the snapshot stands (each worker's KV recompute at the standing's
    ``kv_pressure`` counted) is what every plan's ``worth`` drops from, so ``Standing`` counts it
    once: each ``worth`` then prices the workers' recompute for its plan alone. Counted anew at each
    ``worth``, it cost the planner a walk of every worker twice a plan (a review)."""
    snap = _early_pressed()
    priced: list[object] = []
    overflow = costs.overflow_seconds
    monkeypatch.setattr(costs, "overflow_seconds", lambda *a: priced.append(a) or overflow(*a))
    standing = Standing(snap, 0.8)
    assert len(priced) == len(snap.workers) and standing.longest == pytest.approx(10.0)  # (w1's)
    off_w1 = [MoveRequest(request_id="w1-None-0", adapter=None, to_worker="w2", ship_kv=True)]
    assert len({standing.worth(off_w1) for _ in range(4)}) == 1
    assert len(priced) == 5 * len(snap.workers)  # (once building it, once for each of the four plans)


def _even_pressed(kv_transfer: float = 0.0001) -> ClusterSnapshot:
    """w0's two requests take 4 s and need 94 of its 100 blocks (14 over a 0.8 bound: 0.224 s of
    recompute); w1's three take 4 s too, in one block each. A w0 request's cache ships in 0.075 s."""
    return ClusterSnapshot(
        workers=[worker("w0", kv_blocks=100), worker("w1")],
        requests=reqs("w0", None, 2, remaining=200, context=47 * 16)
        + reqs("w1", None, 1, remaining=200, context=16)
        + reqs("w1", None, 2, remaining=100, context=16, start=1),
        recompute_seconds_per_token=0.001,
        kv_transfer_seconds_per_token=kv_transfer,
    )


def test_the_greedy_pass_swaps_a_long_context_off_a_pressed_worker_for_a_short_one() -> None:
    """Any single move off w0 ends past its 4.224 s (w1 at 6.08 s), so the greedy pass moved nothing
    and the relief was planned only where CBC had the time (left by the last session). Swapped for
    w1's 2 s request of one block, w0 is under its bound and both end by 4.08 s. Where the swap's
    moves cost more than it saves, or the short request's adapter would be read at w0, none goes."""
    snap = _even_pressed()
    swap = {("w0-None-0", "w1"), ("w1-None-0", "w0")}
    standing = Standing(snap, 0.8)
    moves = greedy_moves(standing)
    assert {(m.request_id, m.to_worker) for m in moves} == swap and standing.worth(moves) == pytest.approx(0.1472)
    p = plan(snap, PlannerSettings(kv_pressure=0.8, max_ilp_variables=1))  # (no CBC: the greedy plan)
    assert p.method == "greedy" and {(m.request_id, m.to_worker) for m in p.moves} == swap
    assert greedy_moves(Standing(_even_pressed(kv_transfer=0.0003), 0.8)) == []  # (0.23 s to ship, 0.224 s saved)
    read = dataclasses.replace(snap.requests[2], adapter="a1")  # (w1 holds a1, w0 does not)
    workers, requests = [snap.workers[0], worker("w1", adapters=["a1"])], [*snap.requests[:2], read, *snap.requests[3:]]
    assert greedy_moves(Standing(dataclasses.replace(snap, workers=workers, requests=requests), 0.8)) == []
