"""The connections every service holds (NATS and the Redis state store, opened and closed as
one), and typed subscribe / publish over the wire contract."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import msgspec
import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from prometheus_client import Counter
from redis.exceptions import AuthenticationError as RedisAuthenticationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ExecAbortError, OutOfMemoryError, ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

from dlora.common import log, subjects
from dlora.common.lograte import RateLimiter
from dlora.common.redis_client import StateMisconfigured, redis_client
from dlora.common.settings import Common
from dlora.common.state import StateStore
from dlora.common.urls import nats_login, nats_servers, redacted

T = TypeVar("T")


@contextlib.asynccontextmanager
async def connections(s: Common, stop: asyncio.Event | None = None) -> AsyncIterator[tuple[NATS, StateStore]]:
    """NATS and the state store for ``s``; on exit NATS is drained (for at most ``DRAIN_S``) and
    Redis closed. ``stop`` set while NATS does not answer yet: ``StoppedConnecting`` (a service
    told to stop then stops, not retries for ever). NATS closing the connection for good (nats-py
    reconnects after an outage, never after the server answered a command with an error: a
    publish past its control line, a payload past its maximum): ``stop`` is set, and once the
    service has stopped, ``ConnectionLost``, for its supervisor to start it again (it ran on,
    hearing nothing, and the cluster lost it for good: a helper's finding)."""
    lost, running = asyncio.Event(), asyncio.Event()  # running: connected, and not closing it ourselves

    async def on_closed() -> None:
        if running.is_set():
            _log.error("NATS closed the connection for good; stopping to be restarted")
            lost.set()
            if stop is not None:
                stop.set()

    nc = await _connect_nats(s, stop, on_closed)
    running.set()
    redis = redis_client(
        s.redis_url, s.redis_max_connections, s.redis_pool_timeout_s, s.redis_username, s.redis_password
    )
    try:
        await redis.ping()
    except RedisAuthenticationError as e:
        running.clear()
        await nc.close()
        await redis.aclose()
        raise CredentialsRefused(
            f"Redis at {redacted(s.redis_url)} refused the credentials: {e} (check redis_username and redis_password)"
        ) from e
    except STATE_OUTAGE:
        pass  # down at start (or refusing writes: MISCONF refuses PING too): an outage, ridden out like any other
    try:
        yield nc, StateStore(redis, s.redis_prefix)
    except nats.errors.Error as e:
        if lost.is_set():  # what the service met on its way out of a closed connection (others keep their traceback)
            raise ConnectionLost.of(s, nc) from e
        raise
    finally:
        running.clear()
        await _close_nats(nc)
        await redis.aclose()
    if lost.is_set():
        raise ConnectionLost.of(s, nc)


# How long a stopping service drains NATS (the handlers of messages it holds finish; what it
# published goes out) before it closes the connection without. nats-py's own bounds, 30 s for the
# handlers and then 10 s for a flush that waits on a PONG, kept a dispatcher of a ``dlora up``
# killed outright 40 s and more: its handler waited out Redis, which had stopped with it, and its
# server was gone (a CI run). Room under the units' TimeoutStopSec and ``dlora up``'s 10 s wait.
DRAIN_S = 5.0
# Seconds one connect attempt to a NATS node may take (nats-py's default, said here because
# ``clients.FAILOVER_S`` counts on it): a node whose host is cut off answers nothing, and a client
# failing over to the next node waits this long before it tries another.
CONNECT_TIMEOUT_S = 2.0


async def _close_nats(nc: NATS) -> None:
    """``nc`` drained for at most ``DRAIN_S``, then closed (nothing raised: a server already gone
    must not mask the error the service stops with). One not answering in 2 s is not drained:
    cancelled waiting on it, nats-py's drain left an error nobody retrieved (logged, a traceback)."""
    try:
        if not nc.is_connected:
            raise ConnectionError("not connected")
        await nc.flush(2)
    except Exception:  # noqa: BLE001 - gone, hung or closed: closed undrained
        with contextlib.suppress(Exception):
            await nc.close()
        return
    draining = asyncio.ensure_future(nc.drain())
    await asyncio.wait([draining], timeout=DRAIN_S)
    while not draining.done():  # nats-py's drain takes a cancel for its cue to flush: cancel until it ends
        # Not while it still waits on its subscriptions: cancelled there (a loop held past both
        # bounds fires them in one turn), its gather of them keeps a CancelledError nobody reads,
        # logged; its own drain_timeout (4/5 of DRAIN_S) ends that wait and reads it.
        if not nc.is_draining or nc.is_draining_pubs:
            draining.cancel()
        await asyncio.wait([draining], timeout=0.1)
    if not draining.cancelled():
        draining.exception()  # retrieved: a server already gone (ConnectionReconnectingError) is no news
    with contextlib.suppress(Exception):
        await nc.close()


# What nats-py reports while its server is away and it tries again.
_NATS_AWAY = (
    OSError,
    TimeoutError,
    nats.errors.UnexpectedEOF,
    nats.errors.StaleConnectionError,
    nats.errors.NoServersError,
    nats.errors.ConnectionClosedError,
)


class StoppedConnecting(Exception):
    """Told to stop (SIGTERM, Ctrl-C) before NATS ever answered."""


class ConnectionLost(Exception):
    """NATS closed this service's connection for good while it ran (``connections``)."""

    @classmethod
    def of(cls, s: Common, nc: NATS) -> ConnectionLost:
        return cls(f"NATS at {redacted(s.nats_url)} closed the connection for good ({nc.last_error})")


class CredentialsRefused(Exception):
    """NATS or Redis refused this service's credentials at start: a setting to fix, not an outage
    to wait out (a NATS client retries a refused login for ever, and says so only in its log)."""


async def _connect_nats(
    s: Common, stop: asyncio.Event | None = None, closed: Callable[[], Awaitable[None]] | None = None
) -> NATS:
    """Connected to NATS (any of ``s.nats_url``'s seeds), or ``CredentialsRefused`` as soon as the
    server refuses the login, or ``StoppedConnecting`` once ``stop`` is set.

    It reconnects for ever once connected (nats-py gives up after 60 tries, 2 minutes, by default,
    leaving a service that runs but hears nothing): a NATS outage of any length ends when the
    server is back."""
    refused: asyncio.Future[Exception] = asyncio.get_running_loop().create_future()

    # The server away (each reconnect attempt fails): said once, and once when it is back, not at
    # every attempt (a line every 2 s in each process for as long as it lasted: a helper's finding).
    link = Outage("nats")

    async def on_error(e: Exception) -> None:
        if isinstance(e, nats.errors.AuthorizationError) or "authorization violation" in str(e).lower():
            if not refused.done():
                refused.set_result(e)
        if isinstance(e, _NATS_AWAY):
            link.failed(e)
        elif isinstance(e, nats.errors.DrainTimeoutError):
            _log.warning("stopping with handlers still running: drain bound reached", drain_s=DRAIN_S)
        else:
            _log.warning("nats error", error=f"{type(e).__name__}: {e}")

    async def on_reconnected() -> None:
        link.succeeded()

    connecting = asyncio.ensure_future(
        nats.connect(
            nats_servers(s.nats_url),
            user=s.nats_user or None,
            password=s.nats_password or None,
            max_reconnect_attempts=-1,
            error_cb=on_error,
            reconnected_cb=on_reconnected,
            closed_cb=closed,
            # A server on a host that was cut off answers nothing and closes nothing: only a missed
            # ping shows it. nats-py's default (2 pings, 2 minutes apart) left a worker deaf and
            # mute for minutes; two missed pings a quarter TTL apart move it to another node
            # before the dispatcher gives up on it (deploy test: a worker host cut off).
            ping_interval=max(0.5, s.heartbeat_ttl_s / 4),
            max_outstanding_pings=2,
            connect_timeout=CONNECT_TIMEOUT_S,
            # Its own drain ends the handlers' wait before ``_close_nats`` cancels it: cancelled
            # there, nats-py's gather of its subscriptions' drains kept a CancelledError nobody
            # retrieved (Python 3.11's wait_for), an error and traceback in the log at every stop
            # a handler outlasted. On its own timeout it retrieves it; 1/5 is left for its flush.
            drain_timeout=DRAIN_S * 0.8,
        )
    )
    stopping = asyncio.ensure_future((stop or asyncio.Event()).wait())
    either: list[asyncio.Future[Any]] = [connecting, refused, stopping]
    await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if connecting.done():
        return connecting.result()
    connecting.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await connecting
    if not refused.done():
        raise StoppedConnecting(f"stopped before NATS at {redacted(s.nats_url)} answered")
    login = nats_login(s.nats_url, s.nats_user, s.nats_password)
    raise CredentialsRefused(
        f"NATS at {redacted(s.nats_url)} refused the login ({login}): {refused.result()} "
        "(check nats_user and nats_password, or the login in nats_url)"
    )


# What a lost or restarting Redis raises, or one that refuses writes for a while (at maxmemory with
# noeviction; a replica after a failover; a transaction aborted by either): a service loop that
# meets one carries on and tries again. (Refused writes killed the dispatcher and the migrator,
# and again at each restart while they lasted: a helper's soak.) A full disk's MISCONF too
# (``StateMisconfigured``: told apart by ``_TellsMisconf``).
STATE_OUTAGE = (
    RedisConnectionError,
    RedisTimeoutError,
    ConnectionError,
    TimeoutError,
    OutOfMemoryError,
    ReadOnlyError,
    ExecAbortError,
    StateMisconfigured,
)


class Outage:
    """A dependency that is down, logged once when it goes and once when it is back (with how many
    attempts failed meanwhile), not at every attempt: a service retrying every 0.1 s would
    otherwise write a line per attempt for as long as the outage lasts."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.failures = 0

    def failed(self, error: BaseException) -> None:
        if self.failures == 0:
            _log.warning("dependency unavailable; retrying", what=self.what, error=f"{type(error).__name__}: {error}")
        self.failures += 1

    def succeeded(self) -> None:
        if self.failures:
            _log.info("dependency back", what=self.what, failed_attempts=self.failures)
            self.failures = 0


class StateBound:
    """A request's Redis work, bounded: ``async with bound():`` raises ``RedisTimeoutError`` once
    its block has waited ``bound_s`` seconds, and after any outage error, for ``pause_s`` seconds,
    ``RedisConnectionError`` at once without trying. With Redis hung (SIGSTOP, a partition) each
    read waited out redis-py's tries of its socket timeout (4 x 5 s) before the service could say
    so; one at a time, a queue of such requests waited minutes. Only for work a cut-off may leave
    undone or done late (reads, writes that are checked again); a write whose late effect would be
    wrong stays unbounded (``worker/moves.py``)."""

    def __init__(self, bound_s: float = 2.0, pause_s: float = 1.0) -> None:
        self.bound_s, self.pause_s = bound_s, pause_s
        self.down_until = 0.0  # (monotonic) Redis failed: refused without trying until then

    @contextlib.asynccontextmanager
    async def __call__(self) -> AsyncIterator[None]:
        if time.monotonic() < self.down_until:
            raise RedisConnectionError("failed a moment ago")
        try:
            async with asyncio.timeout(self.bound_s):
                yield
        except STATE_OUTAGE as e:
            self.down_until = time.monotonic() + self.pause_s
            if isinstance(e, TimeoutError):  # the bound's (redis-py's is no TimeoutError)
                raise RedisTimeoutError(f"no answer within {self.bound_s:g} s") from e
            raise

    async def reachable(self, ping: Callable[[], Awaitable[object]]) -> None:
        """Raises as a bounded block does unless ``ping()`` answers within the bound: before work
        that stays unbounded (a write whose late effect would be wrong), so that a hung Redis costs
        it 2 s, not redis-py's 20 (a helper: every admin route), and nothing is sent to run late."""
        async with self():
            await ping()


async def every(every_s: float, stop: asyncio.Event) -> AsyncIterator[None]:
    """Yields every ``every_s`` seconds until ``stop`` is set (then at once, not a round more): a
    service's periodic task, ``async for _ in every(60, stop): ...``."""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(every_s):
                await stop.wait()
        if stop.is_set():
            return
        yield


async def unless_stopped(work: Awaitable[T], stop: asyncio.Event) -> T | None:
    """``work``'s result, or None once ``stop`` is set first (``work`` then cancelled): for a
    service's periodic look, of no use to one that stops. With Redis hung each of a look's calls
    waits out redis-py's tries (4 x 5 s), and a dispatcher or migrator told to stop meanwhile
    waited for all of them (18 s, 38 s), past the 10 s ``dlora up`` gives it before SIGKILL."""
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([task, stopped], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait([task])
    return None if task.cancelled() else task.result()


async def when_reachable(
    read: Callable[[], Awaitable[T]], what: str, stop: asyncio.Event, every_s: float = 0.5
) -> T | None:
    """``read()``'s result once Redis answers it, tried every ``every_s`` seconds meanwhile (the
    outage logged as ``Outage`` logs it); None if ``stop`` is set first, a read under way then broken
    off. For what a service reads before it serves: raised, a dispatcher or worker started while
    Redis was down exited with a traceback, and under systemd's start limit stayed down for good."""
    outage = Outage(what)
    while not stop.is_set():
        try:  # (broken off at a stop: a hung Redis held each try 20 s, redis-py's 4 x 5 s, past dlora up's 10 s)
            result = await unless_stopped(read(), stop)
        except STATE_OUTAGE as e:
            outage.failed(e)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(every_s):
                    await stop.wait()
            continue
        if stop.is_set():
            return None
        outage.succeeded()
        return result
    return None


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
    refused: Callable[[Msg, msgspec.DecodeError], Awaitable[None]] | None = None,
) -> Subscription:
    """Subscribe ``handler`` to ``subject`` with messages decoded as ``kind`` (JSON, or msgpack for
    binary payloads). A message that does not decode is logged and counted in ``REJECTED`` by
    subject pattern and type, handed to ``refused`` (to answer its sender), then dropped; the
    handler never sees it."""
    decoder = (msgspec.msgpack.Decoder if msgpack else msgspec.json.Decoder)(kind)
    deliver = _decoding(subject, kind, decoder, lambda v, _: handler(v), refused)
    return await nc.subscribe(subject, queue=queue, cb=deliver)


async def subscribe_senders(
    nc: NATS, pattern: str, kind: type[T], handler: Callable[[T, str], Awaitable[None]], *, queue: str = ""
) -> Subscription:
    """``subscribe`` to a subject per application user (``subjects.APP_ABORTS``): ``handler`` also
    gets the user it came from (``subjects.sender``), which NATS permissions vouch for."""
    decoder = msgspec.json.Decoder(kind)
    deliver = _decoding(pattern, kind, decoder, lambda v, msg: handler(v, subjects.sender(msg.subject)))
    return await nc.subscribe(pattern, queue=queue, cb=deliver)


async def subscribe_requests(
    nc: NATS, subject: str, kind: type[T], handler: Callable[[T, str], Awaitable[None]]
) -> Subscription:
    """``subscribe`` to requests: ``handler`` also gets the subject to answer on (a message with none
    is dropped, as nobody waits for its answer)."""
    decoder = msgspec.json.Decoder(kind)

    async def deliver(value: T, msg: Msg) -> None:
        if msg.reply:
            await handler(value, msg.reply)

    return await nc.subscribe(subject, cb=_decoding(subject, kind, decoder, deliver))


def _decoding(
    pattern: str,
    kind: type[T],
    decoder: msgspec.json.Decoder[T] | msgspec.msgpack.Decoder[T],
    deliver: Callable[[T, Msg], Awaitable[None]],
    refused: Callable[[Msg, msgspec.DecodeError], Awaitable[None]] | None = None,
) -> Callable[[Msg], Awaitable[None]]:
    async def on_message(msg: Msg) -> None:
        try:
            value = decoder.decode(msg.data)
        except msgspec.DecodeError as e:
            reject(pattern, msg.subject, kind, e)
            if refused is not None:
                await refused(msg, e)
            return
        await deliver(value, msg)

    return on_message


# A flood of bad messages (any process on the bus can publish) must not flood the log too.
_reject_log = RateLimiter(burst=10, interval_s=10.0)


def reject(pattern: str, subject: str, kind: type, error: Exception) -> None:
    """Count, and log (at most 10 per kind in 10 s), a message on ``subject`` (subscribed as
    ``pattern``) that is not a ``kind``."""
    REJECTED.labels(pattern, kind.__name__).inc()
    allowed, suppressed = _reject_log.allow((pattern, kind.__name__))
    if allowed:
        _log.warning(
            "bus message rejected", subject=subject, type=kind.__name__, error=str(error)[:500], not_logged=suppressed
        )


# How long ``unsubscribe`` waits for the handlers it cut off to end: DRAIN_S, what a drain gives
# the handlers of a stopping service to finish (those unsubscribed are out of the drain, which then
# has none to wait for, so the stop stays within dlora up's 10 s). Their clean-up's Redis work is
# bounded at 2 s (``StateBound``); one that outlasts this is hung, and the stop goes on without it.
HANDLERS_S = DRAIN_S


async def unsubscribe(subs: list[Subscription]) -> None:
    """Each of ``subs`` ended, and the handler each was running ended too (cancelled: its clean-up
    runs), for at most ``HANDLERS_S`` in all; none left to end on a connection NATS closed (a
    service stopping then goes on to its own clean-up: a lease released, its requests handed back).

    nats-py runs a subscription's handler in the subscription's task and cancels that task at
    ``unsubscribe`` without awaiting it: a handler cut off in a Redis write ran its clean-up (a
    take-back, a record's delete) after the service's ``run`` returned, raced the next owner, and
    was destroyed pending at the loop's close (a review).

    All are unsubscribed in one turn of the loop (their handlers' tasks cancelled there) before any
    handler is awaited: nats-py's unsubscribe waits for its flusher when the connection's outgoing
    buffer is past ``pending_size`` (a busy worker's tokens), and one at a time, a later
    subscription's handler meanwhile took its next message and began its work during the stop (a
    review; test_bus.py)."""

    async def unsubscribed(sub: Subscription) -> None:
        with contextlib.suppress(nats.errors.ConnectionClosedError):
            await sub.unsubscribe()

    # (gather's tasks take their first steps one after another, in the turn after this call: each
    # subscription's task is cancelled there, before any other can run)
    await asyncio.gather(*(unsubscribed(sub) for sub in subs))
    # The task nats-py runs a ``cb=`` subscription's handlers in (2.16's name, typed None there; a
    # rename fails test_bus.py). On a closed connection nats-py cancelled it at its close, unawaited too.
    tasks: list[asyncio.Task[None] | None] = [getattr(sub, "_wait_for_msgs_task", None) for sub in subs]
    handlers = [t for t in tasks if t is not None]
    if handlers and (left := (await asyncio.wait(handlers, timeout=HANDLERS_S))[1]):
        _log.warning(
            "stopping with bus handlers still running: their clean-up outlasted the bound",
            handlers=len(left),
            bound_s=HANDLERS_S,
        )


async def flush(nc: NATS, round_trip_s: int = 10) -> None:
    """Return once the NATS server has read everything ``nc`` was given before this call (a
    subscription from then on gets what anyone publishes; a publish is on the server).

    ``nc.flush()`` alone does not promise it: nats-py (2.15, 2.16 and its main branch of June 2026)
    writes the flush's PING straight to the socket while the commands given before it wait in a
    buffer for its flusher task, so the server can answer PONG before it reads a SUB sent just
    before the flush. Subscribing, flushing, then publishing from another connection lost the
    message in 5 % of tries here (a CI failure); a service announcing "ready" could miss its first
    requests so. The first round trip lets the flusher write the buffer; the second PING follows
    it on the socket, so its PONG comes after the server has read it: 0 losses in 2,000 tries.

    Raises ``nats.errors.FlushTimeoutError`` when a round trip takes past ``round_trip_s`` seconds,
    ``nats.errors.ConnectionClosedError`` on a closed connection."""
    await nc.flush(round_trip_s)
    await nc.flush(round_trip_s)


async def publish(nc: NATS, subject: str, value: msgspec.Struct, *, msgpack: bool = False) -> None:
    """Publish one message of the wire contract (``common/messages.py``) as JSON, or msgpack for
    binary payloads (its subscribers decode it with ``msgpack=True``)."""
    await nc.publish(subject, (_msgpack if msgpack else _json).encode(value))
