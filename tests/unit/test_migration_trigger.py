"""When the migrator plans: each trigger bound on hand-built snapshots."""

from __future__ import annotations

import msgspec
import pytest

from dlora.common.messages import WorkerStats
from dlora.common.plans import PLAN_MAX_AGE_S
from dlora.services.migrator.looks import unheard
from dlora.services.migrator.snapshot import ClusterSnapshot, RequestState, WorkerState
from dlora.services.migrator.trigger import TriggerBounds, triggered

OFF = TriggerBounds(imbalance=None, request_excess=None, kv_pressure=None)


def snap(*loads: tuple[int, float, int], kv_blocks: int = 100) -> ClusterSnapshot:
    """One worker per (requests, remaining tokens each, context tokens each); 16-token blocks."""
    workers = [WorkerState(f"w{i}", kv_blocks, 16, 4, frozenset(), 0.01) for i in range(len(loads))]
    requests = [
        RequestState(f"w{i}-{j}", f"w{i}", None, context, remaining)
        for i, (n, remaining, context) in enumerate(loads)
        for j in range(n)
    ]
    return ClusterSnapshot(workers, requests)


def test_queue_delay_spread() -> None:
    bounds = TriggerBounds(imbalance=0.25, min_gain_s=0.5, request_excess=None, kv_pressure=None)
    assert triggered(snap((4, 100, 16), (1, 100, 16)), bounds) == "queue-delay"  # 4 s vs mean 2.5 s
    assert triggered(snap((4, 100, 16), (4, 100, 16)), bounds) is None
    # Spread by fraction but not by min_gain_s seconds: not worth a plan.
    assert triggered(snap((4, 1, 16), (1, 1, 16)), bounds) is None
    # One long request beside idle workers: moved, it takes as long anywhere. A simulated hour of
    # the Azure trace at 256 replicas solved an ILP every cool-down for it, none with a move.
    assert triggered(snap((1, 3000, 16), (0, 0, 0), (0, 0, 0)), bounds) is None
    assert triggered(snap((2, 3000, 16), (0, 0, 0), (0, 0, 0)), bounds) == "queue-delay"  # one can go
    assert triggered(snap((1, 3000, 16), (3, 100, 16), (0, 0, 0)), bounds) is None  # the long one sets it
    # ... unless a worker's KV is past what the planner prices: a move relieves that too (a review's
    # case, the KV bound off: the planner still prices demand past all of the blocks).
    assert triggered(snap((2, 3000, 1600), (0, 0, 0), kv_blocks=100), bounds) == "queue-delay"
    assert triggered(snap((1, 3000, 1700), (0, 0, 0), kv_blocks=100), bounds) == "queue-delay"


def test_request_count_excess_counts_requests_not_their_work() -> None:
    bounds = TriggerBounds(imbalance=None, request_excess=3, kv_pressure=None)
    assert triggered(snap((10, 1, 16), (2, 100, 16)), bounds) == "request-count"  # 10 vs mean 6
    assert triggered(snap((7, 1, 16), (3, 100, 16)), bounds) is None  # 7 vs mean 5


def test_kv_pressure_needs_somewhere_with_room() -> None:
    bounds = TriggerBounds(imbalance=None, request_excess=None, kv_pressure=0.9)
    # 10 requests x 10 blocks on a 100-block worker: all of it; the other is empty.
    assert triggered(snap((10, 1, 160), (0, 0, 0)), bounds) == "kv-pressure"
    assert triggered(snap((10, 1, 160), (10, 1, 160)), bounds) is None  # nobody could take it
    assert triggered(snap((8, 1, 160), (0, 0, 0)), bounds) is None  # 80 % is below the bound


def test_bounds_turned_off_never_trigger() -> None:
    skewed = snap((10, 100, 160), (0, 0, 0))
    assert triggered(skewed, TriggerBounds()) is not None and triggered(skewed, OFF) is None


def test_a_lone_worker_never_triggers() -> None:
    assert triggered(snap((10, 100, 160)), TriggerBounds(request_excess=1)) is None


