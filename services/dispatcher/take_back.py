"""A new request's in-flight record whose write was cut off (``bus.StateBound``: Redis hung past
2 s), taken back once Redis answers. Its client was told UNAVAILABLE; but Redis may run the write
when it wakes, and then the record named a worker that never got the request: that worker's sweep
handed it back and it ran for nobody (or an application's retry under the same id met it as a
duplicate, and waited out its timeout)."""

from __future__ import annotations

import asyncio

from dlora.common import bus, log
from dlora.common.state import StateStore

logger = log.get("dispatcher")

# Seconds between tries while Redis fails, and how long to keep trying (an in-flight record's TTL
# ends it anyway after 10 minutes).
RETRY_S = 1.0
GIVE_UP_S = 120.0


async def take_back(store: StateStore, request_id: str, worker: str, attempt: int, retry_s: float = RETRY_S) -> None:
    """Delete ``request_id``'s record if it names ``worker`` and ``attempt`` (``delete_inflight``'s
    expect: a record written since by another dispatcher stays), until two deletes have been
    answered ``retry_s`` apart: the cut-off write sat on another pooled connection, which a Redis
    waking from a hang may read after the first delete, in the same turn of its loop, but not after
    a reply sent a second later. Never raises: a take-back that gives up is logged."""
    answered, deadline = 0, asyncio.get_running_loop().time() + GIVE_UP_S
    while answered < 2:
        await asyncio.sleep(retry_s)
        try:
            async with asyncio.timeout(2 * retry_s + 1.0):
                if not await store.delete_inflight(request_id, expect=(worker, attempt)):
                    return  # another dispatcher's record now: not ours to take
            answered += 1
        except bus.STATE_OUTAGE:
            answered = 0
            if asyncio.get_running_loop().time() > deadline:
                logger.warning("a cut-off record not taken back; its worker hands it back", request=request_id)
                return
