"""The connections every service holds: NATS and the Redis state store, opened and closed as one."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import nats
from nats.aio.client import Client as NATS
from redis.asyncio import Redis

from dlora.common.settings import Common
from dlora.common.state import StateStore


@contextlib.asynccontextmanager
async def connections(s: Common) -> AsyncIterator[tuple[NATS, StateStore]]:
    """NATS and the state store for ``s``; on exit NATS is drained (pending messages go out) and
    Redis closed."""
    nc = await nats.connect(s.nats_url)
    redis = Redis.from_url(s.redis_url)
    try:
        yield nc, StateStore(redis, s.redis_prefix)
    finally:
        with contextlib.suppress(Exception):  # a server already gone must not mask the real error
            await nc.drain()
        await redis.aclose()
