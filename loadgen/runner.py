"""Open-loop replay: every request is sent at its arrival time, whatever is still running.

The run stops sending at ``max_duration_s`` or on ``stop`` (Ctrl-C); requests still running
then get ``grace_s`` to finish and are otherwise marked cut off, so a partial run still reports
sent = completed + failed + cut + lost.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol

from dlora.loadgen.metrics import RequestResult
from dlora.loadgen.workload import RequestSpec


class Client(Protocol):
    async def send(self, index: int, spec: RequestSpec, r: RequestResult) -> None: ...


class Clock:
    """Seconds since the run started."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0


async def replay(
    specs: list[RequestSpec],
    client: Client,
    clock: Clock,
    max_duration_s: float,
    stop: asyncio.Event,
    grace_s: float = 30.0,
    on_update: Callable[[list[RequestResult]], None] | None = None,
) -> tuple[list[RequestResult], float]:
    results = [RequestResult(s.arrival_s, s.adapter, s.output_len) for s in specs]
    tasks: set[asyncio.Task] = set()

    async def one(i: int) -> None:
        try:
            await client.send(i, specs[i], results[i])
        except Exception as e:  # noqa: BLE001 - its own failure (a stream not in the expected form, a
            results[i].error = f"{type(e).__name__}: {e}"  # connection closed), not the run's
        if results[i].finish_s is None and results[i].error is None:
            results[i].error = "the stream ended without a finish"
        if on_update:
            on_update(results)

    for i, spec in enumerate(specs):
        delay = spec.arrival_s - clock()
        if delay > 0:
            try:
                await asyncio.wait_for(stop.wait(), timeout=delay)
            except TimeoutError:
                pass
        if stop.is_set() or clock() > max_duration_s:
            break
        results[i].sent = True
        task = asyncio.create_task(one(i))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        remaining = max(0.0, max_duration_s - clock()) if not stop.is_set() else 0.0
        _, pending = await asyncio.wait(set(tasks), timeout=remaining + grace_s if not stop.is_set() else grace_s / 10)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    end = clock()
    for r in results:
        if r.sent and r.finish_s is None and r.error is None:
            r.cut = True
    return results, end
