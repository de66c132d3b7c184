"""The worker's side of the in-flight records: progress writes that survive a Redis outage, the
deletes of finished requests' records, and the stalls after which copies held here are checked
against their records before anything more is sent for them (fencing)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

from dlora.common import bus, log
from dlora.common.inflight import Copy, Sent
from dlora.common.messages import GenerateRequest
from dlora.common.state import StateStore

logger = log.get("worker")

# Chunks kept for the in-flight records while Redis refuses writes, each request's consecutive
# chunks joined into one (kept apart, 64 streams filled 10,000 in 3 s and the oldest were dropped:
# the record then skipped tokens, and a resume from it gave wrong output); past this the oldest go.
_MAX_UNWRITTEN = 10_000
# Seconds a step waits for its progress write: past them Redis counts as down (hung, each write
# took redis-py's four tries of its 5 s socket timeout) and the writes go on beside the steps.
_WRITE_TIMEOUT_S = 1.0
# Seconds between tries to mark records taken while Redis refuses them.
_MARK_AGAIN_S = 2.0
# Seconds between tries to write the steps' progress while Redis refuses it (beside the steps).
_WRITE_AGAIN_S = 1.0


class ProgressRecords:
    """What one worker process writes to the in-flight records, and whether it may have stalled.

    A stall is a heartbeat silence of half the TTL: long enough for a dispatcher to have given up
    on the worker and re-dispatched its requests (half: the dispatcher's clock starts from the last
    beat it received). Not a long step: it runs off the loop, and the heartbeat goes on.
    """

    def __init__(self, store: StateStore, worker_id: str, heartbeat_ttl_s: float) -> None:
        self.store, self.worker_id, self.ttl_s = store, worker_id, heartbeat_ttl_s
        self.unrecorded_ends: dict[str, int] = {}  # finished requests whose records are not yet deleted
        self.unwritten: list[tuple[str, Sent]] = []  # chunks sent whose progress write failed, in order
        self.taken: dict[str, int] = {}  # requests received whose records are not yet marked taken (id -> attempt)
        self._mark_again_at = 0.0  # after a failed mark, when to try again
        self._marking = asyncio.Lock()  # one mark at a time: a second waits for the one in flight (a review)
        self._writing = asyncio.Lock()  # one progress write at a time (``write``)
        self._retry: asyncio.Task[set[str] | None] | None = None  # the background write after a failure
        self.stalls = 0  # stalls seen, and how many of them a strict fencing check has followed
        self._stalls_checked = 0
        self._beat_at = time.monotonic()  # when a heartbeat last got out
        self._stall_seen_at = -float("inf")  # when a heartbeat after a stall last got out
        self._outage = bus.Outage("in-flight progress records (redis)")

    def beat(self) -> None:
        """A heartbeat got out (stats on NATS, or the key in Redis: a dispatcher takes either)."""
        now = time.monotonic()
        if now - self._beat_at > self.ttl_s / 2:
            self.stalls += 1
            self._stall_seen_at = now
        self._beat_at = now

    def stalled(self) -> bool:
        """Whether this process may have been given up on, its requests re-dispatched (and perhaps
        finished elsewhere, their records gone), since fencing last asked strictly: no heartbeat
        got out for half the TTL, now (the beat task has not run yet) or at some point since. A
        stall that hits after this is asked and before the chunks are written to the socket puts
        out that step's chunks (readers drop them by attempt); the next step asks first."""
        silent = time.monotonic() - self._beat_at > self.ttl_s / 2
        return silent or self.stalls != self._stalls_checked

    def stalled_lately(self) -> bool:
        """Whether a request delivered now may have been sent before a stall of this process and
        given up on since: ``stalled``, or a stall ended within the heartbeat TTL (a message
        buffered through the stall is delivered after the check that followed it)."""
        return self.stalled() or time.monotonic() - self._stall_seen_at < self.ttl_s

    async def fenced_on_arrival(self, request: GenerateRequest) -> bool:
        """Whether a request delivered just after this process stalled was given up on meanwhile:
        sent before the stall and re-dispatched, perhaps finished elsewhere (its record gone). The
        check after the stall asked about the copies held then, not one still in the socket."""
        if not self.stalled_lately():
            return False
        return bool(await self._ask({request.request_id: Copy.of(request, stalled=True)}))

    async def superseded(self, attempts: dict[str, int]) -> set[str]:
        """Which of these requests (id -> attempt) another attempt serves now, as a re-send asks
        it: read only, so it may run beside a step. A missing record does not count (the request
        may have finished here)."""
        return await self._ask({rid: Copy(attempt, recorded=False) for rid, attempt in attempts.items()})

    async def _ask(self, copies: dict[str, Copy]) -> set[str]:
        """The fenced ids among ``copies``; none when Redis cannot tell (then the copy is served: a
        reader drops an earlier attempt's chunks anyway)."""
        try:
            async with asyncio.timeout(_WRITE_TIMEOUT_S):  # a hung Redis held a step 20 s a question
                return await self.store.fenced(self.worker_id, copies)
        except bus.STATE_OUTAGE:
            return set()

    async def fenced_after_stall(self, copies: dict[str, Copy]) -> set[str]:
        """The ids among ``copies`` (taken with ``stalled=True``) that are fenced, a missing record
        of a recorded one included; none if Redis cannot tell (then the next step asks again)."""
        stalls = self.stalls  # a stall during the check makes another one
        try:
            async with asyncio.timeout(_WRITE_TIMEOUT_S):
                fenced = await self.store.fenced(self.worker_id, copies)
        except bus.STATE_OUTAGE:
            return set()  # cannot tell: send (a reader drops an earlier attempt's chunks anyway)
        self._stalls_checked = stalls
        return fenced

    async def write(self, running: dict[str, Sent]) -> set[str]:
        """Record this step's chunks, after those earlier failed writes left, and drop the records
        of finished requests; the ids whose copies are fenced. One write at a time, in order (a
        later chunk written first would have an earlier one's tokens refused). Raises what Redis
        raises, and then what it did not write stays for the next call (the caller keeps
        ``running``: see ``write_step``); what is kept meanwhile goes after it."""
        async with self._writing:
            ends, earlier = self.unrecorded_ends, self.unwritten
            self.unrecorded_ends, self.unwritten = {}, []
            try:
                return await self.store.record_progress(self.worker_id, running, ends, earlier)
            except BaseException:
                self.unrecorded_ends = ends | self.unrecorded_ends
                self._keep(earlier, first=True)
                raise

    async def write_step(self, running: dict[str, Sent]) -> set[str]:
        """``write``, with a failure kept for later rather than raised: the tokens went out, only
        recovery's record lags. After a failure the steps go on without waiting for Redis: their
        chunks are kept, and a write in the background tries again every ``_WRITE_AGAIN_S`` until
        one succeeds (awaited here, each failing write cost a step redis-py's retries, and a hung
        Redis its socket timeout: 2 tokens/s, none while hung). The ids whose copies are fenced
        (none on a failure; those the background write found, once it is done)."""
        if self._retry is not None:
            self._keep(running.items())
            if not self._retry.done():
                return set()
            fenced, self._retry = self._retry.result(), None
            if fenced is None:  # failed again
                self._retry = asyncio.create_task(self._write_later())
            return fenced or set()
        try:
            async with asyncio.timeout(_WRITE_TIMEOUT_S):
                fenced = await self.write(running)
        except BaseException as e:
            self._keep(running.items())  # sent: kept whatever stopped the write (a caller's bound too)
            if not isinstance(e, Exception):
                raise
            self._outage.failed(e)
            self._retry = asyncio.create_task(self._write_later())
            return set()
        self._outage.succeeded()
        return fenced

    async def close(self) -> None:
        """Cancel the write in the background (``write_step``) and wait for its end: at a worker's
        stop it outlived the worker as the re-sends did (``Delivery.close``), to write on a
        connection closed under it, or be destroyed pending."""
        if self._retry is not None:
            self._retry.cancel()
            await asyncio.gather(self._retry, return_exceptions=True)

    @property
    def outage(self) -> bool:
        """Redis failed the last write, and a write beside the steps is trying again."""
        return self._retry is not None

    async def end(self, ended: dict[str, int]) -> None:
        """Drop the records of the requests ``ended`` (id -> the attempt over here) with a write now
        (``write_step``: bounded, kept for later while Redis is down; each awaited in line, a
        deadline's drop during an outage ended the worker, and a hung Redis held each 20 s)."""
        self.unrecorded_ends |= ended
        await self.write_step({})

    def _keep(self, chunks: Iterable[tuple[str, Sent]], first: bool = False) -> None:
        """Keep ``chunks`` for a later write, after those kept (before them: ``first``), each
        request's consecutive chunks joined; past ``_MAX_UNWRITTEN`` the oldest go."""
        ordered = [*chunks, *self.unwritten] if first else [*self.unwritten, *chunks]
        joined: list[tuple[str, Sent]] = []
        at: dict[str, int] = {}  # request -> its latest entry in joined
        for rid, sent in ordered:
            if rid in at and (both := joined[at[rid]][1].then(sent)) is not None:
                joined[at[rid]] = (rid, both)
            else:
                at[rid] = len(joined)
                joined.append((rid, sent))
        self.unwritten = joined[-_MAX_UNWRITTEN:]

    async def _write_later(self) -> set[str] | None:
        """The kept chunks written after ``_WRITE_AGAIN_S``: the fenced ids, None if it failed."""
        await asyncio.sleep(_WRITE_AGAIN_S)
        try:
            fenced = await self.write({})
        except Exception as e:  # noqa: BLE001 - still down
            self._outage.failed(e)
            return None
        self._outage.succeeded()
        return fenced

    async def mark_taken(self) -> None:
        """Mark the records of the requests received so far as taken up here, before any work on
        them (``Inflight.taken``: only then is this worker's loss their death); a call while
        another's write is in flight waits for it (it may carry the caller's requests). A failure
        keeps them for the next call and the work goes on (a running request's progress write
        marks it too)."""
        async with self._marking:
            if not self.taken or time.monotonic() < self._mark_again_at:
                return
            batch, self.taken = self.taken, {}  # what arrives during the write waits for the next (a review)
            try:
                async with asyncio.timeout(_WRITE_TIMEOUT_S):  # a hung Redis held every command 20 s
                    await self.store.mark_taken(self.worker_id, batch)
            except asyncio.CancelledError:  # a caller's task stopped (arrival.py's): the batch is the next's
                self.taken = {**batch, **self.taken}
                raise
            except Exception as e:  # noqa: BLE001 - Redis down: serve all the same
                self._outage.failed(e)
                self.taken = dict(list({**batch, **self.taken}.items())[-_MAX_UNWRITTEN:])
                # Not again before every command: a hung Redis cost each 20 s, and the loop's watchdog
                # (a review). Meanwhile a death goes uncounted unless a progress write marks it.
                self._mark_again_at = time.monotonic() + _MARK_AGAIN_S

    @property
    def behind(self) -> bool:
        """Whether writes or deletes wait for Redis."""
        return bool(self.unrecorded_ends or self.unwritten)
