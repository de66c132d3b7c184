"""Open-loop replay: every request is sent at its arrival time, whatever is still running (unless
``max_concurrency`` caps how many are: then an arrival waits for a slot, as vLLM's
benchmark_serving ``--max-concurrency`` makes it).

The run stops sending at ``max_duration_s`` or on ``stop`` (Ctrl-C); requests still running
then get ``grace_s`` to finish and are otherwise marked cut off, so a partial run still reports
sent = completed + failed + cut + lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Protocol

from dlora.loadgen.metrics import RequestResult
from dlora.loadgen.workload import RequestSpec


class Client(Protocol):
    async def send(self, index: int, spec: RequestSpec, r: RequestResult) -> None: ...


class Clock:
    """Seconds since the run started."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def restart(self) -> None:
        """From now: the run starts when sending can (what came before, the target's checks, is not
        the run's: counted, it made the arrivals a burst and every TTFT as long)."""
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
    on_update: Callable[[RequestResult], None] | None = None,
    max_concurrency: int | None = None,
) -> tuple[list[RequestResult], float]:
    """Send ``specs`` through ``client`` at their arrival times (``clock``'s seconds), at most
    ``max_concurrency`` in flight (None: no cap; capped, a request's times count from when it is
    sent, as vLLM's do, and one still waiting for a slot when sending ends is not sent). Returns
    each request's result and the run's end (``clock``'s seconds)."""
    results = [RequestResult(s.arrival_s, s.adapter, s.output_len, prompt_len=s.prompt_len) for s in specs]
    tasks: set[asyncio.Task] = set()
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None

    async def one(i: int) -> None:
        came = clock()
        async with slots or contextlib.nullcontext():
            if slots is not None:
                if stop.is_set() or clock() > max_duration_s:
                    return  # sending ended while it waited for a slot
                results[i].sent, results[i].arrival_s = True, clock()
                results[i].queued_s = results[i].arrival_s - came
            try:
                await client.send(i, specs[i], results[i])
            except Exception as e:  # noqa: BLE001 - its own failure (a stream not in the expected form, a
                results[i].error = f"{type(e).__name__}: {e}"  # connection closed), not the run's
        if results[i].finish_s is None and results[i].error is None:
            results[i].error = "the stream ended without a finish"
        if on_update:  # the one that ended: handed them all, a caller summing them read n² in a run
            on_update(results[i])

    for i, spec in enumerate(specs):
        # No later than the duration's end: an arrival past it is not sent, and was waited for
        # (--rate 1e-9 ran for ever).
        delay = min(spec.arrival_s, max_duration_s) - clock()
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await stop.wait()
        if stop.is_set() or spec.arrival_s > max_duration_s or clock() > max_duration_s:
            break
        results[i].due, results[i].sent = True, slots is None  # capped: sent once a slot is free
        task = asyncio.create_task(one(i))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        # Until they end, or the duration and the grace pass, or Ctrl-C: then a tenth of the grace
        # (a Ctrl-C after the last request went out was heard only once every one had ended).
        # One waiter for them all (one per ending request, over the rest, kept a core busy at 8,000
        # in flight and made the timings it took late).
        remaining = max(0.0, max_duration_s - clock()) + grace_s
        ended, stopped = asyncio.ensure_future(asyncio.wait(set(tasks))), asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({ended, stopped}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ended.cancel()  # (the wait, not the requests)
            stopped.cancel()
        if stop.is_set() and tasks:
            await asyncio.wait(set(tasks), timeout=grace_s / 10)
        pending = {t for t in tasks if not t.done()}
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    end = clock()
    for r in results:
        if r.sent and r.finish_s is None and r.error is None:
            r.cut = True
    return results, end


async def warm_up(
    specs: list[RequestSpec], client: Client, n: int, max_concurrency: int | None, timeout_s: float
) -> list[RequestResult]:
    """vLLM's ``--num-warmups``: ``n`` requests shaped as the first of ``specs`` before the run,
    at most ``max_concurrency`` at a time, none of them counted. They go to the workload's adapters
    in turn (a multi-LoRA server's cold start is each adapter's load, not the base model's), with
    prompts of their own (indexes past the workload's, no shared blocks: the run's prompts are not
    put in the prefix cache). Returns their results; those unfinished after ``timeout_s`` are cut."""
    adapters = list(dict.fromkeys(s.adapter for s in specs))
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    results = [RequestResult(0.0, adapters[k % len(adapters)], specs[0].output_len, sent=True) for k in range(n)]

    async def one(k: int) -> None:
        spec = replace(specs[0], adapter=results[k].adapter, hash_ids=())
        async with slots or contextlib.nullcontext():
            try:
                await client.send(len(specs) + k, spec, results[k])
            except Exception as e:  # noqa: BLE001 - as a run's request: its own failure
                results[k].error = f"{type(e).__name__}: {e}"

    tasks = [asyncio.create_task(one(k)) for k in range(n)]
    try:
        _, pending = await asyncio.wait(tasks, timeout=timeout_s) if tasks else (set(), set())
    finally:
        for task in tasks:
            task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for k, task in enumerate(tasks):
        results[k].cut = task in pending
    return results
