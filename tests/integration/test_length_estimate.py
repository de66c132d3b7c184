"""A worker estimates its running requests' remaining work from the requests it has finished,
not from max_tokens: what it publishes is what dispatch and the migration planner weigh."""

from __future__ import annotations

import asyncio
import uuid

import msgspec
import nats
from redis.asyncio import Redis

from dlora.common import subjects
from dlora.common.messages import GenerateRequest, SamplingParams, TokenChunk, WorkerStats
from dlora.common.state import StateStore
from dlora.model.make_tiny import TinyOutput
from dlora.services.servers import Server
from dlora.services.worker.main import WorkerService, build_engine
from dlora.services.worker.settings import WorkerSettings
from tests.integration.conftest import small_engine, worker_settings
from tests.integration.test_gateway import offline

SHORT_PROMPT = [5, 6, 7]


async def test_stats_carry_the_expected_remaining_tokens(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput
) -> None:
    ws = WorkerSettings(
        nats_url=nats_server.url,
        redis_url="unused",
        worker_id="w0",
        model=str(tiny_llama.model),
        stats_interval_s=0.05,
        engine=small_engine(),
    )
    nc, client = await nats.connect(nats_server.url), await nats.connect(nats_server.url)
    worker = WorkerService(ws, nc, StateStore(redis), build_engine(ws))
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    owner = uuid.uuid4().hex[:8]
    finished: dict[str, str] = {}  # request -> finish reason

    async def on_chunk(msg) -> None:
        c = msgspec.json.decode(msg.data, type=TokenChunk)
        if c.finish_reason:
            finished[c.request_id] = c.finish_reason

    async def send(rid: str, prompt: list[int], params: SamplingParams) -> None:
        req = GenerateRequest(
            request_id=rid, reply_to=subjects.reply_inbox(rid, owner), prompt_token_ids=prompt, params=params
        )
        await client.publish(subjects.worker_requests("w0"), msgspec.json.encode(req))

    # Short answers that end by themselves, far below their bound (a stop token greedy decoding
    # first reaches at step stop_at), so the history holds real lengths, not cut-offs.
    greedy = offline(tiny_llama, [{"id": "g", "prompt_token_ids": SHORT_PROMPT, "max_tokens": 40, "ignore_eos": True}])[
        0
    ]["token_ids"]
    stop_at = next(i for i, t in enumerate(greedy) if i >= 3 and t not in greedy[:i])
    short = SamplingParams(max_tokens=400, temperature=0.0, stop_token_ids=[greedy[stop_at]])  # (within the context)

    try:
        await client.subscribe(subjects.replies_of(owner), cb=on_chunk)
        ready = await client.subscribe(subjects.stats("w0"))
        await ready.next_msg(timeout=30)  # stats flow once the worker listens for requests
        await ready.unsubscribe()
        for i in range(8):
            await send(f"short{i}", SHORT_PROMPT, short)
        async with asyncio.timeout(30):
            while len(finished) < 8:
                await asyncio.sleep(0.02)
        await send("long", [9, 8, 7], SamplingParams(max_tokens=400, ignore_eos=True))  # a bound far above any
        async with asyncio.timeout(30):
            while not (load := [r for r in worker.stats.requests if r.request_id == "long"]):
                await asyncio.sleep(0.02)
        assert set(finished.values()) == {"stop"}
        # The bound says up to 400 more; the history says about stop_at tokens in all, or, for a
        # request already past every answer seen, about as many again as it has.
        generated = load[0].context_tokens - 3
        assert 1 <= load[0].remaining_tokens <= max(stop_at + 1, generated) < 100, (load[0], stop_at)
        # What the base model's tokens cost here is measured and published with the rest.
        assert set(worker.stats.adapter_seconds_per_token) == {""}
        assert 0 < worker.stats.adapter_seconds_per_token[""] < 10 * worker.stats.seconds_per_token
    finally:
        stop.set()
        await asyncio.gather(task, return_exceptions=True)
        for c in (nc, client):
            await c.drain()


async def test_a_worker_falling_idle_says_so_at_once(nats_server: Server, redis: Redis, tiny_llama: TinyOutput) -> None:
    """A trial: right after a burst ended, the next went 0/40 to the other worker: the stats, taken
    mid-burst, said this one was busy until the next interval. Its stats now go out as it falls idle
    (not sooner than a quarter interval after the last): here within a second of a request sent just
    after a regular message, against the 4 s interval."""
    ws = worker_settings(
        nats_server.url,
        tiny_llama,
        "w-idle",
        stats_interval_s=4.0,
        heartbeat_ttl_s=10.0,
    )
    nc, client = await nats.connect(nats_server.url), await nats.connect(nats_server.url)
    worker = WorkerService(ws, nc, StateStore(redis), build_engine(ws))
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        stats = await client.subscribe(subjects.stats("w-idle"))
        await stats.next_msg(timeout=30)  # a regular message: the next is 4 s away
        sent = asyncio.get_running_loop().time()
        req = GenerateRequest(
            request_id="r",
            reply_to=subjects.reply_inbox("r", "t"),
            prompt_token_ids=SHORT_PROMPT,
            params=SamplingParams(max_tokens=4, ignore_eos=True),
        )
        await client.publish(subjects.worker_requests("w-idle"), msgspec.json.encode(req))
        while True:
            got = msgspec.json.decode((await stats.next_msg(timeout=10)).data, type=WorkerStats)
            if got.steps and not got.running and not got.waiting:
                break
        assert asyncio.get_running_loop().time() - sent < 2.0  # not at the next interval (4 s)
        await stats.unsubscribe()
    finally:
        stop.set()
        await asyncio.gather(task, return_exceptions=True)
        for c in (nc, client):
            await c.drain()
