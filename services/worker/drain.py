"""What a worker told to stop (SIGTERM: ``systemctl stop``) does before it exits: say so in its
stats at once, finish what runs for ``drain_timeout_s``, hand the rest back to a dispatcher.
Functions of the running ``WorkerService`` (its commands, streams and records)."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from dlora.common import bus, log, subjects
from dlora.common.messages import LostRequests
from dlora.services.worker import beats
from dlora.services.worker.arrival import stop_preparing
from dlora.services.worker.commands import Add
from dlora.services.worker.engine.sequence import Status
from dlora.services.worker.move_out import queued
from dlora.services.worker.move_out import waited as waited_since
from dlora.services.worker.one_id import give_up, successor

if TYPE_CHECKING:
    from dlora.services.worker.main import WorkerService

logger = log.get("worker")
T = TypeVar("T")

# Seconds each of a stopping worker's Redis calls may take. With Redis hung (SIGSTOP, a partition,
# a paused VM) each waited out redis-py's tries (4 x 5 s): is the id another's now, what came late,
# the clean-stop mark, the heartbeat's removal, one after the other, so an idle worker took 86 s to
# stop, past the units' TimeoutStopSec (60 s), and was killed outright. Once one failed the rest
# are not tried: what they leave undone is left as a crash leaves it (the records recovered after
# the heartbeat's TTL).
STOP_STATE_S = 2.0


def stop_bound() -> bus.StateBound:
    """The bound of one stop's Redis work (``STOP_STATE_S`` a call; none tried after a failure)."""
    return bus.StateBound(STOP_STATE_S, pause_s=math.inf)


async def _bounded(w: WorkerService, call: Callable[[], Awaitable[T]]) -> T:
    """``call()`` under the stop's bound (raising as a Redis outage does)."""
    async with w.leaving():
        return await call()


async def start(w: WorkerService) -> float:
    """Be given nothing new: stats saying so go out at once (the dispatcher and the migrator
    leave a draining worker alone). When the drain ends (monotonic seconds)."""
    w.draining = True
    w.stats, w._snapshot_at = w._snapshot(), time.monotonic()
    with contextlib.suppress(Exception):  # NATS down: the next stats say it
        await bus.publish(w.nc, subjects.stats(w.s.worker_id), beats.outgoing(w))
    logger.info("draining", requests=len(w.streams), timeout_s=w.s.drain_timeout_s, now="signal again to hand over now")
    return time.monotonic() + w.s.drain_timeout_s


async def hand_over(w: WorkerService, died: bool = False) -> None:
    """Give what still runs here after the drain back to a dispatcher, which runs each on
    another worker from the tokens its client has (its in-flight record says which); not a
    death (``LostRequests.draining``) unless the worker ``died`` (its device failed: a request
    that breaks every GPU it runs on must not go round them all). Unsent (NATS down), they are
    recovered anyway once this worker's heartbeat is gone."""
    held: dict[str, int] = {}
    waited: dict[str, float] = {}  # the queue time of those whose client has no token yet
    unrun: list[str] = []  # after a device loss: requests in no step, not its death even if marked taken
    # Requests that came during the drain go back unrun: those still waiting on arrival (for a
    # moved cache, a grammar or a long prompt's tokens; stopped first, so that none joins the queue after it is read)
    # and those queued.
    came = [(p.req, p.arrived) for p in stop_preparing(w)]
    while not w.commands.empty():
        if isinstance(cmd := w.commands.get_nowait(), Add):
            came.append((cmd.req, cmd.arrived))
        elif not died:  # a dead device runs nothing more: a move's KV export raised there (a review)
            await w._safely(cmd)
    for req, arrived in came:
        held[req.request_id] = req.recoveries
        # its wait on arrival here (a grammar's compile can take minutes) is queue time too
        if not req.resume_token_ids and (wait := waited_since(req, arrived or time.monotonic())) > 0:
            waited[req.request_id] = wait
        w.pending.discard(req.request_id)
        if died:
            unrun.append(req.request_id)
    if died and (culprit := w.admitting) is not None:  # the device failed while it took this one up
        held.setdefault(culprit.request_id, culprit.recoveries)
    for rid, stream in list(w.streams.items()):
        held[rid] = stream.request.recoveries
        seq = w.engine.seqs.get(rid)
        if (wait := queued(w, stream, seq.scheduled_at if seq is not None else None)) > 0:
            waited[rid] = wait  # (its record's queued_s lacks its wait here: its next worker adds on)
        if died and _never_scheduled(w, rid):  # admitted, then waited: the device failed in others' steps
            unrun.append(rid)
        elif rid in unrun:  # another copy of it waited (a later attempt, one delivered late): this one ran
            unrun.remove(rid)
        await w.drop(rid, record=False, attempt=stream.request.recoveries)
    w.handed_over = set(held)  # not handed back late, even if what follows fails (a review)
    later = None
    with contextlib.suppress(*bus.STATE_OUTAGE):  # (successor says None where Redis cannot tell)
        later = await _bounded(w, lambda: successor(w.store, w.stats, w.s.heartbeat_ttl_s))
    if later is not None:
        give_up(w, later, "nothing handed over")  # stopped, then silent long enough to be replaced
        return
    try:
        if w.records.behind:  # the records must say what the clients have (and which ended)
            await _bounded(w, lambda: w.records.write({}))
        if not held:
            return
        handed = LostRequests(
            worker=w.s.worker_id, requests=held, draining=not died, never_arrived=unrun, queued_s=waited
        )
        await bus.publish(w.nc, subjects.LOST, handed)
        await bus.flush(w.nc, round_trip_s=2)
        logger.info("handed over at stop", requests=len(held))
    except Exception as e:  # noqa: BLE001 - see the docstring
        logger.warning("hand-over not sent; recovered after the heartbeat TTL", error=f"{type(e).__name__}: {e}")


