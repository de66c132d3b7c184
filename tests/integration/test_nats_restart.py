"""NATS restarted under a running request (issue 16, the NATS restart fault): every service
reconnects, and the client's stream completes exact, though chunks published around the outage
never reached it the first time (the worker sends its recent chunks again after reconnecting; the
reader drops what it has by sequence number)."""

from __future__ import annotations

import asyncio
import time

import msgspec
import nats
from redis.asyncio import Redis

from dlora.common import subjects
from dlora.common.messages import GenerateRequest, SamplingParams, TokenChunk
from dlora.common.state import StateStore
from dlora.model.make_tiny import TinyOutput
from dlora.services.dispatcher.main import Dispatcher
from dlora.services.dispatcher.settings import DispatcherSettings
from dlora.services.gateway.replies import ReplyStream
from dlora.services.servers import Server, start_nats
from dlora.services.worker.engine.config import EngineConfig
from dlora.services.worker.main import WorkerService, build_engine
from dlora.services.worker.settings import WorkerSettings
from tests.integration.test_gateway import offline

PROMPT, N = [5, 40, 41, 300, 17], 200


async def test_a_stream_survives_a_nats_restart(redis: Redis, redis_server: Server, tiny_llama: TinyOutput) -> None:
    server = start_nats()
    port = int(server.url.rsplit(":", 1)[1])
    store = StateStore(redis)
    common = dict(nats_url=server.url, redis_url=redis_server.url, heartbeat_ttl_s=30.0)
    stop = asyncio.Event()
    # The worker is back first; the reader re-subscribes only at nats-py's default 2 s, so what the
    # worker sends in between reaches nobody the first time.
    conns = [await nats.connect(server.url, reconnect_time_wait=wait) for wait in (0.2, 0.2, 2.0)]
    d_nc, w_nc, app = conns
    ws = WorkerSettings(
        **common, worker_id="w0", model=str(tiny_llama.model), stats_interval_s=0.1, engine=EngineConfig(device="cpu")
    )
    worker = WorkerService(ws, w_nc, store, build_engine(ws))
    step = worker.engine.step

    def slow():  # type: ignore[no-untyped-def]
        time.sleep(0.02)  # the request outlives the outage
        return step()

    worker.engine.step = slow  # type: ignore[method-assign]
    tasks = [
        asyncio.create_task(worker.run(stop)),
        asyncio.create_task(Dispatcher(DispatcherSettings(**common), d_nc, store).run(stop)),
    ]
    try:
        while not await store.live_workers():
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        chunks: asyncio.Queue[TokenChunk] = asyncio.Queue()

        async def on_chunk(msg) -> None:  # type: ignore[no-untyped-def]
            chunks.put_nowait(msgspec.json.decode(msg.data, type=TokenChunk))

        await app.subscribe(subjects.replies_of("app"), cb=on_chunk)
        req = GenerateRequest(
            request_id="through",
            reply_to=subjects.reply_inbox("through"),
            prompt_token_ids=PROMPT,
            params=SamplingParams(max_tokens=N, ignore_eos=True),
        )
        await app.request(subjects.REQUESTS, msgspec.json.encode(req), timeout=5)
        stream = ReplyStream("through")
        while stream.tokens < 20:
            stream.take(await asyncio.wait_for(chunks.get(), 30), time.monotonic())
        server.stop()  # the worker goes on generating meanwhile
        await asyncio.sleep(1.0)
        server = start_nats(port)
        while not stream.done:
            stream.take(await asyncio.wait_for(chunks.get(), 30), time.monotonic())
        assert stream.error is None and stream.tokens == N
        expected = offline(tiny_llama, [{"id": "x", "prompt_token_ids": PROMPT, "max_tokens": N, "ignore_eos": True}])
        assert stream.text == expected[0]["text"]
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=15)
        for c in conns:
            await c.close()
        server.stop()
