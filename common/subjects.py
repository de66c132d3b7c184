"""Every NATS subject dlora uses. Nothing else spells a subject."""

from __future__ import annotations

import hashlib

PREFIX = "dlora"

# GenerateRequest from gateways; dispatchers consume it as one queue group (with APP_REQUESTS).
REQUESTS = f"{PREFIX}.requests"
DISPATCHERS = "dispatchers"  # the queue group
# GenerateRequest from applications on the bus, each on its NATS user's own subject (requests_of):
# where the server has users, an application may publish only there, so its subject says who sent
# it (GenerateRequest.owner), and its aborts (aborts_of) reach only its own requests.
APP_REQUESTS = f"{PREFIX}.requests.*"

# Empty request answered by any one dispatcher: "no responders" means none is running (readiness).
DISPATCHER_PING = f"{PREFIX}.dispatchers.ping"

# AbortRequest from gateways, broadcast: the worker that holds the request drops it.
ABORT = f"{PREFIX}.abort"
# AbortRequest from applications (aborts_of): only a request the same user sent is dropped.
APP_ABORTS = f"{PREFIX}.abort.*"

# ClientAlive from every reply reader that wants its requests aborted when it goes (gateways).
CLIENTS = f"{PREFIX}.clients"
# ClientAlive from applications (clients_of): only names of the same user count (``owns_client``).
APP_CLIENTS = f"{PREFIX}.clients.*"

# CancelResponse from the gateway that was asked to cancel a background response (Responses API),
# broadcast to every gateway: the one running it cancels its task (``gateway/background.py``).
RESPONSE_CANCELS = f"{PREFIX}.responses.cancel"

# LostRequests from a worker; dispatchers consume it as one queue group.
LOST = f"{PREFIX}.lost"

# AdapterEvent, broadcast.
ADAPTER_EVENTS = f"{PREFIX}.adapters.events"

# PrefixCacheReset from the gateway (admin), broadcast; each worker answers the message's reply
# subject with a PrefixCacheResetDone, and dispatchers forget where prefixes went.
PREFIX_CACHE_RESET = f"{PREFIX}.prefix-cache.reset"

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
    """KVChunks of a request moving to ``worker``, under a token made of its id (the chunks name the
    request themselves): an application's id may hold what a subject token may not (".", "*",
    ">", spaces), and its move's chunks were unsendable or went nowhere (a trial)."""
    return f"{PREFIX}.worker.{worker}.kv.{hashlib.blake2b(request_id.encode(), digest_size=8).hexdigest()}"


def kv_inbox(worker: str) -> str:
    return f"{PREFIX}.worker.{worker}.kv.*"


def stats(worker: str) -> str:
    return f"{PREFIX}.stats.{worker}"


def reply_inbox(request_id: str, owner: str = "app") -> str:
    """A reply subject for one request (any subject works; this is the conventional one).
    ``owner`` groups the replies of one process under ``replies_of(owner)``."""
    return f"{replies_prefix(owner)}{request_id}"


def replies_of(owner: str) -> str:
    """Every reply subject of one owner: a gateway subscribes once, not once per request."""
    return f"{replies_prefix(owner)}*"


def replies_prefix(owner: str) -> str:
    """What every reply subject of ``owner`` starts with."""
    return f"{PREFIX}.reply.{owner}."


def requests_of(user: str) -> str:
    """Where the application connected as NATS ``user`` publishes its GenerateRequests."""
    return f"{PREFIX}.requests.{user}"


def aborts_of(user: str) -> str:
    """Where the application connected as NATS ``user`` publishes its AbortRequests."""
    return f"{PREFIX}.abort.{user}"


def clients_of(user: str) -> str:
    """Where the application connected as NATS ``user`` announces its readers (ClientAlive)."""
    return f"{PREFIX}.clients.{user}"


def owns_client(user: str, client: str) -> bool:
    """Whether the application ``user`` may speak for reader ``client`` (its requests' ``client``,
    its announcements): its own name, or ``<user>.<anything>``. On one shared subject any user
    kept another's abandoned requests running, or turned off their replays (a trial)."""
    return client == user or client.startswith(f"{user}.")


def sender(subject: str) -> str:
    """The application user a message on ``requests_of(user)`` or ``aborts_of(user)`` came from;
    "" for the gateways' own subjects (REQUESTS, ABORT)."""
    parts = subject.split(".")
    return parts[2] if len(parts) == 3 else ""


def replies_to(user: str, reply_to: str) -> bool:
    """Whether ``reply_to`` is a subject the application user may read (its replies or its inboxes):
    the only kind its requests may name, or it could write into another user's stream. It must be
    one a worker can publish to (no blank, wildcard or empty token): else every chunk to it fails."""
    return reply_to.startswith((replies_prefix(user), f"_INBOX.{user}.")) and publishable(reply_to)


# Longest subject published to, in bytes: with a reply subject and a size it must fit nats-server's
# 4,096-byte control line, or the server closes the publisher's connection for good (see
# ``messages.MAX_NAME``).
MAX_SUBJECT_BYTES = 1024


def publishable(subject: str) -> bool:
    """Whether NATS takes ``subject`` for a publish: tokens non-empty, no whitespace, no wildcard
    (nats-server's subject rules; nats-py raises BadSubjectError for the first two), at most
    ``MAX_SUBJECT_BYTES``."""
    tokens = subject.split(".")
    return all(tokens) and not any(c in subject for c in " \t\r\n*>") and len(subject.encode()) <= MAX_SUBJECT_BYTES