def _never_scheduled(w: WorkerService, request_id: str) -> bool:
    """Whether the request waited here and was in no step: waiting for its adapter's read (a moved
    one with its KV too), or nothing of it computed or cached (a step's batch holds its blocks),
    never preempted (which would have freed them after it ran), and its adapter not in a switch
    that raised (a merge comes before the step's scheduling: one that lost the device is its
    requests' doing, a review)."""
    seq = w.engine.seqs.get(request_id)
    if seq is not None and seq.adapter in w.engine.loading:
        return True
    return (
        seq is not None
        and seq.status is Status.WAITING
        and not seq.num_cached
        and not seq.num_preemptions
        and not w.engine.blocks.holds(request_id)
        and seq.adapter not in w.engine.switching
    )


async def device_lost(w: WorkerService, e: Exception) -> None:
    """The device failed for good (``engine.faults``): nothing more runs here, so every request is
    handed over at once, as at the end of a drain but as a death (each one's ``recoveries`` count
    it); the worker then exits with the error and its supervisor (systemd, ``dlora up``) starts
    a new process, with a new device context."""
    logger.error("the device failed for good: handing every request over", error=str(e))
    w.device_failed = True
    if not w.draining:  # stats saying so go out at once: dispatchers send nothing more here
        await start(w)
    await hand_over(w, died=True)


async def hand_back_late(w: WorkerService) -> None:
    """Once the worker has stopped listening: hand back every record still naming it, requests a
    dispatcher sent before it heard of the drain whose message came after ``hand_over`` (or never
    came). Handed back as a drain's, not a death; otherwise they would wait for the heartbeat
    TTL and count as one. Best effort: what is not sent is recovered after the TTL."""
    try:
        late, _ = await _bounded(w, lambda: w.store.sweep_inflight(w.s.worker_id, w.incarnation, w.handed_over, 0.0))
        if late:  # after a device loss none of them ran: they came after the hand-over (a trial)
            unrun = list(late) if w.device_failed else []
            lost = LostRequests(worker=w.s.worker_id, requests=late, draining=not w.device_failed, never_arrived=unrun)
            await bus.publish(w.nc, subjects.LOST, lost)
            await bus.flush(w.nc, round_trip_s=2)
            w.handed_over.update(late)  # (the stop's last line counts them: they went elsewhere too)
            logger.info("handed back requests that came after the hand-over", requests=len(late))
    except Exception as e:  # noqa: BLE001 - see the docstring
        logger.warning("late hand-back not sent; recovered after the heartbeat TTL", error=f"{type(e).__name__}: {e}")


async def leave(w: WorkerService) -> None:
    """Last, once the worker has stopped listening: after a drain, hand back what came late and
    mark this start's stop clean; then remove its heartbeat and placement."""
    if w.draining:
        await hand_back_late(w)
        if not w.device_failed:  # a stop, not a death: without it, what is left counts as one
            with contextlib.suppress(*bus.STATE_OUTAGE):
                await _bounded(w, lambda: w.store.mark_stopped(w.s.worker_id, w.incarnation))
    with contextlib.suppress(*bus.STATE_OUTAGE):  # its heartbeat expires by itself anyway
        await _bounded(w, lambda: w.store.forget_worker(w.s.worker_id, w.incarnation))  # (not a successor's: one_id.py)
    # "draining" was, and the journal did not say the drain ended, nor how many requests finished
    # here rather than went to another worker.
    log.stopped("worker", drained=w.draining and not w.device_failed, handed_over=len(w.handed_over))
