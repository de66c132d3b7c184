"""The durable copies of the adapter registry and the API keys when JetStream is not there at start
(a server without it, or a cluster still electing its leader): the services work from Redis, and
once JetStream is up the buckets open and take what was written meanwhile, so a Redis that then
restarts empty gets it all back."""

from __future__ import annotations

import asyncio
import time

import msgspec
import nats
import pytest
from nats.errors import Error as NatsError
from redis.asyncio import Redis
from redis.exceptions import OutOfMemoryError

from dlora.common import apikeys
from dlora.common.durable import REOPEN_INTERVAL_S, Bucket
from dlora.common.key_registry import KeyRegistry, keys_bucket_name
from dlora.common.messages import AdapterEntry, AdapterRemoval, ApiKey
from dlora.common.registry import MERGE_INTERVAL_S, REMOVAL_MEMORY_S, AdapterRegistry, bucket_name
from dlora.common.state import INFLIGHT_TTL_S, StateStore
from dlora.services.servers import Server, free_port, start_nats


async def test_buckets_opened_late_catch_up_with_what_redis_took_meanwhile(redis: Redis) -> None:
    port = free_port()
    server = start_nats(port, jetstream=False)
    nc = await nats.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.1)
    now = [0.0]
    store = StateStore(redis)
    registry = AdapterRegistry(store, Bucket(nc, bucket_name(store.p), clock=lambda: now[0]))
    keys = KeyRegistry(store, Bucket(nc, keys_bucket_name(store.p), clock=lambda: now[0]))
    try:
        assert await registry.kv() is None and await keys.kv() is None  # no JetStream: Redis alone
        assert await registry.register(AdapterEntry(name="a", path="/a", rank=8, created=0.0, version="v1"))
        _, key = apikeys.new_key("acme", [apikeys.INFERENCE], now=0.0)
        await keys.add(key)
        _, revoked = apikeys.new_key("acme", [apikeys.INFERENCE], now=0.0)
        await keys.add(revoked)

        server.stop()
        server = start_nats(port)  # with JetStream now
        for _ in range(100):
            if nc.stats["reconnects"] and nc.is_connected:
                break
            await asyncio.sleep(0.1)
        now[0] = REOPEN_INTERVAL_S / 2
        assert await registry.kv() is None  # not tried again yet
        now[0] = REOPEN_INTERVAL_S
        assert await registry.kv() is not None and await keys.kv() is not None
        # A revocation while JetStream was down again, with the bucket's copy older (the bucket
        # lost its open handle as JetStream went): it must reach the bucket when it opens.
        keys.bucket.kv, keys.bucket.missed, keys._caught_up = None, True, False
        await keys.store.put_api_key(msgspec.structs.replace(revoked, revoked=True))
        now[0] = 2 * REOPEN_INTERVAL_S
        assert await keys.kv() is not None

        # Redis restarts empty: what was written before JetStream came is back
        await redis.flushdb()
        assert await registry.restore() == 1 and await keys.restore() == 2
        assert (await store.get_adapter("a")).version == "v1"
        assert (await keys.lookup(key.digest)) == key and (await keys.lookup(revoked.digest)).revoked
    finally:
        await nc.close()
        server.stop()


