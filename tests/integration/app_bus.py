"""Applications on a secured bus, each its own NATS user (alice, bob), beside a dispatcher and an
in-process worker: the fixture and the helpers of the application tests (``test_app_isolation``,
``test_app_retries``)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import msgspec
import nats
import pytest
from nats.aio.client import Client as NATS
from redis.asyncio import Redis

from dlora.common import subjects
from dlora.common.bus import flush
from dlora.common.messages import GenerateRequest, SamplingParams, TokenChunk
from dlora.common.permissions import ROLES
from dlora.common.state import StateStore
from dlora.model.make_tiny import TinyOutput
from dlora.services.dispatcher.main import Dispatcher
from dlora.services.dispatcher.settings import DispatcherSettings
from dlora.services.servers import Server, start_nats
from dlora.services.worker.main import WorkerService, build_engine
from dlora.services.worker.settings import WorkerSettings
from tests.integration.conftest import small_engine

PASSWORDS = {name: f"pw-{name}" for name in (*ROLES, "alice", "bob")}


@pytest.fixture
async def bus(
    redis_server: Server, redis: Redis, tiny_llama: TinyOutput
) -> AsyncIterator[tuple[NATS, NATS, WorkerService]]:
    """A secured NATS with a dispatcher and a worker on it; yields alice's and bob's connections."""
    server = start_nats(passwords=PASSWORDS)
    stop, conns, tasks = asyncio.Event(), [], []

    async def connect(user: str) -> NATS:
        nc = await nats.connect(server.url, user=user, password=PASSWORDS[user], inbox_prefix=f"_INBOX.{user}")
        conns.append(nc)
        return nc

    try:
        store = StateStore(redis)
        common = dict(nats_url=server.url, redis_url=redis_server.url)
        ws = WorkerSettings(
            **common,
            worker_id="w0",
            model=str(tiny_llama.model),
            engine=small_engine(device="cpu"),
            stats_interval_s=0.1,
            # No one to drain to: a test's slowed request left running held each stop for the 10 s
            # default, the bound below.
            drain_timeout_s=0.0,
        )
        worker = WorkerService(ws, await connect("worker"), store, build_engine(ws))
        tasks.append(asyncio.create_task(worker.run(stop)))
        tasks.append(
            asyncio.create_task(Dispatcher(DispatcherSettings(**common), await connect("dispatcher"), store).run(stop))
        )
        for _ in range(200):  # the dispatcher has heard the worker
            if await store.live_workers():
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        yield await connect("alice"), await connect("bob"), worker
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=10)
        for nc in conns:
            with contextlib.suppress(Exception):
                await nc.close()
        server.stop()


async def _send(
    nc: NATS, user: str, rid: str, reply_to: str, adapter: str | None = None, max_tokens: int = 400
) -> None:
    req = GenerateRequest(
        request_id=rid,
        reply_to=reply_to,
        adapter=adapter,
        prompt_token_ids=[5, 40, 41],
        params=SamplingParams(max_tokens=max_tokens, ignore_eos=True),
    )
    await nc.publish(subjects.requests_of(user), msgspec.json.encode(req))


async def _chunks(nc: NATS, subject: str) -> asyncio.Queue[TokenChunk]:
    q: asyncio.Queue[TokenChunk] = asyncio.Queue()

    async def on(msg: nats.aio.msg.Msg) -> None:
        q.put_nowait(msgspec.json.decode(msg.data, type=TokenChunk))

    await nc.subscribe(subject, cb=on)
    await flush(nc)
    return q


def _slowed(worker: WorkerService, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each of ``worker``'s steps 20 ms or more: 400 tokens take 8 s, so a request outlives every
    check a test makes of it while it runs, however fast the machine."""
    step = worker.engine.step

    def slow():  # type: ignore[no-untyped-def]
        time.sleep(0.02)
        return step()

    monkeypatch.setattr(worker.engine, "step", slow)


async def _still_running(q: asyncio.Queue[TokenChunk]) -> bool:
    """Whether chunks keep coming: the queue drained, then a new one within 2 s."""
    while not q.empty():
        q.get_nowait()
    try:
        chunk = await asyncio.wait_for(q.get(), 2)
    except TimeoutError:
        return False
    return chunk.error is None and chunk.finish_reason is None
