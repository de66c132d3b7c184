"""The lease of a background response's run (``background``): a Redis key with a short TTL
(``StateStore.lease_response``; ``SPAN_HEARTBEATS`` times ``heartbeat_ttl_s``, the span after which
every service counts another gone) taken before its record is stored ``queued`` and renewed by the
gateway running it (``RunLease.hold``) while its record is still what that run last wrote. So a
gateway killed outright (SIGKILL, the OOM killer, its host lost) no longer leaves its runs
``queued`` or ``in_progress`` until ``responses_ttl_s``: the first reader after its lease lapsed (a
GET, a cancel, a ``previous_response_id``, a stream's reader, on any gateway) ends it ``failed``
(``settled``), by compare-and-swap, so of several such readers one writes. And a run whose record
changed under it (cancelled or deleted where NATS could not tell it, replaced by a retry or by a
foreground response of its id, failed by a reader) finds so at its next renewal and is stopped (its
request aborted on its worker), as a cancel heard on NATS stops it. A record an older gateway
wrote in a rolling upgrade (no ``leased`` mark: it took no lease) is not judged by a lease it never
had until a lease's span after a reader first found it so, on Redis's clock (``settled``)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgspec

from dlora.common import bus, log
from dlora.common.state import StateStore

if TYPE_CHECKING:  # (its reader, ``read``, ends a lapsed run's record here: ``settled``)
    from dlora.services.gateway.responses_read import Stored

logger = log.get("gateway")
Bound = Callable[[], AbstractAsyncContextManager[None]]
Finishing = Callable[[], Awaitable[bytes | None]]

# The error a response whose run was lost is failed with (OpenAI's ``server_error`` code)
LAPSED = "the gateway running this background response stopped (or lost Redis) before it ended"
# A lease's span in heartbeat_ttl_s: three (15 s by default), as a live run failed by a reader
# costs its client more than a dead gateway's runs learnt failed seconds later
SPAN_HEARTBEATS = 3
# Renewals per lease span (one a third of heartbeat_ttl_s): eight in a row may fail (Redis out,
# its bound waited out, a starved loop) before a reader may end it
RENEWALS = 9
_RUNNING = ("queued", "in_progress")


def running(status: object) -> bool:
    """Whether a stored response's ``status`` (``Stored.status``, ``Seen.status``: ``responses_read.read``)
    is queued or in progress."""
    return status in _RUNNING


def closing(failed: bytes) -> tuple[bytes, bytes]:
    """The ``response.failed`` event of ``failed`` (a response object, JSON: failed, or cancelled,
    which OpenAI's stream events have none of) framed as
    ``ResponsesShape`` frames its stream's events, in two parts around its sequence_number, which
    Redis counts as it appends it (``StateStore.end_unleased``, ``StateStore.swap_response``)."""
    head = b'event: response.failed\ndata: {"type":"response.failed","response":'
    return head + failed + b',"sequence_number":', b"}\n\n"


async def settled(
    state: StateStore, response_id: str, tenant: str, stored: Stored, legacy_s: float = 0.0
) -> bytes | None:
    """``stored`` (``tenant``'s response as just read: ``responses_read.read``) as it stands: one
    queued or in progress whose lease lapsed made ``failed`` (``LAPSED``) first, unless it changed
    meanwhile, a streamed one's stream ended with its ``response.failed`` event. One an older
    gateway wrote (a rolling upgrade: it took no lease) is its gateway's until ``legacy_s``
    seconds after a reader first found it so (a lease's span: as long as a run of ours is trusted
    unrenewed; timed on Redis's clock, not by its ``created_at``, which is its gateway's wall
    clock), then judged as lapsed (failed, it ran on for nobody, its end's write refused by its
    changed record).
    The caller bounds the Redis work. Returns its record (None: gone since it was read).

    Raises:
        ``bus.STATE_OUTAGE``: Redis failed.
    """
    if not running(stored.status):
        return stored.raw
    failed = stored.object | {"status": "failed", "error": {"code": "server_error", "message": LAPSED}}
    ended = msgspec.json.encode(failed)
    if (now := await state.end_unleased(response_id, tenant, stored.raw, ended, closing(ended), legacy_s)) == ended:
        logger.warning("a background response whose run was lost is failed", id=response_id)
    return now


@dataclass
class RunLease:
    """One run's lease: taken (``take``) before its record is stored, renewed (``hold``) every
    ``ttl_s / RENEWALS`` while the record is ``expect()`` (the run's last write). The run's own
    writes of its record hold ``lock``, so that a renewal never reads the record between a write
    and the run's note of it (and stops a run for a change of its own)."""

    state: StateStore
    bound: Bound
    response_id: str
    tenant: str
    holder: str  # the gateway's id (what the key holds: who ran it, for a reader of Redis)
    ttl_s: float
    expect: Callable[[], bytes | None]  # the record as the run last wrote it
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    over: bool = False  # the run wrote its end: nothing more to hold

    async def take(self) -> None:
        """Raises ``bus.STATE_OUTAGE``: Redis failed (then nothing is stored or run)."""
        async with self.bound():
            await self.state.lease_response(self.response_id, self.tenant, self.holder, self.ttl_s)

    async def hold(self, run: asyncio.Task[None]) -> None:
        """Renews the lease, at once (what storing its record took is renewed) then every
        ``ttl_s / RENEWALS``, until the run ends (its caller cancels this) or writes its end; cancels
        ``run`` once its record is not its own anymore. Redis failing is ridden out: where it lasts
        past the lease, a reader may end the response, which the next renewal then finds."""
        outage = bus.Outage(f"background response {self.response_id}'s lease (redis)")
        while not self.over:
            try:
                async with self.lock:
                    if self.over or (expect := self.expect()) is None:
                        return
                    async with self.bound():
                        ours = await self.state.lease_response(
                            self.response_id, self.tenant, self.holder, self.ttl_s, expect
                        )
            except Exception as e:  # noqa: BLE001 - Redis out, or any other error: tried again at the next
                outage.failed(e)  # (a renewal task that ended on one left a live run to a reader's lapse)
            else:
                outage.succeeded()
                if not ours:  # (cancelled or deleted where NATS did not tell this gateway, replaced, failed)
                    logger.info("a background response's record is not its run's anymore: stopped", id=self.response_id)
                    run.cancel()
                    return
            await asyncio.sleep(self.ttl_s / RENEWALS)

    def guarded(self, finishing: Finishing) -> Finishing:
        """``finishing`` (the run's write of its final object) under ``lock``, the lease over
        with it: a renewal after it would find the record changed, by the run itself."""

        async def guarded() -> bytes | None:
            async with self.lock:
                self.over = True
                return await finishing()

        return guarded
