"""From worker stats to a planner snapshot, and whether it is worth planning. Pure."""

from __future__ import annotations

from dlora.common.messages import WorkerStats
from dlora.services.migrator.planner import completion_times
from dlora.services.migrator.snapshot import ClusterSnapshot, RequestState, WorkerState


def snapshot_from_stats(stats: list[WorkerStats], ranks: dict[str, int], **costs: float) -> ClusterSnapshot:
    # A worker that has not stepped yet has no measured speed: use the cluster's mean.
    measured = [s.seconds_per_token for s in stats if s.seconds_per_token > 0]
    default = sum(measured) / len(measured) if measured else 0.01
    workers = [
        WorkerState(s.worker, s.total_blocks, s.block_size, s.max_loras, frozenset(a.name for a in s.adapters),
                    s.seconds_per_token or default)
        for s in stats
    ]
    requests = [RequestState(r.request_id, s.worker, r.adapter, r.context_tokens, float(r.remaining_tokens))
                for s in stats for r in s.requests]
    return ClusterSnapshot(workers, requests, ranks, **costs)


def imbalanced(snapshot: ClusterSnapshot, imbalance: float, min_gain_s: float) -> bool:
    """The most loaded worker's completion time exceeds the mean by ``imbalance`` and ``min_gain_s``."""
    times = completion_times(snapshot)
    if len(times) < 2:
        return False
    mean = sum(times.values()) / len(times)
    worst = max(times.values())
    return worst > mean * (1 + imbalance) and worst - mean > min_gain_s
