"""The Redis client every service holds: a bounded, blocking pool that rides out restarts and
Sentinel failovers, and tells a full disk's MISCONF apart (``StateMisconfigured``)."""

from __future__ import annotations

import functools
from typing import Any, cast

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from dlora.common.urls import SENTINEL_SCHEME, parse_sentinel_url

# Seconds a Redis command or connect may take before it counts as an outage (retried, then the
# caller's loop tries again): far above a command's time, far below TCP's own timeouts.
REDIS_SOCKET_TIMEOUT_S = 5.0
# Seconds a Sentinel query (and a connection to a Sentinel) may take: a Sentinel on a host that
# was cut off must not hold up the question to the next one for a TCP timeout (minutes).
SENTINEL_TIMEOUT_S = 0.5


class StateMisconfigured(ResponseError):
    """Redis refusing writes because it cannot persist them (MISCONF: its last RDB save failed, a
    full disk, with ``stop-writes-on-bgsave-error``): an outage, until the disk has room."""


class _TellsMisconf:
    """A Redis connection mixin: MISCONF raised as ``StateMisconfigured`` (redis-py names OOM and
    READONLY but gives this one as a plain ResponseError, which ended the dispatcher's loops); on
    the connection, not its parser: a subclass of redis-py's parser broke its connections (tried)."""

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)  # type: ignore[misc]
        except ResponseError as e:
            if not isinstance(e, StateMisconfigured) and str(e).startswith("MISCONF"):
                raise StateMisconfigured(str(e)) from e
            raise


@functools.cache
def _telling_misconf(connection_class: type) -> type:
    """``connection_class`` (whichever the URL chose: TCP, TLS, Unix socket, Sentinel's) with ``_TellsMisconf``."""
    return type(connection_class.__name__, (_TellsMisconf, connection_class), {})


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """Connections to whichever server the Sentinels name primary (``SentinelConnectionPool``),
    a burst beyond ``max_connections`` waiting for one (``BlockingConnectionPool``): the
    Sentinel pool's only overrides are where a connection goes, the blocking pool's how one is
    handed out, so the two combine without either knowing the other."""


def redis_client(
    url: str, max_connections: int = 64, pool_timeout_s: float = 10.0, username: str = "", password: str = ""
) -> Redis:
    """A Redis client with at most ``max_connections`` connections: a command that finds them all
    busy waits up to ``pool_timeout_s`` for one (redis-py's BlockingConnectionPool) instead of
    failing, as the default pool does past its size (a burst of requests answered 500).

    ``url`` is a ``redis://`` URL, or a ``redis+sentinel://`` one (``parse_sentinel_url``): then
    every connection goes to the server the Sentinels name primary, and after a failover to the
    replica they promote (redis-py's Sentinel support); ``username`` and ``password`` are the
    data servers', the Sentinels are asked without.

    It rides out a restart: a command that meets a closed or refused
    connection (a pooled connection to the server before it restarted, or the seconds it is
    down) is retried on a fresh one, three times with jittered backoff up to 0.5 s (redis-py's
    Retry); a longer outage reaches the caller, whose loop tries again later. A command whose
    reply was lost after the old server ran it is run again: every write of ours is idempotent
    or harmless to repeat (progress appends only a chunk past the record's next sequence
    number; a create-only or compare-and-delete script run again answers as it did the first
    time)."""
    options: dict[str, Any] = {
        "max_connections": max_connections,
        "timeout": pool_timeout_s,
        "retry": Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), retries=3),
        "retry_on_error": [RedisConnectionError, RedisTimeoutError],
        # A server on a host that was cut off answers nothing and closes nothing: without these a
        # command on a pooled connection to it waited for TCP to give up (minutes), and a Sentinel
        # failover never reached it. No command of ours blocks on the server (no BLPOP, no XREAD).
        "socket_timeout": REDIS_SOCKET_TIMEOUT_S,
        "socket_connect_timeout": REDIS_SOCKET_TIMEOUT_S,
    }
    if url.startswith(f"{SENTINEL_SCHEME}://"):
        address = parse_sentinel_url(url)
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            address.sentinels,
            sentinel_kwargs={"socket_timeout": SENTINEL_TIMEOUT_S, "socket_connect_timeout": SENTINEL_TIMEOUT_S},
        )
        username, password = username or address.username, password or address.password
        client: Redis = sentinel.master_for(
            address.service,
            redis_class=Redis,
            connection_pool_class=_BlockingSentinelPool,
            db=address.db,
            **options,
            **({"username": username} if username else {}),
            **({"password": password} if password else {}),
        )
        pool = client.connection_pool
    else:
        pool = BlockingConnectionPool.from_url(
            url,
            **options,
            **({"username": username} if username else {}),
            **({"password": password} if password else {}),
        )
        client = Redis.from_pool(pool)
    pool.connection_class = _telling_misconf(cast(type, pool.connection_class))
    return client
