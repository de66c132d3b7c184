"""What the worker's loop does between steps besides its commands: stop the requests past their
deadline (looked for often), and reconcile what it holds with the in-flight records (every few
seconds). Functions of the running ``WorkerService``, as ``admit``'s are."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from dlora.common import log
from dlora.common.messages import ErrorCode
from dlora.services.worker.admit import hand_back_unheld
from dlora.services.worker.chunks import error_chunk, past_deadline
from dlora.services.worker.rerecord import record_again_if_lost

if TYPE_CHECKING:
    from dlora.services.worker.main import WorkerService

logger = log.get("worker")

# A record this fresh may be for a request whose message is still on its way here: not handed
# back. Records are reconciled this often too (or every quarter heartbeat TTL, if sooner).
HANDBACK_GRACE_S = 2.0
RECONCILE_REDIS_S = 1.0  # the most a reconcile's reads of Redis may hold the step loop, each
EXPIRE_EVERY_S = 0.05  # how late past its deadline a request may still be stopped, at most


async def expire(w: WorkerService) -> None:
    """Stop each request held here whose deadline passed (``GenerateRequest.deadline``), waiting
    or running: its reader gets the tokens sent so far, then an error saying why. Looked at
    every ``EXPIRE_EVERY_S``, not every step: a walk over every request held, on the loop."""
    now = time.time()
    if now - w.expired_at < EXPIRE_EVERY_S:
        return
    w.expired_at = now
    for rid, stream in list(w.streams.items()):
        if (late := past_deadline(stream.request, now)) is not None:
            await w.drop(rid)
            chunk = error_chunk(stream.request, ErrorCode.UNAVAILABLE, late, w.s.worker_id, seq=stream.seq)
            await w.delivery.publish(stream.reply_to, chunk, stream.request.client)


async def reconcile(w: WorkerService) -> None:
    """Between steps, every few seconds: write the records of the requests held here again if Redis
    lost its data, drop moved caches unclaimed (else kept until the next move came) and requests
    whose client has gone, and hand back what the in-flight records say is here but is not (a past
    incarnation's, or never came) for a dispatcher to re-dispatch. Redis's parts not while its writes
    fail (each waited out a hung Redis in the step loop), its reads each within ``RECONCILE_REDIS_S``."""
    w.kv_inbox.sweep()
    if not w.records.outage:
        await record_again_if_lost(w, RECONCILE_REDIS_S)
    now = time.monotonic()
    for rid, stream in list(w.streams.items()):
        if stream.request.client and w.clients.gone(stream.request.client, now):
            logger.info("request abandoned: its client is gone", request=rid, client=stream.request.client)
            await w.drop(rid)
            # said, for a reader that comes back (it is sent again with the chunks it missed):
            # without it, one that was away longer than the heartbeat TTL waited for ever (a trial)
            why = "the request was stopped: its client was not heard from for heartbeat_ttl_s"
            chunk = error_chunk(stream.request, ErrorCode.UNAVAILABLE, why, w.s.worker_id, seq=stream.seq)
            await w.delivery.publish(stream.reply_to, chunk, stream.request.client)
    await w.records.write_step({})  # what waits for Redis (a finished request's record going)
    if not w.records.outage:
        async with asyncio.timeout(RECONCILE_REDIS_S):
            await hand_back_unheld(w, min(HANDBACK_GRACE_S, w.s.heartbeat_ttl_s))
