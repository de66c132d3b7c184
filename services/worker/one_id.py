"""One process per worker id: a worker does not start while another incarnation of its id still
beats in Redis (``{p}:worker:{id}``, rewritten every stats interval by a live worker).

A probe: ``dlora serve worker`` on two hosts from one dlora.toml without --worker-id (both
"worker-0"), and ``dlora up`` twice against one NATS and Redis (worker-0..N-1 each time), were
both accepted. Both processes subscribed to the id's subject and generated every request sent to
it, and the second, starting, took the first's running requests for its own previous
incarnation's and handed them back, to be computed again.

A restart after a crash must still start: the dead incarnation's key lives on until its TTL ends
(``heartbeat_ttl_s``; a test's 60 s), but is no longer rewritten. So a key found is watched until
it has not been rewritten for a few stats intervals, or half the TTL (a live worker that beats
later than that takes itself for stalled: ``WorkerSettings.check``), its age read on Redis's
clock; an ordinary start, with no key, waits for nothing.

The check at start cannot see a process that is silent then and beats again later: one stopped
(SIGSTOP, a paused VM) long enough to be taken for dead and replaced under its id, then resumed,
ran beside its replacement, both subscribed (a review); two started at the same instant both
passed. So every heartbeat reads the one it replaces (``StateStore.heartbeat``), and a process
that finds another incarnation there that started later than itself (``WorkerStats.started``, on
Redis's clock) gives the id up: it stops at once, sending nothing more and handing nothing back
(what the in-flight records name under the id is the later process's to hand back now), and
exits with an error. The later start always keeps the id: a replacement has taken the records
over, and of two simultaneous starts either would do, as long as both agree which.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

from dlora.common import bus, log
from dlora.common.messages import WorkerStats
from dlora.common.state import StateStore
from dlora.services.run import StartupError
from dlora.services.worker.settings import WorkerSettings

if TYPE_CHECKING:
    from dlora.services.worker.main import WorkerService

logger = log.get("worker")

# A live worker rewrites its key every stats interval (a write that times out skips one): a key
# not rewritten for this many intervals (or half the TTL, if sooner) was left by a dead one. Its
# interval is taken for this worker's own: one dlora.toml sets both.
_BEATS_MISSED = 4


async def refuse_if_taken(store: StateStore, s: WorkerSettings) -> float:
    """Return once no other incarnation of ``s.worker_id`` beats: at once when its key is not
    there; when it is there but no longer rewritten (a crash), after ``_BEATS_MISSED`` stats
    intervals or half ``heartbeat_ttl_s``, whichever is sooner, less the key's age (at least one
    interval). StartupError, naming the id, the incarnation that beats and the fix, while one does.
    Redis failing meanwhile lets it start, with a warning: the check is a guard, not a lock.
    Returns when it let this start through (``WorkerStats.started``): Unix seconds on Redis's clock,
    on this host's where Redis could not tell."""
    try:
        found = await store.beat_of(s.worker_id, s.heartbeat_ttl_s)
        if found is None:
            return await store.now()
        first, age = found
        # A stats interval at the least: a key that old may still be rewritten (a beat late).
        wait = max(min(s.heartbeat_ttl_s / 2, _BEATS_MISSED * s.stats_interval_s) - age, s.stats_interval_s)
        logger.info(
            "another incarnation's heartbeat found: waiting to see whether it still beats",
            other=first.incarnation,
            seconds=round(wait, 2),
        )
        until = time.monotonic() + wait
        while (left := until - time.monotonic()) > 0:
            await asyncio.sleep(min(left, s.stats_interval_s / 2))
            again = await store.beat_of(s.worker_id, s.heartbeat_ttl_s)
            if again is None:  # it stopped (and removed its key) or the key expired
                return await store.now()
            if (again[0].incarnation, again[0].sent) != (first.incarnation, first.sent):
                raise StartupError(_taken(s.worker_id, again[0].incarnation, again[0].draining))
        return await store.now()
    except bus.STATE_OUTAGE as e:
        logger.warning("could not tell whether the worker id is in use", error=f"{type(e).__name__}: {e}")
        return time.time()


def taken_over(mine: WorkerStats, before: WorkerStats | None) -> bool:
    """Whether ``before``, the heartbeat that ``mine`` replaced under one worker id, is another
    incarnation's that started later than ``mine``'s: then this process must give the id up. Ties
    of ``started`` are broken by the incarnation, so that of any two exactly one gives it up."""
    return (
        before is not None
        and before.incarnation != mine.incarnation
        and (before.started, before.incarnation) > (mine.started, mine.incarnation)
    )


async def successor(store: StateStore, mine: WorkerStats, ttl_s: float) -> WorkerStats | None:
    """The heartbeat under ``mine``'s id of a later start that took the id over (``taken_over``),
    read now: asked before a process that may have been silent sends anything on its id's behalf
    (a drain's hand-over, a sweep's hand-back). None if there is none, or Redis cannot tell."""
    with contextlib.suppress(*bus.STATE_OUTAGE):
        found = await store.beat_of(mine.worker, ttl_s)
        if found is not None and taken_over(mine, found[0]):
            return found[0]
    return None


def give_up(w: WorkerService, later: WorkerStats, so: str) -> None:
    """Have ``w`` give its id up to ``later``: it says so (``so``: what it does not do for it), and
    its loop stops at its next turn (``WorkerService.taken_over_by``)."""
    logger.warning(f"another worker process took this worker id over: {so}", other=later.incarnation)
    w.taken_over_by = later


def given_up(worker_id: str, later: WorkerStats) -> str:
    """The error a process that gave its id up to ``later`` exits with."""
    return (
        f"worker id {worker_id!r} was taken over by another worker process (incarnation "
        f"{later.incarnation}) that started while this one was silent (stopped, paused or cut off "
        "from Redis) or at the same time; this one stopped without handing anything back (the "
        "requests under the id are the other's); give each worker its own id if both are meant to run"
    )


def _taken(worker_id: str, incarnation: str, draining: bool) -> str:
    how = "drains under it (start this one once it has stopped), " if draining else "serves under it, "
    return (
        f"worker id {worker_id!r} is in use: another worker process (incarnation {incarnation}) {how}"
        "and both would run every request sent to it; give each worker its own id (--worker-id, "
        "or worker_id in [worker] of dlora.toml, DLORA_WORKER_ID)"
    )
