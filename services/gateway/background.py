"""OpenAI's background responses (``background: true`` on ``POST /v1/responses``, as vLLM's
``serving_responses`` runs them): the POST answers at once with the response ``queued``, stored in
Redis; a task of the gateway that took it relays its request to the workers as if its client
stayed, the record made ``in_progress``, then its final object (``completed``, ``incomplete`` or
``failed``); streamed, its events go to Redis as they come (``EventLog``), where its client and
any later reader (``GET ?stream=true&starting_after=N``) read them (``replay``). Any gateway reads
it (``GET /v1/responses/{id}``) and cancels it: ``cancel`` makes the
record ``cancelled`` and tells every gateway on NATS (``subjects.RESPONSE_CANCELS``); the one
running it cancels its task, which aborts its request on the worker. Each change of the record is
a compare-and-swap on the object last written (``StateStore.swap_response``), so a cancel and the
end of its run cannot overwrite each other. Its run holds a lease (``responses_lease``): a gateway
killed outright leaves its runs to the first reader after it lapses, which ends them ``failed``;
a run whose record changed under it where NATS told it nothing is stopped at its next renewal.
The key's concurrency slot (``Auth.admitted``) is held until the run ends. A gateway that stops
waits for its runs within its drain (``shutdown_timeout_s``), as for its other requests; those
still running then are ``failed``."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager, ExitStack
from typing import Any, cast

import msgspec
from aiohttp import web
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError

from dlora.common import bus, log, subjects
from dlora.common.messages import CancelResponse
from dlora.common.state import StateStore
from dlora.services.gateway.openai import APIError
from dlora.services.gateway.responses_lease import RunLease, closing, running
from dlora.services.gateway.responses_read import Seen, Stored, read
from dlora.services.gateway.responses_shape import TOO_LARGE, ResponsesShape
from dlora.services.gateway.responses_store import Keeping
from dlora.services.gateway.shaping import Job

logger = log.get("gateway")
Bound = Callable[[], AbstractAsyncContextManager[None]]


class _Transport:
    @staticmethod
    def is_closing() -> bool:
        return False


class Detached(dict[str, Any]):
    """What a background response's relay has for its HTTP request: nobody waits on it, so its
    "client" never goes away (its run ends by its end, a cancel or the gateway's stop), and no
    access line is noted (the POST's was written when it answered)."""

    transport = _Transport()


Relay = Callable[[web.Request, Job], Awaitable[object]]
# The events that end a response's stream (then nothing follows)
_LAST = (b"event: response.completed\n", b"event: response.incomplete\n", b"event: response.failed\n")
# How often a reader of a background response's stream looks for its next events
POLL_S = 0.05
# How often a run whose start Redis failed, or a stream's reader, tries it again (``StateBound``
# answers at once for 1 s)
RETRY_S = 0.5
# A stream's reader judges its run's lease (``_follow``) at least once in this many reads that
# found new events, or this many seconds, whichever comes first: each judgement is two Redis reads
# more, so not at every read (every POLL_S at most) of a run that writes steadily
JUDGE_READS, JUDGE_S = 64, 1.0


class EventLog:
    """Where a streamed background response's relay writes its events (``responses.opensse``): to
    Redis, each frame its own entry, for every reader (``Background.replay``) from any gateway;
    only while its record names its run (``keeping.stream``: ``StateStore.append_events``). Its
    last ones go with its final object (``finishing``), in one step."""

    def __init__(self, state: StateStore, bound: Bound, response_id: str, keeping: Keeping) -> None:
        assert keeping.stream is not None
        self.state, self.bound, self.response_id, self.keeping = state, bound, response_id, keeping
        self.run = keeping.stream  # (the token its record names: ``Keeping.stream``)
        self.closing = False  # its final object is to be stored with the next events (its last)

    async def finishing(self) -> bytes | None:
        """The job's (``Job.finishing``): its final object stored with its last events, which the
        writer writes next (``ResponseWriter._end``), not before them: a reader that found the
        record over before they came ended its stream without them."""
        self.closing = True
        return None  # (the events, not written, need no framing again)

    async def write(self, data: bytes) -> None:
        """Raises ConnectionResetError where its run's record is gone (deleted) or another's (a
        retry under its id): the run ends as a foreground one whose client left (its request
        aborted on the worker), not writing into the new response's stream or a deleted one's."""
        # (frames end with a blank line, and their JSON holds no raw newline)
        events = [e + b"\n\n" for e in data.split(b"\n\n") if e]
        k = self.keeping
        if events and self.closing:  # (not stored, cancelled or replaced meanwhile: none written)
            await k.finishing(events)
        elif events:
            async with self.bound():
                appended = await self.state.append_events(self.response_id, k.tenant, self.run, events, k.store.ttl_s)
            if not appended:  # (raised out of the bound: a ConnectionError within it reads as Redis down)
                raise ConnectionResetError(f"{self.response_id} is deleted or replaced: its run is over")

    async def write_eof(self) -> None:
        pass


class Background:
    """The background responses this gateway runs, by (tenant, response id)."""

    def __init__(self, nc: NATS, state: StateStore, bound: Bound, gateway_id: str = "", lease_s: float = 5.0) -> None:
        self.nc, self.state, self.bound, self.gateway_id = nc, state, bound, gateway_id
        self.lease_s = lease_s  # a run's lease (``responses_lease``): a few heartbeat_ttl_s
        self.running: dict[tuple[str, str], asyncio.Task[None]] = {}
        self.kept: dict[tuple[str, str], Keeping] = {}  # each run's record (``keeping.expect``: its last write)
        self._beginning: set[asyncio.Task[None]] = set()  # runs being stored (``_begin``), whoever waits

    async def listen(self) -> None:
        await bus.subscribe(self.nc, subjects.RESPONSE_CANCELS, CancelResponse, self._on_cancel)

    async def start(
        self, request: web.Request, job: Job, keeping: Keeping, held: ExitStack, relay: Relay
    ) -> web.StreamResponse:
        """Stores ``job``'s response ``queued`` and runs it in a task (``relay``: the gateway's);
        ``held`` (its key's slot) is released when the run ends. Answers the queued object, or,
        streamed, its events as they come (``replay``): a client gone leaves it running.

        Raises:
            APIError(503): Redis could not store it (nothing runs).
            APIError(400): its conversation is over ``responses_max_bytes``.
        """
        with held:
            queued = cast(ResponsesShape, job.shape).response("queued", [])
            if not keeping.keep(queued):
                raise APIError(400, f"background: {TOO_LARGE}", param="background")
            slot = held.pop_all()
        # Stored and run whether its client stays or not: one that left while its record was
        # written (its handler cancelled) left it queued with nothing to run it
        begin = asyncio.create_task(self._begin(queued, job, keeping, slot, relay))
        self._beginning.add(begin)
        begin.add_done_callback(self._begun)
        await asyncio.shield(begin)
        if job.stream:
            return await self.replay(request, queued["id"], keeping.tenant, -1)
        return web.json_response(queued)

    def _begun(self, task: asyncio.Task[None]) -> None:
        self._beginning.discard(task)
        if not task.cancelled():
            task.exception()  # (its POST's client was the one to tell, and it may have left)

    async def _begin(self, queued: dict[str, Any], job: Job, keeping: Keeping, slot: ExitStack, relay: Relay) -> None:
        """``start`` past its checks: the run's lease taken, its record stored ``queued``, its run
        started, holding ``slot`` until it ends (released at once where nothing runs).

        Raises:
            APIError(503): Redis could not store it (nothing runs).
        """
        key, response_id = (keeping.tenant, queued["id"]), queued["id"]
        lease = RunLease(
            self.state, self.bound, response_id, keeping.tenant, self.gateway_id, self.lease_s, lambda: keeping.expect
        )
        with slot:
            keeping.stream = secrets.token_hex(8) if job.stream else None  # (its events' writer: ``EventLog``)
            keeping.leased = True  # (a record without it is an older gateway's: ``settled``)
            unstored = APIError(503, "background: the response could not be stored; try again")
            try:  # (first: a reader finding its record queued finds its lease too)
                await lease.take()
            except bus.STATE_OUTAGE:
                raise unstored from None
            if not await keeping.finishing() or keeping.written is None:
                raise unstored
            keeping.expect, keeping.written = keeping.written, None  # (its final write: ``_run``)
            # A run of the same id (a retry under its X-Request-Id), here or on another gateway, is
            # stopped: its record replaced, it ran on for nobody, holding its key's slot. Once this
            # record is stored (a store that failed leaves it its record, running), and the others
            # told, so that one whose own retry stored a later record sees it still holds the
            # record and runs on (``_on_cancel``); where NATS fails, its lease's renewal finds it.
            if (replaced := self.running.get(key)) is not None:
                replaced.cancel()
            told = CancelResponse(response_id=response_id, tenant=keeping.tenant, gateway=self.gateway_id)
            try:
                await bus.publish(self.nc, subjects.RESPONSE_CANCELS, told)
            except NatsError as e:  # (its own relay waits NATS out: a 503 here failed a POST that ran)
                logger.warning("a retry's cancel could not be sent", id=response_id, error=type(e).__name__)
            detached = Detached()
            if keeping.stream is not None:
                detached["sink"] = log = EventLog(self.state, self.bound, response_id, keeping)
                job = dataclasses.replace(job, finishing=log.finishing)
            if job.finishing is not None:  # (a stream's: its last events' write, ``EventLog.write``)
                job = dataclasses.replace(job, finishing=lease.guarded(job.finishing))
            held = slot.pop_all()
            task = asyncio.create_task(self._run(queued, keeping, job, relay, detached, lease))
            holding = asyncio.create_task(lease.hold(task))
            self.running[key], self.kept[key] = task, keeping
            task.add_done_callback(lambda t: self._ended(key, t, held, holding))

    async def replay(self, request: web.Request, response_id: str, tenant: str, after: int) -> web.StreamResponse:
        """``GET /v1/responses/{id}?stream=true&starting_after=N`` (and a streamed POST): its events
        after the ``after``-th, then each as it comes, until the one that ends it, or (cancelled,
        its gateway stopped) its record is over with none left. A reader that leaves ends it
        quietly (the run goes on): raised, aiohttp logged a traceback for a client that hung up."""
        stream = web.StreamResponse(
            headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
        )
        with contextlib.suppress(ConnectionResetError):
            await stream.prepare(request)
            await self._follow(stream, response_id, tenant, after)
            await stream.write_eof()
        return stream

    async def _follow(self, stream: web.StreamResponse, response_id: str, tenant: str, after: int) -> None:
        """``replay``'s events written to ``stream``, Redis failing waited out: raised, its 503 was
        written into the stream already open. Its record is read (its lease judged: ``settled``)
        where no event is new, and at least every ``JUDGE_READS`` reads or ``JUDGE_S`` seconds
        that found some: judged only when idle, a run living on past its lease (its gateway cut
        from Redis, its renewals starved) kept its readers on for as long as it appended. Raises
        ConnectionResetError: its reader left."""
        loop = asyncio.get_running_loop()
        reads, judged = 0, loop.time()
        while True:
            try:
                async with self.bound():
                    events = await self.state.response_events(response_id, tenant, after + 1)
                    reads += 1
                    if not events or reads >= JUDGE_READS or loop.time() - judged >= JUDGE_S:
                        reads, judged = 0, loop.time()
                        stored = await self._judged(response_id, tenant)
                        # (over: its events written before it)
                        if not events and (stored is None or not running(stored.status)):
                            events = await self.state.response_events(response_id, tenant, after + 1)
                            if not events:
                                return
            except bus.STATE_OUTAGE:
                await asyncio.sleep(RETRY_S)
                continue
            if events:
                after += len(events)
                await stream.write(b"".join(events))
                if events[-1].startswith(_LAST):
                    return
            else:
                await asyncio.sleep(POLL_S)

    async def _judged(self, response_id: str, tenant: str) -> Stored | Seen | None:
        """Its record as it stands (``settled``: failed first where its run's lease lapsed), its
        status alone read where it is over (``read``'s ``whole`` False: its items not built, at
        every poll of a reader); None: gone, or not of a response's shape (as every route reads
        it). The caller bounds the Redis work."""
        got = await read(self.state, response_id, tenant, ("response",), self.lease_s, whole=False)
        return None if got is None else cast(Stored | Seen, got[0])

    def _ended(
        self, key: tuple[str, str], task: asyncio.Task[None], slot: ExitStack, holding: asyncio.Task[None]
    ) -> None:
        # The slot given back here, not in ``_run``'s body: a task cancelled before its first step
        # (a cancel heard just after the POST answered) never enters its body.
        slot.close()
        holding.cancel()
        if self.running.get(key) is task:
            del self.running[key], self.kept[key]

    async def _run(
        self, queued: dict[str, Any], keeping: Keeping, job: Job, relay: Relay, detached: Detached, lease: RunLease
    ) -> None:
        started = queued | {"status": "in_progress"}
        try:
            if not await self._retried(keeping, started, lease):
                return  # cancelled (or deleted, replaced) before it began
        except bus.STATE_OUTAGE:  # (its lease lapses with it: a reader once Redis is back fails it)
            logger.warning("a background response could not be started", id=queued["id"])
            return
        why = "the response could not be stored"  # (Redis failed; over responses_max_bytes: ``ResponsesShape.final``)
        try:
            await relay(cast(web.Request, detached), job)
            if keeping.written is not None:
                return  # its final object stored (not if cancelled meanwhile: the swap below fails too)
        except APIError as e:  # it failed (a worker's error, a timeout, the gateway stopping)
            why = e.message
        except Exception as e:  # (asyncio.CancelledError, a cancel, is none: the record says cancelled)
            logger.exception("a background response failed", id=queued["id"])
            why = f"internal error: {type(e).__name__}"
        failed = started | {"status": "failed", "error": {"code": "server_error", "message": why}}
        with contextlib.suppress(*bus.STATE_OUTAGE):  # (then its lease lapses: a reader fails it)
            await self._retried(keeping, failed, lease)

    async def _retried(self, keeping: Keeping, new: dict[str, Any], lease: RunLease) -> bool:
        """The record made ``new`` (``_swap``), tried again while Redis fails, for as long as the
        run's lease lasts unrenewed: a Redis blip as it began left it queued, never run; one that
        failed its end's write failed its failed record's too (``StateBound`` answers at once for
        a second), leaving it in progress, its stream unclosed, until its lease lapsed.

        Raises:
            ``bus.STATE_OUTAGE``: Redis failed for the whole lease.
        """
        loop, failed = asyncio.get_running_loop(), False
        until = loop.time() + self.lease_s
        while True:
            try:
                if await self._swap(keeping, new, lease):
                    return True
                if not failed:
                    return False
                async with self.bound():  # a try whose answer was lost may have written it
                    got = await self.state.response_fields(new["id"], keeping.tenant, "response")
                if got is None or got[1] != msgspec.json.encode(new):
                    return False
                keeping.expect = got[1]
                return True
            except bus.STATE_OUTAGE:
                if loop.time() >= until:
                    raise
                failed = True
                await asyncio.sleep(RETRY_S)

    async def _swap(self, keeping: Keeping, new: dict[str, Any], lease: RunLease) -> bool:
        """The record made ``new`` if it is still what this gateway last wrote there; made
        ``failed``, a streamed one's stream ends with its ``response.failed`` in the same step (its
        run failed before its stream's end, or the write of that end failed: without it, its
        readers had no closing event)."""
        assert keeping.expect is not None
        encoded = msgspec.json.encode(new)
        ends = closing(encoded) if new["status"] == "failed" else (b"", b"")
        async with lease.lock, self.bound():
            swapped = await self.state.swap_response(new["id"], keeping.tenant, keeping.expect, encoded, ends)
            if swapped:
                keeping.expect = encoded
        return swapped

    async def cancel(self, response_id: str, tenant: str, stored: Stored | Seen) -> dict[str, Any] | None:
        """``tenant``'s response as cancelled, if ``stored`` (its record as just read) is one still
        queued or running and still there: every gateway told, the one running it cancels its
        task. A streamed one's stream ends, in the same step, with the cancelled object's
        ``response.failed`` (OpenAI's stream events have no cancelled one; its ``status`` says
        ``cancelled``) and its run's token cleared: its run, until it hears the cancel, appends
        nothing after it. None: it is not (anymore)."""
        if not isinstance(stored, Stored) or not running(stored.status):  # (a ``Seen`` is over)
            return None
        cancelled = stored.object | {"status": "cancelled"}
        encoded = msgspec.json.encode(cancelled)
        async with self.bound():  # (a streamed one's stream closed with it: ``closing``)
            if not await self.state.swap_response(response_id, tenant, stored.raw, encoded, closing(encoded)):
                return None
        await self.stop(response_id, tenant)
        return cancelled

    async def stop(self, response_id: str, tenant: str) -> None:
        """Every gateway told to end its run of ``tenant``'s response (cancelled, or deleted: its
        end could not be stored), at once where it runs here: its task cancelled. NATS failing,
        the record changed is the word: a run elsewhere finds it at its lease's next renewal."""
        told = CancelResponse(response_id=response_id, tenant=tenant, gateway=self.gateway_id)
        if (task := self.running.get((tenant, response_id))) is not None:
            task.cancel()  # (its relay aborts its request on the worker)
        try:
            await bus.publish(self.nc, subjects.RESPONSE_CANCELS, told)
        except NatsError as e:  # the record is the truth: its run finds it changed at its lease's renewal
            logger.warning("a background response's stop could not be sent", id=response_id, error=type(e).__name__)

    async def _on_cancel(self, told: CancelResponse) -> None:
        if told.gateway and told.gateway == self.gateway_id:
            return  # its own, done when sent (``stop``)
        key = (told.tenant, told.response_id)
        if (task := self.running.get(key)) is None:
            return
        keeping = self.kept[key]
        try:  # (a run whose record is still its own was stored after the sender's: a later retry)
            async with self.bound():
                got = await self.state.response_fields(told.response_id, told.tenant, "response")
            if got is not None and got[1] is not None and got[1] == keeping.expect:
                return
        except bus.STATE_OUTAGE:
            pass  # (stopped, as a run whose record cannot be read could not write its end either)
        task.cancel()

    async def settled(self, timeout_s: float) -> None:
        """Waits (at most ``timeout_s``) for the runs to write their end: called once the gateway
        has failed the requests still in flight (``Gateway.shutdown``)."""
        if self.running:
            await asyncio.wait(list(self.running.values()), timeout=timeout_s)
