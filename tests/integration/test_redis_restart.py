"""Redis restarted under a running cluster (empty: no persistence): the worker, dispatcher and
migrator ride it out, reconnect and serve again, the adapter registry comes back from its durable
copy; nothing crashes (issue 16, the restart fault)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import msgspec
import nats
import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

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
from dlora.services.servers import Server, free_port, start_redis
from dlora.services.worker.main import WorkerService, build_engine
from dlora.services.worker.settings import WorkerSettings


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


@pytest.fixture
def start_redis_here() -> Iterator[Callable[..., Server]]:
    """start_redis, each server it starts stopped after the test, failing or not (a test that failed
    left its servers running: one a SIGSTOP'd Redis)."""
    started: list[Server] = []

    def start(port: int | None = None) -> Server:
        started.append(server := start_redis(port))
        return server

    yield start
    for server in started:
        server.proc.send_signal(signal.SIGCONT)
        server.stop()


@contextlib.asynccontextmanager
async def _worker_and_dispatcher(
    nats_url: str, common: dict, tiny: TinyOutput
) -> AsyncIterator[tuple[nats.NATS, list[asyncio.Task], StateStore]]:
    """A worker "w0" on ``tiny``'s model and a dispatcher, and a NATS client of the test's: the
    client, the services' tasks and the dispatcher's store; all stopped at the end."""
    stop = asyncio.Event()
    client = await nats.connect(nats_url)
    await purge(client, "dlora")
    async with contextlib.AsyncExitStack() as stack:
        ws = WorkerSettings(**common, worker_id="w0", model=str(tiny.model), stats_interval_s=0.1)
        worker_nc, worker_store = await stack.enter_async_context(connections(ws))
        ds = DispatcherSettings(**common)
        d_nc, d_store = await stack.enter_async_context(connections(ds))
        tasks = [
            asyncio.create_task(WorkerService(ws, worker_nc, worker_store, build_engine(ws)).run(stop)),
            asyncio.create_task(Dispatcher(ds, d_nc, d_store).run(stop)),
        ]
        try:
            yield client, tasks, d_store
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
        ws = WorkerSettings(**common, worker_id="w0", model=str(tiny_llama.model), stats_interval_s=0.1)
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
    async with _worker_and_dispatcher(nats_server.url, common, tiny_llama) as (client, tasks, d_store):
        await asyncio.sleep(2.0)
        assert not any(t.done() for t in tasks), [t.exception() for t in tasks if t.done()]
        start_redis_here(port)
        async with asyncio.timeout(30):
            while "w0" not in [w.worker for w in await d_store.live_workers()]:
                await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)  # the dispatcher hears the worker's stats
        chunks = await _generate(client)
        assert chunks[-1].error is None and chunks[-1].finish_reason == "length"


