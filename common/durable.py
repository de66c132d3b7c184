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
import json
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from nats.aio.client import Client as NATS
from nats.js.errors import APIError, BadRequestError, KeyDeletedError, KeyNotFoundError
from nats.js.kv import KeyValue

from dlora.common import log

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
    and restored from after a lookup misses."""

    def __init__(self, bucket: Bucket | None, clock: Callable[[], float]) -> None:
        self.bucket, self.clock = bucket, clock
        self._caught_up = False
        self._restore_tried = -RESTORE_ON_MISS_INTERVAL_S  # the clock's time of the last restore a miss set off
        self._restoring: asyncio.Future[int] | None = None  # that restore, while it runs

    async def restore(self) -> int:
        """Put the bucket back into an empty Redis; how many entries came back."""
        raise NotImplementedError

    async def restore_after_miss(self) -> int:
        """What a lookup that missed restores: ``restore`` unless a registry says otherwise."""
        return await self.restore()

    async def _restored_after_miss(self) -> bool:
        """After a lookup missed: whether restoring (``restore_after_miss``, set off at most once
        per ``RESTORE_ON_MISS_INTERVAL_S``) brought anything back, so looking again may find it.
        A miss while one runs waits for it (one at a time: a merge of thousands of keys outlasts
        the interval; a Redis emptied under load answered every other miss meanwhile 401 or 404:
        a helper's trial)."""
        if self.bucket is None:
            return False
        if self._restoring is None:
            if self.clock() - self._restore_tried < RESTORE_ON_MISS_INTERVAL_S:
                return False
            self._restore_tried = self.clock()
            self._restoring = asyncio.ensure_future(self.restore_after_miss())
            self._restoring.add_done_callback(self._restored)
        return bool(await asyncio.shield(self._restoring))

    def _restored(self, restoring: asyncio.Future[int]) -> None:
        self._restoring = None
        if not restoring.cancelled():
            restoring.exception()  # (retrieved: every waiter has it raised already)

    async def kv(self) -> KeyValue | None:
        kv = await self.bucket.get() if self.bucket is not None else None
        if kv is not None and self.bucket is not None and self.bucket.missed and not self._caught_up:
            await self._catch_up(kv, await bucket_values(self.bucket))
            self._caught_up = True  # only once it all went in: a failed catch-up is tried again
        return kv

    async def _catch_up(self, kv: KeyValue, stored: dict[str, bytes]) -> None:
        """Make the bucket, opened late, say what Redis says of what was written while JetStream
        was down: a key revoked meanwhile must not come back unrevoked after a later Redis loss."""


async def bucket_values(bucket: Bucket | None) -> dict[str, bytes]:
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
