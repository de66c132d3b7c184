"""The dispatcher's recovery side: a worker lost (its stats stopped, or it handed requests back)
has its in-flight requests re-dispatched from their Redis records, each resuming after the tokens
its client has; a request with no live worker to go to waits for one (``orphans.py``) unless its
client aborts it. A mixin of ``Dispatcher`` (``main.py``), which holds the state and the sending."""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import TYPE_CHECKING

import msgspec

from dlora.common import bus, log
from dlora.common.aborts import Aborts
from dlora.common.clients import Clients
from dlora.common.inflight import Inflight
from dlora.common.lograte import RateLimiter
from dlora.common.messages import (
    MAX_RECOVERIES,
    AbortRequest,
    AdapterEntry,
    ErrorCode,
    FinishReason,
    GenerateRequest,
    LostRequests,
    TokenChunk,
    WorkerStats,
)
from dlora.common.state import StateStore
from dlora.services.dispatcher import hand_backs
from dlora.services.dispatcher.metrics import DispatcherMetrics, Refusal
from dlora.services.dispatcher.orphans import OrphanWait
from dlora.services.dispatcher.rechecks import Rechecks
from dlora.services.dispatcher.settings import DispatcherSettings

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS

logger = log.get("dispatcher")
_hand_backs = RateLimiter(burst=10, interval_s=10.0)  # (kind: the worker)


