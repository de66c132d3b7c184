"""A service's durable copy of what it keeps in Redis: a NATS JetStream key-value bucket, opened
when JetStream is there and tried again while it is not (``Bucket``), caught up once when it opens
late and restored from after a lookup misses (``Durable``); the adapter registry
(``registry.py``) and the inference API keys (``key_registry.py``) are kept so.

JetStream's key-value store is used, not a file of ours, because every host already reaches NATS
and it is replicated there. Without JetStream (a server started without ``-js``, or a cluster
still electing its leader) a registry works from Redis alone, says so once in the log, and tries
the bucket again every ``REOPEN_INTERVAL_S``: opened late, it first takes what was written
meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy
from nats.js.errors import BadRequestError
from nats.js.kv import KeyValue

from dlora.common import log
from dlora.common.bus import Outage
from dlora.common.state import StateStore

logger = log.get("registry")
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


# What bounds a lookup's Redis reads (``bus.StateBound``; none by default).
ReadBound = Callable[[], AbstractAsyncContextManager[Any]]


class Durable:
    """A registry's durable side: its bucket (None: Redis alone), caught up once when it opens late,
    and restored from after a lookup misses (``_restored_after_miss``)."""

    store: StateStore  # (the registry's)

    def __init__(self, bucket: Bucket | None, clock: Callable[[], float]) -> None:
        self.bucket, self.clock = bucket, clock
        self._caught_up = False
        self._restore_tried = -RESTORE_ON_MISS_INTERVAL_S  # the clock's time of the last merge a miss set off
        self._epoch: str | None = None  # Redis's data token (``StateStore.data_epoch``) at open or the last miss
        self._after_miss: asyncio.Future[int] | None = None  # what a miss set off, while it runs
        self._merging: asyncio.Future[int] | None = None  # a merge a miss set off beside its lookup
        self._merges = Outage(f"merges lookups set off ({bucket.name if bucket else 'no bucket'})")

    async def restore(self, at_once: bool = False) -> int:
        """Make Redis and the bucket agree; how many entries that changed. ``at_once``: even if
        a registry merged lately (Redis lost its data since)."""
        raise NotImplementedError

    async def holds_any(self) -> bool:
        """Whether Redis holds any of this registry's entries."""
        raise NotImplementedError

    async def _restored_after_miss(self) -> bool:
        """After a lookup missed: whether looking again may find it. Where Redis lost its data
        since the last miss or the open (its data token new; not known, none of ours there:
        another process may be part way through putting it back) the miss restores it whole,
        waits, and looks again; so does every miss meanwhile (each answered at once, a Redis
        emptied under load answered 401 and 404 for valid keys and registered adapters for
        seconds: a helper's trial; looking again only where its own restore put something back,
        one that another process finished first left them 404: a review). Else (a name never
        registered, a wrong key, or Redis brought back from an older snapshot) a merge is set off
        beside the lookup, at most every ``RESTORE_ON_MISS_INTERVAL_S``, and the lookup answers
        at once: waiting, a name never registered waited for a whole merge (5 s at 4,000
        adapters) and so did every wrong key (a review). The next lookup finds what it put back."""
        if self.bucket is None:
            return False
        if self._after_miss is None:
            self._after_miss = asyncio.ensure_future(self._after_a_miss())
            self._after_miss.add_done_callback(self._missed)
        return bool(await asyncio.shield(self._after_miss))

    async def note_epoch(self) -> None:
        """At open: take Redis's data token, for a miss to tell whether Redis lost its data since,
        restoring first where Redis holds none of ours (it may have lost them just before: a
        gateway started on an emptied Redis answered 404 for every registered adapter, a review).
        Where Redis or the bucket cannot say, the first miss restores whole."""
        try:
            epoch = await self.store.data_epoch()
            if not await self.holds_any():
                await self.restore(at_once=True)
            self._epoch = epoch
        except Exception as e:  # noqa: BLE001 - Redis or JetStream away at start: the first miss restores
            logger.warning(
                "registry not restored at open; the first lookup that misses will", error=f"{type(e).__name__}: {e}"
            )

    async def _after_a_miss(self) -> int:
        """1 when Redis lost its data since the token was last taken (restored whole: what this or
        another process put back is looked for again), else 0 (a merge set off beside)."""
        epoch, due = await self.store.data_epoch(), self.clock() - self._restore_tried >= RESTORE_ON_MISS_INTERVAL_S
        # The token alone where known: with no adapter registered (or none of ours) every unknown
        # name restored the whole bucket (a review); not known (Redis away at open), the first miss
        # restores whole (none of ours there was no sign: another process may be part way through).
        emptied = epoch != self._epoch if self._epoch is not None else due
        if emptied:
            self._restore_tried = self.clock()
            await self.restore(at_once=True)
        self._epoch = epoch  # (after the restore: one that failed is tried again by the next miss)
        if emptied:
            return 1
        if self._merging is None and due:
            self._restore_tried = self.clock()
            self._merging = asyncio.ensure_future(self.restore())
            self._merging.add_done_callback(self._merged)
        return 0

    def _missed(self, done: asyncio.Future[int]) -> None:
        self._after_miss = None
        if not done.cancelled():
            done.exception()  # (retrieved: every waiter had it raised)

    def _merged(self, done: asyncio.Future[int]) -> None:
        self._merging = None
        if done.cancelled():
            return
        if (e := done.exception()) is not None:  # (no waiter: said here, once an outage)
            self._merges.failed(e)
        else:
            self._merges.succeeded()

    async def kv(self) -> KeyValue | None:
        kv = await self.bucket.get() if self.bucket is not None else None
        if kv is not None and self.bucket is not None and self.bucket.missed and not self._caught_up:
            await self._catch_up(kv, await bucket_values(self.bucket))
            self._caught_up = True  # only once it all went in: a failed catch-up is tried again
        return kv

    async def _catch_up(self, kv: KeyValue, stored: dict[str, bytes]) -> None:
        """Make the bucket, opened late, say what Redis says of what was written while JetStream
        was down: a key revoked meanwhile must not come back unrevoked after a later Redis loss."""


