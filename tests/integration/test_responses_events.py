"""A streamed background response's events against the real stack: only the run its record names
appends them (a run stopped late writes nothing into a new response's stream nor a deleted one's);
its last ones are stored with its final object, so its stream and its record end alike (one too
large to store ends failed); a background response made unstreamed has no stream to read."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import msgspec
import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisDown

from dlora.common.state import StateStore
from dlora.model.make_tiny import TinyOutput
from dlora.services.servers import Server
from tests.integration.conftest import Stack, run_stack
from tests.integration.test_abort import _nothing_left, _slow_steps
from tests.integration.test_responses_background import LONG, _over
from tests.integration.test_responses_store import ASKED, _call, _client


@pytest.mark.parametrize("how", ["replaced", "deleted"])
async def test_a_run_whose_record_is_replaced_or_deleted_before_its_cancel_lands_appends_nothing(
    stack: Stack, redis: Redis, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """Another gateway's retry under its id (a new record, another run's) or DELETE, whose cancel
    this gateway has not heard (none is sent here): the run's next events are refused, so none go
    into the new response's stream nor make the deleted one's again, and the run stops by itself
    (its request aborted on the worker). Appends were not compare-and-swapped: it wrote on for
    its 400 tokens."""
    _slow_steps(stack, monkeypatch, 0.02)
    client = _client(stack.url)
    try:
        stream = await client.responses.create(
            **LONG, input="kalo", background=True, stream=True, extra_headers={"X-Request-Id": "resp_old"}
        )
        async for event in stream:
            if event.type == "response.output_text.delta":
                break
        await stream.close()
        steps = sum(w.engine.stats.steps for w in stack.workers)
        if how == "replaced":  # (as ``Background.start`` stores a retry's, its run token another)
            queued = msgspec.json.encode({"id": "resp_old", "status": "queued", "background": True})
            await stack.store.put_response("resp_old", "", queued, b"[]", 60.0, stream="another run")
        else:
            assert await stack.store.delete_response("resp_old", "")
        while stack.gateway.background.running:
            await asyncio.sleep(0.01)
        assert await redis.keys("*response-events*") == []
        assert await _nothing_left(stack, within_s=10.0)
        assert sum(w.engine.stats.steps for w in stack.workers) - steps < 100  # stopped, not its 400
        if how == "replaced":  # (its record left as the other run wrote it)
            assert (await client.responses.retrieve("resp_old")).status == "queued"
    finally:
        await client.close()


async def test_a_background_response_made_unstreamed_has_no_stream_to_read(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``GET ?stream=true`` of one created without ``stream``: OpenAI's 400, not an empty stream
    (no events were kept), while one created streamed is read from the start, its record and
    whether it was made streamed read in one round trip before its events (read in two, each
    such GET waited for Redis twice)."""
    store = stack.gateway.store
    calls: list[str] = []

    def spy(name: str, real: Any) -> Any:
        def spied(*args: Any, **named: Any) -> Any:
            calls.append(name)
            return real(*args, **named)

        return spied

    for name in ("response_fields", "streamed", "response_events"):
        monkeypatch.setattr(store, name, spy(name, getattr(store, name)))
    client = _client(stack.url)
    try:
        made = await client.responses.create(**ASKED, input="kalo", background=True)
        await _over(client, made.id)
        status, err = await _call(stack.url, "GET", f"/v1/responses/{made.id}?stream=true")
        assert status == 400 and err["error"]["param"] == "stream", err
        assert "stream" in err["error"]["message"], err
        streamed = await client.responses.create(**ASKED, input="kalo", background=True, stream=True)
        first = [e async for e in streamed][0].response.id
        while stack.gateway.background.running:  # (its run's own reads over)
            await asyncio.sleep(0.01)
        calls.clear()
        events = [e async for e in await client.responses.retrieve(first, stream=True)]
        assert events[0].type == "response.created" and events[-1].type == "response.incomplete"
        assert calls[:2] == ["response_fields", "response_events"], calls
    finally:
        await client.close()


async def test_a_streamed_background_response_too_large_to_store_ends_failed_as_its_record(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput
) -> None:
    """Its final object over responses_max_bytes (its queued one within): the record is
    ``failed``, so its stream ends ``response.failed`` with that very object, read again alike
    from any reader; its stream said ``response.incomplete`` where a retrieve said ``failed``."""
    async with run_stack(nats_server, redis, tiny_llama, responses_max_bytes=1400) as stack:  # (queued ~1 kB, done 1.7)
        client = _client(stack.url)
        try:
            asked: dict[str, Any] = {**ASKED, "max_output_tokens": 200, "extra_body": {"ignore_eos": True}}
            made = await client.responses.create(**asked, input="kalo", background=True, stream=True)
            events = [e async for e in made]
            assert events[-1].type == "response.failed", events[-1]
            stored = await client.responses.retrieve(events[-1].response.id)
            assert stored.status == "failed" and stored.error is not None, stored
            assert "responses_max_bytes" in stored.error.message
            assert events[-1].response.model_dump() == stored.model_dump()
            again = [e async for e in await client.responses.retrieve(stored.id, stream=True)]
            assert [e.model_dump() for e in again] == [e.model_dump() for e in events]
        finally:
            await client.close()


