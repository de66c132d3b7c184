"""``bus.StateBound``: a request's Redis work bounded, and not tried for a moment after it failed."""

from __future__ import annotations

import asyncio

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from dlora.common.bus import StateBound


async def test_a_block_past_the_bound_is_a_redis_timeout_then_refused_until_the_pause_ends() -> None:
    bound, tried = StateBound(bound_s=0.05, pause_s=0.2), []
    with pytest.raises(RedisTimeoutError, match="no answer within 0.05 s"):
        async with bound():
            await asyncio.sleep(10)  # a hung Redis
    with pytest.raises(RedisConnectionError, match="a moment ago"):
        async with bound():
            tried.append(1)
    assert tried == []  # not tried while paused
    await asyncio.sleep(0.25)
    async with bound():
        tried.append(2)
    assert tried == [2]


async def test_redis_refusing_pauses_too_and_other_errors_do_not() -> None:
    bound = StateBound(bound_s=1.0, pause_s=60.0)
    with pytest.raises(ValueError):
        async with bound():
            raise ValueError("not Redis's")
    async with bound():  # not paused by it
        pass
    with pytest.raises(RedisConnectionError, match="refused"):
        async with bound():
            raise RedisConnectionError("refused")
    with pytest.raises(RedisConnectionError, match="a moment ago"):
        async with bound():
            pass


async def test_every_ticks_until_stopped_and_not_a_round_more() -> None:
    from dlora.common.bus import every

    stop, ticks = asyncio.Event(), 0
    async for _ in every(0.01, stop):
        ticks += 1
        if ticks == 3:
            asyncio.get_running_loop().call_later(0.001, stop.set)
    assert ticks == 3