async def test_a_redis_brought_back_from_an_older_snapshot_gets_the_registrations_made_since(
    nats_server: Server, redis: Redis
) -> None:
    """The keys' trial found it, the registry has the same kind: Redis restarted from an older
    snapshot lacked an adapter registered since (404 until registered again) and held the older
    version of one replaced since; only an empty Redis was restored. Now a lookup that misses sets
    off a merge (and the dispatcher's looks merge) that puts them back; the newer registration
    (``created``) wins. The miss itself answers at once (a name never registered waited for a
    whole merge: 5 s at 4,000 adapters, a helper's trial)."""
    nc = await nats.connect(nats_server.url)
    now = [0.0]
    store = StateStore(redis)
    registry = AdapterRegistry(store, Bucket(nc, bucket_name(store.p)), clock=lambda: now[0])
    try:
        await registry.note_epoch()  # (as open takes it: Redis has not lost its data since)
        old = AdapterEntry(name="kept", path="/k1", rank=8, created=1.0, version="v1")
        assert await registry.register(old)
        snapshot = await redis.dump(f"{store.p}:adapters")  # Redis's registrations as the snapshot saved them
        assert await registry.register(AdapterEntry(name="kept", path="/k2", rank=8, created=2.0, version="v2"), True)
        assert await registry.register(AdapterEntry(name="since", path="/s", rank=8, created=3.0, version="v1"))
        await redis.restore(f"{store.p}:adapters", 0, snapshot, replace=True)  # rolled back
        assert await store.get_adapter("since") is None and (await store.get_adapter("kept")).version == "v1"
        now[0] = MERGE_INTERVAL_S  # (past a merge's interval: taking the token, the open merged)
        assert await registry.lookup("since") is None  # answered at once: the merge runs beside it
        async with asyncio.timeout(60):
            while await registry.lookup("since") is None:  # the merge put both back
                await asyncio.sleep(0.02)
        assert (await registry.lookup("since")).version == "v1"
        assert (await store.get_adapter("kept")).version == "v2"
        assert await registry.restore() == 0  # agreed: nothing more, and not compared again so soon
    finally:
        await nc.close()


async def test_a_redis_brought_back_from_an_older_snapshot_drops_the_registrations_removed_since(
    nats_server: Server, redis: Redis
) -> None:
    """The other half of the rollback: an adapter removed after the snapshot came back registered
    and served (the bucket kept no trace of the removal). The removed registration is now kept
    until its name is registered again; Redis's copy of it, or of anything older, is dropped, a
    registration made since stands, and one the snapshot holds for another owner is put right."""
    nc = await nats.connect(nats_server.url)
    now = [0.0]
    store = StateStore(redis)
    registry = AdapterRegistry(store, Bucket(nc, bucket_name(store.p)), clock=lambda: now[0])
    try:
        skewed = time.time() + 60  # registered by a host whose clock runs a minute ahead
        for name, created in (("gone", 1.0), ("fast", skewed), ("again", 1.0), ("kept", 1.0)):
            entry = AdapterEntry(name=name, path=f"/{name}", rank=8, created=created, version="v1", owner="acme")
            assert await registry.register(entry)
        snapshot = await redis.dump(f"{store.p}:adapters")
        assert await registry.remove("gone") and await registry.remove("fast") and await registry.remove("again")
        # the same files registered again for another tenant: the same version
        again = AdapterEntry(name="again", path="/again", rank=8, created=time.time(), version="v1", owner="globex")
        assert await registry.register(again)
        await redis.restore(f"{store.p}:adapters", 0, snapshot, replace=True)  # rolled back
        # registered in Redis alone (JetStream down then) after the removals: the catch-up's to write
        while_down = AdapterEntry(name="new", path="/n", rank=8, created=time.time() + 1, version="v1")
        assert await registry.remove("new") is False and await store.put_adapter(while_down)

        assert await registry.restore() == 3  # two dropped, one put right
        assert await registry.lookup("gone") is None and await registry.lookup("fast") is None
        assert {e.name for e in await store.list_adapters()} == {"again", "kept", "new"}
        assert (await store.get_adapter("again")).owner == "globex"  # not the snapshot's acme
        assert ("gone", "v1") in await store.retired(time.time() + 1)  # purged in its time, as removed ones are
        # a registration made between the restore's reading and its deleting is not dropped
        other = AdapterEntry(name="kept", path="/k2", rank=8, created=2.0, version="v2")
        assert not await store.delete_adapter("kept", only=other, retire=("v2", 5.0))
        assert ("kept", "v2") not in await store.retired(10.0)  # not deleted: nothing retired either
        # an entry an older dlora wrote, without the fields added since, is matched all the same
        old = b'{"name":"kept","path":"/kept","rank":8,"created":1.0}'
        await redis.hset(f"{store.p}:adapters", "kept", old)
        assert await store.delete_adapter("kept", only=AdapterEntry(name="kept", path="/kept", rank=8, created=1.0))
    finally:
        await nc.close()


