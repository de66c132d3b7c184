"""Inference API keys (``KeyRegistry``), kept as the adapter registry is (``durable.py``): in Redis,
which every lookup reads, and in their own bucket ``{prefix}-keys`` (``key.<id>`` -> ApiKey, its
digest and never the key): an empty Redis must not lock every client out, nor bring a revoked key
back. Only the gateway reads keys, so it restores them itself (at start, before writing one, and
when a presented key is not found, at most once a second) instead of the dispatcher's loop doing
it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import msgspec
from nats.aio.client import Client as NATS
from nats.js.errors import KeyDeletedError, KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue
from redis.exceptions import RedisError

from dlora.common import log
from dlora.common.bus import Outage, every
from dlora.common.durable import Bucket, Durable, ReadBound, bucket_values
from dlora.common.messages import ApiKey
from dlora.common.state import StateStore

logger = log.get("registry")
_encode = msgspec.json.Encoder()
_decode_key = msgspec.json.Decoder(ApiKey)


def keys_bucket_name(prefix: str) -> str:
    return f"{prefix}-keys"


# Seconds between the gateway's reconciles of the keys (``KeyRegistry.restore``): at most this long
# does a revocation Redis lost to an older snapshot go unseen.
KEYS_RECONCILE_S = 5.0


class KeyRegistry(Durable):
    """Inference API keys, written to the durable bucket (``kv``; None: Redis only) and then to
    Redis (``store``), which every lookup reads. Durable first: a write that fails half way leaves
    the bucket right (a key created there but not in Redis is unusable, its secret never shown; a
    revocation refused by Redis is reported and tried again by the caller)."""

    def __init__(self, store: StateStore, bucket: Bucket | None, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(bucket, clock)
        self.store = store

    @classmethod
    async def open(cls, nc: NATS, store: StateStore, replicas: int = 1) -> KeyRegistry:
        """The keys of ``store``'s deployment, their bucket created if missing and reconciled with
        Redis (``restore``; when Redis is unreachable now, by the first lookup that misses).
        Without JetStream they live in Redis alone meanwhile (see ``Bucket``)."""
        registry = cls(store, Bucket(nc, keys_bucket_name(store.p), replicas=replicas))
        await registry.note_epoch()  # (and the merge:)
        try:
            await registry.restore()
        except (RedisError, OSError) as e:  # Redis down at start: the first key it misses restores
            logger.warning("API keys not restored at start (Redis unreachable)", error=f"{type(e).__name__}: {e}")
        return registry

    async def add(self, key: ApiKey) -> None:
        """Store a new key, Redis and the durable copy reconciled first (``restore``)."""
        await self.restore()
        if (kv := await self.kv()) is not None:
            await kv.put(f"key.{key.id}", _encode.encode(key))
        await self.store.put_api_key(key)

    async def revoke(self, key_id: str) -> ApiKey | None:
        """Mark the key revoked (it stays listed, and refused); returns it, or None if no key has
        that id. Revoking a revoked key changes nothing."""
        await self.restore()
        key = await self.store.api_key(key_id)
        if key is None:
            return None
        revoked = msgspec.structs.replace(key, revoked=True)
        if (kv := await self.kv()) is not None:
            await kv.put(f"key.{key.id}", _encode.encode(revoked))
        await self.store.put_api_key(revoked)
        return revoked

    async def all(self) -> list[ApiKey]:
        """Every key, revoked ones too, oldest first."""
        await self.restore()
        return await self.store.list_api_keys()

    async def lookup(self, digest: str, bound: ReadBound = contextlib.nullcontext) -> ApiKey | None:
        """The key with that digest, revoked or not; None if there is none. A miss reconciles Redis
        with the durable copy (see ``_restored_after_miss``) and looks again; a revocation Redis
        lost (an older snapshot) is written back by ``restore``, which the gateway runs every
        ``KEYS_RECONCILE_S`` too. ``bound``: around each Redis read, not the restore (NATS work:
        inside a gateway's bound, an unknown key's merge of 7,000 keys counted as Redis down and
        refused every request for a second: a review)."""
        async with bound():
            key = await self.store.api_key_by_digest(digest)
        if key is None and await self._restored_after_miss():
            async with bound():
                key = await self.store.api_key_by_digest(digest)
        return key

    async def durable_keys(self) -> list[ApiKey]:
        """Every key in the bucket, as stored."""
        await self.kv()  # opened (and caught up) if it can be
        return [_decode_key.decode(value) for value in (await bucket_values(self.bucket)).values()]

    async def _catch_up(self, kv: KeyValue, stored: dict[str, bytes]) -> None:
        await self._merge(kv, stored)

    async def keep_reconciled(self, stop: asyncio.Event, interval_s: float = KEYS_RECONCILE_S) -> None:
        """``restore`` every ``interval_s`` until ``stop`` (a gateway's task): a Redis brought back
        from an older snapshot made a revoked key work again."""
        outage = Outage("API keys reconciled (redis, jetstream)")
        async for _ in every(interval_s, stop):
            try:
                await self.restore()
                outage.succeeded()
            except Exception as e:  # noqa: BLE001 - Redis or JetStream away: the next round tries again (said once)
                outage.failed(e)

    async def holds_any(self) -> bool:
        return await self.store.has_api_keys()

    async def restore(self, at_once: bool = False) -> int:
        """Make Redis and the durable copy agree, a revocation winning wherever it was written:
        a key either lacks is copied to it, and one revoked in either is revoked in both. Returns
        how many writes that took. A user's trial: Redis brought back from an older snapshot made a
        revoked key work again (and lost keys made since, for good), since this filled only a Redis
        with no keys at all; a bucket that started empty (`dlora up`'s own NATS) never learnt the
        keys a persisted Redis held, so an emptied Redis then lost them all."""
        if (kv := await self.kv()) is None:
            return 0
        return await self._merge(kv, await bucket_values(self.bucket))

    async def _merge(self, kv: KeyValue, stored: dict[str, bytes]) -> int:
        durable = {k.id: k for k in map(_decode_key.decode, stored.values())}
        held = {k.id: k for k in await self.store.list_api_keys()}
        writes = 0
        for key_id in durable.keys() | held.keys():
            mine, theirs = held.get(key_id), durable.get(key_id)
            merged = mine or theirs
            assert merged is not None
            if (mine is not None and mine.revoked) or (theirs is not None and theirs.revoked):
                merged = msgspec.structs.replace(merged, revoked=True)
            if theirs != merged:  # first: a revocation written there since it was read wins
                merged = await _put_key_unless_revoked(kv, merged)
                writes += 1
            if mine != merged:  # revoked there, or missing here
                await self.store.put_api_key(merged, replace=mine is not None)
                writes += 1
        if writes:
            logger.warning("API keys reconciled between Redis and the durable copy", writes=writes)
        return writes


async def _put_key_unless_revoked(kv: KeyValue, key: ApiKey) -> ApiKey:
    """Write ``key`` into the bucket, compared and set on its revision: a revocation another
    gateway wrote there after this one read the bucket must not be overwritten by the unrevoked
    copy it read (a review: a reconcile could bring a revoked key back that way). Returns the key
    as the bucket now holds it (revoked, when it was there)."""
    name = f"key.{key.id}"
    while True:
        try:
            entry = await kv.get(name)
        except (KeyNotFoundError, KeyDeletedError):
            with contextlib.suppress(KeyWrongLastSequenceError):  # made meanwhile: looked at again
                await kv.create(name, _encode.encode(key))
                return key
            continue
        theirs = _decode_key.decode(entry.value or b"")
        if theirs.revoked and not key.revoked:
            key = msgspec.structs.replace(key, revoked=True)
        if theirs == key:
            return key
        with contextlib.suppress(KeyWrongLastSequenceError):  # written meanwhile: looked at again
            await kv.update(name, _encode.encode(key), last=entry.revision)
            return key


async def purge_keys(nc: NATS, prefix: str) -> None:
    """Delete the deployment's durable API keys (tests start each case from nothing)."""
    with contextlib.suppress(NotFoundError):  # none yet
        await nc.jetstream().delete_key_value(keys_bucket_name(prefix))
