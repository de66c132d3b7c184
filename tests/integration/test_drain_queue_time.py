"""A request's queue time at the workers (vllm:request_queue_time_seconds): its wait on arrival
counts, and one handed over at a worker's stop before its first token keeps the time it waited
there, as a request the migrator moves does (GenerateRequest.queued_s)."""

from __future__ import annotations

import asyncio
import threading
import time

import aiohttp
import nats
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from dlora.common.state import StateStore
from dlora.model.make_tiny import TinyOutput
from dlora.services.dispatcher.main import Dispatcher
from dlora.services.dispatcher.settings import DispatcherSettings
from dlora.services.servers import Server
from dlora.services.worker.main import WorkerService, build_engine
from dlora.services.worker.settings import WorkerSettings
from tests.integration.conftest import Stack, small_engine, sse_events, start_gateway
from tests.integration.test_gateway import post

WAIT_S = 1.0


async def _queue_time(base_url: str) -> tuple[float, float]:
    """The gateway's vllm:request_queue_time_seconds _sum and _count, scraped (none before the first)."""
    async with aiohttp.ClientSession() as http, http.get(base_url + "/metrics") as r:
        text = await r.text()
    got = {
        s.name: s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name.startswith("vllm:request_queue_time_seconds_") and "le" not in s.labels
    }
    return got.get("vllm:request_queue_time_seconds_sum", 0.0), got.get("vllm:request_queue_time_seconds_count", 0.0)


async def _seen(dispatcher: Dispatcher, worker_id: str) -> None:
    """Returns once ``dispatcher`` has heard ``worker_id``'s stats (polled: no fixed sleep to
    outlast a loaded machine)."""
    async with asyncio.timeout(30):
        while worker_id not in dispatcher.workers:
            await asyncio.sleep(0.02)


class _Handover:
    """Workers, a dispatcher and a gateway over real NATS and Redis, each worker stopped (SIGTERM's
    drain, over at once: the rest handed over) when its event is set."""

    def __init__(self, nats_server: Server, redis: Redis, tiny: TinyOutput) -> None:
        self.url, self.store, self.model = nats_server.url, StateStore(redis), str(tiny.model)
        self.conns: list[nats.NATS] = []
        self.tasks: list[asyncio.Task] = []
        self.stop = asyncio.Event()
        self.events = [self.stop]
        self.runner: web.AppRunner | None = None

    async def worker(self, name: str, until: asyncio.Event, seats: int = 64) -> WorkerService:
        engine = small_engine(max_num_seqs=seats, device="cpu", dtype="float32")
        ws = WorkerSettings(
            nats_url=self.url,
            redis_url="unused",
            worker_id=name,
            model=self.model,
            stats_interval_s=0.1,
            drain_timeout_s=0.0,
            engine=engine,
        )
        nc = await nats.connect(self.url)
        self.conns.append(nc)
        service = WorkerService(ws, nc, self.store, build_engine(ws))
        self.tasks.append(asyncio.create_task(service.run(until)))
        self.events.append(until)
        return service

    async def front(self) -> str:
        """A dispatcher and a gateway (its base URL), once the dispatcher heard "a-victim"."""
        nc = await nats.connect(self.url)
        self.conns.append(nc)
        self.dispatcher = Dispatcher(DispatcherSettings(nats_url=self.url, redis_url="unused"), nc, self.store)
        self.tasks.append(asyncio.create_task(self.dispatcher.run(self.stop)))
        base_url, self.runner = await start_gateway(self.url, self.store, self.model, self.conns)
        await _seen(self.dispatcher, "a-victim")
        return base_url

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
        for event in self.events:
            event.set()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for c in self.conns:
            await c.drain()