async def test_a_merge_does_not_put_back_what_was_removed_while_it_read(nats_server: Server, redis: Redis) -> None:
    """A helper's trial at scale: 1,000 removals while a merge of 4,000 adapters ran, and up to 127
    came back, listed and served for seconds, their names refused to a new registration (409).
    The merge read the removal records, then Redis's registrations; a removal finished between
    the two was in neither, and its registration was put back."""

    class RemovedWhileRead(StateStore):
        async def list_adapters(self) -> list[AdapterEntry]:
            if not removed:  # what clients did just then, between the merge's two reads
                removed.append(await registry.remove("gone"))
                removed.append(await registry.remove("again"))
            return await super().list_adapters()

        async def put_adapter(self, entry: AdapterEntry, replace: bool = False, restoring: bool = False) -> bool:
            if restoring and entry.name == "again" and len(removed) == 2:
                # registered again just before the merge put back what it had read (a review: v1 over v2)
                removed.append(await registry.register(again))
            return await super().put_adapter(entry, replace, restoring)

    nc = await nats.connect(nats_server.url)
    removed: list[bool] = []
    store = RemovedWhileRead(redis)
    registry = AdapterRegistry(store, Bucket(nc, bucket_name(store.p)), clock=lambda: 1e9)
    again = AdapterEntry(name="again", path="/again2", rank=8, created=time.time(), version="v2")
    try:
        for name in ("gone", "kept", "again"):
            assert await registry.register(AdapterEntry(name=name, path=f"/{name}", rank=8, created=1.0, version="v1"))
        await registry.restore()
        assert removed == [True, True, True]
        assert await registry.lookup("gone") is None and await store.get_adapter("gone") is None
        assert sorted(e.name for e in await store.list_adapters()) == ["again", "kept"]
        assert (await store.get_adapter("again")).version == "v2"
        # and a registration of the name made after that removal is put back all the same
        later = AdapterEntry(name="gone", path="/gone", rank=8, created=2.0, version="v2")
        assert await store.put_adapter(later, replace=True, restoring=True)
    finally:
        await nc.close()


async def test_a_removal_that_did_not_reach_the_bucket_is_finished_by_the_next_merge(
    nats_server: Server, redis: Redis
) -> None:
    """A review: a gateway whose bucket was not open (JetStream electing a leader) removed from Redis
    alone, and the dispatcher's merge put the adapter back from the bucket; so did a removal whose
    bucket write failed part way. Redis keeps the removal too now, and the merge carries it into
    the bucket; a bucket write that fails after Redis's record is written is such a removal."""
    nc = await nats.connect(nats_server.url)
    store = StateStore(redis)
    dispatcher = AdapterRegistry(store, Bucket(nc, bucket_name(store.p)))
    try:
        for name in ("a", "b", "c"):
            assert await dispatcher.register(AdapterEntry(name=name, path=f"/{name}", rank=8, created=1.0))
        assert await AdapterRegistry(store, None).remove("a")  # a gateway without its bucket
        kv = await dispatcher.kv()
        assert kv is not None
        put = kv.put

        async def failing(key: str, value: bytes) -> int:
            if key.startswith("removed."):
                raise TimeoutError("injected: JetStream did not answer")
            return await put(key, value)

        kv.put = failing  # type: ignore[method-assign]
        # Redis's record stands, so the removal is done: it was answered 503 and b served until the
        # next merge removed it anyway
        assert await dispatcher.remove("b")
        kv.put = put  # type: ignore[method-assign]
        assert await store.get_adapter("b") is None

        assert await dispatcher.restore() == 0  # neither put back from the bucket
        assert {e.name for e in await store.list_adapters()} == {"c"}
        current, _, removals = await dispatcher.durable_entries()
        assert [e.name for e in current] == ["c"] and removals.keys() == {"a", "b"}
        await redis.flushdb()  # and a Redis that comes back empty gets only what is registered
        assert await dispatcher.restore() == 1 and {e.name for e in await store.list_adapters()} == {"c"}
        # registered again: the removal is over, in both
        assert await dispatcher.register(AdapterEntry(name="a", path="/a2", rank=8, created=2.0))
        assert "a" not in (await dispatcher.durable_entries())[2] and "a" not in await store.removals()
    finally:
        await nc.close()


