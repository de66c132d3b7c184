"""An application's request sent again under its id (a retry, NATS application API): joined to
its stream where it is the request as sent, told where another is or where Redis fails meanwhile."""

from __future__ import annotations

import asyncio
import time

import msgspec
import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from dlora.common import subjects
from dlora.common.bus import flush
from dlora.common.state import StateStore
from dlora.model.config import ModelConfig
from dlora.model.make_tiny import TinyOutput
from dlora.services.gateway.admin import check_adapter
from tests.integration.app_bus import _chunks, _send, _slowed, _still_running, bus  # noqa: F401 - a fixture


async def test_a_second_request_under_an_id_in_flight_is_answered_when_redis_fails_at_its_second_look(  # type: ignore[no-untyped-def]
    bus,  # noqa: F811 - the fixture
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A different request under an id in flight is looked at again a moment later (the id may be
    free by then); Redis failing then left it unanswered (a review): told, as at the first look."""
    alice, _, worker = bus
    _slowed(worker, monkeypatch)
    first, second = subjects.reply_inbox("a", "alice"), subjects.reply_inbox("b", "alice")
    runs, refused = await _chunks(alice, first), await _chunks(alice, second)
    await _send(alice, "alice", "r-x", first)
    assert (await asyncio.wait_for(runs.get(), 30)).error is None
    await _send(alice, "alice", "r-x", second)
    await flush(alice)
    await asyncio.sleep(0.2)  # its first look found the id in flight: the second comes 0.5 s later

    async def down(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RedisConnectionError("Redis down")

    monkeypatch.setattr(worker.store, "get_inflight", down)  # the dispatcher's store too (one in the fixture)
    monkeypatch.setattr(worker.store, "put_inflight", down)
    told = await asyncio.wait_for(refused.get(), 60)
    assert told.error_code == "unavailable" and "Redis" in (told.error or "")


async def test_a_retry_joins_its_stream_though_its_adapter_was_replaced_meanwhile(  # type: ignore[no-untyped-def]
    bus,  # noqa: F811 - the fixture
    redis: Redis,
    tiny_llama: TinyOutput,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An application's request names an adapter, no version; the adapter is replaced (a new
    version) while it runs; the very same message sent again was refused on the live stream's
    subject, its version taken for one the sender gave (the dispatcher had filled it in: a review)."""
    alice, _, worker = bus
    _slowed(worker, monkeypatch)
    store = StateStore(redis)
    name, path = sorted(tiny_llama.adapters.items())[0]
    entry = check_adapter(name, str(path), [str(path.parent)], "model", ModelConfig.from_dir(tiny_llama.model))
    await store.put_adapter(entry)
    inbox = subjects.reply_inbox("r-v", "alice")
    chunks = await _chunks(alice, inbox)
    await _send(alice, "alice", "r-v", inbox, adapter=name)
    assert (await asyncio.wait_for(chunks.get(), 30)).error is None
    await store.put_adapter(msgspec.structs.replace(entry, version="feedbeef", created=time.time()), replace=True)
    await _send(alice, "alice", "r-v", inbox, adapter=name)  # the very same message again
    await flush(alice)
    await asyncio.sleep(1.5)  # (its second look comes 0.5 s after the first)
    assert not [c.error for c in [chunks.get_nowait() for _ in range(chunks.qsize())] if c.error]
    assert await _still_running(chunks)
