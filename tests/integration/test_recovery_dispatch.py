"""A lost worker's requests as the dispatcher recovers them, against real NATS and Redis with the
dispatcher in-process and no worker processes: re-dispatched once, failed when their workers keep
dying, kept waiting while no worker is live, answered for a client gone only past twice the TTL."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
import nats
import structlog
from redis.asyncio import Redis

from dlora.common import subjects
from dlora.common.clients import FAILOVER_S
from dlora.common.inflight import Sent
from dlora.common.messages import AbortRequest, GenerateRequest, LostRequests, TokenChunk, WorkerStats
from dlora.common.state import StateStore
from dlora.services.dispatcher.main import Dispatcher
from dlora.services.dispatcher.recovery import Recovery
from dlora.services.dispatcher.settings import DispatcherSettings
from dlora.services.servers import Server

T = TypeVar("T")


@dataclass
class _Recovering:
    dispatcher: Dispatcher
    store: StateStore
    forwarded: asyncio.Queue  # what the dispatcher sent the live worker
    replies: asyncio.Queue  # what it answered the requests' clients


@contextlib.asynccontextmanager
async def _dispatcher(
    nats_server: Server, redis: Redis, worker: str, reply_subject: str, **settings: Any
) -> AsyncIterator[_Recovering]:
    """A dispatcher in-process, with queues of what it sends ``worker`` and ``reply_subject``."""
    store, nc = StateStore(redis), await nats.connect(nats_server.url)
    dispatcher = Dispatcher(DispatcherSettings(nats_url=nats_server.url, redis_url="unused", **settings), nc, store)
    forwarded: asyncio.Queue = asyncio.Queue()
    replies: asyncio.Queue = asyncio.Queue()
    await nc.subscribe(subjects.worker_requests(worker), cb=forwarded.put)
    await nc.subscribe(reply_subject, cb=replies.put)
    try:
        yield _Recovering(dispatcher, store, forwarded, replies)
    finally:
        await nc.drain()


def _idle(worker: str) -> WorkerStats:
    return WorkerStats(
        worker=worker, running=0, waiting=0, free_blocks=100, total_blocks=100, block_size=16, max_loras=4
    )


async def _next(queue: asyncio.Queue, kind: type[T]) -> T:
    return msgspec.json.decode((await asyncio.wait_for(queue.get(), 60)).data, type=kind)


async def test_a_request_whose_workers_keep_dying_is_failed_not_retried_forever(
    nats_server: Server, redis: Redis
) -> None:
    """Recovery re-dispatches a lost worker's request once; if that worker dies too, the request
    fails with a reason instead of being handed to the next worker (no poison cascade)."""
    async with _dispatcher(nats_server, redis, "w-live", "test.poison.reply") as r:
        dispatcher, store = r.dispatcher, r.store
        dispatcher.workers["w-live"] = (_idle("w-live"), time.monotonic())
        req = GenerateRequest(request_id="poison", reply_to="test.poison.reply", prompt="kalo")
        await store.put_inflight(req, "w-a")
        await store.record_progress("w-a", {"poison": Sent(0, 0, [5, 6], 0)}, {})
        # w-a's new incarnation never got it and hands it back: re-dispatched, and no death counted
        await dispatcher._on_lost(LostRequests(worker="w-a", requests={"poison": 0}, never_arrived=["poison"]))
        moved = await _next(r.forwarded, GenerateRequest)
        assert moved.recoveries == 1 and moved.resume_token_ids == [5, 6] and moved.next_seq == 1
        await store.put_inflight(moved, "w-a", expect=("w-live", 1))  # (sent back to w-a, say)
        await store.mark_taken("w-a", {"poison": 1})  # it took it up
        await dispatcher.recover("w-a", "")  # first death: retried on the live worker, once
        moved = await _next(r.forwarded, GenerateRequest)
        assert moved.recoveries == 2 and moved.resume_token_ids == [5, 6] and moved.next_seq == 1
        # the live worker took it, then died in turn
        await store.mark_taken("w-live", {"poison": 2})
        rec = await store.get_inflight("poison")
        assert rec is not None and rec.worker == "w-live" and (rec.recoveries, rec.deaths) == (2, 1)
        await dispatcher.recover("w-live", "")
        chunk = await _next(r.replies, TokenChunk)
        assert chunk.error is not None and "not retried again" in chunk.error and chunk.seq == 1
        assert r.forwarded.empty() and await store.get_inflight("poison") is None


async def test_a_restarted_dispatcher_hears_each_worker_when_it_last_beat(nats_server: Server, redis: Redis) -> None:
    """A dispatcher seeding its workers from Redis took each as heard at its start, so a worker
    dead for most of a TTL looked fresh for another (a trial: it took a lost worker's requests).
    Its heartbeat key's time to live tells how long ago it beat, against the TTL that worker writes
    it with (a worker set to a shorter TTL than the dispatcher's read as silent for longer)."""
    s = StateStore(redis)
    for worker, ttl in (("w-fresh", 5.0), ("w-old", 5.0), ("w-short", 2.0)):
        stats = WorkerStats(
            worker=worker, running=0, waiting=0, free_blocks=1, total_blocks=1, block_size=16, max_loras=1
        )
        await s.heartbeat(stats, ttl_s=ttl)
    older = WorkerStats(
        worker="w-older", running=0, waiting=0, free_blocks=1, total_blocks=1, block_size=16, max_loras=1
    )
    await redis.set("dlora:worker:w-older", msgspec.json.encode(older), px=5000)  # an older worker's: no TTL said
    for worker in ("w-old", "w-short", "w-older"):
        await redis.pexpire(f"dlora:worker:{worker}", 1500)  # beat 3.5 s ago, 0.5 s ago (TTL 2), 3.5 s ago
    ages = {st.worker: age for st, age in await s.beats(5.0)}
    assert ages["w-fresh"] < 0.5 and ages["w-short"] < 0.6 and 3.4 < ages["w-old"] < 3.6 and 3.4 < ages["w-older"] < 3.6
    nc = await nats.connect(nats_server.url)
    try:
        dispatcher = Dispatcher(DispatcherSettings(nats_url=nats_server.url, redis_url="unused"), nc, s)
        await dispatcher._seed_from_redis()
        assert dispatcher.state.quiet(time.monotonic()) == {"w-old", "w-older"}
    finally:
        await nc.drain()


async def test_a_lost_workers_requests_wait_for_a_worker_when_none_is_live(nats_server: Server, redis: Redis) -> None:
    """A user's trial: with one worker, a crash failed every request in flight on it ("no worker is
    available") though the worker was back a second after its loss was noticed. Such a request
    now waits (``orphan_wait_s``) with its record on the lost worker; the orphan sweep sends it on
    once a worker is live, and one that still finds none after the wait is failed. One its client's
    gateway gave up on (its chunk timeout: an abort) is dropped, not run later for nobody."""
    wait = {"heartbeat_ttl_s": 1.0, "orphan_wait_s": 30.0}
    async with _dispatcher(nats_server, redis, "w-new", "test.wait.>", **wait) as r:
        dispatcher, store, replies = r.dispatcher, r.store, r.replies
        for rid in ("waits", "gives-up", "aborted"):
            await store.put_inflight(GenerateRequest(request_id=rid, reply_to=f"test.wait.{rid}", prompt="kalo"), "w-a")
            await store.record_progress("w-a", {rid: Sent(0, 0, [5, 6], 0)}, {})
        await dispatcher.recover("w-a", "")  # no live worker anywhere
        await asyncio.sleep(0.3)
        assert replies.empty() and (await store.get_inflight("waits")).worker == "w-a"
        await dispatcher._on_app_abort(AbortRequest(request_id="aborted"), "someone-else")  # not theirs
        assert await store.get_inflight("aborted") is not None
        await dispatcher._on_abort(AbortRequest(request_id="aborted"))  # its gateway's chunk timeout
        assert await store.get_inflight("aborted") is None and "aborted" not in dispatcher.orphans
        last = await _next(replies, TokenChunk)
        assert (last.request_id, last.finish_reason, last.seq) == ("aborted", "abort", 1)  # as a worker answers
        dispatcher.orphans._since["gives-up"] -= wait["orphan_wait_s"]  # its wait is over
        await dispatcher._recover_orphans()  # still none: the one whose wait is over is failed
        chunk = await _next(replies, TokenChunk)
        assert chunk.request_id == "gives-up" and chunk.error == "no worker is available"
        await asyncio.sleep(wait["heartbeat_ttl_s"])  # one sweep of a worker's orphans a heartbeat TTL
        dispatcher.workers["w-new"] = (_idle("w-new"), time.monotonic())  # a worker came up
        await dispatcher._recover_orphans()
        moved = await _next(r.forwarded, GenerateRequest)
        assert (moved.request_id, moved.resume_token_ids, moved.recoveries) == ("waits", [5, 6], 1)
        assert (await store.get_inflight("waits")).worker == "w-new" and "waits" not in dispatcher.orphans
        assert replies.empty()


async def test_a_handed_back_record_that_no_longer_reads_does_not_hold_up_the_rest(redis: Redis) -> None:
    """A review: a record an older release wrote under looser bounds (an application's 600-character
    adapter name, recorded before any worker refused it) raised ValidationError out of the
    hand-back loop, and every record after it went unrecovered until the bad one expired."""
    store = StateStore(redis)
    for req in (
        GenerateRequest(request_id="older", reply_to="_INBOX.x", prompt="hi", adapter="a" * 600),
        GenerateRequest(request_id="innocent", reply_to="_INBOX.y", prompt="hi"),
    ):
        assert await store.put_inflight(req, "w0", new=True)
    recovered: list[str] = []

    class Dispatching(Recovery):  # the hand-back loop alone: what it would re-dispatch
        def __init__(self) -> None:
            self.store = store

        def live(self) -> list[object]:
            return [object()]

        async def _recover(self, rec, died=True, avoid=None, holding=False) -> None:  # type: ignore[no-untyped-def]
            recovered.append(rec.request.request_id)

    await Dispatching()._on_lost(LostRequests(worker="w0", requests={"older": 0, "innocent": 0}, draining=True))
    assert recovered == ["innocent"]


async def test_a_lost_worker_is_looked_for_before_the_registry_is_merged(nats_server: Server, redis: Redis) -> None:
    """A helper's trial at scale: a look merged the registry (5 s at 4,000 adapters) before it
    looked for lost workers, so a killed worker was found 8 s late, its requests waiting."""
    store = StateStore(redis)
    nc = await nats.connect(nats_server.url)
    try:
        dispatcher = Dispatcher(DispatcherSettings(nats_url=nats_server.url, redis_url="unused"), nc, store)
        done: list[str] = []

        async def recover(worker: str, incarnation: str, stopped: bool = False) -> None:
            done.append(f"recover {worker}")

        async def restore() -> int:
            done.append("merge")
            return 0

        dispatcher.recover = recover  # type: ignore[method-assign]
        dispatcher.registry.restore = restore  # type: ignore[method-assign]
        silent = WorkerStats(
            worker="w-gone", running=1, waiting=0, free_blocks=1, total_blocks=1, block_size=16, max_loras=1
        )
        dispatcher.workers["w-gone"] = (silent, time.monotonic() - 60)
        await dispatcher._look(time.monotonic())
        assert done == ["recover w-gone", "merge"]
    finally:
        await nc.close()


async def test_a_lost_workers_request_whose_client_was_cut_off_with_it_is_re_dispatched(
    nats_server: Server, redis: Redis
) -> None:
    """The deploy test, now and then: the gateway's NATS node was on the worker host cut off, so the
    gateway was silent as long as the worker when the worker was found lost; its request was
    answered (client gone) while the gateway reconnected, and the answer never reached it. Silent
    about the TTL, a client is not taken for gone: only past twice the TTL."""
    async with _dispatcher(nats_server, redis, "w-live", "test.cut.reply", heartbeat_ttl_s=2.0) as r:
        dispatcher, store = r.dispatcher, r.store
        now = time.monotonic()
        dispatcher.clients.watch_link(now)  # (its own link's first look, as its watch makes at start)
        dispatcher.workers["w-live"] = (_idle("w-live"), now)
        for client, silent_s in (("gw-gone", 2 * 2.0 + FAILOVER_S + 0.5), ("gw-cut", 2.5)):
            dispatcher.clients.heard(client, now - silent_s)
            for t in range(int(silent_s)):  # others heard meanwhile: it was not the one cut off
                dispatcher.clients.noted(now - silent_s + t)
            req = GenerateRequest(request_id=client, reply_to="test.cut.reply", prompt="kalo", client=client)
            await store.put_inflight(req, "w-a")
        dispatcher.clients.noted(now)
        await dispatcher.recover("w-a", "")
        moved = await _next(r.forwarded, GenerateRequest)
        assert moved.request_id == "gw-cut" and moved.recoveries == 1
        answer = await _next(r.replies, TokenChunk)
        assert answer.request_id == "gw-gone" and "not heard from" in (answer.error or "")


async def test_a_drained_worker_is_logged_as_stopped_not_as_lost(nats_server: Server, redis: Redis) -> None:
    """An operator's rolling restart: a worker that drained and stopped with nothing left on it
    was logged as "worker stopped", then warned of as "requests of a lost worker re-dispatched"
    (requests=0). It is neither counted nor warned of; one lost with records left still is. The
    line is "worker left": "worker stopped" is the worker's own last line (``log.stopped``), and
    an operator's jq for it counted every drained worker twice."""
    async with _dispatcher(nats_server, redis, "w-live", "test.drained.reply") as r:
        dispatcher, store = r.dispatcher, r.store
        dispatcher.workers["w-live"] = (_idle("w-live"), time.monotonic())
        with structlog.testing.capture_logs() as logs:
            await dispatcher.recover("w-drained", "", stopped=True)
        assert [e["event"] for e in logs] == ["worker left"]
        assert dispatcher.metrics.registry.get_sample_value("dlora_worker_losses_total") == 0

        await store.put_inflight(GenerateRequest(request_id="left", reply_to="test.drained.reply", prompt="k"), "w-b")
        with structlog.testing.capture_logs() as logs:
            await dispatcher.recover("w-b", "")
        assert (await _next(r.forwarded, GenerateRequest)).request_id == "left"
        warned = [(e["event"], e.get("requests")) for e in logs if e["log_level"] == "warning"]
        assert warned == [("worker lost", None), ("requests of a lost worker re-dispatched", 1)]


async def test_a_lost_starts_request_beside_a_clean_starts_is_said_lost(nats_server: Server, redis: Redis) -> None:
    """The line named a worker's lot by its last record's stop: a request of a start that died,
    beside one an earlier start handed back at a clean stop (unheard: no dispatcher was up), was
    warned of as "requests of a stopped worker". A death among them makes them a lost one's."""
    async with _dispatcher(nats_server, redis, "w-live", "test.mixed.reply") as r:
        dispatcher, store = r.dispatcher, r.store
        dispatcher.workers["w-live"] = (_idle("w-live"), time.monotonic())
        await store.mark_stopped("w-b", "start-1")
        for rid, start in (("a-died", "start-2"), ("b-handed", "start-1")):  # (recovered in id order)
            req = GenerateRequest(request_id=rid, reply_to="test.mixed.reply", prompt="k")
            await store.put_inflight(req, "w-b", incarnation=start)
        with structlog.testing.capture_logs() as logs:
            await dispatcher.recover("w-b", "start-2")
        assert {(await _next(r.forwarded, GenerateRequest)).request_id for _ in range(2)} == {"a-died", "b-handed"}
        warned = [(e["event"], e.get("requests")) for e in logs if e["log_level"] == "warning"]
        assert warned == [("worker lost", None), ("requests of a lost worker re-dispatched", 2)]
