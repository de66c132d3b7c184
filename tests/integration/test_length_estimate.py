"""A worker estimates its running requests' remaining work from the requests it has finished,
not from max_tokens: what it publishes is what dispatch and the migration planner weigh."""

from __future__ import annotations

import asyncio
import uuid

import msgspec
import nats
from redis.asyncio import Redis

from dlora.common import subjects
from dlora.common.messages import GenerateRequest, SamplingParams, TokenChunk
from dlora.common.settings import WorkerSettings
from dlora.common.state import StateStore
from dlora.services.servers import Server
from dlora.services.worker.engine.make_tiny import TinyOutput
from dlora.services.worker.main import WorkerService, build_engine


async def test_stats_carry_the_expected_remaining_tokens(nats_server: Server, redis: Redis,
                                                         tiny_llama: TinyOutput) -> None:
    ws = WorkerSettings(nats_url=nats_server.url, redis_url="unused", worker_id="w0", model=str(tiny_llama.model),
                        stats_interval_s=0.05)
    nc, client = await nats.connect(nats_server.url), await nats.connect(nats_server.url)
    worker = WorkerService(ws, nc, StateStore(redis), build_engine(ws))
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    owner = uuid.uuid4().hex[:8]
    finished: set[str] = set()

    async def on_chunk(msg) -> None:
        c = msgspec.json.decode(msg.data, type=TokenChunk)
        if c.finish_reason:
            finished.add(c.request_id)

    async def send(rid: str, max_tokens: int) -> None:
        req = GenerateRequest(request_id=rid, reply_to=subjects.reply_inbox(rid, owner), prompt_token_ids=[5, 6, 7],
                              params=SamplingParams(max_tokens=max_tokens, ignore_eos=True))
        await client.publish(subjects.worker_requests("w0"), msgspec.json.encode(req))

    try:
        await client.subscribe(subjects.replies_of(owner), cb=on_chunk)
        ready = await client.subscribe(subjects.stats("w0"))
        await ready.next_msg(timeout=30)  # stats flow once the worker listens for requests
        await ready.unsubscribe()
        for i in range(8):  # history: eight answers of 6 tokens
            await send(f"short{i}", 6)
        async with asyncio.timeout(30):
            while len(finished) < 8:
                await asyncio.sleep(0.02)
        await send("long", 400)  # a bound far above anything seen
        async with asyncio.timeout(30):
            while not (load := [r for r in worker.stats.requests if r.request_id == "long"]):
                await asyncio.sleep(0.02)
        assert 1 <= load[0].remaining_tokens <= 6, load[0]
    finally:
        stop.set()
        await asyncio.gather(task, return_exceptions=True)
        for c in (nc, client):
            await c.drain()
