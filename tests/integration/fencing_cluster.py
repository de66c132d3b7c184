"""A dispatcher and in-process workers against real NATS and Redis, each worker stopped by its own
event, every chunk sent back noted with its time: the fencing tests' cluster (``test_fencing``,
``test_orphans``, the resume tests)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import nats
import pytest
from nats.aio.client import Client as NATS
from redis.asyncio import Redis

from dlora.common import subjects
from dlora.common.messages import GenerateRequest, SamplingParams, TokenChunk
from dlora.common.state import StateStore
from dlora.model.make_tiny import TinyOutput
from dlora.services.dispatcher.main import Dispatcher
from dlora.services.dispatcher.settings import DispatcherSettings
from dlora.services.gateway.replies import ReplyStream
from dlora.services.servers import Server
from dlora.services.worker.engine.config import EngineConfig
from dlora.services.worker.main import WorkerService, build_engine
from dlora.services.worker.settings import WorkerSettings
from tests.integration.conftest import small_engine

PROMPT = [5, 40, 41, 300, 17]
N = 300  # tokens: the request is still running when its worker goes
SHORT = 100  # where the test stops or re-sends it a few steps in (its worker steps as it awaits)


@dataclass
class Cluster:
    """A dispatcher and in-process workers; each worker runs until its own stop event."""

    nats_url: str
    redis_url: str
    store: StateStore
    tiny: TinyOutput
    ttl_s: float
    nc: NATS
    dispatcher: Dispatcher | None = None
    stops: list[asyncio.Event] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    conns: list[NATS] = field(default_factory=list)
    arrivals: list[tuple[float, TokenChunk]] = field(default_factory=list)  # every chunk, when it came

    async def worker(
        self, worker_id: str, engine: EngineConfig | None = None
    ) -> tuple[WorkerService, asyncio.Event, asyncio.Task[None]]:
        ws = WorkerSettings(
            nats_url=self.nats_url,
            redis_url=self.redis_url,
            heartbeat_ttl_s=self.ttl_s,
            worker_id=worker_id,
            model=str(self.tiny.model),
            engine=engine or small_engine(device="cpu", dtype="float32"),
            stats_interval_s=0.1,
            drain_timeout_s=0.0,  # no test here is of the drain: a stop hands over at once
        )
        nc = await nats.connect(self.nats_url)
        self.conns.append(nc)
        service = WorkerService(ws, nc, self.store, build_engine(ws))
        stop = asyncio.Event()
        task = asyncio.create_task(service.run(stop))
        self.stops.append(stop)
        self.tasks.append(task)
        await _until(lambda: _live(self.store, worker_id))
        return service, stop, task

    async def send(
        self,
        request_id: str,
        client: str = "",
        max_tokens: int = N,
        to_worker: str = "",
        prompt: str | None = None,
        params: SamplingParams | None = None,
        adapter: str | None = None,
    ) -> asyncio.Queue[TokenChunk]:
        """Publish a long greedy request to the dispatchers (or straight to a worker, unrecorded);
        its chunks arrive on the queue. ``prompt``: a text one instead of ``PROMPT``'s ids;
        ``params``: its own, in place of ``max_tokens`` greedy ones that ignore EOS; ``adapter``:
        the registered adapter it runs on (None: the base model)."""
        chunks: asyncio.Queue[TokenChunk] = asyncio.Queue()

        async def on_chunk(msg: nats.aio.msg.Msg) -> None:
            chunk = msgspec.json.decode(msg.data, type=TokenChunk)
            self.arrivals.append((time.monotonic(), chunk))
            chunks.put_nowait(chunk)

        reply = f"test.reply.{request_id}"
        await self.nc.subscribe(reply, cb=on_chunk)
        req = GenerateRequest(
            request_id=request_id,
            reply_to=reply,
            prompt_token_ids=PROMPT if prompt is None else None,
            prompt=prompt,
            params=params or SamplingParams(max_tokens=max_tokens, ignore_eos=True),
            client=client,
            adapter=adapter,
        )
        if to_worker:
            await self.nc.publish(subjects.worker_requests(to_worker), msgspec.json.encode(req))
        else:
            await self.nc.request(subjects.REQUESTS, msgspec.json.encode(req), timeout=60)
        return chunks


async def _live(store: StateStore, worker: str) -> bool:
    return any(w.worker == worker for w in await store.live_workers())


async def _until(check, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError("condition never held")
        await asyncio.sleep(0.05)


async def _read(stream: ReplyStream, chunks: asyncio.Queue[TokenChunk], until_tokens: int | None = None) -> None:
    """Take chunks into ``stream`` until it is over (or has ``until_tokens`` tokens)."""
    while not stream.done and (until_tokens is None or stream.tokens < until_tokens):
        stream.accept(await asyncio.wait_for(chunks.get(), 60))


async def resumed(
    c: Cluster, others: tuple[str, ...], **send: Any
) -> tuple[ReplyStream, asyncio.Queue[TokenChunk], Callable[[], None], list[WorkerService]]:
    """A request (``Cluster.send``'s ``send``) running on w-a, its first tokens read, then ``others``
    up: the stream, its chunks, w-a's stop (its drain hands the request over at once, with its tokens
    so far) and the others. w-a's steps wait from the first tokens until its stop, so that it is
    still running then however long the others take to start."""
    first, first_stop, _ = await c.worker("w-a")
    going, step = threading.Event(), first.engine.step
    going.set()

    def gated() -> Any:
        going.wait(60)
        return step()

    first.engine.step = gated  # type: ignore[method-assign]
    chunks = await c.send("r", **send)
    stream = ReplyStream("r")
    await _read(stream, chunks, until_tokens=5)
    going.clear()
    started = [(await c.worker(name))[0] for name in others]

    def stop() -> None:  # seen at the loop's next turn, once the step it waits in ends
        first_stop.set()
        going.set()

    return stream, chunks, stop, started


async def resume_faulted(
    started: Awaitable[tuple[ReplyStream, asyncio.Queue[TokenChunk], Callable[[], None], list[WorkerService]]],
    fault: Callable[[list[WorkerService], list[str], int], None],
    times: int,
) -> tuple[ReplyStream, list[str]]:
    """The request ``started`` (``resumed``: running on w-a, others up) handed over at w-a's stop
    once ``fault`` is put on the others, its first ``times`` faults noted by worker, and read to its
    end: the stream and the workers faulted."""
    stream, chunks, stop, others = await started
    faulted: list[str] = []
    fault(others, faulted, times)
    stop()
    await _read(stream, chunks)
    return stream, faulted


@pytest.fixture
async def cluster(nats_server: Server, redis_server: Server, redis: Redis, tiny_llama: TinyOutput) -> AsyncIterator:
    async def make(ttl_s: float) -> Cluster:
        nc = await nats.connect(nats_server.url)
        stop = asyncio.Event()
        c = Cluster(
            nats_server.url, redis_server.url, StateStore(redis), tiny_llama, ttl_s, nc, stops=[stop], conns=[nc]
        )
        made.append(c)
        settings = DispatcherSettings(nats_url=nats_server.url, redis_url="unused", heartbeat_ttl_s=ttl_s)
        c.dispatcher = Dispatcher(settings, nc, c.store)
        c.tasks.append(asyncio.create_task(c.dispatcher.run(stop)))
        return c

    made: list[Cluster] = []
    yield make
    for c in made:
        for stop in c.stops:
            stop.set()
        # stopped, not cancelled: a cancel that meets an expiring asyncio.timeout can be lost (3.11)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*c.tasks, return_exceptions=True), timeout=10)
        for conn in c.conns:
            with contextlib.suppress(Exception):
                await conn.close()
