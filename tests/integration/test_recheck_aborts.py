"""Requests the dispatcher looks at again later (``_look_again``, ``rechecks.py``), against real
NATS and Redis: a second request under an id in flight, and one waiting for a worker that holds
its adapter version. Their aborts end them as the intake ends one, and the dispatcher's stop
leaves none of them running. The workers here are stats published by hand: a worker "live" to
the dispatcher that never answers, so nothing but the dispatcher ends a request."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import msgspec
import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from redis.asyncio import Redis

from dlora.common import subjects
from dlora.common.messages import AbortRequest, GenerateRequest, LostRequests, SamplingParams, TokenChunk, WorkerStats
from dlora.common.state import StateStore
from dlora.services.dispatcher import main as dispatcher_main
from dlora.services.dispatcher.main import Dispatcher
from dlora.services.dispatcher.settings import DispatcherSettings
from dlora.services.servers import Server
from tests.integration.conftest import sigstop
from tests.integration.fencing_cluster import PROMPT, _until

# No worker is found lost, no sweep runs, and a wait for every worker's next stats lasts this
# long: only an abort can end a wait within a test.
TTL_S = 3600.0


class _Bus:
    """A dispatcher's surroundings: stats of made-up workers, requests, aborts, and what comes back."""

    def __init__(self, nc: NATS, store: StateStore, dispatcher: Dispatcher) -> None:
        self.nc, self.store, self.dispatcher = nc, store, dispatcher
        self.sent: list[bytes] = []  # requests the dispatcher sent to a worker

    async def live(self, worker: str) -> None:
        """``worker`` live to the dispatcher (its stats heard), holding no adapter; whatever is
        sent to it is noted in ``sent``."""
        stats = WorkerStats(
            worker=worker, running=0, waiting=0, free_blocks=100, total_blocks=100, block_size=16, max_loras=4
        )

        async def on_request(msg: Msg) -> None:
            self.sent.append(msg.data)

        await self.nc.subscribe(subjects.worker_requests(worker), cb=on_request)
        await _until(self._listening)
        # published once: a copy heard later would be the "next stats" a wait for a holder awaits
        await self.nc.publish(subjects.stats(worker), msgspec.json.encode(stats))

        async def heard() -> bool:
            return worker in {w.worker for w in self.dispatcher.live()}

        await _until(heard)

    async def _listening(self) -> bool:
        """Whether the dispatcher answers its ping: subscribed, the stats' subscription first."""
        with contextlib.suppress(nats.errors.NoRespondersError, nats.errors.TimeoutError):
            await self.nc.request(subjects.DISPATCHER_PING, b"", timeout=1)
            return True
        return False

    async def reader(self, reply: str) -> asyncio.Queue[TokenChunk]:
        chunks: asyncio.Queue[TokenChunk] = asyncio.Queue()

        async def on_chunk(msg: Msg) -> None:
            chunks.put_nowait(msgspec.json.decode(msg.data, type=TokenChunk))

        await self.nc.subscribe(reply, cb=on_chunk)
        await self.nc.flush()
        return chunks

    async def abort(self, request_id: str) -> None:
        await self.nc.publish(subjects.ABORT, msgspec.json.encode(AbortRequest(request_id=request_id)))

    async def waiting(self, request_id: str) -> None:
        """Until a request under ``request_id`` waits to be looked at again."""

        async def waits() -> bool:
            return request_id in self.dispatcher.rechecks

        await _until(waits)


def _request(request_id: str, reply: str, **fields: Any) -> GenerateRequest:
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    return GenerateRequest(request_id=request_id, reply_to=reply, prompt_token_ids=PROMPT, params=params, **fields)


@pytest.fixture
async def surroundings(nats_server: Server, redis: Redis) -> AsyncIterator[Callable[..., Awaitable[_Bus]]]:
    """A dispatcher (heartbeat TTL ``TTL_S``) not yet running, and its surroundings; the test runs
    it. On the tests' Redis, or on ``own`` (a test's own, to hang with SIGSTOP)."""
    conns: list[NATS] = []
    clients: list[Redis] = []

    async def make(own: Server | None = None) -> _Bus:
        nc = await nats.connect(nats_server.url)
        conns.append(nc)
        if own is not None:
            clients.append(client := Redis.from_url(own.url))
        settings = DispatcherSettings(nats_url=nats_server.url, redis_url="unused", heartbeat_ttl_s=TTL_S)
        store = StateStore(client if own is not None else redis)
        return _Bus(nc, store, Dispatcher(settings, nc, store))

    yield make
    for nc in conns:
        with contextlib.suppress(Exception):
            await nc.close()
    for client in clients:
        await client.aclose()