def test_move_costs_weigh_each_workers_measurement_by_its_tokens() -> None:
    from dlora.common.messages import WorkerStats
    from dlora.services.migrator.looks import _cost

    def stats(name: str, spt: float, tokens: int) -> WorkerStats:
        return WorkerStats(
            worker=name,
            running=0,
            waiting=0,
            free_blocks=1,
            total_blocks=1,
            block_size=16,
            max_loras=1,
            prefill_seconds_per_token=spt,
            prefill_tokens=tokens,
        )

    measured = [stats("w0", 0.001, 9000), stats("w1", 0.011, 1000), stats("w2", 0.0, 0)]
    assert _cost(measured, "prefill", None, prior=0.5) == pytest.approx(0.002)  # not the plain mean, 0.006
    assert _cost(measured, "prefill", 0.25, prior=0.5) == 0.25  # a setting fixes it
    assert _cost([stats("w2", 0.0, 0)], "prefill", None, prior=0.5) == 0.5  # nobody has measured yet


def test_looks_wait_for_patience_and_the_cool_down() -> None:
    from dlora.services.migrator.looks import Looks

    bounds = TriggerBounds(request_excess=1, patience=2, cooldown_s=10.0)
    looks = Looks(bounds)
    imbalanced, even = snap((10, 100, 160), (1, 10, 160)), snap((5, 50, 160), (5, 50, 160))
    assert triggered(imbalanced, bounds) is not None and triggered(even, bounds) is None
    assert looks.look(imbalanced, now=0.0) is None  # once: not yet
    assert looks.look(even, now=1.0) is None  # the run is broken
    assert looks.look(imbalanced, now=2.0) is None
    assert looks.look(imbalanced, now=3.0) is not None  # twice in a row
    looks.solved(3.0)
    assert looks.look(imbalanced, now=4.0) is None  # cooling down
    assert looks.look(imbalanced, now=13.5) is not None


def test_a_request_a_plan_moved_is_not_moved_again_until_it_settles() -> None:
    """A trial on four real workers: a burst onto w0, and plans a second apart moved one request
    w0 -> w2 -> w1 -> w2 -> w1 (its stats, and its new worker's speed, read wrong for a while after
    each move). Moved, it stays where the plan sent it for ``settle_s``."""
    from dlora.services.migrator.looks import Looks
    from dlora.services.migrator.planner import plan

    looks = Looks(TriggerBounds(settle_s=10.0))
    busy = snap((10, 100, 160), (0, 0, 0))
    moved = plan(busy).moves
    assert moved
    looks.moved("p1", (m.request_id for m in moved), now=0.0)
    # the next stats: the moved requests on w1 now, and w1 the busier for them
    back = {m.request_id for m in moved}
    later = ClusterSnapshot(
        busy.workers,
        [
            RequestState(
                r.request_id, "w1" if r.request_id in back else "w0", None, 160, 400 if r.request_id in back else 1
            )
            for r in busy.requests
        ],
    )
    assert plan(later).moves  # unsettled, they would go back
    assert not {m.request_id for m in plan(looks.settled(later, now=5.0)).moves} & back
    assert {m.request_id for m in plan(looks.settled(later, now=10.0)).moves} & back  # settled: free again


def test_a_move_its_source_refused_frees_its_request_for_the_next_plan_at_once() -> None:
    """A source refuses a planned move while its Redis progress writes lag (a resume from its record
    would lose tokens): the request never left, but pinned as moved it stayed out of every plan
    for ``settle_s`` (10 s; left by the last session). The source's stats say which moves it
    refused (``WorkerStats.refused_moves``), by plan: those requests are free again at once, and a
    refusal of an earlier plan leaves a later plan's move of the same request pinned."""
    from dlora.services.migrator.looks import Looks
    from dlora.services.migrator.planner import plan

    looks = Looks(TriggerBounds(settle_s=10.0))
    busy = snap((10, 100, 160), (0, 0, 0))
    moved = [m.request_id for m in plan(busy).moves]
    assert len(moved) >= 3
    looks.moved("p1", moved, now=0.0)
    looks.moved("p2", moved[2:3], now=0.5)  # (moved again by a later plan: its refusal of p1 is old news)
    assert all(r.pinned == (r.request_id in moved) for r in looks.settled(busy, now=1.0).requests)
    # the source kept them all (its stats a moment later, the plan's moves still there)
    assert looks.refused({"p1": moved, "p0": ["w0-0"]}) == [r for r in moved if r != moved[2]]
    assert looks.refused({"p1": moved}) == []  # (said again in the next stats: nothing more to free)
    assert [r.request_id for r in looks.settled(busy, now=1.0).requests if r.pinned] == [moved[2]]


