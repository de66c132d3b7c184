"""The adapter registry: Redis for lookups, a NATS JetStream key-value bucket as the durable copy.

Redis is a cache here: a restart without persistence (or a flushed or replaced instance) loses
every key, and with them which adapters exist, so every request for one answered 404. Each
registration and removal is therefore also written to the bucket ``{prefix}-adapters``, which
JetStream keeps on disk (and replicates in a cluster), and a dispatcher that finds the Redis
registry empty while the bucket is not puts it back (``restore``). JetStream's key-value store is
used, not a file of ours, because every host already reaches NATS and it is replicated there.
Without JetStream (a server started without ``-js``) the registry works from Redis alone, and says
so once in the log.

Keys in the bucket: ``current.<name>`` holds the name's registered version's AdapterEntry (JSON),
``version.<name>.<version>`` every version ever registered (requests may still run on one).
"""

from __future__ import annotations

import contextlib

import msgspec
from nats.aio.client import Client as NATS
from nats.js.errors import KeyNotFoundError, NoKeysError, NotFoundError
from nats.js.kv import KeyValue

from dlora.common import log
from dlora.common.messages import AdapterEntry
from dlora.common.state import StateStore

logger = log.get("registry")
_encode = msgspec.json.Encoder()
_decode = msgspec.json.Decoder(AdapterEntry)


def bucket_name(prefix: str) -> str:
    return f"{prefix}-adapters"


class AdapterRegistry:
    """Registration and removal, written to Redis (``store``) and the durable bucket (``kv``; None:
    Redis only)."""

    def __init__(self, store: StateStore, kv: KeyValue | None) -> None:
        self.store, self.kv = store, kv

    @classmethod
    async def open(cls, nc: NATS, store: StateStore) -> AdapterRegistry:
        """The registry of ``store``'s deployment, its bucket created if missing. Without JetStream
        on the server it falls back to Redis alone (logged)."""
        try:
            kv = await nc.jetstream().create_key_value(bucket=bucket_name(store.p), history=1)
        except Exception as e:  # noqa: BLE001 - no JetStream: the registry lives in Redis only
            logger.warning("no durable adapter registry (JetStream unavailable)", error=f"{type(e).__name__}: {e}")
            kv = None
        return cls(store, kv)

    async def register(self, entry: AdapterEntry, replace: bool = False) -> bool:
        """Register ``entry`` (``StateStore.put_adapter``: False if the name is taken, unless
        ``replace``), then record it durably."""
        if not await self.store.put_adapter(entry, replace):
            return False
        if self.kv is not None:
            data = _encode.encode(entry)
            await self.kv.put(f"version.{entry.name}.{entry.version or 'none'}", data)
            await self.kv.put(f"current.{entry.name}", data)
        return True

    async def remove(self, name: str) -> bool:
        """Unregister ``name``; False if it was not registered. Its versions stay findable."""
        removed = await self.store.delete_adapter(name)
        if self.kv is not None:
            with contextlib.suppress(KeyNotFoundError):
                await self.kv.delete(f"current.{name}")
        return removed

    async def durable_entries(self) -> tuple[list[AdapterEntry], list[AdapterEntry]]:
        """The bucket's registered entries and every version's, as stored."""
        if self.kv is None:
            return [], []
        try:
            keys = await self.kv.keys()
        except NoKeysError:
            return [], []
        current: list[AdapterEntry] = []
        versions: list[AdapterEntry] = []
        for key in keys:
            try:
                value = (await self.kv.get(key)).value
            except KeyNotFoundError:  # removed since listed
                continue
            if value:
                (current if key.startswith("current.") else versions).append(_decode.decode(value))
        return current, versions

    async def restore(self) -> int:
        """Put the durable registry back into Redis when Redis has no registry at all (it restarted
        empty); returns the number of adapters restored. Versions go first, so a request running
        on an older one finds it too."""
        if self.kv is None or await self.store.has_adapters():
            return 0
        current, versions = await self.durable_entries()
        if not current:
            return 0
        for entry in versions:
            await self.store.put_version(entry)
        for entry in current:
            await self.store.put_adapter(entry, replace=True)
        logger.warning("adapter registry restored from the durable copy", adapters=len(current))
        return len(current)


async def purge(nc: NATS, prefix: str) -> None:
    """Delete the deployment's durable registry (tests start each case from nothing)."""
    with contextlib.suppress(NotFoundError):  # none yet
        await nc.jetstream().delete_key_value(bucket_name(prefix))
