"""Redis restarted under a running cluster (empty: no persistence): the worker, dispatcher and
migrator ride it out, reconnect and serve again, the adapter registry comes back from its durable
copy; nothing crashes (issue 16, the restart fault)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from dlora.common import subjects
from dlora.common.bus import STATE_OUTAGE, connections
from dlora.common.messages import ErrorCode, GenerateRequest, SamplingParams, TokenChunk
from dlora.common.registry import AdapterRegistry, purge
from dlora.common.state import StateStore
from dlora.model.config import ModelConfig
from dlora.model.make_tiny import TinyOutput
from dlora.services.dispatcher.main import Dispatcher
from dlora.services.dispatcher.settings import DispatcherSettings
from dlora.services.gateway.admin import check_adapter
from dlora.services.gateway.replies import ReplyStream
from dlora.services.migrator.main import Migrator
from dlora.services.migrator.settings import MigratorSettings
from dlora.services.servers import Server, free_port
from dlora.services.worker.main import WorkerService, build_engine
from dlora.services.worker.settings import WorkerSettings
from tests.integration.conftest import small_engine


async def _generate(nc: nats.NATS, tokens: int = 8, adapter: str | None = None) -> list[TokenChunk]:
    rid = uuid.uuid4().hex
    owner = uuid.uuid4().hex[:8]
    got: asyncio.Queue[TokenChunk] = asyncio.Queue()

    async def on_chunk(msg) -> None:
        await got.put(msgspec.json.decode(msg.data, type=TokenChunk))

    sub = await nc.subscribe(subjects.replies_of(owner), cb=on_chunk)
    req = GenerateRequest(
        request_id=rid,
        reply_to=subjects.reply_inbox(rid, owner),
        prompt_token_ids=[5, 40, 41],
        params=SamplingParams(max_tokens=tokens, ignore_eos=True),
        adapter=adapter,
    )
    await nc.publish(subjects.REQUESTS, msgspec.json.encode(req))
    chunks: list[TokenChunk] = []
    async with asyncio.timeout(60):
        while not chunks or chunks[-1].finish_reason is None:
            chunks.append(await got.get())
    await sub.unsubscribe()
    return chunks


@contextlib.asynccontextmanager
async def _worker_and_dispatcher(
    nats_url: str, common: dict, tiny: TinyOutput
) -> AsyncIterator[tuple[nats.NATS, list[asyncio.Task], StateStore, WorkerService]]:
    """A worker "w0" on ``tiny``'s model and a dispatcher, and a NATS client of the test's: the
    client, the services' tasks, the dispatcher's store and the worker; all stopped at the end."""
    stop = asyncio.Event()
    client = await nats.connect(nats_url)
    await purge(client, "dlora")
    async with contextlib.AsyncExitStack() as stack:
        ws = WorkerSettings(
            **common,
            worker_id="w0",
            model=str(tiny.model),
            stats_interval_s=0.1,
            engine=small_engine(),
            drain_timeout_s=0.0,  # (nothing here is of the drain: the stop hands over at once)
        )
        worker_nc, worker_store = await stack.enter_async_context(connections(ws))
        ds = DispatcherSettings(**common)
        d_nc, d_store = await stack.enter_async_context(connections(ds))
        worker = WorkerService(ws, worker_nc, worker_store, build_engine(ws))
        tasks = [asyncio.create_task(worker.run(stop)), asyncio.create_task(Dispatcher(ds, d_nc, d_store).run(stop))]
        try:
            yield client, tasks, d_store, worker
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            await purge(client, "dlora")
            await client.close()


async def test_services_ride_out_a_redis_restart(
    nats_server: Server, tiny_llama: TinyOutput, start_redis_here: Callable[..., Server]
) -> None:
    redis = start_redis_here()
    port = int(redis.url.rsplit(":", 1)[1].split("/")[0])
    common = dict(nats_url=nats_server.url, redis_url=redis.url, heartbeat_ttl_s=2.0)
    stop = asyncio.Event()
    tasks: list[asyncio.Task] = []
    client = await nats.connect(nats_server.url)
    # Before any service opens the registry's bucket: a purge racing the dispatcher's open left it
    # holding a stream that was then deleted (seen once in a fresh-clone run).
    await purge(client, "dlora")
    async with contextlib.AsyncExitStack() as stack:
        ws = WorkerSettings(
            **common,
            worker_id="w0",
            model=str(tiny_llama.model),
            stats_interval_s=0.1,
            engine=small_engine(),
            drain_timeout_s=0.0,
        )
        worker_nc, worker_store = await stack.enter_async_context(connections(ws))
        tasks.append(asyncio.create_task(WorkerService(ws, worker_nc, worker_store, build_engine(ws)).run(stop)))
        ds = DispatcherSettings(**common)
        d_nc, d_store = await stack.enter_async_context(connections(ds))
        tasks.append(asyncio.create_task(Dispatcher(ds, d_nc, d_store).run(stop)))
        ms = MigratorSettings(**common, interval_s=0.1)
        m_nc, m_store = await stack.enter_async_context(connections(ms))
        tasks.append(asyncio.create_task(Migrator(ms, m_nc, m_store).run(stop)))
        registry = await AdapterRegistry.open(client, StateStore(Redis.from_url(redis.url)))
        path = str(tiny_llama.adapters["lora-0"])
        entry = check_adapter(
            "lora-0", path, [str(tiny_llama.adapters_dir)], "model", ModelConfig.from_dir(tiny_llama.model)
        )
        assert await registry.register(entry)
        try:
            await asyncio.sleep(1.0)
            assert [c.finish_reason for c in await _generate(client)][-1] == "length"

            running = asyncio.create_task(_generate(client, tokens=300))
            await asyncio.sleep(0.5)
            redis.stop()
            await asyncio.sleep(1.5)  # the services meet the closed connection meanwhile
            # A request the dispatcher cannot record is refused at once (it was dropped, and its
            # client waited out the gateway's 60 s chunk timeout for a misleading answer).
            refused = await _generate(client)
            assert refused[-1].error_code is ErrorCode.UNAVAILABLE and "Redis" in (refused[-1].error or "")
            # One already running goes on at its pace: each step awaited its failing progress write
            # (redis-py's retries: 2 tokens a second), so 300 tokens took minutes.
            chunks = await running
            assert chunks[-1].finish_reason == "length" and sum(len(c.token_ids) for c in chunks) == 300
            redis = start_redis_here(port)  # back, empty
            await asyncio.sleep(2.0)

            assert not any(t.done() for t in tasks), [t.exception() for t in tasks if t.done()]
            chunks = await _generate(client)
            assert [t for c in chunks for t in c.token_ids] and chunks[-1].finish_reason == "length"
            # the registry is back from its durable copy: the adapter is served, not 404
            assert await d_store.get_adapter("lora-0") == entry
            assert await d_store.get_adapter("lora-0", entry.version) == entry
            chunks = await _generate(client, adapter="lora-0")
            assert chunks[-1].error is None and chunks[-1].finish_reason == "length"
            assert "w0" in [w.worker for w in await worker_store.live_workers()]  # heartbeat back in the new Redis
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            await purge(client, "dlora")
            await client.close()
            await registry.store.r.aclose()


async def test_a_dispatcher_and_a_worker_started_while_redis_is_down_wait_for_it(
    nats_server: Server, tiny_llama: TinyOutput, start_redis_here: Callable[..., Server]
) -> None:
    """Each exited with a traceback at its first read (the dispatcher's seed, the worker's policy
    checkpoint): under systemd's start limit, a Redis down for ten seconds kept them down for good."""
    port = free_port()
    common = dict(nats_url=nats_server.url, redis_url=f"redis://127.0.0.1:{port}/0", heartbeat_ttl_s=2.0)
    async with _worker_and_dispatcher(nats_server.url, common, tiny_llama) as (client, tasks, d_store, _):
        await asyncio.sleep(2.0)
        assert not any(t.done() for t in tasks), [t.exception() for t in tasks if t.done()]
        start_redis_here(port)
        async with asyncio.timeout(30):
            while "w0" not in [w.worker for w in await d_store.live_workers()]:
                await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)  # the dispatcher hears the worker's stats
        chunks = await _generate(client)
        assert chunks[-1].error is None and chunks[-1].finish_reason == "length"