async def test_a_request_handed_over_at_a_stop_keeps_its_wait_there_in_its_queue_time(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput
) -> None:
    """A request that waited on a full worker (one request a step) until the worker stopped
    (SIGTERM, its drain over) was handed back and re-dispatched from its in-flight record, which
    did not know that wait: its first chunk on the next worker said a few milliseconds of queue
    time though its client had waited the whole drain, so vllm:request_queue_time_seconds lost the
    waits of every rolling restart under load (left noticed by the last session). The hand-over
    says each one's wait, and the next attempt carries it on."""
    stack, stop_victim = _Handover(nats_server, redis, tiny_llama), asyncio.Event()
    try:
        victim = await stack.worker("a-victim", stop_victim, 1)  # alone at first: both requests go there
        step = victim.engine.step

        def slow():  # type: ignore[no-untyped-def]
            time.sleep(0.02)  # (in the step's thread) so that the first request outlasts the wait
            return step()

        victim.engine.step = slow  # type: ignore[method-assign]
        base_url = await stack.front()
        before = await _queue_time(base_url)
        body = {"model": "model", "prompt": [5, 40, 41], "temperature": 0, "ignore_eos": True}
        async with aiohttp.ClientSession() as http:
            url = f"{base_url}/v1/completions"
            async with http.post(url, json={**body, "max_tokens": 400, "stream": True}) as busy:
                await anext(sse_events(busy))  # running: the one seat taken
                waiting = asyncio.create_task(http.post(url, json={**body, "max_tokens": 4}))
                async with asyncio.timeout(30):
                    while len(victim.streams) < 2:
                        await asyncio.sleep(0.01)
                await asyncio.sleep(WAIT_S)  # it waits there, unscheduled
                assert victim.engine.seqs[next(r for r in victim.streams if r != busy_id(victim))].scheduled_at is None
                # room for both: the moved one waits for nothing there
                await stack.worker("b-survivor", stack.stop, 4)
                await _seen(stack.dispatcher, "b-survivor")
                stop_victim.set()  # what SIGTERM does: drained at once (0 s), the rest handed over
                async with asyncio.timeout(30):
                    answer = await waiting
                    assert answer.status == 200, await answer.text()
                    assert (await answer.json())["choices"][0]["finish_reason"] == "length"
        queue_sum, count = await _queue_time(base_url)
        # one observation (the busy one's client went before it finished): the waiting one's, its
        # wait on the stopped worker with it (it read a few ms)
        assert (count - before[1], queue_sum - before[0] >= WAIT_S) == (1, True), (queue_sum, before)
    finally:
        await stack.close()


def busy_id(worker: WorkerService) -> str:
    """The id of the request running on ``worker`` (its one seat)."""
    return next(rid for rid, seq in worker.engine.seqs.items() if seq.scheduled_at is not None)


async def test_a_requests_wait_on_arrival_for_its_grammar_counts_in_its_queue_time(stack: Stack) -> None:
    """docs/metrics.md: queue time is the time waiting at the worker until the first step; a request
    waiting on arrival for its grammar's compile (minutes for some schemas, vLLM #54003) is counted
    waiting (vllm:num_requests_waiting, as vLLM counts one waiting for its grammar, whose queue
    time that wait is in), but its queue time ran from its admission, after the compile: it read
    a few ms where the client waited the whole compile."""
    for worker in stack.workers:
        prepare = worker.engine.grammars.prepare

        def slow(params, prepare=prepare):  # type: ignore[no-untyped-def]  # (on a thread: off_loop)
            time.sleep(WAIT_S)
            return prepare(params)

        worker.engine.grammars.prepare = slow  # type: ignore[method-assign]
    before = await _queue_time(stack.url)
    body = {"model": "model", "messages": [{"role": "user", "content": "k"}], "max_tokens": 3}
    status, out = await post(stack, "/v1/chat/completions", {**body, "response_format": {"type": "json_object"}})
    assert status == 200, out
    queue_sum, count = await _queue_time(stack.url)
    assert (count - before[1], queue_sum - before[0] >= WAIT_S) == (1, True), (queue_sum, before)


async def test_a_request_waiting_on_arrival_at_a_stop_keeps_that_wait_in_its_queue_time(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput
) -> None:
    """A request still waiting on arrival when its worker stopped (its grammar compiling, or its
    moved cache or long prompt's tokens on their way) was handed back with no wait said for it,
    though its queue time counts that wait (docs/metrics.md, as vLLM counts a wait for its
    grammar): re-dispatched, its first chunk said the next worker's few milliseconds, and a
    rolling restart under a slow schema lost every such wait (a review of the queue-time series)."""
    stack, stop_victim, release = _Handover(nats_server, redis, tiny_llama), asyncio.Event(), threading.Event()
    try:
        victim = await stack.worker("a-victim", stop_victim)  # alone at first: the request goes there
        prepare = victim.engine.grammars.prepare

        def stuck(params):  # type: ignore[no-untyped-def]  # (on a thread): compiles until released
            release.wait(30)
            return prepare(params)

        victim.engine.grammars.prepare = stuck  # type: ignore[method-assign]
        base_url = await stack.front()
        before = await _queue_time(base_url)
        body = {"model": "model", "messages": [{"role": "user", "content": "k"}], "max_tokens": 3}
        body["response_format"] = {"type": "json_object"}
        async with aiohttp.ClientSession() as http:
            waiting = asyncio.create_task(http.post(f"{base_url}/v1/chat/completions", json=body))
            async with asyncio.timeout(30):
                while not victim.preparing:
                    await asyncio.sleep(0.01)
            await asyncio.sleep(WAIT_S)  # it waits there, on arrival
            await stack.worker("b-survivor", stack.stop)
            await _seen(stack.dispatcher, "b-survivor")
            stop_victim.set()  # SIGTERM: what is not running is handed over
            async with asyncio.timeout(30):
                answer = await waiting
                assert answer.status == 200, await answer.text()
        queue_sum, count = await _queue_time(base_url)
        assert (count - before[1], queue_sum - before[0] >= WAIT_S) == (1, True), (queue_sum, before)
    finally:
        release.set()
        await stack.close()
