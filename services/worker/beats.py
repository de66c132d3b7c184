"""What a worker tells the cluster of itself every ``stats_interval_s``: its stats on NATS, then its
heartbeat, adapter placement and batching policy's checkpoint in Redis; and its stats at once when
it falls idle (``WorkerService.fell_idle``), so that a dispatcher does not go on taking it for busy.

A trial: right after a burst of 40 requests ended, the next burst went 0/40, 8/32 and 7/33 to the
other worker (with a gap of 1 s between them, 19/21): the worker's last stats, taken mid-burst,
said it was busy until its next interval. Early stats go out at most every quarter interval: a
worker that serves one request at a time falls idle after each.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import msgspec

from dlora.common import bus, subjects
from dlora.services.worker.one_id import give_up, taken_over

if TYPE_CHECKING:
    from dlora.common.messages import WorkerStats
    from dlora.services.worker.main import WorkerService

LIST_EVERY_S = 10.0  # how often the registry's adapters are listed (their ranks, for the metrics)


async def publish_stats(w: WorkerService, stop: asyncio.Event) -> None:
    """Until ``stop``: ``w``'s stats and heartbeat every ``stats_interval_s``, and its stats as soon
    as it falls idle (not sooner than a quarter interval after the last)."""
    outage = bus.Outage("stats and heartbeat (nats, redis)")
    interval = w.s.stats_interval_s
    beat_at = -interval  # when the heartbeat last went to Redis
    while not stop.is_set() and w.taken_over_by is None:
        w.delivery.reconnected()  # what went out meanwhile may be lost: sent again
        w.clients.watch_link(time.monotonic())  # and the clients' silence was ours (as of now)
        stats = outgoing(w)
        try:
            await bus.publish(w.nc, subjects.stats(w.s.worker_id), stats)
            w.records.beat()
            if time.monotonic() - beat_at >= interval / 2:  # (an early one's stats alone)
                beat_at = time.monotonic()
                await _heartbeat(w, stats)
            outage.succeeded()
        except Exception as e:  # noqa: BLE001 - a missed beat is retried next interval
            outage.failed(e)
        sent_at = time.monotonic()
        waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(w.fell_idle.wait())]
        await asyncio.wait(waits, timeout=interval, return_when=asyncio.FIRST_COMPLETED)
        for waiting in waits:
            waiting.cancel()
        if w.fell_idle.is_set() and not stop.is_set():
            w.fell_idle.clear()
            await asyncio.sleep(max(0.0, sent_at + interval / 4 - time.monotonic()))


def outgoing(w: WorkerService) -> WorkerStats:
    """``w``'s last snapshot (``w.stats``) as every stats message of it goes out, the periodic ones
    and a drain's first alike: with the moves it refused lately (``MoveRefusals.stated``), when sent
    (Unix seconds) and its ``stats_interval_s``. A drain's own message lacked the three: a migrator
    reading it took the worker's interval from the gap between two stats, and its refusals as none
    (a review: one message of another shape among a worker's stats)."""
    stats = w.refusals.stated(w.stats, time.monotonic(), w.streams)
    return msgspec.structs.replace(stats, sent=time.time(), stats_interval_s=w.s.stats_interval_s)


async def _heartbeat(w: WorkerService, stats: WorkerStats) -> None:
    """The heartbeat, placement and policy checkpoint in Redis; bounded: a Redis that hangs must
    not hold up the next beat on NATS (that silence would count as a stall)."""
    async with asyncio.timeout(w.s.stats_interval_s):
        before = await w.store.heartbeat(stats, w.s.heartbeat_ttl_s)
        if taken_over(stats, before):  # a later start beats under the id: it is the other's now
            give_up(w, before, "stopping")
            await w.store.heartbeat(before, before.heartbeat_ttl_s or w.s.heartbeat_ttl_s)  # its beat back
            return
        w.records.beat()
        w.clients.noted(time.monotonic())  # Redis's host reached: not cut off
        await w.store.set_placement(w.s.worker_id, sorted({a.name for a in stats.adapters}))
        await w.store.save_policy(w.s.worker_id, w.engine.policy.checkpoint())
    if time.monotonic() - w.listed_at > LIST_EVERY_S:  # for the residency metric's disk tier
        w.listed_at = time.monotonic()
        async with asyncio.timeout(w.s.stats_interval_s):  # (unbounded, a hung Redis stopped the stats 20 s)
            w.registered = {e.name: e.rank for e in await w.store.list_adapters()}
        w.adapters.listed = set(w.registered)  # the credit of those gone goes (``tidy``, between steps)