async def test_a_worker_writes_its_requests_records_again_when_redis_lost_its_data(
    nats_server: Server, tiny_llama: TinyOutput, start_redis_here: Callable[..., Server]
) -> None:
    """Progress writes update records that exist: after Redis came back empty, the requests running
    had none for good, and a later death or drain of their worker lost them. The worker writes them
    again (each resumed after the tokens its client has, as a move records it)."""
    redis = start_redis_here()
    port = int(redis.url.rsplit(":", 1)[1].split("/")[0])
    common = dict(nats_url=nats_server.url, redis_url=redis.url, heartbeat_ttl_s=2.0)
    owner = uuid.uuid4().hex[:8]
    streams = {f"r{i}": ReplyStream(f"r{i}") for i in range(4)}

    async def on_chunk(msg) -> None:  # type: ignore[no-untyped-def]
        chunk = msgspec.json.decode(msg.data, type=TokenChunk)
        streams[chunk.request_id].accept(chunk)

    async with _worker_and_dispatcher(nats_server.url, common, tiny_llama) as (client, _, d_store, worker):
        found_it = _step_once_per_reconcile(worker)
        await client.subscribe(subjects.replies_of(owner), cb=on_chunk)
        await asyncio.sleep(1.0)
        for rid in streams:
            params = SamplingParams(max_tokens=480, ignore_eos=True)
            req = GenerateRequest(
                request_id=rid, reply_to=subjects.reply_inbox(rid, owner), prompt_token_ids=[5, 40], params=params
            )
            await client.publish(subjects.REQUESTS, msgspec.json.encode(req))
        async with asyncio.timeout(30):
            while not all(s.tokens for s in streams.values()):
                await asyncio.sleep(0.01)
        redis.stop()
        redis = start_redis_here(port)  # back, empty
        found = None
        async with asyncio.timeout(60):
            while found is None and not all(s.done for s in streams.values()):
                await asyncio.sleep(0.05)
                with contextlib.suppress(*STATE_OUTAGE):
                    held = [await d_store.get_inflight(rid) for rid, s in streams.items() if not s.done]
                    found = next((rec for rec in held if rec is not None), None)
        assert found is not None and found.worker == "w0" and found.request.resume_token_ids
        found_it.set()  # the rest at the worker's own pace
        async with asyncio.timeout(60):
            while not all(s.done for s in streams.values()):
                await asyncio.sleep(0.05)
        assert all(s.error is None and s.tokens == 480 for s in streams.values())


