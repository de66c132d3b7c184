"""Adapter registrations written, removed and tidied while other writes race them: Redis and the
durable bucket end on the same registration, and a purge of the bucket's markers never takes a
value (split from test_registry.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import msgspec
import nats
import pytest
from nats.errors import Error as NatsError
from nats.js.kv import KeyValue
from redis.asyncio import Redis

from dlora.common.durable import Bucket, bucket_last
from dlora.common.messages import AdapterEntry, AdapterRemoval
from dlora.common.registry import AdapterRegistry, bucket_name
from dlora.common.state import StateStore
from dlora.services.servers import Server

Opened = tuple[nats.NATS, StateStore, AdapterRegistry]


@pytest.fixture
async def opened(nats_server: Server, redis: Redis) -> AsyncIterator[Opened]:
    """A connection, the state store and the adapter registry over them (its clock stands at 0)."""
    nc = await nats.connect(nats_server.url)
    store = StateStore(redis)
    try:
        yield nc, store, AdapterRegistry(store, Bucket(nc, bucket_name(store.p)), clock=lambda: 0.0)
    finally:
        await nc.close()


class _SlowWrites:
    """A bucket whose writes of values holding ``slow`` wait ``delay_s`` first (everything else as the
    bucket it wraps): a registration's durable write overtaken by another's."""

    def __init__(self, kv: KeyValue, slow: bytes, delay_s: float) -> None:
        self.kv, self.slow, self.delay_s = kv, slow, delay_s

    def __getattr__(self, name: str) -> object:
        return getattr(self.kv, name)

    async def _later(self, value: bytes) -> None:
        if self.slow in value:
            await asyncio.sleep(self.delay_s)

    async def put(self, key: str, value: bytes, **kw: object) -> int:
        await self._later(value)
        return await self.kv.put(key, value, **kw)

    async def update(self, key: str, value: bytes, **kw: object) -> int:
        await self._later(value)
        return await self.kv.update(key, value, **kw)

    async def create(self, key: str, value: bytes, **kw: object) -> int:
        await self._later(value)
        return await self.kv.create(key, value, **kw)


async def test_replacements_racing_leave_redis_and_the_bucket_on_the_same_one(opened: Opened) -> None:
    """A user's trial: load_inplace calls of one name at once all answered 200, then seconds later
    the name served another of them: Redis and the bucket took two replacements in opposite orders
    and the next merge put the bucket's over Redis's (its ``created`` was later). The bucket now
    follows Redis, a merge changes nothing, and each version replaced is retired."""
    nc, store, registry = opened
    assert await registry.register(AdapterEntry(name="x", path="/x", rank=8, created=0.0, version="v0"))
    kv = await registry.kv()
    assert kv is not None
    registry.bucket.kv = _SlowWrites(kv, b'"/x1"', 0.3)  # type: ignore[assignment]
    first = AdapterEntry(name="x", path="/x1", rank=8, created=2.0, version="v1")
    slow = asyncio.create_task(registry.register(first, replace=True))
    await asyncio.sleep(0.1)  # in Redis, its bucket write waiting
    assert await registry.register(AdapterEntry(name="x", path="/x2", rank=8, created=1.0, version="v2"), True)
    assert await slow
    registry.bucket.kv = kv
    (cached,) = await store.list_adapters()
    assert cached.version == "v2" and (await registry.durable_entries())[0] == [cached]
    assert await registry.restore() == 0 and await store.get_adapter("x") == cached
    assert {v for n, v in await store.retired(time.time() + 1) if n == "x"} == {"v0", "v1"}
    # removals at once: one removes it, the others find it gone (all five answered 200)
    assert sorted(await asyncio.gather(*(registry.remove("x") for _ in range(5)))) == [False] * 4 + [True]
    assert await store.get_adapter("x") is None and (await registry.durable_entries())[0] == []


class _CopiedThenRefused(_SlowWrites):
    """A bucket that, on the version write of ``entry``, first takes a racing registration's copy of
    it as the name's registration, then refuses the write (a JetStream timeout)."""

    def __init__(self, kv: KeyValue, entry: AdapterEntry) -> None:
        super().__init__(kv, b"", 0.0)
        self.entry = entry

    async def put(self, key: str, value: bytes, **kw: object) -> int:
        if key.startswith("version.") and value == msgspec.json.encode(self.entry):
            await self.kv.put(f"current.{self.entry.name}", value)
            raise NatsError("timed out")
        return await self.kv.put(key, value, **kw)


async def test_a_failed_registration_copied_by_a_racing_one_is_not_brought_back(opened: Opened) -> None:
    """A review: a registration whose durable write failed was undone in Redis, but a racing one had
    copied it into the bucket meanwhile, and the next merge put it back. The bucket follows Redis
    after the undo."""
    nc, store, registry = opened
    kept = AdapterEntry(name="x", path="/x1", rank=8, created=1.0, version="v1")
    assert await registry.register(kept)
    kv = await registry.kv()
    assert kv is not None
    failed = AdapterEntry(name="x", path="/x2", rank=8, created=2.0, version="v2")
    registry.bucket.kv = _CopiedThenRefused(kv, failed)  # type: ignore[assignment]
    with pytest.raises(NatsError):
        await registry.register(failed, replace=True)
    registry.bucket.kv = kv
    assert await store.get_adapter("x") == kept and (await registry.durable_entries())[0] == [kept]
    assert await registry.restore() == 0 and await store.get_adapter("x") == kept


