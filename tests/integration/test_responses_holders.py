"""The Redis scripts of the Responses API's item index (common/state_responses.py) against a real
redis-server: an item_reference's lookup writes nothing, and a DELETE takes its response out of
every holder set its record names when it goes, a run's last write in between included."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import msgspec
import pytest
from redis.asyncio import Redis

from dlora.common.state import StateStore
from dlora.services.gateway.openai import APIError
from dlora.services.gateway.responses_read import held as _held
from dlora.services.gateway.responses_store import ResponsesStore


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
    assert await s.responses_of_items(["msg_x", "msg_none"], "t") == ["resp_a", None]
    assert await redis.zrange(key, 0, -1, withscores=True) == before


async def test_a_delete_drops_the_items_a_runs_last_write_gave_its_response_in_between(redis: Redis) -> None:
    """DELETE read the record's item ids, then ran its script: a background run's last write between
    the two (its output's items, each held by the response) left the deleted id in those items'
    sets until it expired. Read and delete are one transaction now: the write makes it read again.
    The write is the run's own script, sent by another client while the delete has read."""
    import redis as sync_redis

    from dlora.common.state_responses import _PUT_IF_LUA

    s = StateStore(redis)
    queued, done = b'{"output": []}', msgspec.json.encode({"output": [{"type": "message", "id": "msg_out"}]})
    item = msgspec.json.encode([{"type": "message", "id": "msg_in"}])
    await s.put_response("resp_1", "t", queued, item, 60.0, ["msg_in"], leased=True)
    where = redis.connection_pool.connection_kwargs
    other = sync_redis.Redis(host=where["host"], port=where["port"])
    keys = [f"{s.p}:response:t:resp_1", f"{s.p}:response-events:t:resp_1", f"{s.p}:response-holders:t:msg_out"]
    reads: list[tuple[bytes | None, bytes | None]] = []

    def held(items: bytes | None, response: bytes | None) -> list[str]:
        reads.append((items, response))
        if len(reads) == 1:  # (the run's last write lands now, from another gateway)
            assert other.register_script(_PUT_IF_LUA)(keys=keys, args=[queued, done, item, 60_000, "resp_1"]) == 1
        return _held(items, response)

    try:
        assert await s.delete_response("resp_1", "t", held)
    finally:
        other.close()
    assert await redis.keys(f"{s.p}:response*") == []  # (no set names it: each had it alone)
    assert [r for _, r in reads] == [queued, done]  # (read again once the write had changed it)


async def test_a_delete_of_a_record_changed_on_every_read_ends_after_a_few_reads(redis: Redis) -> None:
    """The record is written again after each of DELETE's reads (a client sending its id again and
    again, from another gateway): redis-py's transaction read it again for ever. It reads it at
    most ``DELETE_TRIES`` times and deletes what it read last."""
    import redis as sync_redis

    from dlora.common.state_responses import DELETE_TRIES

    s = StateStore(redis)
    await s.put_response("resp_1", "t", b'{"output": []}', b"[]", 60.0, ["msg_in"])
    where = redis.connection_pool.connection_kwargs
    other = sync_redis.Redis(host=where["host"], port=where["port"])
    reads = 0

    def held(items: bytes | None, response: bytes | None) -> list[str]:
        nonlocal reads
        reads += 1
        assert reads <= 2 * DELETE_TRIES, "read again and again"  # (ends the test without the bound)
        other.hset(f"{s.p}:response:t:resp_1", "seen", reads)  # (changed after the read: WATCH fires)
        return ["msg_in"]

    try:
        assert await s.delete_response("resp_1", "t", held)
    finally:
        other.close()
    assert reads == DELETE_TRIES
    assert await redis.keys(f"{s.p}:response*") == []


def _record(*ids: str) -> tuple[bytes, bytes]:
    """A record's ``response`` and ``input``, its conversation holding ``ids``."""
    return b'{"output": []}', msgspec.json.encode([{"type": "message", "id": i} for i in ids])


async def test_a_retry_under_the_same_id_leaves_the_sets_of_the_items_it_no_longer_holds(redis: Redis) -> None:
    """A retry (its client's X-Request-Id again) wrote a new conversation over resp_b, and its id
    stayed in msg_x's set: the lookup found resp_b first (it expires last) and read msg_x there in
    vain (a 404 while resp_a held it). The replaced record's items leave it now; those both hold stay."""
    s = StateStore(redis)
    await s.put_response("resp_a", "t", *_record("msg_x"), 60.0, ["msg_x"], held=_held)
    await s.put_response("resp_b", "t", *_record("msg_x", "msg_y"), 120.0, ["msg_x", "msg_y"], held=_held)
    assert await s.responses_of_items(["msg_x", "msg_y"], "t") == ["resp_b", "resp_b"]
    await s.put_response("resp_b", "t", *_record("msg_y", "msg_z"), 120.0, ["msg_y", "msg_z"], held=_held)
    assert await s.responses_of_items(["msg_x", "msg_y", "msg_z"], "t") == ["resp_a", "resp_b", "resp_b"]
    assert await redis.zrange(f"{s.p}:response-holders:t:msg_x", 0, -1) == [b"resp_a"]


async def test_a_corrupt_record_is_deleted_and_a_retry_writes_over_it(redis: Redis) -> None:
    """A record whose fields are no JSON (cut short, written by hand) made DELETE a 500, for good:
    ``_held`` raised reading it. It is deleted now, and a retry written over it is stored."""
    s = StateStore(redis)
    await s.put_response("resp_1", "t", b"{cut", b"[{", 60.0, ["msg_in"])
    await s.put_response("resp_2", "t", b'{"output": "x"}', b'{"id": "msg_in"}', 60.0, ["msg_in"])
    assert await s.put_response("resp_2", "t", *_record("msg_y"), 60.0, ["msg_y"], held=_held)
    for response_id in ("resp_1", "resp_2"):
        assert await s.delete_response(response_id, "t", _held)
        assert await s.response_fields(response_id, "t", "response") is None


@contextlib.asynccontextmanager
async def _unbound() -> AsyncIterator[None]:
    yield


async def test_a_corrupt_record_is_read_as_not_there_not_a_500(redis: Redis) -> None:
    """A record whose fields are no JSON, or not a response's shape, was a 500 for good on GET, on
    ``input_items``, as a ``previous_response_id`` and as an ``item_reference``'s holder (each
    reader decoded it and raised). Each answers as for a response not there now: OpenAI's 404
    (400 ``previous_response_not_found``); the item is not found through it."""
    state = StateStore(redis)
    store = ResponsesStore(state, _unbound, 60.0, 1 << 20)
    await state.put_response("resp_1", "t", b"{cut", b"[{", 60.0, ["msg_in"])
    await state.put_response("resp_2", "t", b'{"output": "x"}', b'{"id": "msg_in"}', 120.0, ["msg_in"])
    for response_id in ("resp_1", "resp_2"):
        for names, param, status in (
            (("response",), None, 404),
            (("input",), None, 404),
            (("input", "response"), "previous_response_id", 400),
        ):
            with pytest.raises(APIError) as e:
                await store.fields(response_id, "t", *names, param=param)
            assert (e.value.status, e.value.param) == (status, param)
    assert await store.referenced([{"type": "item_reference", "id": "msg_in"}], [], "t") == {}
    # a status of another type (a background response's readers take it as a string)
    await state.put_response("resp_3", "t", b'{"status": 1}', b"[]", 120.0, [])
    for names, param, status in ((("response",), None, 404), (("input", "response"), "previous_response_id", 400)):
        with pytest.raises(APIError) as e:
            await store.fields("resp_3", "t", *names, param=param)
        assert (e.value.status, e.value.param) == (status, param)


async def test_an_item_of_a_record_no_route_reads_is_not_found_through_it(redis: Redis) -> None:
    """An item_reference's lookup read a holder's two fields apart (``_record_items``): a record
    whose output no reader decodes (a string of bad UTF-8, written by hand), which every route
    reads as not there, still gave the items of its conversation, with no warning. It is read as
    the routes read it (``read``): its items are not found through it."""
    state = StateStore(redis)
    store = ResponsesStore(state, _unbound, 60.0, 1 << 20)
    items = b'[{"type": "message", "role": "user", "content": "kalo", "id": "msg_in"}]'
    await state.put_response("resp_1", "t", b'{"output": [{"type": "message", "x": "\xff"}]}', items, 60.0, ["msg_in"])
    with pytest.raises(APIError) as e:
        await store.fields("resp_1", "t", "input", "response", param="previous_response_id")
    assert e.value.status == 400
    assert await store.referenced([{"type": "item_reference", "id": "msg_in"}], [], "t") == {}


@pytest.mark.parametrize("between", ["written", "deleted"])
async def test_a_retry_over_a_record_changed_after_its_read_reads_it_again_a_few_times_at_most(
    redis: Redis, between: str
) -> None:
    """A retry written over a stored response reads the replaced record's items in a WATCH
    transaction: a DELETE (or another write) after the read makes it read again, and a record
    changed after every read (its id sent again and again, from another gateway) is read at most
    ``DELETE_TRIES`` times, as DELETE's, where redis-py's transaction went round for ever."""
    import redis as sync_redis

    from dlora.common.state_responses import _DELETE_LUA, _PUT_HOLDERS_LUA, DELETE_TRIES

    s = StateStore(redis)
    key = f"{s.p}:response:t:resp_1"
    await s.put_response("resp_1", "t", *_record("msg_a"), 60.0, ["msg_a"], held=_held)
    where = redis.connection_pool.connection_kwargs
    other = sync_redis.Redis(host=where["host"], port=where["port"])
    reads: list[bytes | None] = []

    def held(items: bytes | None, response: bytes | None) -> list[str]:
        reads.append(items)
        assert len(reads) <= 2 * DELETE_TRIES, "read again and again"  # (ends the test without the bound)
        if between == "written":  # (another retry's record, holding msg_c, after each read: WATCH fires)
            other.hset(key, "input", msgspec.json.encode([{"type": "message", "id": "msg_c"}]))
            other.register_script(_PUT_HOLDERS_LUA)(keys=[f"{s.p}:response-holders:t:msg_c"], args=["resp_1", 60_000])
        elif len(reads) == 1:  # (another gateway's DELETE, its script as delete_response runs it)
            keys = [key, f"{s.p}:response-events:t:resp_1", f"{s.p}:response-holders:t:msg_a"]
            assert other.register_script(_DELETE_LUA)(keys=keys, args=["resp_1"]) == 1
        return _held(items, response)

    try:
        assert await s.put_response("resp_1", "t", *_record("msg_b"), 60.0, ["msg_b"], held=held)
    finally:
        other.close()
    assert len(reads) == (DELETE_TRIES if between == "written" else 2)
    # (msg_c: the record last read held it, the one written does not)
    assert await s.responses_of_items(["msg_b", "msg_c"], "t") == ["resp_1", None]


async def test_a_response_under_an_id_drawn_here_is_stored_in_one_round_trip(redis: Redis) -> None:
    """Every stored response was written in an optimistic transaction (WATCH, HMGET of the record
    it would replace, then MULTI/EXEC): two round trips more before its client's last bytes, though
    only an id its client named (request_id, X-Request-Id) can name a stored one. An id drawn here
    is written in one MULTI/EXEC, no read; a client's is read first, as a retry needs. And its
    item index's script, queued as redis-py queues a ``Script`` in a pipeline, sent SCRIPT EXISTS
    first, a round trip more on every store with items: nothing is sent outside its MULTI/EXEC
    now. Counted by redis-server's own command counts."""
    from dlora.services.gateway.auth import Principal
    from dlora.services.gateway.completion_shape import Shape
    from dlora.services.gateway.dialects import Responses
    from dlora.services.gateway.shaping import Job

    store = ResponsesStore(StateStore(redis), _unbound, 60.0, 1 << 20)
    nobody = Principal(key_id=None, tenant=None, inference=True, admin=False)
    for named in (False, True):
        dialect = Responses(store)
        await dialect.decode(b'{"input": "kalo"}', nobody)
        drawn = dialect.response_id(True, "ours")  # (as the gateway names each request)
        shown = "chatcmpl-mine" if named else drawn  # (shaping names a job by its client's id, where sent)
        job = dialect.answer(Job(Shape(True, shown, "m", 7), None, 1, False, False, []))
        response_id = "resp_mine" if named else drawn
        assert dialect.keeping is not None and dialect.keeping.keep({"id": response_id, "output": []})
        await redis.config_resetstat()
        assert job.finishing is not None and await job.finishing() is None  # (stored: its answer stands)
        stats = await redis.info("commandstats")
        calls = {name.removeprefix("cmdstat_"): stat["calls"] for name, stat in stats.items()}
        # (sent in its MULTI/EXEC, and run by its item index's script: those count too)
        queued = ("multi", "exec", "del", "hset", "pexpire", "eval", "time", "zremrangebyscore", "zadd", "pttl")
        outside = {n: c for n, c in calls.items() if n not in (*queued, "config|resetstat")}
        assert outside == ({"watch": 1, "hmget": 1} if named else {}), calls
        assert calls["exec"] == calls["eval"] == 1, calls
        assert await store.fields(response_id, "", "response")