@contextlib.contextmanager
def _hung(redis: Server) -> Iterator[Callable[[], None]]:
    """A call that hangs ``redis`` (SIGSTOP); it answers again when the block ends."""
    try:
        yield lambda: sigstop(redis.proc)
    finally:
        redis.proc.send_signal(signal.SIGCONT)


@contextlib.asynccontextmanager
async def _running(bus: _Bus) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(bus.dispatcher.run(stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)


async def _wait_for_holder(bus: _Bus, request_id: str, reply: str) -> None:
    """A request of an adapter version no live worker lists, handed back by the worker whose files
    changed under it: the dispatcher waits for every other worker's next stats (``TTL_S`` here)
    before it looks again (``_dispatch``'s ``holding``)."""
    await bus.live("w-other")
    req = _request(request_id, reply, adapter="rl", adapter_version="v1", recorded=True)
    assert await bus.store.put_inflight(req, "w-from", new=True)
    lost = LostRequests(worker="w-from", requests={request_id: 0}, never_arrived=[request_id], elsewhere=[request_id])
    await bus.nc.publish(subjects.LOST, msgspec.json.encode(lost))
    await bus.waiting(request_id)


async def test_a_second_request_under_an_id_in_flight_ends_with_its_abort_not_dispatched(
    surroundings,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A second request under the id of one in flight is looked at again a moment later (the
    first's record may go meanwhile). Its abort heard in between was not looked for: the first
    ended (its record went), and the second was sent to a worker, to run for nobody. It ends with
    the abort's last chunk as soon as the abort is heard (the moment is ``TTL_S`` here), as one
    taken after its abort ends at the intake, and nothing is sent or recorded."""
    monkeypatch.setattr(dispatcher_main, "_RECHECK_S", TTL_S)
    bus: _Bus = await surroundings()
    async with _running(bus):
        await bus.live("w-a")
        assert await bus.store.put_inflight(_request("dup", "test.reply.first"), "w-busy", new=True)
        chunks = await bus.reader("test.reply.second")
        await bus.nc.request(subjects.REQUESTS, msgspec.json.encode(_request("dup", "test.reply.second")), timeout=60)
        await bus.waiting("dup")
        assert await bus.store.delete_inflight("dup")  # the first ended (aborted, on its worker)
        await bus.abort("dup")

        async def answered() -> bool:
            return not chunks.empty() or bool(bus.sent)

        await _until(answered)
        assert not bus.sent
        chunk = chunks.get_nowait()
        assert (chunk.request_id, chunk.finish_reason, chunk.error, chunk.seq) == ("dup", "abort", None, 0)
        assert await bus.store.get_inflight("dup") is None


async def test_a_request_waiting_for_a_worker_holding_its_adapter_version_ends_when_its_abort_is_heard(
    surroundings,  # type: ignore[no-untyped-def]
) -> None:
    """A request handed back to wait for a worker that holds its adapter version was not looked
    for aborts: after the wait it was failed (no worker holds the version) or sent to a holder, for
    nobody. Its abort now ends the wait at once: its record goes, its reader gets the abort's last
    chunk, and nothing is sent to a worker."""
    bus: _Bus = await surroundings()
    async with _running(bus):
        chunks = await bus.reader("test.reply.held")
        await _wait_for_holder(bus, "held", "test.reply.held")
        await bus.abort("held")
        chunk = await asyncio.wait_for(chunks.get(), 60)
        assert (chunk.request_id, chunk.finish_reason, chunk.error, chunk.seq) == ("held", "abort", None, 0)
        assert await bus.store.get_inflight("held") is None
        assert not bus.sent


async def test_an_applications_abort_leaves_the_wait_of_anothers_request_under_its_id(
    surroundings,  # type: ignore[no-untyped-def]
) -> None:
    """An application's abort stops only its own requests: heard, it must not end the wait of a
    gateway's request under the same id (woken, that one was looked at at once, found no holder,
    and failed). The gateway's own abort then ends it with the abort's last chunk."""
    bus: _Bus = await surroundings()
    async with _running(bus):
        chunks = await bus.reader("test.reply.held")
        await _wait_for_holder(bus, "held", "test.reply.held")
        await bus.nc.publish(subjects.aborts_of("bob"), msgspec.json.encode(AbortRequest(request_id="held")))

        async def heard() -> bool:
            return bus.dispatcher.aborted.lately("held", "bob", time.monotonic())

        await _until(heard)
        assert "held" in bus.dispatcher.rechecks
        await bus.abort("held")
        chunk = await asyncio.wait_for(chunks.get(), 60)
        assert (chunk.request_id, chunk.finish_reason, chunk.error, chunk.seq) == ("held", "abort", None, 0)


async def test_a_stop_leaves_no_recheck_or_take_back_running(
    surroundings,  # type: ignore[no-untyped-def]
    start_redis_here: Callable[..., Server],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The requests looked at again were cancelled at the dispatcher's stop, not awaited: they
    ended after it (their log lines and Redis writes too), or were destroyed pending with the loop;
    and a dispatch cut off in its Redis write by that cancel starts a take-back of the write, which
    nothing cancelled. The stop waits for all of them: none is left once ``run`` returns."""
    redis = start_redis_here()
    bus: _Bus = await surroundings(redis)
    stop = asyncio.Event()
    monkeypatch.setattr(bus.dispatcher._state_bound, "bound_s", TTL_S)  # (not cut off by the bound)

    async def stage(hang: Callable[[], None]) -> None:
        await _wait_for_holder(bus, "held", "test.reply.held")  # a wait of TTL_S
        assert await bus.store.put_inflight(_request("dup", "test.reply.first"), "w-busy", new=True)
        real, calls, hanging = bus.store.put_inflight, [], asyncio.Event()

        async def second_hangs(*args: Any, **kwargs: Any) -> bool:  # the real write; Redis hangs in the second
            calls.append(args)
            if len(calls) == 2:  # (the first look's found the id in flight)
                hang()
                hanging.set()
            return await real(*args, **kwargs)

        monkeypatch.setattr(bus.store, "put_inflight", second_hangs)
        await bus.nc.request(subjects.REQUESTS, msgspec.json.encode(_request("dup", "test.reply.second")), timeout=60)
        await asyncio.wait_for(hanging.wait(), 60)  # looked at again 0.5 s later
        stop.set()

    with _hung(redis) as hang:
        staging = asyncio.create_task(stage(hang))
        async with asyncio.timeout(60):  # run awaited here, not in a task: what it left is looked at as it returns
            await bus.dispatcher.run(stop)
        await staging
        left = {t.get_coro().__qualname__ for t in asyncio.all_tasks()}  # type: ignore[union-attr]
    assert not left & {"Dispatcher._look_again.<locals>.recheck", "Dispatcher._heard_from_all", "take_back"}, left
    assert not len(bus.dispatcher.rechecks)


async def test_a_write_the_stop_cuts_off_at_the_intake_starts_no_take_back_after_the_stop(
    surroundings,  # type: ignore[no-untyped-def]
    start_redis_here: Callable[..., Server],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The stop's unsubscribe cancelled a request's handler, not awaited: cut off in its record's
    write (Redis hung), it started a take-back of that write once ``run`` had returned (its Redis
    work and log lines after the stop). The handler's clean-up now ends before ``run`` returns,
    and the take-back it starts is cancelled with the rest at ``Rechecks.close``."""
    redis = start_redis_here()
    bus: _Bus = await surroundings(redis)
    stop = asyncio.Event()
    monkeypatch.setattr(bus.dispatcher._state_bound, "bound_s", TTL_S)  # (not cut off by the bound)
    real, writing, cut = bus.store.put_inflight, asyncio.Event(), asyncio.Event()

    async def noted(*args: Any, **kwargs: Any) -> bool:  # the real write, its start and end noted
        writing.set()
        try:
            return await real(*args, **kwargs)
        finally:
            cut.set()  # (the handler's clean-up after it runs in the same step: ``_dispatch``'s finally)

    monkeypatch.setattr(bus.store, "put_inflight", noted)

    async def stage(hang: Callable[[], None]) -> None:
        await bus.live("w-a")
        await bus.store.get_inflight("warm")  # a pooled connection: the write is sent, then hangs
        hang()
        await bus.nc.publish(subjects.REQUESTS, msgspec.json.encode(_request("cut", "test.reply.cut")), reply="r")
        await asyncio.wait_for(writing.wait(), 60)
        stop.set()

    with _hung(redis) as hang:
        staging = asyncio.create_task(stage(hang))
        async with asyncio.timeout(60):
            await bus.dispatcher.run(stop)
            assert cut.is_set()  # the handler's clean-up ran before run returned (bus.unsubscribe awaits it)
            await staging
        left = {t.get_coro().__qualname__ for t in asyncio.all_tasks()}  # type: ignore[union-attr]
    assert "take_back" not in left, left
