"""Which reply readers are still there: a gateway announces itself with ``ClientAlive`` every
``ANNOUNCE_S`` on ``subjects.CLIENTS`` (an application that opts in, on
``subjects.clients_of(user)``, for names of its own); a request whose client (its
``GenerateRequest.client``) was heard from and has since been silent for the heartbeat TTL and
``FAILOVER_S`` is abandoned, and whoever holds it drops it. A client never heard from is never taken for gone."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections import OrderedDict
from collections.abc import Callable

from nats.aio.client import Client as NATS

from dlora.common import bus, subjects
from dlora.common.messages import ClientAlive

# Seconds between two announcements: several fit in any heartbeat TTL worth setting.
ANNOUNCE_S = 1.0
# Seconds past the TTL a client's silence is forgiven: a gateway whose NATS node died fails over to
# another, and one node that does not answer on the way costs ``bus.CONNECT_TIMEOUT_S``; its next
# announcement comes up to ``ANNOUNCE_S`` after it is back. Without it, a heartbeat TTL of 2 s
# dropped a stream of a gateway 3 s into its failover (the deploy test, a NATS node killed while
# another host was cut off).
FAILOVER_S = bus.CONNECT_TIMEOUT_S + ANNOUNCE_S
# Clients known at once. Past it the longest silent is forgotten, as one never heard from is
# (its requests are kept): anyone allowed to announce must not grow the map without bound.
MAX_CLIENTS = 10_000
# Processes sharing one reader name, each sent its replies once when it starts: remembered while
# heard within STARTS_KEPT_S; past MAX_STARTS of them a new one is not told apart.
STARTS_KEPT_S = 10 * ANNOUNCE_S
MAX_STARTS = 1_000


class Clients:
    """Reply readers and when each was last heard from (monotonic seconds). Pure."""

    def __init__(self, ttl_s: float, link: Callable[[], tuple[bool, int]] | None = None) -> None:
        """``link``: the observer's own NATS connection, (connected, times it came back: nats-py's
        ``stats["reconnects"]``; ``link_of``); None: taken as always up."""
        self.ttl_s = ttl_s
        self._last: OrderedDict[str, float] = OrderedDict()  # in the order last heard: longest silent first
        self._latest = float("-inf")  # when anyone (a client, or another party: ``noted``) was last heard from
        self._reconnects: dict[str, tuple[int, float]] = {}  # its count, and when it last grew
        # its processes' starts (``ClientAlive.incarnation``), each when last heard
        self._starts: dict[str, dict[str, float]] = {}
        self._link = link
        self._link_reconnects = link()[1] if link is not None else 0

    def heard(self, client: str, now: float, reconnects: int = 0, incarnation: str = "") -> bool:
        """Note ``client`` as there ``now``. True when it says its connection came back since it
        was last heard from (``ClientAlive.reconnects`` grew), or it is a process started again
        (an ``incarnation`` not heard lately under its name: a restarted one counts from 0, and the
        count it had was remembered, so it was never sent what it missed: a helper's finding); at
        most once per ``ANNOUNCE_S``, for these are the client's word: it may have missed replies,
        to be sent again. Several processes may share a name: each start is news once."""
        self.noted(now)
        before, grew_at = self._reconnects.get(client, (0, -ANNOUNCE_S))
        starts = self._starts.setdefault(client, {})
        for start in [k for k, t in starts.items() if now - t > STARTS_KEPT_S]:  # processes that stopped
            del starts[start]
        started = client in self._last and incarnation not in starts and len(starts) < MAX_STARTS
        missed = (reconnects > before or started) and now - grew_at >= ANNOUNCE_S  # (first heard after one too)
        self._reconnects[client] = (reconnects, now) if missed else (before, grew_at)
        if missed or not started:  # (a start not taken yet stays news)
            starts[incarnation] = now
        self._last[client] = now
        self._last.move_to_end(client)
        # Forget clients gone long ago (their requests were dropped then) and any past the cap, from
        # the longest silent: each announcement costs O(1), however many clients announce (a full
        # sweep per announcement made a burst of 20,000 names stall a cluster for minutes).
        while self._last:
            oldest, t = next(iter(self._last.items()))
            if now - t < 100 * self.ttl_s and len(self._last) <= MAX_CLIENTS:
                break
            del self._last[oldest]
            self._reconnects.pop(oldest, None)
            self._starts.pop(oldest, None)
        return missed

    def noted(self, now: float) -> None:
        """Someone (a client, or another party: a worker's stats, Redis, a request) was heard ``now``. The first
        after a silence of everyone longer than the TTL forgives every client (``forgive``): the
        silence was the observer's, and a client's own announcement may come a second later."""
        if now - self._latest > self.ttl_s:
            self.forgive(now)
        self._latest = max(self._latest, now)

    def forgive(self, now: float) -> None:
        """Count every known client as heard from ``now``: the observer's own connection was down,
        so their silence meanwhile says nothing about them."""
        self._last = OrderedDict.fromkeys(self._last, now)
        self._latest = now

    def gone(self, client: str, now: float, silent_s: float | None = None) -> bool:
        """True when ``client`` was heard from and has been silent for more than the TTL (or
        ``silent_s``) plus ``FAILOVER_S``, while someone else (another client, or a party
        ``noted``) was heard from meanwhile. When the observer heard no one for that long, the
        silence is more likely its own: its host cut off from the others while its local NATS node
        stayed up (so no reconnect says so); a request
        that reached it right after the link came back, before the first announcement did, was
        dropped for a client that was there (the deploy test's worker host cut off). Workers note
        each heartbeat Redis took and each request that came; dispatchers each worker's stats."""
        self.watch_link(now)
        last = self._last.get(client)
        silence = (silent_s or self.ttl_s) + FAILOVER_S
        return last is not None and now - last > silence and now - self._latest <= self.ttl_s

    def watch_link(self, now: float) -> None:
        """While the observer's own NATS connection is down, and at the first look after it came
        back, every client counts as heard ``now`` (``forgive``): what they announced meanwhile
        never reached it. Redis heard meanwhile (``noted``) says nothing of that: a NATS restart
        of 9 s stopped every stream with a client, a gateway's included (a helper's finding). Called
        by ``gone`` and now and then by its owner: a first look long after the link came back would
        forgive a client silent since before it (a review)."""
        if self._link is None:
            return
        connected, reconnects = self._link()
        if not connected or reconnects != self._link_reconnects:
            self._link_reconnects = reconnects
            self.forgive(now)


def link_of(nc: NATS) -> Callable[[], tuple[bool, int]]:
    """``nc``'s state as ``Clients`` reads it: whether it is connected, and how often it came back."""
    return lambda: (nc.is_connected, nc.stats["reconnects"])


async def announce(nc: NATS, client: str, stop: asyncio.Event, subject: str = subjects.CLIENTS) -> None:
    """Say ``client`` is there every ``ANNOUNCE_S`` until ``stop``, with how often its connection
    came back, on ``subject`` (an application's: ``subjects.clients_of(user)``); a NATS outage is
    ridden out."""
    outage = bus.Outage("client announcements (nats)")
    incarnation = secrets.token_hex(6)  # this start: a reader started again has none of its replies
    while not stop.is_set():
        try:
            alive = ClientAlive(client=client, reconnects=nc.stats["reconnects"], incarnation=incarnation)
            await bus.publish(nc, subject, alive)
            outage.succeeded()
        except Exception as e:  # noqa: BLE001 - a missed announcement is repeated next second
            outage.failed(e)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(ANNOUNCE_S):
                await stop.wait()
