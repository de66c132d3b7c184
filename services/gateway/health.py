"""Readiness: whether a request sent to this gateway now can be served, and why not.

A request needs Redis (the adapter registry), NATS, a dispatcher to take it and a worker to run
it. Dispatchers answer an empty request on ``subjects.DISPATCHER_PING`` (each of them: the first
answer counts, so one dispatcher that hangs does not fail readiness while another answers), so
NATS answers "no responders" at once when none is running; workers are live while their
heartbeat is in Redis, and take requests unless it says they are draining (stopping).
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from redis.exceptions import RedisError

from dlora.common import subjects
from dlora.common.bus import STATE_OUTAGE, StateBound
from dlora.common.state import StateStore
from dlora.model.config import same_model

# What an unreachable or failing Redis raises (redis-py's errors, and the socket's).
STORE_DOWN = (RedisError, *STATE_OUTAGE)

# Seconds a dispatcher has to answer the readiness ping: it answers from its event loop at once,
# and a probe (Kubernetes' default timeout is 1 s) must not wait for more.
PING_TIMEOUT_S = 0.5


def retry_after_s(heartbeat_ttl_s: float) -> int:
    """The ``Retry-After`` of a 503 for a missing worker or dispatcher or an unreachable Redis, in
    whole seconds: one heartbeat TTL, the time the cluster takes to notice a worker that started
    or stopped (a new worker is seen at its first heartbeat, a dead one forgotten and its requests
    recovered after one TTL), and long enough for a restarting dispatcher or Redis; at least 1."""
    return max(1, math.ceil(heartbeat_ttl_s))


async def dispatcher_problem(nc: NATS) -> str | None:
    """Why no dispatcher can take a request (none subscribed, none answered within
    ``PING_TIMEOUT_S``, NATS failing), or None when one answered the ping."""
    try:
        await nc.request(subjects.DISPATCHER_PING, b"", timeout=PING_TIMEOUT_S)
    except NoRespondersError:
        return "no dispatcher is running"
    except NatsTimeoutError:
        return f"no dispatcher answered within {PING_TIMEOUT_S} s"
    except NatsError as e:
        return f"no dispatcher can be reached: {type(e).__name__}"
    return None


async def readiness(
    nc: NATS, store: StateStore, bound: StateBound, digests: Collection[str] = (), ours: str = ""
) -> tuple[bool, dict[str, Any]]:
    """Whether a request can be served now, and the body of ``/healthz``: the live workers' counts,
    whether NATS is connected and a dispatcher answers, and when not ready the reasons (every one
    that holds, joined by "; "), not ready while every live worker is draining. Never raises for
    an unreachable dependency: that is the answer (Redis's within ``bound``). ``digests``: the
    model digests of the workers heard from (their stats), ``ours`` the gateway's: none of its
    requests can run where every one differs."""
    reasons: list[str] = []
    try:
        async with bound():
            workers = await store.live_workers()
        store_up = True
    except STORE_DOWN as e:
        workers, store_up = [], False
        reasons.append(f"the state store (Redis) is unreachable: {type(e).__name__}")
    connected = nc.is_connected
    dispatcher = await dispatcher_problem(nc) if connected else "the message bus (NATS) is disconnected"
    if dispatcher is not None:
        reasons.append(dispatcher)
    draining = sum(w.draining for w in workers)
    if not workers and store_up:
        reasons.append("no worker is live")
    elif draining == len(workers) and store_up:
        # The dispatchers send a draining worker nothing new: every request is a 503 meanwhile
        # (a helper's finding: /healthz said ok for the whole drain of the only worker).
        reasons.append("every live worker is draining (stopping): none takes new requests")
    elif digests and not any(same_model(d, ours) for d in digests):
        reasons.append(f"every live worker serves another base model than this gateway (digest {ours})")
    body: dict[str, Any] = {
        "status": "unavailable" if reasons else "ok",
        "workers": len(workers),
        "draining": draining,  # of them, stopping: they finish what they hold, take nothing new
        "running": sum(w.running for w in workers),
        "waiting": sum(w.waiting for w in workers),
        "nats": connected,
        "dispatcher": dispatcher is None,
    }
    if reasons:
        body["reason"] = "; ".join(reasons)
    return not reasons, body
