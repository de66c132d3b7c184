"""The Redis scripts of the Responses API's item index (common/state_responses.py) against a real
redis-server: an item_reference's lookup writes nothing."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from dlora.common.state import StateStore


async def test_an_items_lookup_writes_nothing_and_passes_over_holders_gone(redis: Redis) -> None:
    """The lookup pruned every set it read (expired holders, holders whose record was gone) on every
    item_reference: a write, replicated, for a read. It now skips them and leaves the set as it
    was; writes prune the expired (``_HOLD_LUA``), and the holder found is the same."""
    s = StateStore(redis)
    key = f"{s.p}:response-holders:t:msg_x"
    await s.put_response("resp_a", "t", b"{}", b"[]", 60.0, ["msg_x"])
    await s.put_response("resp_b", "t", b"{}", b"[]", 120.0, ["msg_x"])  # (expires last: looked up first)
    await s.put_response("resp_c", "t", b"{}", b"[]", 0.001, ["msg_x"])
    for _ in range(10_000):  # (until Redis has expired it: a bound by count, not time)
        if not await redis.exists(f"{s.p}:response:t:resp_c"):
            break
        await asyncio.sleep(0.001)
    await redis.delete(f"{s.p}:response:t:resp_b")  # (an older gateway's DELETE: the record alone)
    before = await redis.zrange(key, 0, -1, withscores=True)
    assert {m for m, _ in before} == {b"resp_a", b"resp_b", b"resp_c"}
    changes = (await redis.info("persistence"))["rdb_changes_since_last_save"]
    assert await s.responses_of_items(["msg_x", "msg_none"], "t") == ["resp_a", None]
    assert await redis.zrange(key, 0, -1, withscores=True) == before
    assert (await redis.info("persistence"))["rdb_changes_since_last_save"] == changes  # (no write at all)
