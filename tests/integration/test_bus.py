"""``bus.flush`` and ``bus.unsubscribe`` against a real nats-server: what they promise, that
nats-py's own flush and unsubscribe do not."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import msgspec
import nats
import pytest
import structlog
from nats.aio.client import Client as NATS
from redis.asyncio import Redis

from dlora.common import bus
from dlora.common.messages import AbortRequest
from dlora.services.servers import Server


async def test_a_subscription_flushed_gets_what_another_connection_publishes_next(nats_server: Server) -> None:
    """A CI failure: a test subscribed, flushed with nats-py, published from another connection
    and never got the message (nats-py wrote the PING ahead of the SUB; 5 % of tries lost it)."""
    reader, writer = await nats.connect(nats_server.url), await nats.connect(nats_server.url)
    try:
        lost = []
        for i in range(300):
            sub = await reader.subscribe(f"test.flush.{i}")
            await bus.flush(reader)
            await writer.publish(f"test.flush.{i}", b"x")
            await bus.flush(writer)
            try:
                await sub.next_msg(timeout=0.5)
            except nats.errors.TimeoutError:
                lost.append(i)
            await sub.unsubscribe()
        assert lost == []
    finally:
        await reader.close()
        await writer.close()


@pytest.fixture
async def nc(nats_server: Server) -> AsyncIterator[NATS]:
    conn = await nats.connect(nats_server.url)
    yield conn
    await conn.close()


async def _cut_off(nc: NATS, clean_up: Callable[[], Awaitable[object]]) -> tuple[asyncio.Task[None], list[str]]:
    """A handler subscribed on ``nc`` that gets a message and waits (as on a hung Redis) until
    ``bus.unsubscribe`` cuts it off; its clean-up awaits ``clean_up()`` and then notes its end.
    The unsubscribe (a task), and the list the end goes in."""
    started, ended = asyncio.Event(), []

    async def handler(_: AbortRequest) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            await clean_up()
            ended.append("cleaned up")

    sub = await bus.subscribe(nc, "test.cut", AbortRequest, handler)
    await bus.flush(nc)
    await nc.publish("test.cut", msgspec.json.encode(AbortRequest(request_id="r")))
    await asyncio.wait_for(started.wait(), 30)
    return asyncio.create_task(bus.unsubscribe([sub])), ended


async def test_unsubscribe_returns_once_the_handlers_it_cut_off_have_cleaned_up(nc: NATS, redis: Redis) -> None:
    """A review: nats-py's unsubscribe cancels the handler it runs without awaiting it, so a
    service's ``run`` returned while a handler cut off mid-write still had its clean-up (a
    take-back, a record's delete) to run: Redis work and log lines after the stop, racing the next
    owner. Here the clean-up is a real Redis write; it is done when ``unsubscribe`` returns."""
    stopping, ended = await _cut_off(nc, lambda: redis.set("test:cleaned", "1"))
    await stopping
    assert ended == ["cleaned up"]
    assert await redis.get("test:cleaned") == b"1"


async def test_unsubscribe_gives_up_on_a_clean_up_that_hangs(nc: NATS, monkeypatch: pytest.MonkeyPatch) -> None:
    """A handler whose clean-up hangs holds the stop for ``HANDLERS_S``, not for ever: the stop
    goes on, and says so."""
    monkeypatch.setattr(bus, "HANDLERS_S", 0.2)
    hung = asyncio.Event()
    with structlog.testing.capture_logs() as logs:
        stopping, ended = await _cut_off(nc, hung.wait)
        await asyncio.wait_for(stopping, 30)  # (a guard: unbounded, it never returns)
    assert ended == []
    assert [e["handlers"] for e in logs if e["event"].startswith("stopping with bus handlers")] == [1]
    hung.set()  # (the handler ends before the test's loop does)
    async with asyncio.timeout(30):
        while not ended:
            await asyncio.sleep(0.01)


async def test_unsubscribe_stops_every_handler_before_any_can_take_its_next_message(nats_server: Server) -> None:
    """A review: ``unsubscribe`` unsubscribed one subscription at a time, awaiting each, and
    nats-py's unsubscribe waits for its flusher once the connection's outgoing buffer is past its
    ``pending_size`` (here at once; a busy worker's past 2 MB of tokens). Meanwhile the first
    handler cut off ran its clean-up, which let a later subscription's handler end, and that one
    took its next message and began its work in the middle of the stop. All are now cut off in one
    turn: the message waiting is never begun."""
    busy = await nats.connect(nats_server.url, pending_size=1)
    try:
        released, began = asyncio.Event(), []
        first_started = asyncio.Event()

        async def first(_: AbortRequest) -> None:  # cut off in a wait; its clean-up frees the other
            first_started.set()
            try:
                await asyncio.Event().wait()
            finally:
                released.set()

        async def second(req: AbortRequest) -> None:  # one message at a time, the first until freed
            began.append(req.request_id)
            if len(began) == 1:
                await released.wait()

        subs = [
            await bus.subscribe(busy, "test.first", AbortRequest, first),
            await bus.subscribe(busy, "test.second", AbortRequest, second),
        ]
        await bus.flush(busy)
        for subject, rid in (("test.first", "f"), ("test.second", "s1"), ("test.second", "s2")):
            await busy.publish(subject, msgspec.json.encode(AbortRequest(request_id=rid)))
        await bus.flush(busy)
        async with asyncio.timeout(30):  # (a guard) the first in its wait, s1 begun and s2 waiting
            while not (first_started.is_set() and began == ["s1"] and subs[1].pending_msgs == 1):
                await asyncio.sleep(0.01)
        await bus.unsubscribe(subs)
        assert began == ["s1"]
    finally:
        await busy.close()