async def test_steps_do_not_wait_for_progress_writes_redis_refuses(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each step awaited its failing progress write (redis-py's retries: a stream got 2 tokens a
    second while Redis refused, none while it hung). After a failure the steps' chunks are kept and
    a write beside the steps tries again; once Redis answers, the record holds every token in order."""
    from dlora.common.inflight import Sent
    from dlora.services.worker import records as records_module
    from dlora.services.worker.records import ProgressRecords

    store = StateStore(redis)
    assert await store.put_inflight(GenerateRequest(request_id="r", reply_to="x", prompt_token_ids=[1]), "w-a")
    records = ProgressRecords(store, "w-a", 5.0)
    calls, real, down = [0], store.record_progress, [True]

    async def refusing(*args: object) -> set[str]:
        calls[0] += 1
        if down[0]:
            raise RedisConnectionError("Connection refused")
        return await real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "record_progress", refusing)
    monkeypatch.setattr(records_module, "_WRITE_AGAIN_S", 0.2)
    step = iter(range(100))

    async def write_step() -> set[str]:
        seq = next(step)
        return await records.write_step({"r": Sent(0, seq, [10 + seq], 0)})

    for _ in range(5):
        assert await write_step() == set()
    assert calls[0] == 1  # the first step's write failed; the next four did not try
    # kept as one chunk (64 streams' chunks kept apart filled the cap in 3 s: the oldest were
    # dropped, and the record skipped tokens a resume then lacked)
    assert [(rid, sent.seq, sent.last) for rid, sent in records.unwritten] == [("r", 0, 4)]
    await asyncio.sleep(0.3)
    assert calls[0] == 2 and await write_step() == set()  # tried again beside the steps: still refused
    down[0] = False
    async with asyncio.timeout(5):
        while records.behind:
            await write_step()
            await asyncio.sleep(0.05)
    written = await store.get_inflight("r")
    sent = next(step)
    assert written is not None and written.tokens == [10 + seq for seq in range(sent)] and written.next_seq == sent


async def test_a_hung_redis_holds_a_step_a_second_at_most(redis: Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hung Redis (SIGSTOP) held each step for redis-py's four tries of its 5 s socket timeout;
    the first write is now bounded, and the writes go on beside the steps from then on."""
    from dlora.common.inflight import Sent
    from dlora.services.worker.records import ProgressRecords

    store = StateStore(redis)
    records = ProgressRecords(store, "w-a", 5.0)

    async def hung(*args: object) -> set[str]:
        await asyncio.sleep(3600)
        return set()

    monkeypatch.setattr(store, "record_progress", hung)
    with pytest.raises(TimeoutError):  # a caller's own bound, shorter: the chunk, sent, is kept all the same
        async with asyncio.timeout(0.1):
            await records.write_step({"r": Sent(0, 0, [1], 0)})
    assert [sent.seq for _, sent in records.unwritten] == [0] and not records.outage
    async with asyncio.timeout(10):
        assert await records.write_step({}) == set()
        assert records.outage and await records.write_step({"r": Sent(0, 1, [2], 0)}) == set()
    assert [(sent.seq, sent.last, sent.token_ids) for _, sent in records.unwritten] == [(0, 1, [1, 2])]


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

    async with _worker_and_dispatcher(nats_server.url, common, tiny_llama) as (client, _, d_store):
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
        async with asyncio.timeout(60):
            while not all(s.done for s in streams.values()):
                await asyncio.sleep(0.05)
        assert all(s.error is None and s.tokens == 480 for s in streams.values())


async def test_a_hung_redis_gets_requests_refused_at_once_and_a_deadline_ends_its_request(
    nats_server: Server, tiny_llama: TinyOutput, start_redis_here: Callable[..., Server]
) -> None:
    """With Redis hung (SIGSTOP) the dispatcher, taking requests one at a time, waited out
    redis-py's tries for each (20 s): the third's answer came after its client's 60 s timeout. And
    a request whose deadline passed while Redis was down ended the worker (its drop wrote the record
    in line, and raised)."""

    redis = start_redis_here()
    common = dict(nats_url=nats_server.url, redis_url=redis.url, heartbeat_ttl_s=2.0)
    async with _worker_and_dispatcher(nats_server.url, common, tiny_llama) as (client, tasks, _):
        try:  # (Redis let go before the services stop: their drain writes to it)
            await asyncio.sleep(1.0)
            owner = uuid.uuid4().hex[:8]
            ended: asyncio.Queue[TokenChunk] = asyncio.Queue()

            async def on_chunk(msg) -> None:  # type: ignore[no-untyped-def]
                if (chunk := msgspec.json.decode(msg.data, type=TokenChunk)).finish_reason is not None:
                    await ended.put(chunk)

            await client.subscribe(subjects.replies_of(owner), cb=on_chunk)
            params = SamplingParams(max_tokens=480, ignore_eos=True)
            late = GenerateRequest(
                request_id="late", reply_to=subjects.reply_inbox("late", owner), prompt_token_ids=[5], params=params
            )
            await client.publish(subjects.REQUESTS, msgspec.json.encode(late))
            await asyncio.sleep(0.5)  # running
            redis.proc.send_signal(signal.SIGSTOP)
            # the running one's deadline passes while Redis hangs (sent to the worker as an app's would be)
            expiring = msgspec.structs.replace(late, request_id="x", reply_to=subjects.reply_inbox("x", owner))
            expiring = msgspec.structs.replace(expiring, deadline=time.time() + 1.0)
            await client.publish(subjects.worker_requests("w0"), msgspec.json.encode(expiring))
            for i in range(3):
                req = msgspec.structs.replace(late, request_id=f"r{i}", reply_to=subjects.reply_inbox(f"r{i}", owner))
                await client.publish(subjects.REQUESTS, msgspec.json.encode(req))
            got: dict[str, TokenChunk] = {}
            async with asyncio.timeout(20):
                while len(got) < 5:
                    chunk = await ended.get()
                    got[chunk.request_id] = chunk
            assert all("Redis" in (got[f"r{i}"].error or "") for i in range(3))
            assert "deadline" in (got["x"].error or "") and got["late"].finish_reason == "length"
            assert not any(t.done() for t in tasks), [t.exception() for t in tasks if t.done()]
        finally:
            redis.proc.send_signal(signal.SIGCONT)


async def test_a_write_redis_ran_after_its_caller_gave_up_leaves_no_hole(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write cut off by the step's bound that Redis ran all the same moved the record's next past
    its chunk; that chunk, kept and joined with the next ones, was then skipped whole: the record
    lacked their tokens, and a resume from it went on from the wrong ones (a review)."""
    from dlora.common.inflight import Sent
    from dlora.services.worker import records as records_module
    from dlora.services.worker.records import ProgressRecords

    store = StateStore(redis)
    assert await store.put_inflight(GenerateRequest(request_id="r", reply_to="x", prompt_token_ids=[1]), "w-a")
    records = ProgressRecords(store, "w-a", 5.0)
    real, late = store.record_progress, [True]

    async def applied_then_lost(*args: object) -> set[str]:
        fenced = await real(*args)  # type: ignore[arg-type]
        if late[0]:  # the reply never came back
            late[0] = False
            raise RedisConnectionError("Connection reset by peer")
        return fenced

    monkeypatch.setattr(store, "record_progress", applied_then_lost)
    monkeypatch.setattr(records_module, "_WRITE_AGAIN_S", 0.05)
    for seq in range(4):  # the first one's write applied, then counted failed; the others joined to it
        await records.write_step({"r": Sent(0, seq, [10 + seq, 20 + seq], 0)})
    assert [(sent.seq, sent.last, sent.counts) for _, sent in records.unwritten] == [(0, 3, (2, 2, 2, 2))]
    async with asyncio.timeout(5):
        while records.behind or records.outage:
            await records.write_step({})
            await asyncio.sleep(0.02)
    written = await store.get_inflight("r")
    assert written is not None and written.tokens == [t for seq in range(4) for t in (10 + seq, 20 + seq)]
    assert written.next_seq == 4


async def test_a_record_whose_write_was_cut_off_is_taken_back_once_redis_answers(
    nats_server: Server, tiny_llama: TinyOutput, start_redis_here: Callable[..., Server]
) -> None:
    """A dispatcher's record write cut off by its 2 s bound (Redis hung), its client told UNAVAILABLE:
    Redis ran the write when it woke, and the record named a worker that never got the request (a
    review): handed back by that worker's sweep, it ran for nobody, or an application's retry under
    the same id met it as a duplicate and waited out its timeout."""
    redis = start_redis_here()
    common = dict(nats_url=nats_server.url, redis_url=redis.url, heartbeat_ttl_s=2.0)
    async with _worker_and_dispatcher(nats_server.url, common, tiny_llama) as (client, tasks, store):
        await asyncio.sleep(1.0)
        assert (await _generate(client))[-1].error is None  # (Redis has the record's script: run late, it writes)
        owner = uuid.uuid4().hex[:8]
        got: asyncio.Queue[TokenChunk] = asyncio.Queue()

        async def on_chunk(msg) -> None:  # type: ignore[no-untyped-def]
            await got.put(msgspec.json.decode(msg.data, type=TokenChunk))

        await client.subscribe(subjects.replies_of(owner), cb=on_chunk)
        params = SamplingParams(max_tokens=4, ignore_eos=True)
        req = GenerateRequest(
            request_id="cut", reply_to=subjects.reply_inbox("cut", owner), prompt_token_ids=[5], params=params
        )
        try:
            redis.proc.send_signal(signal.SIGSTOP)
            await client.publish(subjects.REQUESTS, msgspec.json.encode(req))
            told = await asyncio.wait_for(got.get(), 10)
            assert told.error_code == ErrorCode.UNAVAILABLE and "Redis" in (told.error or ""), told
        finally:
            redis.proc.send_signal(signal.SIGCONT)
        # Run when Redis wakes (idle, always: without take_back the record stayed and the request ran
        # for nobody), then taken back. Under load the cut-off write may not have left redis-py
        # before the bound (a CI run: no late write to take back); the end state is the same.
        seen, deadline = False, time.monotonic() + 8
        while time.monotonic() < deadline and not (seen and await store.get_inflight("cut") is None):
            seen = seen or await store.get_inflight("cut") is not None
            await asyncio.sleep(0.05)
        await asyncio.sleep(2.5)  # (a second delete a second later, which finds nothing)
        assert await store.get_inflight("cut") is None and got.empty()


async def test_a_hung_redis_holds_an_adapter_requests_admission_seconds_not_the_worker(
    nats_server: Server, tiny_llama: TinyOutput, start_redis_here: Callable[..., Server]
) -> None:
    """A request of an adapter the worker does not hold reads the registry as it is admitted, in
    line in the worker's loop: with Redis hung it waited out redis-py's tries (20 s), and every
    running stream's steps with it. Bounded: it is answered UNAVAILABLE and the streams go on."""
    redis = start_redis_here()
    common = dict(nats_url=nats_server.url, redis_url=redis.url, heartbeat_ttl_s=2.0)
    async with _worker_and_dispatcher(nats_server.url, common, tiny_llama) as (client, tasks, _):
        try:
            await asyncio.sleep(1.0)
            owner = uuid.uuid4().hex[:8]
            got: dict[str, asyncio.Queue[TokenChunk]] = {k: asyncio.Queue() for k in ("long", "lora", "base")}

            async def on_chunk(msg) -> None:  # type: ignore[no-untyped-def]
                chunk = msgspec.json.decode(msg.data, type=TokenChunk)
                await got[chunk.request_id].put(chunk)

            await client.subscribe(subjects.replies_of(owner), cb=on_chunk)

            def request(rid: str, tokens: int, **extra: object) -> bytes:
                params = SamplingParams(max_tokens=tokens, ignore_eos=True)
                reply = subjects.reply_inbox(rid, owner)
                return msgspec.json.encode(GenerateRequest(request_id=rid, reply_to=reply, params=params, **extra))

            await client.publish(subjects.REQUESTS, request("long", 480, prompt_token_ids=[5]))
            await asyncio.wait_for(got["long"].get(), 10)  # running
            redis.proc.send_signal(signal.SIGSTOP)
            lora = request("lora", 2, prompt_token_ids=[5], adapter="lora-0", adapter_version="v1")
            await client.publish(subjects.worker_requests("w0"), lora)
            told = await asyncio.wait_for(got["lora"].get(), 10)
            assert told.error_code == ErrorCode.UNAVAILABLE and "Redis" in (told.error or ""), told
            # a request that needs no registry read is taken meanwhile (a review: the pause after
            # the cut-off read refused every request for a second)
            await client.publish(subjects.worker_requests("w0"), request("base", 2, prompt_token_ids=[5]))
            async with asyncio.timeout(30):
                for rid in ("base", "long"):
                    while (chunk := await got[rid].get()).finish_reason is None:
                        pass
                    assert chunk.error is None, chunk
            assert not any(t.done() for t in tasks)
        finally:
            redis.proc.send_signal(signal.SIGCONT)


async def test_the_control_plane_rides_out_a_redis_that_refuses_writes(
    nats_server: Server, start_redis_here: Callable[..., Server]
) -> None:
    """Redis at maxmemory with noeviction (a failed-over replica's READONLY is of the kind) answers
    writes with an error, not a lost connection: the dispatcher's and the
    migrator's loops took it for a fault of theirs and exited, and again at every restart while it
    lasted (a helper's soak): under systemd's start limit, down for good."""
    redis = start_redis_here()
    common = dict(nats_url=nats_server.url, redis_url=redis.url, heartbeat_ttl_s=1.0)
    stop = asyncio.Event()
    tasks: list[asyncio.Task] = []
    admin = Redis.from_url(redis.url)
    async with contextlib.AsyncExitStack() as stack:
        await admin.config_set("maxmemory-policy", "noeviction")
        await admin.config_set("maxmemory", 1)  # from the start: each exited at once when started so
        ds = DispatcherSettings(**common, placement_interval_s=0.1)
        d_nc, d_store = await stack.enter_async_context(connections(ds))
        tasks.append(asyncio.create_task(Dispatcher(ds, d_nc, d_store).run(stop)))
        ms = MigratorSettings(**common, interval_s=0.1)
        m_nc, m_store = await stack.enter_async_context(connections(ms))
        tasks.append(asyncio.create_task(Migrator(ms, m_nc, m_store).run(stop)))
        try:
            await asyncio.sleep(2.5)
            assert not any(t.done() for t in tasks), [t.exception() for t in tasks if t.done()]
            await admin.config_set("maxmemory", 0)
            await asyncio.sleep(1.0)
            assert not any(t.done() for t in tasks), [t.exception() for t in tasks if t.done()]
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            await admin.aclose()
