"""When the migrator plans: each trigger bound on hand-built snapshots."""

from __future__ import annotations

import pytest

from dlora.services.migrator.snapshot import ClusterSnapshot, RequestState, WorkerState
from dlora.services.migrator.trigger import TriggerBounds, triggered

OFF = TriggerBounds(imbalance=None, request_excess=None, kv_pressure=None)


def snap(*loads: tuple[int, float, int], kv_blocks: int = 100) -> ClusterSnapshot:
    """One worker per (requests, remaining tokens each, context tokens each); 16-token blocks."""
    workers = [WorkerState(f"w{i}", kv_blocks, 16, 4, frozenset(), 0.01) for i in range(len(loads))]
    requests = [RequestState(f"w{i}-{j}", f"w{i}", None, context, remaining)
                for i, (n, remaining, context) in enumerate(loads) for j in range(n)]
    return ClusterSnapshot(workers, requests)


def test_queue_delay_spread() -> None:
    bounds = TriggerBounds(imbalance=0.25, min_gain_s=0.5, request_excess=None, kv_pressure=None)
    assert triggered(snap((4, 100, 16), (1, 100, 16)), bounds) == "queue-delay"  # 4 s vs mean 2.5 s
    assert triggered(snap((4, 100, 16), (4, 100, 16)), bounds) is None
    # Spread by fraction but not by min_gain_s seconds: not worth a plan.
    assert triggered(snap((4, 1, 16), (1, 1, 16)), bounds) is None


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


@pytest.mark.parametrize("loads", [((10, 100, 160), (0, 0, 0)), ((1, 100, 16),)])
def test_off_bounds_and_single_workers_never_trigger(loads) -> None:
    assert triggered(snap(*loads), OFF) is None
    assert len(loads) > 1 or triggered(snap(*loads), TriggerBounds()) is None
