"""A request handed back by several workers in turn (each refusing its adapter by its own limits),
as the dispatcher re-dispatches it against real NATS and Redis, the dispatcher in-process and the
workers' stats put in by hand: it goes to a worker that has not handed it back while there is one."""

from __future__ import annotations

import asyncio
import time

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


async def test_a_request_two_workers_handed_back_goes_to_the_third_not_back_to_the_first(
    nats_server: Server, redis: Redis
) -> None:
    """h7's brief: two workers whose max_lora_rank refuses an adapter and a third that loads it
    (busier); a request of it handed back by the first went to the second (the first avoided), and
    the second's hand-back sent it back to the idle first, which had handed it back within
    HANDED_BACK_MEMORY_S and so answered 400, though the third could serve it. It goes to the third;
    handed back by every worker, it goes to one of them (which answers it)."""
    store, nc = StateStore(redis), await nats.connect(nats_server.url)
    dispatcher = Dispatcher(DispatcherSettings(nats_url=nats_server.url, redis_url="unused"), nc, store)
    sent: asyncio.Queue[tuple[str, GenerateRequest]] = asyncio.Queue()
    for worker in ("w-a", "w-b", "w-c"):

        async def forward(msg: nats.aio.msg.Msg, worker: str = worker) -> None:
            await sent.put((worker, msgspec.json.decode(msg.data, type=GenerateRequest)))

        await nc.subscribe(subjects.worker_requests(worker), cb=forward)
    now = time.monotonic()
    dispatcher.workers.update(
        {w: (msgspec.structs.replace(_idle(w), unlisted_remaining_tokens=q), now) for w, q in LOADS.items()}
    )
    try:
        req = GenerateRequest(request_id="ranked-1", reply_to="test.hand-back.reply", prompt="kalo", adapter="ranked")
        await store.put_inflight(req, "w-a")
        went = []
        for attempt in range(3):  # each worker it went to hands it back, its message refused there
            worker = went[-1] if went else "w-a"
            lost = LostRequests(worker=worker, requests={"ranked-1": attempt}, never_arrived=["ranked-1"])
            await dispatcher._on_lost(lost)
            to, moved = await asyncio.wait_for(sent.get(), 30)
            assert moved.recoveries == attempt + 1
            went.append(to)
        assert went[:2] == ["w-b", "w-c"], went  # (w-a, the idle one that refused it first, was chosen)
        assert went[2] in {"w-a", "w-b", "w-c"}  # none left that did not hand it back: one of them answers
    finally:
        await nc.drain()