async def test_a_removal_redis_refused_is_not_finished_later(nats_server: Server, redis: Redis) -> None:
    """A helper's soak: Redis refusing writes (at maxmemory) answered a removal 503 while the
    bucket's record, written together with Redis's, was kept, and the next merge removed the adapter
    seconds later (a 409 "already registered" in between). Redis's record goes first now."""
    nc = await nats.connect(nats_server.url)
    store = StateStore(redis)
    registry = AdapterRegistry(store, Bucket(nc, bucket_name(store.p)))
    try:
        assert await registry.register(AdapterEntry(name="a", path="/a", rank=8, created=1.0))

        async def refused(removal: AdapterRemoval) -> None:
            raise OutOfMemoryError("command not allowed when used memory > 'maxmemory'")

        put_removal, store.put_removal = store.put_removal, refused  # type: ignore[method-assign]
        with pytest.raises(OutOfMemoryError):
            await registry.remove("a")
        store.put_removal = put_removal  # type: ignore[method-assign]
        await registry.restore()
        assert await store.get_adapter("a") is not None and "a" not in (await registry.durable_entries())[2]
    finally:
        await nc.close()


async def test_a_bucket_made_with_other_settings_is_used_as_it_is() -> None:
    """``nats_kv_replicas`` changed after the bucket was made: JetStream refuses to make it again
    with the new settings; the bucket that is there is used (it was taken for "no JetStream" and
    the durable copy stayed off)."""
    server = start_nats()
    nc = await nats.connect(server.url)
    try:
        await nc.jetstream().create_key_value(bucket="dlora-test-settings", history=5)  # other settings
        bucket = Bucket(nc, "dlora-test-settings", replicas=1)
        kv = await bucket.get()
        assert kv is not None and not bucket.missed
        assert (await kv.status()).history == 5
    finally:
        await nc.close()
        server.stop()


async def test_a_registration_the_bucket_refuses_is_undone_in_redis(nats_server: Server, redis: Redis) -> None:
    """A durable write that fails (here a key the key-value store refuses) left the adapter
    serving from Redis but not kept, and a retry got 409; now it is undone, the replaced entry
    put back."""
    nc = await nats.connect(nats_server.url)
    store = StateStore(redis)
    registry = AdapterRegistry(store, Bucket(nc, bucket_name(store.p)))
    try:
        with pytest.raises(NatsError):
            await registry.register(AdapterEntry(name="bad\n", path="/a", rank=8, created=0.0, version="v1"))
        assert await store.get_adapter("bad\n") is None
        assert await registry.register(AdapterEntry(name="a", path="/a", rank=8, created=0.0, version="v1"))
        with pytest.raises(NatsError):
            await registry.register(
                AdapterEntry(name="a", path="/b", rank=8, created=0.0, version="v2\n"), replace=True
            )
        assert (await store.get_adapter("a")).version == "v1"
    finally:
        await nc.close()


async def test_retired_versions_are_forgotten_once_no_record_can_name_them(nats_server: Server, redis: Redis) -> None:
    """Every version of a re-registered name was kept for good, in Redis and the bucket (300
    re-registrations left 300); a version replaced or removed is forgotten INFLIGHT_TTL_S later,
    unless it is registered again or a live worker holds it, and one restored from the bucket is
    retired as it comes back."""
    nc = await nats.connect(nats_server.url)
    store = StateStore(redis)
    registry = AdapterRegistry(store, Bucket(nc, bucket_name(store.p)))

    def entry(version: str) -> AdapterEntry:
        return AdapterEntry(name="a", path="/a", rank=8, created=0.0, version=version)

    async def kept() -> set[str]:
        redis_side = {v for v in ("v1", "v2", "v3") if await store.get_adapter("a", v) is not None}
        bucket_side = {e.version for e in (await registry.durable_entries())[1]}
        assert redis_side == bucket_side
        return redis_side

    try:
        for version in ("v1", "v2", "v3"):
            assert await registry.register(entry(version), replace=True)
        now = time.time()
        assert await registry.purge_retired(now) == 0 and await kept() == {"v1", "v2", "v3"}  # records may name them
        assert await registry.register(entry("v2"), replace=True)  # v2 registered again: kept; v3 retired
        later = now + INFLIGHT_TTL_S + 1
        assert await registry.purge_retired(later, held={("a", "v3")}) == 1  # a live worker holds v3: kept
        assert await kept() == {"v2", "v3"}
        assert await registry.purge_retired(later) == 1 and await kept() == {"v2"}
        assert await registry.remove("a")
        assert await registry.purge_retired(time.time() + INFLIGHT_TTL_S + 1) == 1 and await kept() == set()
        # Redis lost with a retired version only in the bucket: restored, then retired anew
        assert await registry.register(entry("v1"))
        assert await registry.register(entry("v3"), replace=True)
        await redis.flushdb()
        assert await registry.restore() == 1 and await kept() == {"v1", "v3"}
        assert await registry.purge_retired(time.time() + INFLIGHT_TTL_S + 1) == 1 and await kept() == {"v3"}
    finally:
        await nc.close()


