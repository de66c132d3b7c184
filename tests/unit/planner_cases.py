"""Workers, requests and worker stats the planner's tests build their clusters of."""

from __future__ import annotations

from typing import Any

from dlora.common.messages import RequestLoad, WorkerStats
from dlora.services.migrator.snapshot import RequestState, WorkerState


def worker(name: str, adapters=(), slots: int = 4, kv_blocks: int = 1000) -> WorkerState:
    return WorkerState(name, kv_blocks, 16, slots, frozenset(adapters), seconds_per_token=0.01)


def reqs(worker: str, adapter: str | None, count: int, remaining: float = 100, context: int = 50, start: int = 0):
    return [RequestState(f"{worker}-{adapter}-{start + i}", worker, adapter, context, remaining) for i in range(count)]


def worker_stats(name: str, loads: list[RequestLoad], spt: float, max_loras: int = 2, **more: Any) -> WorkerStats:
    """A worker's stats as it reports them: ``loads`` running, 1,000 blocks, ``max_loras`` slots."""
    return WorkerStats(
        worker=name,
        running=len(loads),
        waiting=0,
        free_blocks=900,
        total_blocks=1000,
        block_size=16,
        max_loras=max_loras,
        seconds_per_token=spt,
        requests=loads,
        **more,
    )