class Recovery:
    """Re-dispatching what lost workers held; ``Dispatcher`` provides the attributes declared here."""

    s: DispatcherSettings
    nc: NATS
    store: StateStore
    clients: Clients
    orphans: OrphanWait
    rechecks: Rechecks
    metrics: DispatcherMetrics

    @property
    def workers(self) -> dict[str, tuple[WorkerStats, float]]:
        raise NotImplementedError

    def live(self) -> list[WorkerStats]:
        raise NotImplementedError

    async def _dispatch(
        self,
        req: GenerateRequest,
        raw: bytes | None = None,
        expect: tuple[str, int] | None = None,
        died: bool = False,
        avoid: frozenset[str] = frozenset(),
        again: bool = False,
        holding: bool = False,
        allowed: AdapterEntry | None = None,
    ) -> None:
        raise NotImplementedError

    async def _fail(
        self,
        req: GenerateRequest,
        seq: int,
        reason: str,
        kind: Refusal,
        code: ErrorCode = ErrorCode.INTERNAL,
        expect: tuple[str, int] | None = None,
    ) -> None:
        raise NotImplementedError

    @functools.cached_property
    def aborted(self) -> Aborts:
        """Aborts heard lately: one sent while its request's worker was dead (restarting under
        systemd, say) reached no worker that would remember it, and the request was re-dispatched
        and ran to its end (a helper's finding). Looked at first by a recovery (``_recover``),
        the intake and every later look at a request (``_ended_if_aborted``)."""
        return Aborts()

    async def _on_abort(self, abort: AbortRequest) -> None:
        await self._heard_abort(abort.request_id, None)

    async def _on_app_abort(self, abort: AbortRequest, sender: str) -> None:
        await self._heard_abort(abort.request_id, sender)

    async def _heard_abort(self, request_id: str, sender: str | None) -> None:
        """Remember the abort, and end its request where it waits here: for a live worker (an
        orphan) or to be looked at again (``rechecks.py``, whose look then finds the abort)."""
        now = time.monotonic()
        self.aborted.add(request_id, sender, now)
        self.rechecks.wake(request_id, lambda req: self._aborted_lately(req, now))
        await self._drop_orphan(request_id, sender)

    async def _drop_orphan(self, request_id: str, sender: str | None) -> None:
        """An abort of a request waiting here for a worker (``orphans.py``): its record goes, so no
        worker runs it later. Only workers heard aborts, and none was live: a gateway whose
        chunk timeout ran out answered its client and aborted, and the request was still run, for
        nobody, once a worker came (a review). Its reader gets the abort's last chunk, as a worker
        answers one (a trial: the stream stayed open). ``sender``: an application's abort, which
        stops only its own requests."""
        if request_id not in self.orphans:
            return
        rec = await self.store.get_inflight(request_id)
        if rec is None or (sender is not None and rec.request.owner != sender):
            return
        if rec.worker not in {w.worker for w in self.live()}:  # still waiting
            await self._end_aborted(rec.request, rec.next_seq, (rec.worker, rec.recoveries))
            self.orphans.over(request_id)

    def _aborted_lately(self, req: GenerateRequest, now: float) -> bool:
        """Whether a gateway's abort of ``req`` was heard lately, or its own sender's (an
        application's abort stops only its own requests)."""
        return self.aborted.lately(req.request_id, None, now) or self.aborted.lately(req.request_id, req.owner, now)

    async def _ended_if_aborted(self, req: GenerateRequest, expect: tuple[str, int] | None = None) -> bool:
        """Whether ``req``'s abort was heard lately (``_aborted_lately``): then it is ended with the
        abort's last chunk, at the intake and at every later look alike. ``expect``: a re-dispatch of
        the record naming that worker and attempt, which goes first (needs Redis; nothing is sent
        where another dispatcher took it meanwhile), as a recovery ends one (``_end_aborted``);
        None: a request with no record of ours (none: needs no Redis)."""
        if not self._aborted_lately(req, time.monotonic()):
            return False
        if expect is None:
            await self._answer_aborted(req, req.next_seq, req.recoveries)
        else:
            await self._end_aborted(req, req.next_seq, expect)
        return True

    async def _end_aborted(self, req: GenerateRequest, seq: int, held: tuple[str, int]) -> None:
        """End the aborted request ``req``, its record held by ``held`` (worker, attempt), unless
        another dispatcher took it meanwhile: its record goes, and its reader gets the abort's last
        chunk of that attempt, numbered ``seq``, as a worker answers one."""
        if await self.store.delete_inflight(req.request_id, held):
            await self._answer_aborted(req, seq, held[1])

    async def _answer_aborted(self, req: GenerateRequest, seq: int, recoveries: int) -> None:
        """Send ``req``'s reader the abort's last chunk of attempt ``recoveries``, numbered ``seq``,
        as a worker answers one (``aborted_chunk``): its stream ends, and its sender learns the abort took."""
        last = TokenChunk(request_id=req.request_id, seq=seq, finish_reason=FinishReason.ABORT, recoveries=recoveries)
        await bus.publish(self.nc, req.reply_to, last)

    async def _on_lost(self, lost: LostRequests) -> None:
        """A worker's in-flight records of requests it does not hold (it restarted, or their
        message never came) or will not finish (it is stopping): re-dispatch each whose record
        is still that worker's."""
        # one line a hand-back, and a client asking again and again for a damaged adapter makes one
        # each time: bounded, with the count held back (a helper's finding)
        if (logged := _hand_backs.allow(lost.worker))[0]:
            logger.warning(
                "worker handed back requests",
                worker=lost.worker,
                requests=len(lost.requests),
                like_this_not_logged=logged[1],
            )
        if lost.draining and not self.live():  # nowhere to go now: left to the usual recovery
            logger.warning("no other worker to take a stopping worker's requests", worker=lost.worker)
            return
        for rid, attempt in lost.requests.items():
            died = not lost.draining and rid not in lost.never_arrived
            refused = rid in lost.never_arrived and not lost.draining  # refused there, not lost with it
            try:  # one record Redis failed on must not hold up the rest: the worker hands it back again
                rec = await self.store.get_inflight(rid)
                if rec is None or rec.worker != lost.worker or rec.recoveries != attempt:
                    continue  # over, or another dispatcher's now
                if refused and (rec := await self._handed_back_by(rec)) is None:
                    continue
                holding = rid in lost.elsewhere  # only a worker holding its adapter's version
                if (waited := lost.queued_s.get(rid)) is not None:
                    rec = _waited(rec, waited)
                avoid = frozenset() if died else frozenset({lost.worker})
                await self._recover(rec, died=died, avoid=avoid, holding=holding)
            except bus.STATE_OUTAGE as e:
                logger.warning("handed-back request not re-dispatched yet", request=rid, error=type(e).__name__)
            except Exception as e:  # nor one that cannot be read (an older release's, under looser
                # bounds: a review) or re-sent: logged, the rest go on
                logger.exception("handed-back request not recovered", request=rid, error=type(e).__name__)

    async def _handed_back_by(self, rec: Inflight) -> Inflight | None:
        """``rec`` with its worker added to the workers that handed it back, in Redis too, where
        any dispatcher that re-dispatches it reads them (``hand_backs.py``); None where the record
        changed hands meanwhile (another dispatcher's now)."""
        handed = hand_backs.added(rec.handed_back, rec.worker, time.time())
        if not await self.store.note_handed_back(rec.request.request_id, (rec.worker, rec.recoveries), handed):
            return None
        return dataclasses.replace(rec, handed_back=handed)

    async def recover(self, worker: str, incarnation: str, stopped: bool = False) -> None:
        """Forget ``worker``'s start ``incarnation`` (not a later one's heartbeat) and re-dispatch
        what it held. ``stopped``: that start drained and stopped (SIGTERM), which is not a loss:
        neither logged nor counted as one (a rolling restart fired every alert on
        dlora_worker_losses_total). Its line is "worker left", not the worker's own last line
        ("worker stopped", ``log.stopped``): one event name for both made a query of the logs
        for stops count each drained worker twice, and the dispatcher's line carries no ``drained``."""
        if not await self.store.forget_worker(worker, incarnation):
            # A later start beats under the id: what the records name there is its to run, or, the
            # lost start's, its to hand back (its sweep), not ours to run again (a review).
            logger.info("worker restarted under its id: its new start hands back what was lost", worker=worker)
            return
        if stopped:
            logger.info("worker left", worker=worker)
        else:
            logger.warning("worker lost", worker=worker)
            self.metrics.losses.inc()
        await self._recover_on(worker)

    async def _recover_on(self, worker: str) -> None:
        """Re-dispatch every request recorded as in flight on ``worker``, and drop its index entries
        that name no record of it any more. Its line says "lost" where one record was of a start
        that did not stop cleanly, else "stopped" (a drain's hand-back went unheard)."""
        request_ids = await self.store.inflight_on(worker)
        stale: list[str] = []
        died = False  # whether a record was of a start that did not stop cleanly
        for rid in request_ids:
            try:  # one record that cannot be read or re-sent must not stop the watch (and the rest)
                rec = await self.store.get_inflight(rid)
                if rec is not None and rec.worker == worker:
                    # A start of the worker that drained and stopped handed this back; the message
                    # went unheard (no dispatcher up): not a death.
                    clean = await self.store.stopped_cleanly(worker, rec.incarnation)
                    died = died or not clean
                    await self._recover(rec, died=not clean)
                else:
                    stale.append(rid)
            except bus.STATE_OUTAGE:
                raise  # Redis down: the whole look is tried again
            except Exception as e:  # logged, not raised: see above; a sweep tries it again
                logger.exception("request not recovered", request=rid, error=type(e).__name__)
        await self.store.unindex(worker, stale)
        # Said only where there were some: every drained worker (a rolling restart, a host taken
        # out) wrote a warning about "a lost worker" with requests=0 after its "worker left".
        # By the records, not the caller's verdict: the last record's stop named the whole lot
        # (a lost start's request beside an earlier clean start's was said to be a stopped one's).
        if recovered := len(request_ids) - len(stale):
            what = "requests of a lost worker re-dispatched" if died else "requests of a stopped worker re-dispatched"
            logger.warning(what, worker=worker, requests=recovered)

    async def _recover_orphans(self) -> None:
        """Requests recorded on a worker that is neither heard from nor beating, which no loss
        re-dispatched: one whose recovery broke off (Redis failed over mid-way, the dispatcher
        restarted), or on a worker that died before this dispatcher heard of it. Without this
        sweep such a request would wait for its client's chunk timeout."""
        self.orphans.prune(time.monotonic())
        for worker in await self.store.indexed_workers():
            if worker in self.workers or await self.store.beating(worker):
                continue
            if await self.store.claim_recovery(f"{worker}:orphans", ttl_s=self.s.heartbeat_ttl_s):
                await self._recover_on(worker)

    async def _recover(
        self, rec: Inflight, died: bool = True, avoid: frozenset[str] = frozenset(), holding: bool = False
    ) -> None:
        """Re-dispatch a request given up on ``rec.worker`` as its next attempt, resuming after the
        tokens its client has; or fail it (``died``, and too many workers died with it before; or
        its client is judged gone: said, not dropped in silence, for a client that was only cut
        off for a while would otherwise wait out its chunk timeout). Each record is re-dispatched
        once, however many dispatchers try. Not ``died``: its message never reached the worker,
        or the worker is stopping; ``avoid``: workers to send it elsewhere than, if any other, beside
        those that handed it back lately (``rec.handed_back``, ``hand_backs.py``);
        ``holding``: only to a worker that holds its adapter's version (``_dispatch``)."""
        first = rec.request
        next_seq = rec.next_seq
        # A worker dead before it took the request up: not its death. One that does not mark (an
        # older version, in a rolling upgrade) is counted as before: unmarked is no proof there.
        died = died and (rec.taken or not rec.marks_taken)
        mine = (rec.worker, rec.recoveries)  # unless another dispatcher took it meanwhile
        now = time.monotonic()
        if self._aborted_lately(first, now):
            await self._end_aborted(first, next_seq, mine)
            return
        # Silent twice the TTL: a client cut off by the fault that lost the worker (its NATS node on
        # the worker's host) was silent about as long as the worker when it is found lost, and
        # was answered while it reconnected (the deploy test, now and then). A client truly gone is
        # dropped by the worker re-dispatched to, at its own look.
        if first.client and self.clients.gone(first.client, now, 2 * self.s.heartbeat_ttl_s):
            logger.warning("client silent; its request is answered, not re-dispatched", request=first.request_id)
            reason = "the request's worker was lost while its client was not heard from; try again"
            await self._fail(first, next_seq, reason, "client-gone", ErrorCode.UNAVAILABLE, expect=mine)
            return
        if died and rec.deaths >= MAX_RECOVERIES:
            # said in the log too (a trial: a give-up showed only in the client's error and a metric)
            logger.warning("request given up: its workers died with it", request=first.request_id, worker=rec.worker)
            await self._fail(
                first,
                next_seq,
                f"the request was in flight on {rec.deaths + 1} workers that "
                f"died, the last {rec.worker}; it is not retried again, since it may be what stops them",
                "gave-up",
                expect=mine,
            )
            return
        # Recomputed from its tokens: a cache once shipped to the lost worker is gone with it.
        resumed = msgspec.structs.replace(
            first,
            resume_token_ids=[*first.resume_token_ids, *rec.tokens],
            resume_text_pending=rec.text_pending,
            resume_text_held=rec.text_held,
            next_seq=next_seq,
            kv_chunks=0,
            kv_transfer="",
            kv_export_s=0.0,
            recoveries=rec.recoveries + 1,
            continued=True,
        )
        avoid |= hand_backs.avoided(rec.handed_back, time.time())
        await self._dispatch(resumed, expect=(rec.worker, rec.recoveries), died=died, avoid=avoid, holding=holding)


def _waited(rec: Inflight, seconds: float) -> Inflight:
    """``rec`` with the queue time the worker handing it back said it has (its wait there, which
    the record, written before, lacks; the next attempt's first chunk says it), bounded by the time
    the request has been in the system (a worker's figure, bounded all the same)."""
    age = max(0.0, time.time() - rec.request.created) if rec.request.created else float("inf")
    request = msgspec.structs.replace(rec.request, queued_s=min(max(0.0, seconds), age))
    return dataclasses.replace(rec, request=request)
