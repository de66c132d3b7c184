"""A worker reads an adapter's files beside its steps: the requests of that adapter wait in the
engine (``LLMEngine.loading``) while every other stream steps on, then run once it is installed
between steps; a read that fails ends only the requests that waited for it."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator

import msgspec
import pytest
from redis.asyncio import Redis

from dlora.common import bus, subjects
from dlora.common.messages import AdapterEntry, GenerateRequest, SamplingParams, TokenChunk, WorkerStats
from dlora.common.state import StateStore
from dlora.common.versions import engine_key
from dlora.model.make_tiny import TinyOutput
from dlora.services.dispatcher.choose import WorkerLoad
from dlora.services.servers import Server
from dlora.services.worker.commands import Abort, AdapterChanged
from dlora.services.worker.main import WorkerService
from tests.engine.helpers import make_engine
from tests.integration.conftest import worker_by_hand, worker_settings

PROMPT = [5, 40, 41, 300, 17]
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def _request(rid: str, adapter: str | None) -> GenerateRequest:
    return GenerateRequest(
        request_id=rid, reply_to=f"test.reads.{rid}", prompt_token_ids=PROMPT, adapter=adapter, params=GREEDY
    )


async def _chunks(service: WorkerService) -> dict[str, list[TokenChunk]]:
    """Every chunk the worker publishes to the test's requests, by request id, as they come."""
    got: dict[str, list[TokenChunk]] = defaultdict(list)

    async def on_chunk(msg) -> None:  # type: ignore[no-untyped-def]
        chunk = msgspec.json.decode(msg.data, type=TokenChunk)
        got[chunk.request_id].append(chunk)

    await service.nc.subscribe("test.reads.>", cb=on_chunk)
    await bus.flush(service.nc)
    return got


async def _delivered(got: dict[str, list[TokenChunk]], rid: str) -> TokenChunk:
    """``rid``'s last chunk, once NATS has brought it."""
    for _ in range(100):
        if got[rid] and (got[rid][-1].finish_reason or got[rid][-1].error):
            return got[rid][-1]
        await asyncio.sleep(0.05)
    raise AssertionError(f"{rid}: no last chunk")


async def _turns_until(service: WorkerService, done: object) -> None:
    for _ in range(200):
        if done():  # type: ignore[operator]
            return
        await asyncio.wait_for(service._turn(), 5)
    raise AssertionError("never done")


@contextlib.asynccontextmanager
async def _worker(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput, version: str = ""
) -> AsyncIterator[tuple[WorkerService, dict[str, list[TokenChunk]], str]]:
    """A worker driven by hand, one of the tiny model's adapters registered (at ``version``): it,
    the chunks it publishes to ``_request``s, and the adapter's name."""
    store = StateStore(redis)
    name, path = next(iter(tiny_llama.adapters.items()))
    await store.put_adapter(AdapterEntry(name=name, path=str(path), rank=8, created=0.0, version=version))
    ws = worker_settings(
        nats_server.url,
        tiny_llama,
        "w-a",
    )
    async with worker_by_hand(nats_server, store, ws) as (service, _):
        yield service, await _chunks(service), name


def _held_read(service: WorkerService) -> threading.Event:
    """Hold ``service``'s adapter reads until the event is set."""
    released, read = threading.Event(), service.engine.read_adapter

    def held(*args: object) -> object:
        assert released.wait(20)
        return read(*args)

    service.engine.read_adapter = held  # type: ignore[method-assign]
    return released


