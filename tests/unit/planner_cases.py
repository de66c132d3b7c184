"""Workers, requests and worker stats the planner's tests build their clusters of."""

from __future__ import annotations

import time
from typing import Any

import pytest

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


def whole_core(monkeypatch: pytest.MonkeyPatch) -> None:
    """The planner's thread given a core of its own, however loaded the machine running the test is:
    under its time bound the planner runs CBC only where the pace it measures leaves CBC time
    (``pace.Clock``), and a test that needs CBC run under it would pass on an idle machine alone."""
    wall = time.perf_counter()
    monkeypatch.setattr(time, "thread_time", lambda: time.perf_counter() - wall)
