"""The adapter registry: Redis for lookups, a NATS JetStream key-value bucket as the durable copy.

Redis is a cache here: a restart without persistence (or a flushed or replaced instance) loses
every key, and with them which adapters exist, so every request for one answered 404. Each
registration and removal is therefore also written to the bucket ``{prefix}-adapters``, which
JetStream keeps on disk (and replicates in a cluster), and a dispatcher that finds the Redis
registry empty while the bucket is not puts it back (``restore``). JetStream's key-value store is
used, not a file of ours, because every host already reaches NATS and it is replicated there.
Without JetStream (a server started without ``-js``, or a cluster still electing its leader) the
registry works from Redis alone, says so once in the log, and tries the bucket again every
``REOPEN_INTERVAL_S``: opened late, it first takes what was registered meanwhile.

Keys in the bucket: ``current.<name>`` holds the name's registered version's AdapterEntry (JSON),
``version.<name>.<version>`` every version ever registered (requests may still run on one),
``removed.<name>`` the registration removed (AdapterRemoval) until the name is registered again,
which a Redis restored from an older snapshot must not undo (Redis keeps the same record, so a
removal by a process whose bucket is not open reaches the bucket at the next merge).

Inference API keys (``KeyRegistry``) are kept the same way, in their own bucket ``{prefix}-keys``
(``key.<id>`` -> ApiKey, its digest and never the key): an empty Redis must not lock every client
out, nor bring a revoked key back. Only the gateway reads keys, so it restores them itself (at
start, before writing one, and when a presented key is not found, at most once a second) instead
of the dispatcher's loop doing it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import time
from collections.abc import Callable, Set

import msgspec
from nats.aio.client import Client as NATS
from nats.js.errors import (
    APIError,
    BadRequestError,
    KeyDeletedError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NotFoundError,
)
from nats.js.kv import KeyValue
from redis.exceptions import RedisError

from dlora.common import log
from dlora.common.messages import AdapterEntry, AdapterRemoval, ApiKey
from dlora.common.state import INFLIGHT_TTL_S, StateStore

logger = log.get("registry")
_encode = msgspec.json.Encoder()
_decode = msgspec.json.Decoder(AdapterEntry)
_decode_removal = msgspec.json.Decoder(AdapterRemoval)
_decode_key = msgspec.json.Decoder(ApiKey)
# Seconds between two restores a lookup that misses may set off: a client sending wrong keys or
# adapter names costs one Redis lookup each, not a listing of the bucket each.
RESTORE_ON_MISS_INTERVAL_S = 1.0
# Seconds between two tries to open a bucket while JetStream is unavailable.
REOPEN_INTERVAL_S = 10.0


class Bucket:
    """One JetStream key-value bucket, created if missing, opened on first use. While JetStream is
    unavailable ``get`` gives None (the caller works from Redis alone) and tries again at most
    every ``REOPEN_INTERVAL_S``; ``missed`` says a try failed before it opened."""

    def __init__(self, nc: NATS, name: str, clock: Callable[[], float] = time.monotonic, replicas: int = 1) -> None:
        self.nc, self.name, self.clock, self.replicas = nc, name, clock, replicas
        self.kv: KeyValue | None = None
        self.missed = False
        self._tried = -REOPEN_INTERVAL_S

    async def get(self) -> KeyValue | None:
        if self.kv is None and self.clock() - self._tried >= REOPEN_INTERVAL_S:
            self._tried = self.clock()
            try:
                self.kv = await _open_bucket(self.nc, self.name, self.replicas)
            except Exception as e:  # noqa: BLE001 - no JetStream: Redis alone until it comes
                if not self.missed:
                    logger.warning(
                        f"no durable copy while JetStream is unavailable; tried again every {REOPEN_INTERVAL_S:g} s",
                        bucket=self.name,
                        error=f"{type(e).__name__}: {e}",
                    )
                self.missed = True
            else:
                if self.missed:
                    logger.info("durable copy opened", bucket=self.name)
        return self.kv


async def _open_bucket(nc: NATS, name: str, replicas: int) -> KeyValue:
    """The bucket, created with ``replicas`` copies if missing. One made earlier with other
    settings (``nats_kv_replicas`` changed since) is used as it is, with a warning: JetStream
    refuses to create it again, and taking that for "JetStream unavailable" left the durable
    copy off for good."""
    js = nc.jetstream(timeout=2.0)
    try:
        return await js.create_key_value(bucket=name, history=1, replicas=replicas)
    except BadRequestError as e:
        kv = await js.key_value(name)
        logger.warning(
            "bucket exists with other settings; used as it is (change them with `nats kv edit`)",
            bucket=name,
            replicas=replicas,
            error=str(e),
        )
        return kv


class _Durable:
    """A registry's durable side: its bucket (None: Redis alone), caught up once when it opens late,
    and restored from after a lookup misses."""

    def __init__(self, bucket: Bucket | None, clock: Callable[[], float]) -> None:
        self.bucket, self.clock = bucket, clock
        self._caught_up = False
        self._restore_tried = -RESTORE_ON_MISS_INTERVAL_S  # the clock's time of the last restore a miss set off

    async def restore(self) -> int:
        """Put the bucket back into an empty Redis; how many entries came back."""
        raise NotImplementedError

    async def _restored_after_miss(self) -> bool:
        """After a lookup missed: whether restoring an empty Redis (at most once per
        ``RESTORE_ON_MISS_INTERVAL_S``) brought anything back, so looking again may find it."""
        if self.bucket is None or self.clock() - self._restore_tried < RESTORE_ON_MISS_INTERVAL_S:
            return False
        self._restore_tried = self.clock()
        return bool(await self.restore())

    async def kv(self) -> KeyValue | None:
        kv = await self.bucket.get() if self.bucket is not None else None
        if kv is not None and self.bucket is not None and self.bucket.missed and not self._caught_up:
            await self._catch_up(kv, await _bucket_values(self.bucket))
            self._caught_up = True  # only once it all went in: a failed catch-up is tried again
        return kv

    async def _catch_up(self, kv: KeyValue, stored: dict[str, bytes]) -> None:
        """Make the bucket, opened late, say what Redis says of what was written while JetStream
        was down: a key revoked meanwhile must not come back unrevoked after a later Redis loss."""


# An adapter's name: letters, digits, '.', '_', '-' and '/', beginning with a letter or digit, a
# '.' or '/' only between two others (vLLM users name adapters by their Hugging Face repo id,
# "org/name"). It is part of the bucket's keys (NATS key-value: [-/_=.a-zA-Z0-9]), where an empty
# token ("a..b", "a.") is refused.
_NAME = re.compile(r"[A-Za-z0-9](?:[./]?[A-Za-z0-9_-]){0,127}")


def valid_name(name: str) -> bool:
    """Whether ``name`` can be registered (the gateway's rule, and the bucket's keys take no other
    characters): a name that cannot is in Redis alone, if anywhere (registered before the rule)."""
    return len(name) <= 128 and _NAME.fullmatch(name) is not None


def bucket_name(prefix: str) -> str:
    return f"{prefix}-adapters"


# Seconds between two of ``AdapterRegistry.restore``'s comparisons of a non-empty Redis with the
# bucket (the dispatcher asks every look).
MERGE_INTERVAL_S = 5.0
# Seconds a removal is kept (``AdapterRemoval``) while its name is not registered again: a Redis
# brought back from a snapshot older than this may serve a name removed before it. Kept for ever,
# names of short-lived adapters grew the bucket and every merge's reading of it (a review).
REMOVAL_MEMORY_S = 7 * 86400.0


class AdapterRegistry(_Durable):
    """Registration and removal, written to Redis (``store``) and the durable bucket (None: Redis
    only)."""

    def __init__(self, store: StateStore, bucket: Bucket | None, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(bucket, clock)
        self.store = store
        self._merged_at = -math.inf  # when ``restore`` last compared a non-empty Redis with the bucket

    @classmethod
    async def open(cls, nc: NATS, store: StateStore, replicas: int = 1) -> AdapterRegistry:
        """The registry of ``store``'s deployment, its bucket created if missing with ``replicas``
        copies across a NATS cluster (see ``Bucket``)."""
        registry = cls(store, Bucket(nc, bucket_name(store.p), replicas=replicas))
        await registry.kv()
        return registry

    async def register(self, entry: AdapterEntry, replace: bool = False) -> bool:
        """Register ``entry`` (``StateStore.put_adapter``: False if the name is taken, unless
        ``replace``), then record it durably. A durable write that fails is undone in Redis (the
        entry it replaced put back) before its error goes on: the caller's error is the whole
        story, not a name that serves but is not kept (and answers 409 to the retry)."""
        before = await self.store.get_adapter(entry.name) if replace else None
        if not await self.store.put_adapter(entry, replace):
            return False
        if (kv := await self.kv()) is not None:
            try:
                await _put_entry(kv, entry)
            except BaseException:
                if before is None:
                    await self.store.delete_adapter(entry.name)
                else:
                    await self.store.put_adapter(before, replace=True)
                raise
        # Registered again: an earlier removal of the name is over (it stays only as long as the
        # name is removed, so no host's clock is compared with another's but in a rollback).
        await self.store.forget_removal(entry.name)
        if kv is not None:
            try:
                await kv.delete(f"removed.{entry.name}")
            except Exception as e:  # noqa: BLE001 - registered already: the record is older than it
                logger.warning("an old removal record stays in the bucket", adapter=entry.name, error=str(e))
        if before is not None and before.version != entry.version:
            await self.store.retire_version(before.name, before.version, time.time())
        return True

    async def lookup(self, name: str) -> AdapterEntry | None:
        """The adapter registered under ``name``, or None. A miss restores an empty Redis from the
        durable copy (see ``_restored_after_miss``) and looks again: Redis came back empty, and
        the dispatcher has not put the registry back yet."""
        entry = await self.store.get_adapter(name)
        if entry is None and await self._restored_after_miss():
            entry = await self.store.get_adapter(name)
        return entry

    async def remove(self, name: str) -> bool:
        """Unregister ``name``; False if it was not registered (in Redis or the bucket). Its
        versions stay findable until ``purge_retired`` forgets them.

        The removal is recorded (``AdapterRemoval``) before the registration goes, in Redis and then
        the bucket, the registration last from Redis: a Redis brought back from an older snapshot
        served the name again, and so did a removal that failed part way or was made by a process
        whose bucket was not open (a review); each merge (``restore``) now finishes it."""
        kv = await self.kv()
        held = [e for e in (await self.store.get_adapter(name), await _durable_entry(kv, name)) if e is not None]
        if not held:
            return False
        entry = max(held, key=lambda e: e.created)
        removal = AdapterRemoval(**msgspec.structs.asdict(entry), removed=time.time())
        await self.store.put_removal(removal)
        if kv is not None:
            await kv.put(f"removed.{name}", _encode.encode(removal))
            with contextlib.suppress(KeyNotFoundError):
                await kv.delete(f"current.{name}")
        await self.store.delete_adapter(name)
        await self.store.retire_version(name, entry.version, time.time())
        return True

    async def purge_retired(self, now: float, held: Set[tuple[str, str]] = frozenset()) -> int:
        """Forget the versions retired (replaced or removed) more than ``INFLIGHT_TTL_S`` before
        ``now`` (Unix seconds) and not ``held`` ((name, version) a live worker holds: a request
        may still run on it, and be moved or recovered), in the bucket and then in Redis; an
        application's fresh request for one is refused as for a removed adapter. Returns how many
        were forgotten (300 re-registrations of a name left 300 versions for good)."""
        forgotten = 0
        for name, version in await self.store.retired(now - INFLIGHT_TTL_S):
            if (name, version) in held:
                continue  # looked at again next time
            current = await self.store.get_adapter(name)
            gone = current is None or current.version != version
            # a name the bucket could never key (registered before names were checked) is in Redis only
            if gone and valid_name(name) and (kv := await self.kv()) is not None:
                with contextlib.suppress(KeyNotFoundError):  # the bucket first: it outlives Redis
                    await kv.purge(f"version.{name}.{version or 'none'}")
            forgotten += await self.store.forget_version(name, version)
        return forgotten

    async def _catch_up(self, kv: KeyValue, stored: dict[str, bytes]) -> None:
        # Registered or replaced meanwhile. A name removed meanwhile is not taken from Redis's
        # lack of it (Redis may have lost it: emptied, then written to before a restore ran) but
        # from Redis's record of the removal, which the next merge carries over (``restore``).
        for entry in await self.store.list_adapters():
            if stored.get(f"current.{entry.name}") != _encode.encode(entry):
                await _put_entry(kv, entry)

    async def durable_entries(self) -> tuple[list[AdapterEntry], list[AdapterEntry], dict[str, AdapterRemoval]]:
        """The bucket's registered entries, every version's, and the last removal of each name
        ever removed, as stored."""
        current: list[AdapterEntry] = []
        versions: list[AdapterEntry] = []
        removals: dict[str, AdapterRemoval] = {}
        await self.kv()  # opened (and caught up) if it can be
        for key, value in (await _bucket_values(self.bucket)).items():
            if key.startswith("removed."):
                removal = _decode_removal.decode(value)
                removals[removal.name] = removal
            else:  # an entry (a removal record too, to an older dlora: it reads as one)
                (current if key.startswith("current.") else versions).append(_decode.decode(value))
        return current, versions, removals

    async def restore(self) -> int:
        """Make Redis's registrations the durable registry's, the newer one winning: put back the
        ones Redis lacks or holds an older one of (``created``), and drop the ones removed (an
        ``AdapterRemoval`` of that registration or a later one; one made after it, while JetStream
        was down, stays for ``_catch_up``). All of it when Redis restarted empty; a Redis brought
        back from an older snapshot answered 404 for adapters registered since and served ones
        removed since (users' trials), so a non-empty one is compared too, at most every
        ``MERGE_INTERVAL_S``. Returns the number of adapters put back or dropped. Versions go
        first, so a request running on an older one finds it too."""
        if (kv := await self.kv()) is None:
            return 0
        empty = not await self.store.has_adapters()
        if not empty and self.clock() - self._merged_at < MERGE_INTERVAL_S:
            return 0
        self._merged_at = self.clock()
        current, versions, removals = await self.durable_entries()
        live = await self._finish_removals(kv, current, removals)
        held = {e.name: e for e in await self.store.list_adapters()}
        dropped = 0
        for entry in held.values():
            removal = removals.get(entry.name)
            if entry.name in live or removal is None or entry.created > removal.created:
                continue
            # only while Redis still holds what was read: a registration made since stands
            if await self.store.delete_adapter(entry.name, only=entry):
                await self.store.retire_version(entry.name, entry.version, time.time())
                dropped += 1
        if dropped:
            logger.warning("adapter registrations removed since Redis's snapshot dropped", adapters=dropped)
        back = [e for e in live.values() if (h := held.get(e.name)) is None or (h != e and h.created < e.created)]
        if not back:
            return dropped
        wanted = {e.name for e in back}
        registered = {(e.name, e.version) for e in live.values()}
        for entry in versions:
            if entry.name not in wanted:
                continue
            await self.store.put_version(entry)
            if (entry.name, entry.version) not in registered:  # when it was retired went with Redis
                await self.store.retire_version(entry.name, entry.version, time.time())
        for entry in back:
            await self.store.put_adapter(entry, replace=True)
        logger.warning("adapter registrations restored from the durable copy", adapters=len(back))
        return len(back) + dropped

    async def _finish_removals(
        self, kv: KeyValue, current: list[AdapterEntry], removals: dict[str, AdapterRemoval]
    ) -> dict[str, AdapterEntry]:
        """The bucket's registrations no removal covers, by name, after making the bucket hold
        every removal Redis recorded (one made while the remover's bucket was not open) and none
        of the registrations they cover (one that failed part way). ``removals`` gains Redis's and
        loses those past ``REMOVAL_MEMORY_S``, forgotten in both; Redis's of a name registered
        since (a rollback brought it back) is forgotten, not carried over."""
        now = time.time()
        newest = {e.name: e.created for e in current}
        for name, recorded in (await self.store.removals()).items():
            if newest.get(name, -math.inf) > recorded.created or now - recorded.removed > REMOVAL_MEMORY_S:
                await self.store.forget_removal(name)
            elif (known := removals.get(name)) is None or known.created < recorded.created:
                await kv.put(f"removed.{name}", _encode.encode(recorded))
                removals[name] = recorded
        for name, old in list(removals.items()):
            if now - old.removed > REMOVAL_MEMORY_S:
                with contextlib.suppress(KeyNotFoundError):
                    await kv.purge(f"removed.{name}")
                await self.store.forget_removal(name)
                del removals[name]
        live = {}
        for entry in current:
            if (removal := removals.get(entry.name)) is not None and entry.created <= removal.created:
                with contextlib.suppress(KeyNotFoundError):
                    await kv.delete(f"current.{entry.name}")
            else:
                live[entry.name] = entry
        return live


async def purge(nc: NATS, prefix: str) -> None:
    """Delete the deployment's durable registry (tests start each case from nothing)."""
    with contextlib.suppress(NotFoundError):  # none yet
        await nc.jetstream().delete_key_value(bucket_name(prefix))


def keys_bucket_name(prefix: str) -> str:
    return f"{prefix}-keys"


async def _durable_entry(kv: KeyValue | None, name: str) -> AdapterEntry | None:
    """The bucket's registration of ``name`` (None: none, or no bucket)."""
    if kv is None:
        return None
    with contextlib.suppress(KeyNotFoundError, KeyDeletedError):
        if value := (await kv.get(f"current.{name}")).value:
            return _decode.decode(value)
    return None


async def _put_entry(kv: KeyValue, entry: AdapterEntry) -> None:
    data = _encode.encode(entry)
    await kv.put(f"version.{entry.name}.{entry.version or 'none'}", data)
    await kv.put(f"current.{entry.name}", data)


# Seconds between the gateway's reconciles of the keys (``KeyRegistry.restore``): at most this long
# does a revocation Redis lost to an older snapshot go unseen.
KEYS_RECONCILE_S = 5.0


class KeyRegistry(_Durable):
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

    async def lookup(self, digest: str) -> ApiKey | None:
        """The key with that digest, revoked or not; None if there is none. A miss reconciles Redis
        with the durable copy (see ``_restored_after_miss``) and looks again; a revocation Redis
        lost (an older snapshot) is written back by ``restore``, which the gateway runs every
        ``KEYS_RECONCILE_S`` too."""
        key = await self.store.api_key_by_digest(digest)
        if key is None and await self._restored_after_miss():
            key = await self.store.api_key_by_digest(digest)
        return key

    async def durable_keys(self) -> list[ApiKey]:
        """Every key in the bucket, as stored."""
        await self.kv()  # opened (and caught up) if it can be
        return [_decode_key.decode(value) for value in (await _bucket_values(self.bucket)).values()]

    async def _catch_up(self, kv: KeyValue, stored: dict[str, bytes]) -> None:
        await self._merge(kv, stored)

    async def keep_reconciled(self, stop: asyncio.Event, interval_s: float = KEYS_RECONCILE_S) -> None:
        """``restore`` every ``interval_s`` until ``stop`` (a gateway's task): a Redis brought back
        from an older snapshot made a revoked key work again."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)
            if stop.is_set():
                return
            try:
                await self.restore()
            except Exception as e:  # noqa: BLE001 - Redis or JetStream away: the next round tries again
                logger.warning("API keys not reconciled", error=f"{type(e).__name__}: {e}")

    async def restore(self) -> int:
        """Make Redis and the durable copy agree, a revocation winning wherever it was written:
        a key either lacks is copied to it, and one revoked in either is revoked in both. Returns
        how many writes that took. A user's trial: Redis brought back from an older snapshot made a
        revoked key work again (and lost keys made since, for good), since this filled only a Redis
        with no keys at all; a bucket that started empty (`dlora up`'s own NATS) never learnt the
        keys a persisted Redis held, so an emptied Redis then lost them all."""
        if (kv := await self.kv()) is None:
            return 0
        return await self._merge(kv, await _bucket_values(self.bucket))

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


async def _bucket_values(bucket: Bucket | None) -> dict[str, bytes]:
    """Every key of ``bucket`` with its value: none without one or while it is not open; a key
    deleted, purged or removed meanwhile skipped.

    The keys are the subjects of the bucket's stream, from one answer of the server, not
    ``KeyValue.keys()``: its watcher can end before the keys the server already sent are read
    (nats-py #842, open in 2.16), and an empty answer skipped a restore into an empty Redis."""
    if bucket is None or (kv := bucket.kv) is None:
        return {}
    prefix = f"$KV.{bucket.name}."
    values: dict[str, bytes] = {}
    for subject in await stream_subjects(bucket.nc, f"KV_{bucket.name}"):
        key = subject.removeprefix(prefix)
        with contextlib.suppress(KeyNotFoundError, KeyDeletedError):  # deleted or purged: a marker's subject
            if value := (await kv.get(key)).value:
                values[key] = value
    return values


async def stream_subjects(nc: NATS, stream: str) -> list[str]:
    """Every subject holding a message in ``stream``, page by page: the server answers at most
    100,000 a time (nats-server's JSMaxSubjectDetails) and nats-py's ``stream_info`` asks for the
    first page only, which would skip the rest of a bucket holding more keys (API keys are
    never deleted)."""
    subjects: list[str] = []
    while True:
        request = json.dumps({"subjects_filter": ">", "offset": len(subjects)}).encode()
        answer = json.loads((await nc.request(f"$JS.API.STREAM.INFO.{stream}", request, timeout=2.0)).data)
        if "error" in answer:
            APIError.from_error(answer["error"])  # raises nats-py's error for it, as stream_info would
        page = (answer.get("state") or {}).get("subjects") or {}
        subjects += page
        if not page or len(subjects) >= answer.get("total", 0):
            return subjects
