"""Every NATS subject dlora uses. Nothing else spells a subject."""

from __future__ import annotations

PREFIX = "dlora"

# GenerateRequest from gateways and apps; dispatchers consume it as one queue group.
REQUESTS = f"{PREFIX}.requests"
DISPATCHERS = "dispatchers"  # the queue group

# Empty request answered by any one dispatcher: "no responders" means none is running (readiness).
DISPATCHER_PING = f"{PREFIX}.dispatchers.ping"

# AbortRequest, broadcast: the worker that holds the request drops it.
ABORT = f"{PREFIX}.abort"

# ClientAlive from every reply reader that wants its requests aborted when it goes (gateways).
CLIENTS = f"{PREFIX}.clients"

# LostRequests from a worker; dispatchers consume it as one queue group.
LOST = f"{PREFIX}.lost"

# AdapterEvent, broadcast.
ADAPTER_EVENTS = f"{PREFIX}.adapters.events"

# Placement from the dispatcher.
PLACEMENT = f"{PREFIX}.placement"

# MovePlan from the migrator.
MOVES = f"{PREFIX}.moves"

# WorkerStats of every worker: subscribe with STATS_ALL.
STATS_ALL = f"{PREFIX}.stats.*"


def worker_requests(worker: str) -> str:
    """GenerateRequest forwarded by a dispatcher to one worker."""
    return f"{PREFIX}.worker.{worker}.requests"


def kv_transfer(worker: str, request_id: str) -> str:
    """KVChunks of a request moving to ``worker``."""
    return f"{PREFIX}.worker.{worker}.kv.{request_id}"


def kv_inbox(worker: str) -> str:
    return f"{PREFIX}.worker.{worker}.kv.*"


def stats(worker: str) -> str:
    return f"{PREFIX}.stats.{worker}"


def reply_inbox(request_id: str, owner: str = "app") -> str:
    """A reply subject for one request (any subject works; this is the conventional one).
    ``owner`` groups the replies of one process under ``replies_of(owner)``."""
    return f"{PREFIX}.reply.{owner}.{request_id}"


def replies_of(owner: str) -> str:
    """Every reply subject of one owner: a gateway subscribes once, not once per request."""
    return f"{PREFIX}.reply.{owner}.*"
