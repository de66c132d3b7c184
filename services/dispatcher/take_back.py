"""A new request's in-flight record whose write was cut off (``bus.StateBound``: Redis hung past
2 s), taken back once Redis answers. Its client was told UNAVAILABLE; but Redis may run the write
when it wakes, and then the record named a worker that never got the request: that worker's sweep
handed it back and it ran for nobody (or an application's retry under the same id met it as a
duplicate, and waited out its timeout)."""

from __future__ import annotations

import asyncio

from dlora.common import bus, log
from dlora.common.messages import GenerateRequest
from dlora.common.state import StateStore

logger = log.get("dispatcher")

# Seconds between tries while Redis fails, and how long to keep trying (an in-flight record's TTL
# ends it anyway after 10 minutes).
RETRY_S = 1.0
GIVE_UP_S = 120.0


async def take_back(store: StateStore, request: GenerateRequest, worker: str, retry_s: float = RETRY_S) -> None:
    """Delete ``request``'s record if it is the one this dispatcher's cut-off write made: naming
    ``worker`` and its attempt, holding this very request, never taken up there (its worker marks
    what it takes: ``Inflight.marks_taken``), until two looks ``retry_s`` apart have been answered
    (the cut-off write sat on another pooled connection, which a Redis waking from a hang may read
    after the first look, in the same turn of its loop, but not after a reply sent a second later).
    A record of anything else stays: an application's retry under the same id, recorded since, or
    the request already running under that id that a re-sent copy met (a review: taken back by id
    and attempt alone, both lost their records while they streamed). Never raises: a take-back
    that gives up is logged."""
    answered, deadline = 0, asyncio.get_running_loop().time() + GIVE_UP_S
    while answered < 2:
        await asyncio.sleep(retry_s)
        try:
            async with asyncio.timeout(2 * retry_s + 1.0):
                # one script: a worker marking it taken between a read and a delete kept it (a review)
                if not await store.delete_inflight(request.request_id, (worker, request.recoveries), untaken=request):
                    return  # not the write that was cut off, or one its worker runs
            answered += 1
        except bus.STATE_OUTAGE:
            answered = 0
            if asyncio.get_running_loop().time() > deadline:
                logger.warning("a cut-off record not taken back; its worker hands it back", request=request.request_id)
                return