async def test_a_merge_purges_delete_markers_now_and_then_and_never_a_value(opened: Opened) -> None:
    """Every removal and purge leaves a marker in the bucket's stream, and each merge read every
    one of them (a previous note's open item); the registry purges them once an interval, each
    subject only up to its marker: a registration written since stays (nats-py's purge_deletes
    took it too, a review)."""
    nc, store, registry = opened
    for i in range(3):
        assert await registry.register(AdapterEntry(name=f"a{i}", path="/a", rank=8, created=1.0, version="v1"))
        assert await registry.remove(f"a{i}")
    stream, deleted = f"KV_{bucket_name(store.p)}", {f"current.a{i}" for i in range(3)}
    assert deleted <= set(await bucket_last(registry.bucket))
    await registry.restore()  # the first merge tidies
    assert registry._tidied_at == 0.0 and not deleted & set(await bucket_last(registry.bucket))
    assert (await registry.durable_entries())[2].keys() == {"a0", "a1", "a2"}  # the removals kept
    # a marker, then a value on the same subject before the purge reaches it: the value stays
    kv = await registry.kv()
    assert kv is not None
    await kv.put("current.b", b"{}")
    await kv.delete("current.b")
    revision = (await nc.jetstream().get_last_msg(stream, f"$KV.{bucket_name(store.p)}.current.b")).seq
    await kv.put("current.b", b'{"name": "b"}')
    await nc.jetstream().purge_stream(stream, subject=f"$KV.{bucket_name(store.p)}.current.b", seq=revision + 1)
    assert (await kv.get("current.b")).value == b'{"name": "b"}'
    subscriptions = len(nc._subs)
    assert await registry.tidy() == 0  # no marker is the last of its subject now
    assert (await kv.get("current.b")).value == b'{"name": "b"}'
    assert len(nc._subs) == subscriptions  # no watcher left running


async def test_a_name_registered_again_while_a_tidy_purges_its_removal_marker_is_registered(opened: Opened) -> None:
    """Unload a name, load it again (vLLM users' way to replace an adapter): the bucket's
    registration of it is a delete marker, and nats-py's create, refused over the marker, reads the
    key once more to learn its revision; a tidy purging that marker in between (another process's
    merge: each process tidies at its first, which a gateway's first 404 sets off) made that read
    raise KeyNotFoundError, and the load was answered 503 "NATS is unavailable" (1 in 4 of a
    helper's trials with a second gateway) and undone. The write is looked at again instead."""
    _, store, registry = opened
    entry = AdapterEntry(name="x", path="/a", rank=8, created=1.0, version="v1")
    assert await registry.register(entry) and await registry.remove("x")
    kv = await registry.kv()
    assert kv is not None
    get, reads = kv._get, 0

    async def purged_before_the_second_read(key: str, revision: int | None = None) -> object:
        nonlocal reads
        reads += key == "current.x"
        if key == "current.x" and reads == 2:  # create's read, after its write met the marker
            assert await registry.tidy() >= 1
        return await get(key, revision)

    kv._get = purged_before_the_second_read  # type: ignore[method-assign]
    again = AdapterEntry(name="x", path="/b", rank=8, created=2.0, version="v2")
    assert await registry.register(again)
    assert reads >= 2 and await store.get_adapter("x") == again
    assert msgspec.json.decode((await kv.get("current.x")).value, type=AdapterEntry) == again


async def test_a_removal_under_way_is_left_to_its_remover_by_another_process_s_merge(opened: Opened) -> None:
    """Unload racing another process's merge: the merge read the removal's record, written first,
    and removed the registration itself; the unload's own delete then found nothing and it was
    answered 404 though the adapter was gone (a loaded CI run). A merge leaves a removal under way
    to its remover, and finishes one whose remover died part way once its mark expired."""
    nc, store, registry = opened
    other = AdapterRegistry(store, Bucket(nc, bucket_name(store.p)), clock=lambda: 0.0)
    removing = store.removing

    async def merged_meanwhile(name: str, under_way_ms: int) -> None:
        await removing(name, under_way_ms)
        if under_way_ms:
            assert await other.restore(at_once=True) == 0  # left to the remover
            assert await store.get_adapter("x") is not None

    entry = AdapterEntry(name="x", path="/a", rank=8, created=1.0, version="v1")
    assert await registry.register(entry)
    store.removing = merged_meanwhile  # type: ignore[method-assign]
    assert await registry.remove("x") and await store.get_adapter("x") is None
    store.removing = removing  # type: ignore[method-assign]
    assert not await store.under_way("x")  # over
    # a remover that died after its first writes
    again = msgspec.structs.replace(entry, created=2.0, version="v2")
    assert await registry.register(again)
    await store.put_removal(AdapterRemoval(**msgspec.structs.asdict(again), removed=time.time()))
    await store.removing("x", under_way_ms=60_000)
    assert await other.restore(at_once=True) == 0 and await store.get_adapter("x") == again
    await store.r.delete(f"{store.p}:adapter-removing:x")  # (what Redis does when the mark expires)
    assert await other.restore(at_once=True) == 1 and await store.get_adapter("x") is None
