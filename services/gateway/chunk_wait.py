"""The gateway's wait for a request's next reply chunk: how long it waits, and when it gives up on
a request nobody holds any more. Split from ``main.py`` (its I/O is passed in)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import msgspec

from dlora.common import bus
from dlora.common.inflight import Inflight
from dlora.common.messages import TokenChunk
from dlora.services.gateway.responses import RunningChoice

_decode_chunk = msgspec.json.Decoder(TokenChunk)


async def next_chunk(
    replies: asyncio.Queue[bytes],
    late: RunningChoice,
    timeout_s: float,
    *,
    check_s: float,
    record: Callable[[str], Awaitable[Inflight | None | bool]],
    stepped_since: Callable[[str, float], bool],
    subject: str,
    patient: bool = False,
) -> TokenChunk | None:
    """The next reply to this request, decoded; after ``timeout_s`` without one, an
    UNAVAILABLE error for ``late`` (a choice not over yet), or sooner once ``late``'s in-flight
    ``record`` is found gone at two checks in a row, ``check_s`` apart (``2 × heartbeat_ttl_s``),
    with nothing heard: nobody holds it (it was dropped or lost on the way), so nothing more will
    come. ``record`` answers False where Redis cannot say (or holds other data since: after a
    restart without persistence a record can be missing only because the data went).
    ``patient``: the wait starts again at a check that finds the worker its record names live
    and stepping since the last (``stepped_since``: the request waits its turn in a busy worker's
    queue; vLLM has no queue timeout either); a worker that stops stepping, or goes, still times
    it out. None: a reply that does not decode (logged and counted as a reject on ``subject``)."""
    deadline = time.monotonic() + timeout_s
    missing, since = 0, time.monotonic()  # the holder must have stepped since (the last check)
    while True:
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow the handler's
        # cancellation when get() completes at the same moment (CPython #86296), and the
        # request then ran to the end for a client long gone.
        try:
            async with asyncio.timeout(min(check_s, deadline - time.monotonic())):
                data = await replies.get()
            break
        except TimeoutError:
            if time.monotonic() >= deadline:
                return late.unanswered("no worker answered in time")
        assert late.request is not None  # (a choice that runs was handed a request)
        found = await record(late.request.request_id)
        missing = missing + 1 if found is None else 0
        if missing >= 2:
            return late.unanswered("the request was lost on its way to a worker; try again")
        now = time.monotonic()
        if patient and isinstance(found, Inflight):
            if stepped_since(found.worker, since):
                deadline = now + timeout_s
        since = now
    try:
        return _decode_chunk.decode(data)
    except msgspec.DecodeError as e:
        bus.reject(subject, "(reply)", TokenChunk, e)
        return None