async def test_a_streamed_background_responses_record_is_over_only_with_its_last_event_there(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its final object and its stream's last events are stored in one step: each time the record
    is written over, its closing event is already in its stream. Written before them, a reader
    that found the record over with no event left ended its stream without response.incomplete
    (under load, the POST's own stream: ``test_..._too_large_...`` failed so)."""
    store = stack.gateway.store
    put = store.put_response
    seen: list[tuple[str, bytes]] = []

    async def watched(response_id: str, tenant: str, *args: Any, **named: Any) -> bool:
        done = await put(response_id, tenant, *args, **named)
        [_, record] = await store.response_fields(response_id, tenant, "response") or [None, None]
        events = await store.response_events(response_id, tenant, -1)
        seen.append((msgspec.json.decode(record or b"{}").get("status"), events[0] if events else b""))
        return done

    monkeypatch.setattr(store, "put_response", watched)
    client = _client(stack.url)
    try:
        made = await client.responses.create(**ASKED, input="kalo", background=True, stream=True)
        events = [e async for e in made]
        assert events[-1].type == "response.incomplete", events[-1]
        while stack.gateway.background.running:  # (its last write watched to its end)
            await asyncio.sleep(0.01)
        assert [s for s, _ in seen] == ["queued", "incomplete"], seen
        assert seen[-1][1].startswith(b"event: response.incomplete\n"), seen
    finally:
        await client.close()


async def test_a_record_written_whole_keeps_no_token_of_the_one_it_replaced(redis: Redis) -> None:
    """A foreground response under a streamed background one's id (its client's X-Request-Id sent
    again): the replaced run's token went on in the record, so that run still appended its events
    to the new response and ``stream=true`` read them as the new one's."""
    store = StateStore(redis)
    await store.put_response("resp_same", "", b'{"status":"queued"}', b"[]", 60.0, stream="old run")
    assert await store.append_events("resp_same", "", "old run", [b"event: a\n\n"], 60.0)
    await store.put_response("resp_same", "", b'{"status":"completed"}', b"[]", 60.0)  # (foreground)
    assert not await store.append_events("resp_same", "", "old run", [b"event: b\n\n"], 60.0)
    assert not await store.streamed("resp_same", "") and await store.response_events("resp_same", "", 0) == []


async def test_a_streamed_background_response_whose_end_could_not_be_stored_ends_its_stream_failed(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis failing the write of its final object and last events (for a second: ``StateBound``):
    its run's write of it ``failed`` met Redis out too, left it in progress till its lease lapsed;
    written, its stream, whose closing event went with the lost write, ended with none, its
    readers never told how it ended. It is stored failed, and its ``response.failed`` ends it."""
    store = stack.gateway.store
    put = store.put_response

    async def lost(response_id: str, tenant: str, *args: Any, **named: Any) -> bool:
        if named.get("events"):  # (its end: its last events with it)
            raise RedisDown("Redis went away")
        return await put(response_id, tenant, *args, **named)

    monkeypatch.setattr(store, "put_response", lost)
    client = _client(stack.url)
    try:
        made = await client.responses.create(**ASKED, input="kalo", background=True, stream=True)
        events = [e async for e in made]
        stored = await client.responses.retrieve(events[0].response.id)
        assert stored.error is not None and stored.error.message == "the response could not be stored", stored
        assert events[-1].type == "response.failed", events[-1]
        assert events[-1].response.model_dump() == stored.model_dump()
        assert [e.sequence_number for e in events] == list(range(len(events)))
    finally:
        await client.close()


async def test_a_record_no_reader_decodes_made_under_a_streams_reader_ends_its_stream(
    stack: Stack, redis: Redis
) -> None:
    """A streamed background response's reader judges its record while no event is new
    (``Background._judged``), which decoded it apart from the routes' read: a record made one no
    reader decodes (here a string of bad UTF-8; written by hand) under a reader raised out of its
    open stream, which then never ended (aiohttp logged the error and left it open), where every
    route reads such a record as not there. Read as every route reads it, it ends the stream, as
    a record deleted does."""
    store, first = stack.store, b"event: response.created\ndata: {}\n\n"
    await store.lease_response("resp_hand", "", "gw-elsewhere", 60.0)  # (its run alive on another gateway)
    running = b'{"status": "in_progress", "background": true}'
    await store.put_response("resp_hand", "", running, b"[]", 60.0, stream="run-a", leased=True)
    assert await store.append_events("resp_hand", "", "run-a", [first], 60.0)
    async with aiohttp.ClientSession() as http, http.get(f"{stack.url}/v1/responses/resp_hand?stream=true") as r:
        assert r.status == 200 and await r.content.readuntil(b"\n\n") == first
        await redis.hset(f"{store.p}:response::resp_hand", "response", b'{"status": "in_progress", "x": "\xff"}')
        async with asyncio.timeout(30):  # (a bound, not a measure: the raised stream never ended)
            assert await r.content.read() == b""  # (ended whole, nothing after its one event)
