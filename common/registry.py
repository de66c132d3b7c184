"""The adapter registry: Redis for lookups, a NATS JetStream key-value bucket as the durable copy.

Redis is a cache here: a restart without persistence (or a flushed or replaced instance) loses
every key, and with them which adapters exist, so every request for one answered 404. Each
registration and removal is therefore also written to the bucket ``{prefix}-adapters``, which
JetStream keeps on disk (and replicates in a cluster), and a dispatcher that finds the Redis
registry empty while the bucket is not puts it back (``restore``); ``durable.py`` says how the
bucket is opened and kept, with JetStream or without it.

Keys in the bucket: ``current.<name>`` holds the name's registered version's AdapterEntry (JSON),
``version.<name>.<version>`` every version ever registered (requests may still run on one),
``removed.<name>`` the registration removed (AdapterRemoval) until the name is registered again,
which a Redis restored from an older snapshot must not undo (Redis keeps the same record, so a
removal by a process whose bucket is not open reaches the bucket at the next merge).

"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import time
from collections.abc import Callable, Set

import msgspec
from nats.aio.client import Client as NATS
from nats.js.errors import (
    BadRequestError,
    KeyDeletedError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NotFoundError,
)
from nats.js.kv import KeyValue

from dlora.common import log
from dlora.common.durable import Bucket, Durable, ReadBound, bucket_last, bucket_values
from dlora.common.messages import AdapterEntry, AdapterRemoval
from dlora.common.state import INFLIGHT_TTL_S, StateStore

logger = log.get("registry")
_encode = msgspec.json.Encoder()
_decode = msgspec.json.Decoder(AdapterEntry)
_decode_removal = msgspec.json.Decoder(AdapterRemoval)


# An adapter's name: letters, digits, '.', '_', '-' and '/', beginning with a letter or digit, a
# '.' or '/' only between two others (vLLM users name adapters by their Hugging Face repo id,
# "org/name"). It is part of the bucket's keys (NATS key-value: [-/_=.a-zA-Z0-9]), where an empty
# token ("a..b", "a.") is refused.
NAME_PATTERN = r"[A-Za-z0-9](?:[./]?[A-Za-z0-9_-]){0,127}"
_NAME = re.compile(NAME_PATTERN)


def valid_name(name: str) -> bool:
    """Whether ``name`` can be registered (the gateway's rule, and the bucket's keys take no other
    characters): a name that cannot is in Redis alone, if anywhere (registered before the rule)."""
    return len(name) <= 128 and _NAME.fullmatch(name) is not None


def bucket_name(prefix: str) -> str:
    return f"{prefix}-adapters"


# JetStream's error codes for a write whose expected last sequence (revision) is not the subject's:
# a stream of one replica, and a replicated one (nats-py's own update checks both).
_WRONG_LAST_SEQUENCE = (10071, 10164)
# Seconds between two of ``AdapterRegistry.restore``'s comparisons of a non-empty Redis with the
# bucket (the dispatcher asks every look).
MERGE_INTERVAL_S = 5.0
# How long a removal is left to its remover before a merge finishes it (Redis expires the mark):
# finished by another process's merge meanwhile, the remover found nothing left and answered 404 (a
# loaded CI run). Longer than a removal's five round trips take on a busy gateway.
REMOVING_MS = 10_000
# Seconds between two purges of the bucket's delete markers (``AdapterRegistry.tidy``), and the
# most one may take.
TIDY_INTERVAL_S = 3600.0
TIDY_TIMEOUT_S = 10.0
# Registrations a restore puts back at once: each a script call on its own connection, at most a
# quarter of the pool (``redis_max_connections``, 64 by default) so that requests meanwhile find one.
RESTORE_AT_ONCE = 16
# Seconds a removal is kept (``AdapterRemoval``) while its name is not registered again: a Redis
# brought back from a snapshot older than this may serve a name removed before it. Kept for ever,
# names of short-lived adapters grew the bucket and every merge's reading of it (a review).
REMOVAL_MEMORY_S = 7 * 86400.0


class AdapterRegistry(Durable):
    """Registration and removal, written to Redis (``store``) and the durable bucket (None: Redis
    only)."""

    def __init__(self, store: StateStore, bucket: Bucket | None, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(bucket, clock)
        self.store = store
        self._merged_at = -math.inf  # when ``restore`` last compared a non-empty Redis with the bucket
        self._tidied_at = -math.inf  # when ``restore`` last purged the bucket's old delete markers

    @classmethod
    async def open(cls, nc: NATS, store: StateStore, replicas: int = 1) -> AdapterRegistry:
        """The registry of ``store``'s deployment, its bucket created if missing with ``replicas``
        copies across a NATS cluster (see ``Bucket``)."""
        registry = cls(store, Bucket(nc, bucket_name(store.p), replicas=replicas))
        await registry.kv()
        await registry.note_epoch()
        return registry

    async def register(self, entry: AdapterEntry, replace: bool = False) -> bool:
        """Register ``entry`` (``StateStore.swap_adapter``: False if the name is taken, unless
        ``replace``), then record it durably: the bucket's registration of the name is made the one
        Redis holds (``_sync_current``), so of replacements racing the bucket ends with the one
        Redis ends with. A durable write that fails is undone in Redis, where Redis still holds
        ``entry`` (the entry it replaced put back), before its error goes on: the caller's error is
        the whole story, not a name that serves but is not kept (and answers 409 to the retry).
        The version it replaced is retired."""
        done, before = await self.store.swap_adapter(entry, replace)
        if not done:
            return False
        if (kv := await self.kv()) is not None:
            try:
                await kv.put(f"version.{entry.name}.{entry.version or 'none'}", _encode.encode(entry))
                await _sync_current(kv, self.store, entry.name)
            except BaseException:
                if await self.store.delete_adapter(entry.name, only=entry) and before is not None:
                    await self.store.put_adapter(before)  # unless registered again meanwhile
                # A racing registration may have copied this entry into the bucket meanwhile: the
                # bucket follows Redis again, else the next merge would bring this one back.
                with contextlib.suppress(Exception):
                    await _sync_current(kv, self.store, entry.name)
                    await _delete_current(kv, entry.name, entry)  # where Redis holds none now
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

    async def lookup(self, name: str, bound: ReadBound = contextlib.nullcontext) -> AdapterEntry | None:
        """The adapter registered under ``name``, or None. A miss restores an empty Redis from the
        durable copy (see ``_restored_after_miss``) and looks again: Redis came back empty, and
        the dispatcher has not put the registry back yet. ``bound``: around each Redis read, not
        the restore (NATS work: inside a gateway's bound, a long one counted as Redis down)."""
        async with bound():
            entry = await self.store.get_adapter(name)
        if entry is None and await self._restored_after_miss():
            async with bound():
                entry = await self.store.get_adapter(name)
        return entry

    async def remove(self, name: str) -> bool:
        """Unregister ``name``; False if it was not registered (in Redis or the bucket), or another
        removal or a registration of the name came first (concurrent removals all answered 200,
        and one could delete a registration made since: a user's trial). Its versions stay
        findable until ``purge_retired`` forgets them.

        The removal is recorded (``AdapterRemoval``) before the registration goes, in Redis and then
        the bucket, the registration last from Redis: a Redis brought back from an older snapshot
        served the name again, and so did a removal that failed part way or was made by a process
        whose bucket was not open (a review); each merge (``restore``) now finishes it. Each copy
        of the registration is deleted only while it is the one read."""
        kv = await self.kv()
        # Five round trips in a row (a busy gateway's loop makes each wait its turn): the two
        # registrations read together, the two removal records, the bucket's
        # registration deleted at the revision read (a registration made since has another), and
        # Redis's deleted and its version retired in one script.
        cached, (durable, revision) = await asyncio.gather(self.store.get_adapter(name), _durable_entry(kv, name))
        held = [e for e in (cached, durable) if e is not None]
        if not held:
            return False
        entry = max(held, key=lambda e: e.created)
        removal = AdapterRemoval(**msgspec.structs.asdict(entry), removed=time.time())
        # Redis's first: written together, a Redis that refused it (at maxmemory) answered 503 while
        # the bucket's was kept, and the next merge removed the adapter seconds later (a helper's soak)
        await self.store.put_removal(removal)
        await self.store.removing(name, under_way_ms=REMOVING_MS)
        removed = False
        if kv is not None:
            try:
                await kv.put(f"removed.{name}", _encode.encode(removal))
                removed = durable is not None and await _delete_at(kv, f"current.{name}", revision)
            except Exception as e:  # noqa: BLE001 - Redis's record stands: the next merge carries it over
                # as where the bucket is not open; answered 503, the adapter was served until that
                # merge removed it anyway (the last notes' item)
                logger.warning(
                    "removal recorded in Redis; the durable copy gets it at the next merge",
                    adapter=name,
                    error=f"{type(e).__name__}: {e}",
                )
                removed = durable is not None
        if cached is not None:  # Redis's answer decides, where it held one
            removed = await self.store.delete_adapter(name, only=cached, retire=(entry.version, time.time()))
        elif removed:
            await self.store.retire_version(name, entry.version, time.time())
        # over: a Redis rolled back since is put right at the next merge (failed before here, the
        # mark expires for it)
        await self.store.removing(name, under_way_ms=0)
        return removed

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
        for key, value in (await bucket_values(self.bucket)).items():
            if key.startswith("removed."):
                removal = _decode_removal.decode(value)
                removals[removal.name] = removal
            else:  # an entry (a removal record too, to an older dlora: it reads as one)
                (current if key.startswith("current.") else versions).append(_decode.decode(value))
        return current, versions, removals

    async def holds_any(self) -> bool:
        return await self.store.has_adapters()

    async def restore(self, at_once: bool = False) -> int:
        """Make Redis's registrations the durable registry's, the newer one winning: put back the
        ones Redis lacks or holds an older one of (``created``), and drop the ones removed (an
        ``AdapterRemoval`` of that registration or a later one; one made after it, while JetStream
        was down, stays for ``_catch_up``). All of it when Redis restarted empty; a Redis brought
        back from an older snapshot answered 404 for adapters registered since and served ones
        removed since (users' trials), so a non-empty one is compared too, at most every
        ``MERGE_INTERVAL_S`` (``at_once``: now, a lookup found Redis's data new). Returns the
        number of adapters put back or dropped. Versions go first, so a request running on an
        older one finds it too."""
        if (kv := await self.kv()) is None:
            return 0
        empty = at_once or not await self.store.has_adapters()
        if not empty and self.clock() - self._merged_at < MERGE_INTERVAL_S:
            return 0
        self._merged_at = self.clock()
        if self.clock() - self._tidied_at >= TIDY_INTERVAL_S:
            self._tidied_at = self.clock()
            try:
                await self.tidy()
            except Exception as e:  # noqa: BLE001 - tidied next time; the merge goes on
                logger.warning("the bucket's delete markers were not purged", error=f"{type(e).__name__}: {e}")
        current, versions, removals = await self.durable_entries()
        live = await self._finish_removals(kv, current, removals)
        held = {e.name: e for e in await self.store.list_adapters()}
        dropped = 0
        for entry in held.values():
            removal = removals.get(entry.name)
            if entry.name in live or removal is None or entry.created > removal.created:
                continue
            if await self.store.under_way(entry.name):  # its remover finishes it (or a later merge)
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
        mine = [e for e in versions if e.name in wanted]  # when one was retired went with Redis
        await self.store.put_versions(mine, [e for e in mine if (e.name, e.version) not in registered], time.time())
        # Each unless a removal of it, or a registration as new, was made since it was read (a
        # helper's trial: 1,000 removals during a merge of 4,000 adapters, and up to 127 came
        # back, served for seconds; a review: a removal and a registration again, and v1 over v2).
        # Several at once: one after another, 4,000 took a second while lookups waited.
        restored: list[AdapterEntry] = []
        pool = getattr(self.store.r.connection_pool, "max_connections", 4 * RESTORE_AT_ONCE)
        width = max(1, min(RESTORE_AT_ONCE, pool // 4))
        for i in range(0, len(back), width):
            chunk = back[i : i + width]
            put = await asyncio.gather(*(self.store.put_adapter(e, replace=True, restoring=True) for e in chunk))
            restored += [e for e, done in zip(chunk, put, strict=True) if done]
        if restored:
            logger.warning("adapter registrations restored from the durable copy", adapters=len(restored))
        return len(restored) + dropped

    async def tidy(self) -> int:
        """Purge the bucket's delete and purge markers: each removal, purge and registration after
        a removal leaves one, and every merge read each of them (every
        ``MERGE_INTERVAL_S``, growing with every adapter removed). A subject is purged only up to
        its marker, so a value written to it since stays (nats-py's ``purge_deletes`` purged the
        whole subject, a registration made meanwhile too, and left a watcher running each time:
        a review). The number of markers purged; none without a bucket."""
        if await self.kv() is None or self.bucket is None:
            return 0
        stream, js, purged = f"KV_{self.bucket.name}", self.bucket.nc.jetstream(), 0
        async with asyncio.timeout(TIDY_TIMEOUT_S):  # a merge must not wait on it for long
            for key, last in (await bucket_last(self.bucket)).items():
                if last.value is None:  # a marker
                    await js.purge_stream(stream, subject=f"$KV.{self.bucket.name}.{key}", seq=last.revision + 1)
                    purged += 1
        return purged

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


async def _durable_entry(kv: KeyValue | None, name: str) -> tuple[AdapterEntry | None, int]:
    """The bucket's registration of ``name`` and its revision ((None, 0): none, or no bucket)."""
    if kv is None:
        return None, 0
    with contextlib.suppress(KeyNotFoundError, KeyDeletedError):
        held = await kv.get(f"current.{name}")
        if held.value:
            return _decode.decode(held.value), held.revision or 0
    return None, 0


async def _sync_current(kv: KeyValue, store: StateStore, name: str) -> None:
    """Make the bucket's registration of ``name`` the one Redis holds now, compared and set on
    the bucket's revision (a user's trial: two replacements racing reached Redis in one order and
    the bucket in the other, and the next merge put the loser back over the winner seconds after
    both had answered 200). The bucket is read before Redis: a writer whose write loses the race
    reads both again, so the last one writes what Redis holds last. Nothing when Redis holds none
    (a removal came between: its own writes see to the bucket)."""
    key = f"current.{name}"
    while True:
        try:
            held = await kv.get(key)
            revision, value = held.revision, held.value
        except (KeyNotFoundError, KeyDeletedError):
            revision, value = None, None
        if (now := await store.get_adapter(name)) is None or (data := _encode.encode(now)) == value:
            return
        # Written meanwhile: looked at again. So is a delete marker purged meanwhile (``tidy``, in
        # another process): nats-py's create, refused over the marker, reads the key again for its
        # revision, and that read found none (a re-registration answered 503: a helper's trial).
        with contextlib.suppress(KeyWrongLastSequenceError, KeyNotFoundError):
            await (kv.create(key, data) if revision is None else kv.update(key, data, last=revision))
            return


async def _delete_current(kv: KeyValue, name: str, entry: AdapterEntry) -> bool:
    """Delete the bucket's registration of ``name`` while it is ``entry``; whether it was deleted."""
    key = f"current.{name}"
    try:
        held = await kv.get(key)
    except (KeyNotFoundError, KeyDeletedError):
        return False
    if not held.value or _decode.decode(held.value) != entry:
        return False
    return await _delete_at(kv, key, held.revision or 0)


async def _delete_at(kv: KeyValue, key: str, revision: int) -> bool:
    """Delete ``key`` while its revision is ``revision``; whether it was deleted."""
    try:
        return await kv.delete(key, last=revision)
    except KeyWrongLastSequenceError:
        return False
    except BadRequestError as e:  # nats-py's delete passes the server's "wrong last sequence" on as is
        if e.err_code in _WRONG_LAST_SEQUENCE:
            return False
        raise


async def _put_entry(kv: KeyValue, entry: AdapterEntry) -> None:
    data = _encode.encode(entry)
    await kv.put(f"version.{entry.name}.{entry.version or 'none'}", data)
    await kv.put(f"current.{entry.name}", data)