def _step_once_per_reconcile(worker: WorkerService) -> asyncio.Event:
    """Have ``worker`` step at most once per reconciliation (``_reconcile``, where it writes its
    records again) until the event returned is set: its requests then cannot all end before their
    records are written again, however fast its steps (with the small KV cache the 480 tokens of
    each were done before the worker's next reconcile in 2 whole-file runs of 4). Counted in turns,
    not seconds: with a reconcile every 15 s instead of 0.5 s it still holds."""
    found, reconciled = asyncio.Event(), [0, 0]  # reconciliations, and the count at the last step
    reconcile, step = worker._reconcile, worker._step

    async def counted() -> None:
        reconciled[0] += 1
        await reconcile()

    async def paced() -> None:
        if found.is_set() or reconciled[0] > reconciled[1]:
            reconciled[1] = reconciled[0]
            await step()
        else:
            await asyncio.sleep(0.01)  # the loop's turn comes again; its reconcile when due

    worker._reconcile, worker._step = counted, paced  # type: ignore[method-assign]
    return found


async def _full(admin: Redis) -> Callable[[], Awaitable[Any]]:
    """Redis at maxmemory with noeviction: OOM (a failed-over replica's READONLY is of the kind)."""
    await admin.config_set("maxmemory-policy", "noeviction")
    await admin.config_set("maxmemory", 1)
    return lambda: admin.config_set("maxmemory", 0)


async def _disk_full(admin: Redis) -> Callable[[], Awaitable[Any]]:
    """Redis whose last RDB save failed (a full disk; here its directory gone): MISCONF."""
    where = Path((await admin.config_get("dir"))["dir"])  # (the test's own server's: a protected setting)
    shutil.rmtree(where)
    await admin.config_set("save", "3600 1")  # (writes are refused only where snapshots are configured)
    await admin.bgsave()
    while (await admin.info("persistence"))["rdb_last_bgsave_status"] != "err":
        await asyncio.sleep(0.05)
    with pytest.raises(ResponseError, match="^MISCONF"):
        await admin.set("probe", 1)

    async def room() -> None:
        await admin.config_set("stop-writes-on-bgsave-error", "no")
        # Its working directory is still the removed one: the save at its stop failed there, and
        # it refused SIGTERM until killed 5 s later (Server.stop), each run's teardown.
        await admin.config_set("save", "")
        where.mkdir()  # (for the server's own clean-up)

    return room


@pytest.mark.parametrize("refuse", [_full, _disk_full], ids=["maxmemory", "misconf"])
async def test_the_control_plane_rides_out_a_redis_that_refuses_writes(
    nats_server: Server, start_redis_here: Callable[..., Server], refuse: Callable[[Redis], Awaitable[Any]]
) -> None:
    """A Redis that refuses writes answers them with an error, not a lost connection: the
    dispatcher's and the migrator's loops took it for a fault of theirs and exited, and again at
    every restart while it lasted (a helper's soak): under systemd's start limit, down for good."""
    redis = start_redis_here()
    common = dict(nats_url=nats_server.url, redis_url=redis.url, heartbeat_ttl_s=1.0)
    stop = asyncio.Event()
    tasks: list[asyncio.Task] = []
    admin = Redis.from_url(redis.url, decode_responses=True)
    async with contextlib.AsyncExitStack() as stack:
        allow = await refuse(admin)  # from the start: each exited at once when started so
        ds = DispatcherSettings(**common, placement_interval_s=0.1)
        d_nc, d_store = await stack.enter_async_context(connections(ds))
        tasks.append(asyncio.create_task(Dispatcher(ds, d_nc, d_store).run(stop)))
        ms = MigratorSettings(**common, interval_s=0.1)
        m_nc, m_store = await stack.enter_async_context(connections(ms))
        tasks.append(asyncio.create_task(Migrator(ms, m_nc, m_store).run(stop)))
        try:
            await asyncio.sleep(2.5)
            assert not any(t.done() for t in tasks), [t.exception() for t in tasks if t.done()]
            await allow()
            await asyncio.sleep(1.0)
            assert not any(t.done() for t in tasks), [t.exception() for t in tasks if t.done()]
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            await admin.aclose()