async def test_a_version_registered_again_as_it_is_forgotten_stays(redis: Redis) -> None:
    """The look and the forgetting are not one step: a re-registration of the same files between
    them (the same version) must not lose its entry; the script checks again."""
    store = StateStore(redis)
    assert await store.put_adapter(AdapterEntry(name="a", path="/a", rank=8, created=0.0, version="v1"))
    await store.retire_version("a", "v1", 0.0)
    assert not await store.forget_version("a", "v1")  # registered: kept, no longer retired
    assert (await store.get_adapter("a", "v1")) is not None and await store.retired(1.0) == []
    assert await store.put_adapter(AdapterEntry(name="a", path="/b", rank=8, created=0.0, version="v2"), replace=True)
    await store.retire_version("a", "v1", 0.0)
    assert await store.forget_version("a", "v1") and await store.get_adapter("a", "v1") is None


async def test_a_reconcile_that_read_the_bucket_before_a_revocation_does_not_undo_it(
    nats_server: Server, redis: Redis
) -> None:
    """A review: gateway A read the bucket (the key not there yet, made while JetStream was down),
    gateway B revoked the key (bucket, then Redis), and A wrote its unrevoked copy over B's. A's
    write is now compared and set on the bucket's revision: B's revocation stands, and reaches
    A's Redis too."""
    nc = await nats.connect(nats_server.url)
    store = StateStore(redis)
    keys = KeyRegistry(store, Bucket(nc, keys_bucket_name(store.p)))
    try:
        kv = await keys.kv()
        assert kv is not None
        _, key = apikeys.new_key("acme", [apikeys.INFERENCE], now=0.0)
        await store.put_api_key(key)  # in Redis alone, as made while JetStream was down
        stale: dict[str, bytes] = {}  # A's read of the bucket
        await kv.put(f"key.{key.id}", msgspec.json.encode(msgspec.structs.replace(key, revoked=True)))  # B
        await keys._merge(kv, stale)
        assert msgspec.json.decode((await kv.get(f"key.{key.id}")).value, type=ApiKey).revoked
        assert (await store.api_key(key.id)).revoked
    finally:
        await nc.close()


async def test_removal_records_are_forgotten_when_stale_or_old(nats_server: Server, redis: Redis) -> None:
    """A review: a removal was kept until its name was registered again (for ever, for a short-lived
    adapter's), growing the bucket every merge reads; and a removal a rollback brought back into
    Redis, for a name registered since, was carried into the bucket."""
    nc = await nats.connect(nats_server.url)
    store = StateStore(redis)
    registry = AdapterRegistry(store, Bucket(nc, bucket_name(store.p)))
    try:
        for name in ("old", "back"):
            assert await registry.register(AdapterEntry(name=name, path=f"/{name}", rank=8, created=1.0))
        snapshot = await redis.dump(f"{store.p}:adapter-removals")  # none yet
        assert await registry.remove("old") and await registry.remove("back")
        removals = await redis.dump(f"{store.p}:adapter-removals")
        assert await registry.register(AdapterEntry(name="back", path="/back2", rank=8, created=2.0))
        await redis.restore(f"{store.p}:adapter-removals", 0, removals, replace=True)  # rolled back: back's again
        kv = await registry.kv()
        assert kv is not None and snapshot is None
        aged = AdapterRemoval(name="old", path="/old", rank=8, created=1.0, removed=time.time() - REMOVAL_MEMORY_S - 1)
        await store.put_removal(aged)
        await kv.put("removed.old", msgspec.json.encode(aged))

        await registry.restore()
        _, _, kept = await registry.durable_entries()
        assert kept == {} and await store.removals() == {}
        assert (await store.get_adapter("back")).path == "/back2"
    finally:
        await nc.close()