async def test_other_requests_step_on_while_one_waits_for_its_adapter_s_read(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput
) -> None:
    """The read held up the command loop, and so every stream (a real adapter: hundreds of MB read
    and hashed; 30x dearer reads doubled a simulated cluster's P90 latency). A base request runs to
    its end while the read is held; the waiting request is counted waiting, aborts as any other,
    and the one left runs on the adapter once read, its tokens those of an engine that held it."""
    async with _worker(nats_server, redis, tiny_llama) as (service, got, name):
        released = _held_read(service)
        for req in (_request("base", None), _request("lora", name), _request("gone", name)):
            await service._on_request(req)
            await asyncio.wait_for(service._take(service.commands.get_nowait()), 5)  # not held up by the read
        assert service.engine.loading == {engine_key(name, "")} and len(service.adapters.reads) == 1
        stats = service._snapshot()  # those waiting for the read are load a dispatcher sees, listed too
        assert stats.waiting == 3 and [r.request_id for r in stats.requests] == ["base", "lora", "gone"]
        await _turns_until(service, lambda: "base" not in service.streams)
        assert (await _delivered(got, "base")).finish_reason == "length"
        assert not got["lora"] and service.engine.seqs["lora"].output_ids == []  # it waited
        await service.commands.put(Abort("gone"))
        await service._take(service.commands.get_nowait())
        assert (await _delivered(got, "gone")).finish_reason == "abort"
        assert service._snapshot().adapter_read_seconds == 0.0  # none measured yet
        released.set()
        await _turns_until(service, lambda: "lora" not in service.streams)
        await _delivered(got, "lora")
        stats = service._snapshot()  # what dispatch prices a load here with, scaled by its files' bytes
        assert stats.adapter_read_seconds > 0.0
        path = service.engine.adapters[engine_key(name, "")].path
        on_disk = sum((path / f).stat().st_size for f in ("adapter_config.json", "adapter_model.safetensors"))
        assert stats.adapter_read_bytes == on_disk > 0

    tokens = [t for c in got["lora"] for t in c.token_ids]
    engine = make_engine(tiny_llama)
    engine.add_request("x", prompt_token_ids=PROMPT, params=GREEDY, adapter=name)
    out: list[int] = []
    while engine.has_unfinished():
        out += [t for o in engine.step() for t in o.new_token_ids]
    assert tokens == out and len(out) == GREEDY.max_tokens and got["lora"][-1].error is None


async def test_a_failed_read_ends_only_the_requests_that_waited_for_it(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput
) -> None:
    """Files no longer what was registered (a version whose digest differs): both requests that
    waited for the read are answered why (500, the server's fault, as on arrival); the base
    request beside them runs to its end, and the worker serves on."""
    async with _worker(nats_server, redis, tiny_llama, version="0" * 16) as (service, got, name):
        for req in (_request("base", None), _request("l1", name), _request("l2", name)):
            await service._on_request(req)
            await service._take(service.commands.get_nowait())
        await _turns_until(service, lambda: not service.streams)
        assert not service.engine.loading and not service.adapters.reads
        assert service._snapshot().failed_adapters == [name]  # dispatch sends no burst to join a read here
        for rid in ("l1", "l2"):
            chunk = await _delivered(got, rid)
            assert (
                len(got[rid]) == 1 and chunk.error_code == "internal" and "changed since version" in (chunk.error or "")
            )
        assert (await _delivered(got, "base")).finish_reason == "length"
        await service._on_request(_request("after", None))  # the worker serves on
        await service._take(service.commands.get_nowait())
        await _turns_until(service, lambda: not service.streams)
        assert (await _delivered(got, "after")).finish_reason == "length"


async def test_an_adapter_removed_while_it_is_read_takes_no_new_request(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput
) -> None:
    """A review: its removal's event came while the read was under way, found no version held to
    retire and was forgotten, so an application's request naming the version was admitted and ran
    on the removed adapter once read (refused, when the read held the loop)."""
    async with _worker(nats_server, redis, tiny_llama) as (service, got, name):
        released = _held_read(service)
        first, second = (
            msgspec.structs.replace(_request(rid, name), owner="app-1", adapter_version="")
            for rid in ("first", "second")
        )
        await service._on_request(first)
        await service._take(service.commands.get_nowait())
        assert await service.store.delete_adapter(name)
        await service._take(AdapterChanged(name, None))  # the removal's event
        await service._on_request(second)
        await service._take(service.commands.get_nowait())
        assert "second" not in service.streams and (await _delivered(got, "second")).error_code == "not_found"
        released.set()
        await _turns_until(service, lambda: not service.streams)  # the first, taken before, runs on it
        assert (await _delivered(got, "first")).finish_reason == "length"
        service.adapters.tidy()
        assert not service.engine.adapters  # unused now: unloaded