@dataclass(frozen=True, slots=True)
class Stored:
    """A key's last message in a bucket: its value (None for a delete or purge marker) and its
    revision (the stream sequence)."""

    value: bytes | None
    revision: int


# Seconds a bucket read may go without a message before it is given up (TimeoutError).
READ_STALL_S = 10.0
# Seconds the consumer's deletion may take after a read: a JetStream gone meanwhile must not hold
# up the read's answer or error (the server drops the consumer anyway after ``READ_STALL_S``).
READ_DELETE_S = 1.0
# Headers that make a message a marker, not a value: nats-py's KV_OP ("DEL", "PURGE") and the
# reason nats-server 2.11+ writes on the markers it places itself (TTLs, MaxAge).
_MARKERS = ("KV-Operation", "Nats-Marker-Reason")


async def bucket_last(bucket: Bucket | None) -> dict[str, Stored]:
    """Every key of ``bucket`` with its last message, markers included: none without a bucket or
    while it is not open.

    One ordered consumer delivering the last message of every subject (JetStream's
    DeliverLastPerSubject), read until a message says none is pending: a get per key made a merge
    of 4,000 adapters take 5 s. Not ``KeyValue.watch``: it takes a bucket for read whole when the
    consumer's pending count reaches 0 before its callback has seen a message (nats-py #842, open
    in 2.16), and an empty answer skipped a restore into an empty Redis; here the server's own
    count of messages delivered says whether the bucket was empty. Raises TimeoutError when no
    message comes for ``READ_STALL_S``, and nats-py's errors."""
    if bucket is None or bucket.kv is None:
        return {}
    prefix = f"$KV.{bucket.name}."
    last: dict[str, Stored] = {}
    done = asyncio.get_running_loop().create_future()

    async def take(msg: Msg) -> None:
        meta = msg.metadata
        marker = msg.header is not None and any(h in msg.header for h in _MARKERS)
        last[msg.subject.removeprefix(prefix)] = Stored(None if marker else msg.data, meta.sequence.stream)
        if meta.num_pending == 0 and not done.done():
            done.set_result(None)

    sub = await bucket.nc.jetstream(timeout=2.0).subscribe(
        f"{prefix}>",
        stream=f"KV_{bucket.name}",
        cb=take,
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
        inactive_threshold=READ_STALL_S,
    )
    try:
        info = await sub.consumer_info()
        if not info.num_pending and not (info.delivered and info.delivered.consumer_seq):  # none sent, none to send
            return {}
        while not done.done():
            seen = len(last)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(done), READ_STALL_S)
            if not done.done() and len(last) == seen:
                raise TimeoutError(f"bucket {bucket.name}: no message for {READ_STALL_S:g} s")
        return last
    finally:
        await sub.unsubscribe()
        # nats-py leaves the consumer on the server (nats.go deletes it): one a merge, each
        # for ``READ_STALL_S`` (its inactive threshold). One a reset replaced goes so.
        with contextlib.suppress(Exception):
            await bucket.nc.jetstream(timeout=READ_DELETE_S).delete_consumer(f"KV_{bucket.name}", sub._consumer)


async def bucket_values(bucket: Bucket | None) -> dict[str, bytes]:
    """Every key of ``bucket`` holding a value (not empty) with it: none without a bucket or while
    it is not open (see ``bucket_last``)."""
    return {key: stored.value for key, stored in (await bucket_last(bucket)).items() if stored.value}
