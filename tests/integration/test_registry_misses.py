"""The registries' lookups that miss (common/durable.py ``Durable._restored_after_miss``), against
real NATS and Redis: an emptied Redis restored and waited for, by every miss meanwhile, however
far another process got; anything else answered at once, a merge set off beside."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import nats
import pytest
from nats.errors import Error as NatsError
from redis.asyncio import Redis

from dlora.common import apikeys
from dlora.common.durable import RESTORE_ON_MISS_INTERVAL_S, Bucket
from dlora.common.key_registry import KeyRegistry, keys_bucket_name
from dlora.common.messages import AdapterEntry
from dlora.common.registry import AdapterRegistry, bucket_name
from dlora.common.state import StateStore
from dlora.services.servers import Server


async def test_a_lookup_that_misses_after_redis_came_back_empty_restores_the_registry(
    nats_server: Server, redis: Redis
) -> None:
    """The gateway answered 404 for a registered adapter until the dispatcher next restored the
    registry (the chaos run's Redis restarts); a miss now restores it, at most once a second."""
    nc = await nats.connect(nats_server.url)
    now = [0.0]
    store = StateStore(redis)
    registry = AdapterRegistry(store, Bucket(nc, bucket_name(store.p)), clock=lambda: now[0])
    try:
        assert await registry.register(AdapterEntry(name="a", path="/a", rank=8, created=0.0, version="v1"))
        hub = AdapterEntry(name="org/a.b", path="/h", rank=8, created=0.0, version="v1")  # a repo id's name
        assert await registry.register(hub)
        await redis.flushdb()
        found = await asyncio.gather(*(registry.lookup("a") for _ in range(8)))  # at once: all wait for it
        assert [e.version if e else None for e in found] == ["v1"] * 8  # (7 were None: a helper's trial)
        assert await registry.lookup("org/a.b") == hub  # restored from the bucket with the rest
        assert await registry.lookup("never-registered") is None  # (at once: a merge set off beside it)
        # emptied again within the second: restored all the same (a review: a miss of a name
        # never registered just before left registered ones 404 for a second)
        await redis.flushdb()
        now[0] = RESTORE_ON_MISS_INTERVAL_S / 2
        assert await registry.lookup("a") is not None
        # another process part way through putting it back (some are there, its data token new):
        # a miss restores it whole (it answered 404 for the ones not back yet: a review)
        await redis.flushdb()
        assert await store.put_adapter(hub)
        assert await registry.lookup("a") is not None
    finally:
        await nc.close()


async def test_a_wrong_key_is_answered_without_waiting_for_the_merge_it_sets_off(
    nats_server: Server, redis: Redis
) -> None:
    """A review: once misses waited for a restore under way, every wrong key waited for a whole
    merge of the keys (one NATS request a key: seconds at thousands), and answered 503 while NATS
    was down. Where Redis holds keys the merge runs beside the lookup, which answers at once."""
    nc = await nats.connect(nats_server.url)
    store = StateStore(redis)
    keys = KeyRegistry(store, Bucket(nc, keys_bucket_name(store.p)))
    set_off = asyncio.Event()

    async def merging_for_ever(at_once: bool = False) -> int:
        set_off.set()
        await asyncio.Event().wait()  # (a merge of many keys, or NATS down: it does not end here)
        return 0

    try:
        _, key = apikeys.new_key("acme", [apikeys.INFERENCE], now=0.0)
        await keys.add(key)
        await keys.note_epoch()  # (as open takes it)
        keys.restore = merging_for_ever  # type: ignore[method-assign]
        found = await asyncio.wait_for(asyncio.gather(*(keys.lookup(f"wrong{i}") for i in range(5))), 5)
        assert found == [None] * 5 and set_off.is_set()
    finally:
        if keys._merging is not None:
            keys._merging.cancel()
        await nc.close()


async def test_a_miss_after_another_process_restored_an_emptied_redis_finds_what_it_put_back(
    nats_server: Server, redis: Redis
) -> None:
    """A review: after a flush, the dispatcher (or another gateway) put each adapter back just
    before this gateway's restore did; this one, its every put yielding to the one there, took
    "nothing put back" for "nothing came back" and answered 404 for every registered adapter (the
    same for two gateways' API keys: 401)."""

    class PutFirstByAnother(StateStore):
        async def put_adapter(self, entry: AdapterEntry, replace: bool = False, restoring: bool = False) -> bool:
            if restoring:  # the other process's restore got there first
                await StateStore(redis).put_adapter(entry, replace=True)
            return await super().put_adapter(entry, replace, restoring)

    nc = await nats.connect(nats_server.url)
    try:
        mine = await AdapterRegistry.open(nc, PutFirstByAnother(redis))
        assert await mine.register(AdapterEntry(name="a", path="/a", rank=8, created=1.0, version="v1"))
        await redis.flushdb()
        assert await mine.lookup("a") is not None
    finally:
        await nc.close()


async def test_with_no_adapter_registered_an_unknown_name_does_not_restore_the_bucket(
    nats_server: Server, redis: Redis
) -> None:
    """A review: "none of ours in Redis" was taken for "Redis lost its data", so where no adapter
    is registered every unknown model name read the whole bucket (ten times the cost of before,
    and a 503 after 2 s with NATS down). Redis's data token says it, where known."""
    nc = await nats.connect(nats_server.url)
    store = StateStore(redis)
    now = [0.0]
    try:
        registry = AdapterRegistry(store, Bucket(nc, bucket_name(store.p)), clock=lambda: now[0])
        await registry.note_epoch()  # (as open takes it)
        restores: list[bool] = []

        async def counted(at_once: bool = False) -> int:
            restores.append(at_once)
            return 0

        registry.restore = counted  # type: ignore[method-assign]
        for _ in range(5):
            assert await registry.lookup("never-registered") is None
            await asyncio.sleep(0)  # (the merge it sets off beside, if any, runs)
        assert restores == [False]  # one merge beside the first, none whole, none again within the second
    finally:
        await nc.close()


async def test_a_restore_of_an_emptied_redis_that_failed_is_tried_again_by_the_next_miss(
    nats_server: Server, redis: Redis
) -> None:
    """The first miss after a flush met NATS away: its restore failed, and the next misses took
    Redis for whole (its data token taken already), merging only beside them: 404s until a merge."""
    nc = await nats.connect(nats_server.url)
    try:
        registry = await AdapterRegistry.open(nc, StateStore(redis))
        assert await registry.register(AdapterEntry(name="a", path="/a", rank=8, created=1.0, version="v1"))
        await redis.flushdb()
        restore = registry.restore

        async def nats_away_once(at_once: bool = False) -> int:
            registry.restore = restore  # type: ignore[method-assign]
            raise NatsError("nats: timeout")

        registry.restore = nats_away_once  # type: ignore[method-assign]
        with pytest.raises(NatsError):  # (the gateway answers it 503)
            await registry.lookup("a")
        assert await registry.lookup("a") is not None
    finally:
        await nc.close()


async def test_a_registry_opened_on_an_emptied_redis_restores_it_first(nats_server: Server, redis: Redis) -> None:
    """A review: a gateway started on a Redis just emptied (a pod restart, `dlora up` on a Redis
    without persistence) took the token made on the empty Redis for its own, and its misses
    answered 404 for every registered adapter until a merge beside them ended."""
    nc = await nats.connect(nats_server.url)
    store = StateStore(redis)
    try:
        first = await AdapterRegistry.open(nc, store)
        assert await first.register(AdapterEntry(name="a", path="/a", rank=8, created=1.0, version="v1"))
        await redis.flushdb()
        started = await AdapterRegistry.open(nc, store)
        assert await store.get_adapter("a") is not None and await started.lookup("a") is not None
    finally:
        await nc.close()


async def test_a_registry_opened_with_redis_away_restores_whole_at_its_first_miss(
    nats_server: Server, redis: Redis
) -> None:
    """A review: opened while Redis was away (no token), its first miss judged by "none of ours in
    Redis", false as soon as another process had put one back: the rest answered 404."""
    nc = await nats.connect(nats_server.url)
    store = StateStore(redis)
    try:
        registry = AdapterRegistry(store, Bucket(nc, bucket_name(store.p)))  # (no token: as if Redis was away)
        entries = [AdapterEntry(name=n, path=f"/{n}", rank=8, created=1.0, version="v1") for n in ("a", "b")]
        for entry in entries:
            assert await registry.register(entry)
        await redis.flushdb()
        assert await store.put_adapter(entries[0])  # another process, part way through putting it back
        assert await registry.lookup("b") is not None
    finally:
        await nc.close()


async def test_a_miss_on_a_redis_that_refuses_writes_is_answered(
    nats_server: Server, start_redis_here: Callable[..., Server]
) -> None:
    """Each miss asked Redis for its data token with a write (SET NX GET), which a Redis at
    maxmemory refuses even where the token is there: every unknown adapter name and wrong API key
    was answered 503 instead of 404 and 401 while reads still worked (the last note's item)."""
    redis = Redis.from_url(start_redis_here().url)
    nc = await nats.connect(nats_server.url)
    store = StateStore(redis)
    adapters = AdapterRegistry(store, Bucket(nc, bucket_name(store.p)))
    keys = KeyRegistry(store, Bucket(nc, keys_bucket_name(store.p)))
    try:
        assert await adapters.register(AdapterEntry(name="a", path="/a", rank=8, created=0.0, version="v1"))
        await adapters.note_epoch()
        await keys.note_epoch()
        await redis.config_set("maxmemory-policy", "noeviction")
        await redis.config_set("maxmemory", 1)
        assert await adapters.lookup("never-registered") is None
        assert await keys.lookup(apikeys.digest("wrong")) is None
        assert (await adapters.lookup("a")) is not None
    finally:
        await redis.config_set("maxmemory", 0)
        await nc.close()
        await redis.aclose()