async def test_an_adapter_registered_again_serves_an_applications_request_before_its_event(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput
) -> None:
    """Removed while a request ran on it, then registered again, its registration's event not heard
    (late, or lost to a reconnect: NATS's events are at most once): an application's new request
    was refused 404 "removed" for as long as the old one ran (the worker trusted the removal it had
    heard over the registry)."""
    async with _worker(nats_server, redis, tiny_llama) as (service, got, name):
        first, second = (
            msgspec.structs.replace(_request(rid, name), owner="app-1", adapter_version="")
            for rid in ("first", "second")
        )
        await service._on_request(first)
        await service._take(service.commands.get_nowait())
        entry = await service.store.get_adapter(name)
        assert entry is not None and await service.store.delete_adapter(name)
        await service._take(AdapterChanged(name, None))  # the removal's event: "first" runs on
        await service.store.put_adapter(entry)  # registered again; no event
        await service._on_request(second)
        await service._take(service.commands.get_nowait())
        assert "second" in service.streams, got["second"]
        await _turns_until(service, lambda: not service.streams)
        assert [(await _delivered(got, rid)).finish_reason for rid in ("first", "second")] == ["length"] * 2


async def test_a_request_waiting_for_its_adapter_is_stopped_at_its_deadline(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput
) -> None:
    """A review: with nothing else to step, the loop idled without looking at deadlines, so a
    request past its deadline waited for its read to end."""
    async with _worker(nats_server, redis, tiny_llama) as (service, got, name):
        released = _held_read(service)
        await service._on_request(msgspec.structs.replace(_request("late", name), deadline=time.time() + 0.3))
        await service._take(service.commands.get_nowait())
        try:
            await _turns_until(service, lambda: "late" not in service.streams)  # 0.2 s idle turns
        finally:
            released.set()
        assert (await _delivered(got, "late")).error_code == "unavailable"


async def test_a_failed_read_whose_answers_fail_leaves_no_request_on_its_adapter(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review: the waiting requests were ended one by one, each answer waiting on Redis; one that
    raised left the rest in the engine on an adapter neither held nor read, and the next step
    failed every request on the worker, the base request beside them too."""
    async with _worker(nats_server, redis, tiny_llama, version="0" * 16) as (service, got, name):
        for req in (_request("base", None), _request("l1", name), _request("l2", name)):
            await service._on_request(req)
            await service._take(service.commands.get_nowait())

        async def down(*args: object, **kwargs: object) -> None:
            raise ConnectionError("redis down")

        monkeypatch.setattr(service.store, "record_progress", down)
        await asyncio.gather(*service.adapters.reads.values())
        await service._take(service.commands.get_nowait())  # the failed read's end, its answers failing
        assert list(service.engine.seqs) == ["base"]
        monkeypatch.undo()
        await _turns_until(service, lambda: "base" not in service.streams)
        assert (await _delivered(got, "base")).finish_reason == "length"


async def test_a_dispatcher_hears_which_version_a_worker_reads(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput
) -> None:
    """A helper's finding: the stats said which adapter versions a worker held but not which it was
    reading, so after an in-place reload a dispatcher took the requests queued there on the old
    version as a read of the new one under way. The read's version now crosses the wire, and a
    dispatcher prices a request of another version as lacking it there."""
    async with _worker(nats_server, redis, tiny_llama, version="v1") as (service, _, name):
        released = _held_read(service)
        heard: asyncio.Queue[WorkerStats] = asyncio.Queue()

        async def on_stats(st: WorkerStats) -> None:
            heard.put_nowait(st)

        await bus.subscribe(service.nc, subjects.stats(service.s.worker_id), WorkerStats, on_stats)
        await bus.flush(service.nc)
        await service._on_request(msgspec.structs.replace(_request("lora", name), adapter_version="v1"))
        await asyncio.wait_for(service._take(service.commands.get_nowait()), 5)
        await bus.publish(service.nc, subjects.stats(service.s.worker_id), service._snapshot())
        st = await asyncio.wait_for(heard.get(), 60)
        released.set()
        await _turns_until(service, lambda: "lora" not in service.streams)
    assert st.reading == [(name, "v1")]
    load = WorkerLoad.of(st)
    assert load.joins(name, "v1") and not load.joins(name, "v2") and not load.holds(name, "v1")
