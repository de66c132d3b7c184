"""``bus.when_reachable``: what a service reads from Redis before it serves, tried until Redis
answers, and given up at a stop, a read under way included."""

from __future__ import annotations

import asyncio

from redis.exceptions import ConnectionError as RedisConnectionError

from dlora.common import bus


async def test_a_read_refused_is_tried_again_until_it_is_answered() -> None:
    tries: list[int] = []

    async def read() -> str:
        tries.append(1)
        if len(tries) < 3:
            raise RedisConnectionError("Redis restarting")
        return "state"

    assert await bus.when_reachable(read, "redis (test)", asyncio.Event(), every_s=0.01) == "state"
    assert len(tries) == 3


async def test_a_stop_breaks_off_a_read_under_way() -> None:
    """A read waiting on a hung Redis (redis-py's 4 x 5 s tries) held a worker or dispatcher told to
    stop while it started past the 10 s ``dlora up`` gives it: the stop now ends it, whatever the
    read would have answered after."""
    stop, asked, answer = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def read() -> str:
        asked.set()
        await answer.wait()  # Redis answers only once the stop has come
        return "state"

    reading = asyncio.create_task(bus.when_reachable(read, "redis (test)", stop))
    await asked.wait()
    stop.set()
    answer.set()
    assert await reading is None
