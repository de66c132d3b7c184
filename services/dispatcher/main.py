"""The dispatcher service: takes requests off the shared subject, picks a worker, records the
in-flight entry, forwards. Several dispatchers share the load as one NATS queue group. It also
watches worker stats: a worker gone silent loses its requests to live workers, which resume
them from the tokens already delivered, so each client's stream continues (``recovery.py``)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import Error as NatsError

from dlora.common import bus, log, subjects
from dlora.common.bus import connections, unless_stopped
from dlora.common.clients import Clients, link_of
from dlora.common.exporter import metrics_endpoint
from dlora.common.inflight import sent_again
from dlora.common.messages import (
    AbortRequest,
    AdapterEntry,
    ClientAlive,
    ErrorCode,
    FinishReason,
    GenerateRequest,
    LostRequests,
    Placement,
    PrefixCacheReset,
    TokenChunk,
    WorkerStats,
    error_text,
)
from dlora.common.reads import read_sizes
from dlora.common.registry import AdapterRegistry
from dlora.common.seeds import with_seed
from dlora.common.state import StateStore
from dlora.services.dispatcher.affinity import request_keys
from dlora.services.dispatcher.choose import DispatchMode, holding_version, holds_request, of_model, version_gone
from dlora.services.dispatcher.intake import Intake
from dlora.services.dispatcher.metrics import DispatcherMetrics, Refusal
from dlora.services.dispatcher.orphans import OrphanWait
from dlora.services.dispatcher.placement import decay, placement_of
from dlora.services.dispatcher.rechecks import Rechecks
from dlora.services.dispatcher.replaced import on_current_version
from dlora.services.dispatcher.settings import DispatcherSettings
from dlora.services.dispatcher.state import DispatchState, new_salt
from dlora.services.dispatcher.take_back import take_back
from dlora.services.notify import notifier

logger = log.get("dispatcher")
_encode = msgspec.json.Encoder()
# How long after a request whose id and reply subject are in flight it is looked at again: the
# worker deletes a record just after it sends the last chunk (milliseconds).
_RECHECK_S = 0.5
# Seconds between looks for retired adapter versions to forget (AdapterRegistry.purge_retired).
PURGE_INTERVAL_S = 60.0


class Dispatcher(Intake):
    def __init__(self, settings: DispatcherSettings, nc: NATS, store: StateStore) -> None:
        self.s, self.nc, self.store = settings, nc, store
        # The workers' stats (monotonic clock), the sends since, the placement: the choice's inputs (salted ties).
        self.state = DispatchState(settings.heartbeat_ttl_s, settings.dispatch, settings.costs, new_salt())
        self.traffic: dict[str, float] = {}  # decayed request counts per adapter
        self.rechecks = Rechecks()  # requests looked at again, records taken back
        self._state_bound = bus.StateBound()  # a request's Redis work
        self._heard = asyncio.Event()  # set by the next worker stats heard
        self._placed_at = 0.0
        self._orphans_at = 0.0
        self.orphans = OrphanWait(settings.orphan_wait_s)  # re-dispatches waiting for a live worker
        self._purged_at = 0.0
        # reply readers: a gone one's requests are not re-dispatched (silent while our NATS is down: link_of)
        self.clients = Clients(settings.heartbeat_ttl_s, link_of(nc))
        self.registry = AdapterRegistry(store, None)  # with its durable copy once running (run)
        self.restoring = bus.Outage("adapter registry restore (nats, jetstream, redis)")
        self._reconnects = nc.stats["reconnects"]
        self.metrics = DispatcherMetrics(lambda: len(self.live()))

    @property
    def workers(self) -> dict[str, tuple[WorkerStats, float]]:
        return self.state.workers

    @property
    def placement(self) -> dict[str, list[str]]:
        return self.state.placement

    def live(self) -> list[WorkerStats]:
        return self.state.live(time.monotonic())

    async def _on_stats(self, st: WorkerStats) -> None:
        self.state.heard(st, time.monotonic())
        self._heard.set()  # wakes the waits of _heard_from_all; the next wait takes a new one
        self._heard = asyncio.Event()
        self.clients.noted(time.monotonic())  # not cut off: a client's silence means something

    async def _on_prefix_cache_reset(self, _: PrefixCacheReset) -> None:
        self.state.affinity.clear()  # the workers forget their caches: a prefix is cached nowhere

    async def _on_ping(self, msg: Msg) -> None:
        await msg.respond(b"")

    async def _on_client(self, alive: ClientAlive) -> None:
        self.clients.heard(alive.client, time.monotonic())

    async def _on_app_client(self, alive: ClientAlive, sender: str) -> None:
        if subjects.owns_client(sender, alive.client):
            await self._on_client(alive)

    async def watch_workers(self, stop: asyncio.Event) -> None:
        """A worker whose stats stopped for ``heartbeat_ttl_s`` is lost: one dispatcher (a lock in
        Redis) re-dispatches its in-flight requests, each resuming after the tokens its client has."""
        redis = bus.Outage("redis (dispatcher)")
        async for _ in bus.every(self.s.heartbeat_ttl_s / 4, stop):  # (no look once stopped)
            try:
                await unless_stopped(self._look(time.monotonic()), stop)  # (one broken off: the sweep's)
                redis.succeeded()
            except bus.STATE_OUTAGE as e:  # Redis restarting: a lost worker is looked at again next time
                redis.failed(e)

    async def _look(self, now: float) -> None:
        if self.nc.stats["reconnects"] != self._reconnects:  # our own outage: their silence was ours
            self._reconnects = self.nc.stats["reconnects"]
            self.state.forgive(now)
        self.clients.watch_link(now)  # forgiven as of now, not as of a recovery much later
        if now - self._placed_at > self.s.placement_interval_s:
            self._placed_at = now
            await self.replan_placement()
        if now - self._purged_at > PURGE_INTERVAL_S:
            self._purged_at = now
            with contextlib.suppress(NatsError, TimeoutError):  # JetStream down: purged next time
                # Every worker heard from, lost ones too until recovered: their requests may resume.
                held = {(a.name, a.version) for st, _ in self.workers.values() for a in st.adapters}
                if purged := await self.registry.purge_retired(time.time(), held):
                    logger.info("retired adapter versions purged", versions=purged)
        for worker, (st, at) in list(self.workers.items()):
            if now - at > self.s.heartbeat_ttl_s:
                if await self.store.beating(worker):
                    continue  # its stats do not reach us, but its heartbeat does: not lost
                if await self.store.claim_recovery(f"{worker}:{st.incarnation}:{st.sent}"):
                    stopped = await self.store.stopped_cleanly(worker, st.incarnation)
                    await self.recover(worker, st.incarnation, stopped)
                self.state.forget(worker)
                with contextlib.suppress(KeyError):  # (a series per worker id ever seen)
                    self.metrics.decisions.remove(worker)
        if now - self._orphans_at > self.s.heartbeat_ttl_s:
            self._orphans_at = now
            await self._recover_orphans()
        try:  # Redis emptied or rolled back; last: a merge of 4,000 adapters took 5 s, lost workers waited
            await self.registry.restore()
            self.restoring.succeeded()
        except Exception as e:  # noqa: BLE001 - NATS or JetStream down: restored on a later look (said once)
            self.restoring.failed(e)

    def _count(self, adapter: str | None) -> None:
        if adapter is not None:
            self.traffic[adapter] = self.traffic.get(adapter, 0.0) + 1.0

    async def replan_placement(self) -> None:
        """Decay the traffic counts (into Redis too) and place adapter replicas for burst tolerance."""
        entries = await self.store.list_adapters()
        ranks = {e.name: e.rank for e in entries}
        self.state.file_bytes = read_sizes(entries)  # (what a read of each costs)
        self.traffic = decay(self.traffic)
        await self.store.save_traffic(self.traffic)
        # On a thread (a placement from empty at 256 workers x 1,000 adapters takes a third of a
        # second), with a copy: the loop counts the requests it dispatches meanwhile (a review)
        placement = await asyncio.to_thread(placement_of, dict(self.traffic), self.live(), ranks)
        if placement is not None:
            self.state.placement = placement
            await bus.publish(self.nc, subjects.PLACEMENT, Placement(workers=self.placement))

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
        """Send ``req`` to the worker chosen for it and record it in flight there. ``expect``: a re-dispatch, sent only
        if the record still names that worker and attempt (recorded first); ``died``: one after the worker running it
        died, counted in the record; ``avoid``: workers not to choose while another can take it (those it was handed
        back by); ``again``: the second look (``_look_again``) at a request whose id and reply subject were in flight
        (see below), or at one ``holding`` found no holder for; ``holding``: only to a worker outside ``avoid`` whose
        stats list the request's adapter version (its files were rewritten since registration, so no other can load it),
        else, once every live worker's stats were read again (a holder's may not list it yet: a trial's rewrite right
        after the first request got 500 for half the next 20), run on a version registered since (``replaced.py``) or
        failed saying so; ``allowed``: its adapter's entry, read already."""
        asked = req  # as it came (a second one under its id: ``sent_again``)
        if (seeded := with_seed(req)) is not req:  # recorded with its seed, so a resume draws the same
            req, raw = seeded, None
        if req.adapter is not None and req.adapter_version is None:  # recorded with its version, so a
            entry = allowed or await self.store.get_adapter(req.adapter)  # resume runs on the same weights
            if entry is not None and entry.version:
                req, raw = msgspec.structs.replace(req, adapter_version=entry.version), None
        live = self.live()
        if not live and expect is not None and self.orphans.waits(req.request_id, now := time.monotonic()):
            if self.orphans.first_wait(req.request_id, now):
                logger.warning("no live worker: the request waits for one", request=req.request_id)
            return  # before it is encoded or priced: the sweep tries it every heartbeat TTL
        if req.model_digest and live and not (live := of_model(live, req.model_digest)):
            served = ", ".join(sorted({w.model_digest or "not said" for w in self.live()}))
            reason = (
                f"no live worker serves the base model this request was tokenized for (digest {req.model_digest}; "
                f"the workers': {served}): the deployment mixes models"
            )
            await self._fail(req, req.next_seq, reason, "other-model", ErrorCode.UNAVAILABLE, expect)
            return
        # prompt and every token it may generate: a worker that cannot hold them would cut it short
        prompt = len(req.prompt_token_ids) if req.prompt_token_ids is not None else 1  # text: not known here
        need = prompt + req.params.max_tokens
        if live and not (live := [w for w in live if holds_request(w, need)]):
            largest = max(w.max_model_len for w in self.live())
            reason = (
                f"the request needs {need} tokens (prompt and max_tokens); the largest worker's context "
                f"and KV cache hold {largest}: lower max_tokens (max_completion_tokens, where the request "
                "gave that) or shorten the prompt"
            )
            await self._fail(req, req.next_seq, reason, "too-long", ErrorCode.BAD_REQUEST, expect)
            return
        if holding and not (live := holding_version(live, req.adapter, req.adapter_version or "", avoid)):
            if not again:  # a worker may have loaded it since its last stats (sent every 0.5 s)
                after = functools.partial(self._heard_from_all, time.monotonic(), avoid)
                self._look_again(req, raw, after, expect=expect, died=died, avoid=avoid, holding=True)
            elif (current := await on_current_version(self.store, req)) is not None:
                await self._dispatch(current, expect=expect, died=died, avoid=avoid)
            else:  # not replaced since, or begun
                reason = version_gone(req.adapter, req.adapter_version or "")
                await self._fail(req, req.next_seq, reason, "adapter-changed", ErrorCode.INTERNAL, expect)
            return
        if not req.recorded:  # its worker then takes a missing record after a stall for its end
            req, raw = msgspec.structs.replace(req, recorded=True), None
        raw = raw or _encode.encode(req)
        if len(raw) > self.nc.max_payload:  # what it gained here (a seed, a version) can take it over
            reason = f"the request is {len(raw)} bytes as forwarded; the message bus carries {self.nc.max_payload}"
            # the client's fault when it came so; a recovery grown by its resumed tokens is not
            code = ErrorCode.BAD_REQUEST if expect is None else ErrorCode.INTERNAL
            await self._fail(req, req.next_seq, reason, "too-large", code, expect)
            return
        # Not a worker gone quiet while another can take it: it is likely dead (its loss not declared yet).
        quiet = self.state.quiet(time.monotonic())
        others = [w for w in live if w.worker not in avoid]
        others = [w for w in others if w.worker not in quiet] or others
        proactive = self.s.dispatch is DispatchMode.PROACTIVE  # round-robin reads no prefixes
        prefixes = request_keys(req) if proactive else None
        # an application's groups are its own, and a name is kept as a digest (its size is the sender's)
        group = hashlib.blake2b(f"{req.owner}\0{req.group}".encode(), digest_size=16).hexdigest() if req.group else ""
        ids = req.prompt_token_ids or []
        p, done = req.params, len(req.resume_token_ids)  # (resumed tokens count against its bounds)
        tokens = self.state.price(max(1, p.max_tokens - done), p.min_tokens - done, p.ignore_eos)
        worker = self.state.choose(others or live, req.adapter, prefixes, group, ids, tokens, req.adapter_version)
        if worker is None:  # none live (a re-dispatch waited for one first)
            await self._fail(req, req.next_seq, "no worker is available", "no-worker", ErrorCode.UNAVAILABLE, expect)
            return
        self.orphans.over(req.request_id)
        # Recorded first: a record made after its request ended (refused at once, or aborted) would
        # outlive it and be handed back; one whose message is lost is handed back, as it should.
        seen, heard = self.workers.get(worker), self.state.stats_heard[worker]
        incarnation, marks = (seen[0].incarnation, seen[0].marks_taken) if seen else ("", False)
        recorded, answered = False, False
        try:
            recorded = await self.store.put_inflight(
                req, worker, expect, new=expect is None, incarnation=incarnation, died=died, marks_taken=marks
            )
            answered = True
        finally:
            # Counted when chosen, so requests chosen meanwhile see it; taken back if it never went
            # (two dispatchers walking a lost worker's records both choose, one records).
            if not recorded:
                self.state.unsend(worker, req.adapter, prefixes, ids, tokens, heard, req.adapter_version)
            if not answered and expect is None:  # cut off: Redis may still write it (take_back.py)
                self.rechecks.start(take_back(self.store, req, worker))
        if recorded:
            self._count(req.adapter)
            await self.nc.publish(subjects.worker_requests(worker), raw)
            self.metrics.decisions.labels(worker).inc()
            if expect is not None:
                self.metrics.recovered.inc()
        elif expect is None:  # a second request under the id of one in flight (anyone's)
            if not again:  # the id reused as soon as its last chunk came, before the worker deleted the
                # record (it sends the chunk first): looked at once more a moment later, it runs if
                # the record went meanwhile (a user's trial lost 1 in 10 such requests)
                self._look_again(asked, raw, functools.partial(asyncio.sleep, _RECHECK_S))
                return
            try:
                held = await self.store.get_inflight(req.request_id)
            except msgspec.ValidationError:  # a record an older release wrote under looser bounds
                held = None
            if held is not None and sent_again(held.request, asked):
                # The same request sent again (a retry) to the stream already under way: an error
                # there would end that stream for its reader, which goes on reading it instead.
                self.metrics.refusals.labels("duplicate-id").inc()
                return
            reason = f"request id {req.request_id!r} is already in flight; give each request its own"
            await self._fail(req, req.next_seq, reason, "duplicate-id", ErrorCode.BAD_REQUEST)

    def _look_again(
        self, req: GenerateRequest, raw: bytes | None, after: Callable[[], Awaitable[None]], **how: Any
    ) -> None:
        """``_dispatch`` ``req`` once more (``again``, with ``how``) when ``after()`` is done, in a
        task of its own: the handler that asked goes on meanwhile. Its abort heard by then (or
        meanwhile: that ends the wait) ends it instead, as at the intake (``_ended_if_aborted``)."""

        async def recheck() -> None:
            await self.rechecks.wait(req, after)
            expect: tuple[str, int] | None = how.get("expect")
            try:
                if expect is None and await self._ended_if_aborted(req):  # needs no Redis, as at the intake
                    return
                async with self._state_bound():  # bounded as at the first look (a hung Redis: 20 s)
                    if expect is None or not await self._ended_if_aborted(req, expect):
                        await self._dispatch(req, raw, again=True, **how)
            except bus.STATE_OUTAGE as e:  # said, as at the first look (a recovery waits for the sweep)
                if expect is None:
                    await self._unrecorded(req, type(e).__name__)
            except Exception as e:  # as the bus handler's own guard: logged, never raised
                logger.exception("request dispatch failed", request=req.request_id, error=str(e))

        self.rechecks.start(recheck())

    async def _heard_from_all(self, since: float, avoid: frozenset[str]) -> None:
        """Until every live worker outside ``avoid`` sent stats read after ``since`` (monotonic
        seconds here), for one heartbeat TTL at most. A busy worker publishes its last reading,
        taken between steps, and one from before a load made while a step ran would not list it (a
        review): a reading's time here is when it was heard less its age when sent (``sent -
        taken``, both the worker's clock), so no two hosts' clocks are compared. A worker that
        does not say when it read (``taken`` 0: older) counts when heard after ``since``."""

        def fresh(st: WorkerStats) -> bool:
            age = st.sent - st.taken if st.taken else 0.0
            return self.workers[st.worker][1] - age > since

        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.s.heartbeat_ttl_s):
                while not all(fresh(w) for w in self.live() if w.worker not in avoid):
                    await self._heard.wait()

    async def _fail(
        self,
        req: GenerateRequest,
        seq: int,
        reason: str,
        kind: Refusal,
        code: ErrorCode = ErrorCode.INTERNAL,
        expect: tuple[str, int] | None = None,
    ) -> None:
        """Answer ``req`` with an error chunk, counted under ``kind``. ``expect``:
        a re-dispatch, failed only while its record still names that worker and attempt (the record
        goes with it); a request not yet dispatched has no record of ours to drop (one under its id
        is another request's)."""
        if expect is not None and not await self.store.delete_inflight(req.request_id, expect):
            return  # another dispatcher took it meanwhile
        self.metrics.refusals.labels(kind).inc()
        chunk = TokenChunk(
            request_id=req.request_id,
            seq=seq,
            error=error_text(reason),
            error_code=code,
            finish_reason=FinishReason.ERROR,
        )
        await bus.publish(self.nc, req.reply_to, chunk)

    async def _seed_from_redis(self) -> bool:
        # Workers and traffic seen before this dispatcher started, each heard when it last beat: as
        # heard now, a worker dead for most of a TTL looked fresh for another whole TTL, and took
        # a lost worker's requests (a trial: a dispatcher restarted after two workers died).
        beats, now = await self.store.beats(self.s.heartbeat_ttl_s), time.monotonic()
        for st, age in beats:
            self.workers.setdefault(st.worker, (st, now - age))
        self.traffic = await self.store.load_traffic()
        return True

    async def run(self, stop: asyncio.Event) -> None:
        if not await bus.when_reachable(self._seed_from_redis, "redis (dispatcher start)", stop):
            return  # stopped while Redis was down
        subs = [
            await bus.subscribe(self.nc, subjects.STATS_ALL, WorkerStats, self._on_stats),
            await self.nc.subscribe(subjects.REQUESTS, queue=subjects.DISPATCHERS, cb=self._on_request),
            await self.nc.subscribe(subjects.APP_REQUESTS, queue=subjects.DISPATCHERS, cb=self._on_request),
            # every dispatcher answers (the first answer counts): one that hangs must not make
            # every gateway's readiness fail for the pings NATS gave it (a helper's finding)
            await self.nc.subscribe(subjects.DISPATCHER_PING, cb=self._on_ping),
            await bus.subscribe(self.nc, subjects.LOST, LostRequests, self._on_lost, queue=subjects.DISPATCHERS),
            await bus.subscribe(self.nc, subjects.CLIENTS, ClientAlive, self._on_client),
            await bus.subscribe_senders(self.nc, subjects.APP_CLIENTS, ClientAlive, self._on_app_client),
            await bus.subscribe(self.nc, subjects.ABORT, AbortRequest, self._on_abort),
            await bus.subscribe(self.nc, subjects.PREFIX_CACHE_RESET, PrefixCacheReset, self._on_prefix_cache_reset),
            await bus.subscribe_senders(self.nc, subjects.APP_ABORTS, AbortRequest, self._on_app_abort),
        ]
        await bus.flush(self.nc)
        logger.info("dispatcher ready")
        notifier.ready("taking requests")
        opened = AdapterRegistry.open(self.nc, self.store, self.s.nats_kv_replicas)  # after: requests need not wait
        self.registry = await unless_stopped(opened, stop) or self.registry  # a hung Redis held a stop 20 s
        try:
            await self.watch_workers(stop)
        finally:
            await bus.unsubscribe(subs)
            await self.rechecks.close()  # their records stay: the workers hand them back to another dispatcher


async def serve(s: DispatcherSettings, stop: asyncio.Event) -> None:
    async with connections(s, stop) as (nc, store):
        dispatcher = Dispatcher(s, nc, store)
        async with metrics_endpoint(s, dispatcher.metrics.registry):
            await dispatcher.run(stop)
    log.stopped("dispatcher")
