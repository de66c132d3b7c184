"""The connections every service holds (NATS and the Redis state store, opened and closed as
one), and typed subscribe / publish over the wire contract."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import msgspec
import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from prometheus_client import Counter
from redis.asyncio import Redis

from dlora.common import log
from dlora.common.settings import Common
from dlora.common.state import StateStore

T = TypeVar("T")


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


# Every process counts the bus messages it could not read, so a peer on another schema version
# shows up instead of silently dropping out (the gateway serves this on /metrics).
REJECTED = Counter(
    "dlora_bus_rejected_messages",
    "Bus messages that did not decode as their subject's type, dropped",
    ["subject", "type"],
)
_log = log.get("bus")
_json = msgspec.json.Encoder()
_msgpack = msgspec.msgpack.Encoder()


async def subscribe(
    nc: NATS,
    subject: str,
    kind: type[T],
    handler: Callable[[T], Awaitable[None]],
    *,
    queue: str = "",
    msgpack: bool = False,
) -> Subscription:
    """Subscribe ``handler`` to ``subject`` with messages decoded as ``kind`` (JSON, or msgpack for
    binary payloads). A message that does not decode is logged and counted in ``REJECTED`` by
    subject pattern and type, then dropped; the handler never sees it."""
    decoder = (msgspec.msgpack.Decoder if msgpack else msgspec.json.Decoder)(kind)

    async def on_message(msg: Msg) -> None:
        try:
            value = decoder.decode(msg.data)
        except msgspec.DecodeError as e:
            reject(subject, msg.subject, kind, e)
            return
        await handler(value)

    return await nc.subscribe(subject, queue=queue, cb=on_message)


def reject(pattern: str, subject: str, kind: type, error: Exception) -> None:
    """Count and log a message on ``subject`` (subscribed as ``pattern``) that is not a ``kind``."""
    REJECTED.labels(pattern, kind.__name__).inc()
    _log.warning("bus message rejected", subject=subject, type=kind.__name__, error=str(error))


async def publish(nc: NATS, subject: str, value: msgspec.Struct, *, msgpack: bool = False) -> None:
    """Publish one message of the wire contract (``common/messages.py``) as JSON, or msgpack for
    binary payloads (its subscribers decode it with ``msgpack=True``)."""
    await nc.publish(subject, (_msgpack if msgpack else _json).encode(value))