def test_a_plan_leaves_out_the_workers_whose_stats_it_would_reach_too_old() -> None:
    """Under a 30 s TTL, a worker silent 6 s was not yet quiet (15 s), and plans were made from its
    stats though it ignores a plan made from stats sent over ``PLAN_MAX_AGE_S`` past its interval:
    its moves were dropped, and held moved ``settle_s`` (left by the last session). Left out where
    its last stats, once the plan has solved (1 s), are older than that, its last gap taken for its
    interval (none before a second stats); the quiet (half the TTL, three gaps) as before."""
    silent = {"live": 0.0, "slow": 5.5, "stale": 5.0, "first": 4.5, "gone": 20.0}
    heard = {w: 100.0 - s for w, s in silent.items()}
    gaps = {"live": 0.5, "slow": 2.0, "stale": 0.5, "gone": 0.5}
    assert PLAN_MAX_AGE_S == 5.0 and unheard(heard, gaps, 100.0, ttl_s=30.0, solve_s=1.0) == {"stale", "first", "gone"}
    assert unheard(heard, gaps, 100.0, ttl_s=30.0, solve_s=0.25) == {"gone"}


def test_a_plan_s_age_bound_takes_the_interval_a_worker_says_not_a_gap_a_lost_message_widened() -> None:
    """The age bound took a worker's last gap between two stats for its interval: one message lost
    at a 2 s interval read as a 4 s gap, and a plan made from its stats 6.5 s old reached it 7.5 s
    old, past the 7 s (``PLAN_MAX_AGE_S`` past 2 s) after which it drops a plan (left by the last
    session's review). The interval a worker says (``WorkerStats.stats_interval_s``) is the bound's;
    its gap only where it says none (an older worker), and a worker heard once is bounded by it too."""
    heard = {"lossy": 93.5, "older": 93.5, "once": 94.5}
    gaps = {"lossy": 4.0, "older": 4.0}
    said = {"lossy": 2.0, "once": 2.0}
    assert PLAN_MAX_AGE_S == 5.0 and unheard(heard, gaps, 100.0, ttl_s=30.0, solve_s=1.0, intervals=said) == {"lossy"}
    assert unheard(heard, gaps, 100.0, ttl_s=30.0, solve_s=0.25, intervals=said) == set()  # (6.75 s: within it)
    assert unheard(heard, gaps, 100.0, ttl_s=30.0, solve_s=1.0) == {"once"}  # none said: the gaps, as before


def test_stats_that_do_not_say_their_interval_still_decode() -> None:
    """A worker older than ``WorkerStats.stats_interval_s`` sends none: read as 0 (its gap taken
    instead); and a migrator older than it reads a newer worker's stats (unknown fields ignored)."""
    fields = {"running": 0, "waiting": 0, "free_blocks": 1, "total_blocks": 1, "block_size": 16, "max_loras": 1}
    new = WorkerStats(worker="w0", stats_interval_s=0.5, **fields)
    old = {k: v for k, v in msgspec.to_builtins(new).items() if k != "stats_interval_s"}
    assert msgspec.json.decode(msgspec.json.encode(old), type=WorkerStats) == msgspec.structs.replace(
        new, stats_interval_s=0.0
    )
    assert not WorkerStats.__struct_config__.forbid_unknown_fields
    assert msgspec.json.decode(msgspec.json.encode(new), type=WorkerStats).stats_interval_s == 0.5
