"""A request handed back by several workers in turn (each refusing its adapter by its own limits),
as the dispatcher re-dispatches it against real NATS and Redis, the dispatcher in-process and the
workers' stats put in by hand: it goes to a worker that has not handed it back while there is one,
whichever dispatcher each hand-back reaches."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import msgspec
import nats
from redis.asyncio import Redis

from dlora.common import subjects
from dlora.common.messages import GenerateRequest, LostRequests
from dlora.common.state import StateStore
from dlora.services.dispatcher.main import Dispatcher
from dlora.services.dispatcher.settings import DispatcherSettings
from dlora.services.servers import Server
from tests.integration.test_recovery_dispatch import _idle

# Each worker's queued tokens: w-c is priced last, so only avoiding the other two sends a request there
LOADS = {"w-a": 0, "w-b": 0, "w-c": 10_000}


@asynccontextmanager
async def _dispatchers(
    nats_server: Server, redis: Redis, count: int
) -> AsyncIterator[tuple[list[Dispatcher], asyncio.Queue[tuple[str, GenerateRequest]]]]:
    """``count`` dispatchers, each on its own NATS connection, sharing Redis, each having heard
    every worker of ``LOADS``; with the queue of what reaches each worker's subject."""
    store, conns = StateStore(redis), [await nats.connect(nats_server.url) for _ in range(count)]
    sent: asyncio.Queue[tuple[str, GenerateRequest]] = asyncio.Queue()
    for worker in LOADS:

        async def forward(msg: nats.aio.msg.Msg, worker: str = worker) -> None:
            await sent.put((worker, msgspec.json.decode(msg.data, type=GenerateRequest)))

        await conns[0].subscribe(subjects.worker_requests(worker), cb=forward)
    await conns[0].flush()
    dispatchers = [
        Dispatcher(DispatcherSettings(nats_url=nats_server.url, redis_url="unused"), nc, store) for nc in conns
    ]
    now = time.monotonic()
    for dispatcher in dispatchers:
        dispatcher.workers.update(
            {w: (msgspec.structs.replace(_idle(w), unlisted_remaining_tokens=q), now) for w, q in LOADS.items()}
        )
    try:
        yield dispatchers, sent
    finally:
        for nc in conns:
            await nc.drain()


async def _hand_backs(dispatchers: list[Dispatcher], sent: asyncio.Queue[tuple[str, GenerateRequest]]) -> list[str]:
    """Record a request on w-a, then have each worker it goes to hand it back, refused there, to
    each of ``dispatchers`` in turn: the workers it went to."""
    req = GenerateRequest(request_id="ranked-1", reply_to="test.hand-back.reply", prompt="kalo", adapter="ranked")
    await dispatchers[0].store.put_inflight(req, "w-a")
    went: list[str] = []
    for attempt, dispatcher in enumerate(dispatchers):
        worker = went[-1] if went else "w-a"
        lost = LostRequests(worker=worker, requests={"ranked-1": attempt}, never_arrived=["ranked-1"])
        await dispatcher._on_lost(lost)
        to, moved = await asyncio.wait_for(sent.get(), 30)
        assert moved.recoveries == attempt + 1
        went.append(to)
    return went


async def test_a_request_two_workers_handed_back_goes_to_the_third_not_back_to_the_first(
    nats_server: Server, redis: Redis
) -> None:
    """h7's brief: two workers whose max_lora_rank refuses an adapter and a third that loads it
    (busier); a request of it handed back by the first went to the second (the first avoided), and
    the second's hand-back sent it back to the idle first, which had handed it back within
    HANDED_BACK_MEMORY_S and so answered 400, though the third could serve it. It goes to the third;
    handed back by every worker, it goes to one of them (which answers it)."""
    async with _dispatchers(nats_server, redis, 1) as (dispatchers, sent):
        went = await _hand_backs(dispatchers * 3, sent)
    assert went[:2] == ["w-b", "w-c"], went  # (w-a, the idle one that refused it first, was chosen)
    assert went[2] in {"w-a", "w-b", "w-c"}  # none left that did not hand it back: one of them answers


async def test_a_hand_back_to_another_dispatcher_still_avoids_the_first_worker(
    nats_server: Server, redis: Redis
) -> None:
    """LostRequests go to any dispatcher of the queue group: w-a's hand-back reached one, which
    sent the request to w-b, and w-b's reached the other, which knew only of w-b's and sent it back
    to the idle w-a (which answered 400, though w-c could serve it). The record carries both."""
    async with _dispatchers(nats_server, redis, 2) as (dispatchers, sent):
        went = await _hand_backs(dispatchers, sent)
        record = await dispatchers[1].store.get_inflight("ranked-1")
    assert went == ["w-b", "w-c"], went
    assert record is not None and set(record.handed_back) == {"w-a", "w-b"}
