"""The worker service: the engine behind NATS. One task owns the engine; handlers only enqueue.

Requests arrive on ``subjects.worker_requests(id)``; every step's tokens go out as TokenChunks on
each request's ``reply_to``; stats and a heartbeat go out every ``stats_interval_s``, and the stats
at once when the worker falls idle (``beats``); the batching policy's state is checkpointed to
Redis and restored at start.
"""

from __future__ import annotations

import asyncio
import functools
import secrets
import time

import msgspec
import structlog
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError

from dlora.common import bus, log, messages, recent, subjects
from dlora.common.aborts import Aborts
from dlora.common.bus import connections
from dlora.common.clients import Clients, link_of
from dlora.common.exporter import metrics_endpoint
from dlora.common.messages import (
    AbortRequest,
    AdapterEvent,
    ClientAlive,
    ErrorCode,
    GenerateRequest,
    KVChunk,
    MovePlan,
    Placement,
    PrefixCacheReset,
    PrefixCacheResetDone,
    WorkerStats,
)
from dlora.common.state import StateStore
from dlora.services.notify import notifier
from dlora.services.run import StartupError, hurried, killed_by_signals
from dlora.services.worker import drain, stepping, upkeep
from dlora.services.worker.adapters import AdapterRead, WorkerAdapters
from dlora.services.worker.admit import abort, adapter_read, admit, refuse_unreadable
from dlora.services.worker.arrival import Preparing, arrive, stop_preparing
from dlora.services.worker.beats import LIST_EVERY_S, publish_stats
from dlora.services.worker.chunks import Stream, error_chunk
from dlora.services.worker.commands import Abort, AdapterChanged, Add, Command, Commands, Prefetch, ResetPrefixCache
from dlora.services.worker.cycles import StepCycles
from dlora.services.worker.delivery import Delivery
from dlora.services.worker.engine import LLMEngine
from dlora.services.worker.engine.faults import device_lost, raise_if_lost
from dlora.services.worker.kv_inbox import KVInbox
from dlora.services.worker.lengths import OutputLengths
from dlora.services.worker.metrics import WorkerMetrics, worker_view
from dlora.services.worker.move_out import move_out
from dlora.services.worker.moves import Move, Refusals, moves_to_take
from dlora.services.worker.one_id import given_up, refuse_if_taken
from dlora.services.worker.records import ProgressRecords
from dlora.services.worker.settings import WorkerSettings
from dlora.services.worker.snapshot import settings_in_effect, worker_stats
from dlora.services.worker.tokenized import Tokenized

logger = log.get("worker")

_KV_WAIT_S = 5.0  # a moved request waits this long for its KV, then recomputes (unclaimed 4x as long: dropped)


class WorkerService:
    """The worker process's shell around one ``LLMEngine``: admission of requests (adapter version
    loaded, KV of a moved request awaited), the engine loop, the move protocol of the migrator's
    plans, and the stats, heartbeat and checkpoints it publishes.

    Bus handlers decode (``bus.subscribe``) and enqueue commands (a request once what it needs
    is prepared beside the steps: ``arrival``); one task (``run_loop``)
    applies them between steps and owns the engine, whose step runs in a thread. Every command
    and every step is applied under a guard: what fails, fails its request, never the worker."""

    def __init__(self, settings: WorkerSettings, nc: NATS, store: StateStore, engine: LLMEngine) -> None:
        self.s, self.nc, self.store, self.engine = settings, nc, store, engine
        self.commands = Commands()
        self.streams: dict[str, Stream] = {}
        self.kv_inbox = KVInbox(_KV_WAIT_S, 4 * _KV_WAIT_S)  # caches of requests moving here, as they arrive
        self.kv_seconds = 0.0  # what the moved caches taken here cost, in all (see WorkerStats)
        self.kv_tokens = 0
        self.lengths = OutputLengths()  # finished requests' lengths: what running ones may still take
        self.cycles = StepCycles()  # the loop's time per decode step, shell included (metrics)
        self.plan_epoch = 0  # the highest migrator epoch among the plans taken
        self.refusals = Refusals(settings.stats_interval_s)  # the planned moves refused lately (its stats say them)
        # the adapter versions loaded, kept to the registry; their reads end as commands, between steps
        self.adapters = WorkerAdapters(engine, store, post=self.commands.put)
        # Aborts seen lately by (request id, Abort.sender), and when: one can overtake its request.
        self.aborted = Aborts()
        self.expired_at = 0.0  # Unix seconds of the last look for requests past their deadline
        # Requests handed back once for another worker to take, with whether only one holding their
        # adapter's version can (admit.py): they did not decode here, or that version cannot load here.
        self.handed_back = recent.Recent[str, bool](messages.HANDED_BACK_MEMORY_S, messages.MAX_HANDED_BACK)
        self.incarnation = secrets.token_hex(6)  # this start: in the stats, a restart is told apart
        self.started = 0.0  # when the one-id guard let this start through (Redis's clock: one_id.py)
        self.taken_over_by: WorkerStats | None = None  # a later start under the id, once one beats
        self.pending: set[str] = set()  # requests received but not yet admitted (or refused)
        # those of them waiting, beside the steps, for a moved cache, a grammar or a long text
        # prompt's tokens (arrival.py)
        self.preparing: dict[str, Preparing] = {}
        self.data_epoch: str | None = None  # Redis's data token at the last look (``rerecord``)
        self.clients = Clients(settings.heartbeat_ttl_s, link_of(nc))  # reply readers, to drop abandoned requests
        self.records = ProgressRecords(store, settings.worker_id, settings.heartbeat_ttl_s)
        self.delivery = Delivery(nc, self.records.superseded)  # chunks out, and again after a NATS reconnect
        self._swept_at = 0.0  # when the in-flight records were last reconciled (sweep_inflight)
        self.reconciling = bus.Outage("in-flight reconciliation (redis, nats)")
        self.draining = False  # told to stop: finishing what runs here, given nothing new
        self.handed_over: set[str] = set()  # what the drain handed back (not handed back again as it exits)
        self.leaving = drain.stop_bound()  # the stop's Redis work, bounded as a whole (drain.py)
        self.device_failed = False  # the device failed for good: what is left here is handed back as deaths
        self.admitting: GenerateRequest | None = None  # the request being taken up, until it is
        self.stats: WorkerStats = self._snapshot()
        self._snapshot_at = time.monotonic()
        self.registered: dict[str, int] = {}  # adapter name -> rank, as the registry last listed them
        self.listed_at = -LIST_EVERY_S
        self.fell_idle = asyncio.Event()  # its stats go out at once (``beats``)
        self._busy = False  # it held requests at the last refresh of its stats
        self.metrics = WorkerMetrics(settings.worker_id, lambda: worker_view(self))
        self.tokenized = Tokenized(engine.tokenizer)  # arriving requests' prompts and bad_words
        self.settings = settings_in_effect(engine)  # for the metrics (read once: they do not change)

    # ---- bus handlers: decode and enqueue ---------------------------------------------------
    async def _on_request(self, req: GenerateRequest) -> None:
        await arrive(self, req)

    async def _on_client(self, alive: ClientAlive) -> None:
        if self.clients.heard(alive.client, time.monotonic(), alive.reconnects, alive.incarnation):
            self.delivery.resend_to(alive.client)  # what it may have missed

    async def _on_app_client(self, alive: ClientAlive, sender: str) -> None:
        if subjects.owns_client(sender, alive.client):
            await self._on_client(alive)

    async def _on_abort(self, abort: AbortRequest) -> None:
        await self.commands.put(Abort(abort.request_id))

    async def _on_app_abort(self, abort: AbortRequest, sender: str) -> None:
        await self.commands.put(Abort(abort.request_id, sender))

    async def _on_adapter_event(self, event: AdapterEvent) -> None:
        await self.commands.put(AdapterChanged(event.name, None if event.removed else event.version))

    async def _on_prefix_cache_reset(self, _: PrefixCacheReset, reply: str) -> None:
        await self.commands.put(ResetPrefixCache(reply))

    async def _on_moves(self, plan: MovePlan) -> None:
        moves = moves_to_take(plan, self.s.worker_id, self.plan_epoch, time.time(), self.streams, self.refusals.age_s)
        if moves is None:
            logger.info("stale plan ignored", plan=plan.plan_id, epoch=plan.epoch, seen=self.plan_epoch)
            return
        self.plan_epoch = plan.epoch
        for move in moves:  # requests no longer here are skipped when the move is applied
            await self.commands.put(move)

    async def _on_placement(self, placement: Placement) -> None:
        if mine := placement.workers.get(self.s.worker_id):
            await self.commands.put(Prefetch(mine))

    async def _on_kv_chunk(self, chunk: KVChunk) -> None:
        self.kv_inbox.put(chunk)

    # ---- the owner of the engine ----------------------------------------------------------
    async def _take(self, cmd: Command) -> None:
        """``_safely``, the requests received so far marked taken up first: a death while this
        worker loads their adapters or runs them counts against them (poison), none before."""
        await self.records.mark_taken()
        self.admitting = cmd.req if isinstance(cmd, Add) else None
        await self._safely(cmd)
        self.admitting = None  # left set when the device failed in it: its hand-over names it

    async def _safely(self, cmd: Command) -> None:
        """Apply one command; whatever goes wrong fails that command only (a request's with an
        error chunk naming the cause), never the worker; a device lost for good raises."""
        try:
            await self._apply(cmd)
        except Exception as e:
            raise_if_lost(e)
            logger.exception("command failed", command=type(cmd).__name__, error=str(e))
            if isinstance(cmd, Add):
                reason = f"the worker could not take the request: {type(e).__name__}: {e}"
                await bus.publish(
                    self.nc, cmd.req.reply_to, error_chunk(cmd.req, ErrorCode.INTERNAL, reason, self.s.worker_id)
                )
                # Its record goes too: left, it would be handed back (it never came, as the sweep
                # sees it) and fail on the next worker, and the next, without counting a death.
                self.records.unrecorded_ends[cmd.req.request_id] = cmd.req.recoveries
        self.adapters.tidy()

    async def _apply(self, cmd: Command) -> None:
        if isinstance(cmd, Move):
            await move_out(self, cmd)
        elif isinstance(cmd, Prefetch):
            await self.adapters.prefetch(cmd.adapters)
        elif isinstance(cmd, AdapterRead):
            await adapter_read(self, cmd)
        elif isinstance(cmd, Abort):
            await abort(self, cmd.request_id, cmd.sender)
        elif isinstance(cmd, AdapterChanged):
            self.adapters.changed(cmd.name, cmd.version)
        elif isinstance(cmd, ResetPrefixCache):
            blocks = self.engine.reset_prefix_cache()
            logger.info("prefix cache reset", blocks=blocks)
            await bus.publish(self.nc, cmd.reply, PrefixCacheResetDone(worker=self.s.worker_id, blocks=blocks))
        else:
            await self._add(cmd)

    async def drop(self, request_id: str, record: bool = True, attempt: int | None = None) -> None:
        """Stop a request held here without a word to its client (it went away, or another attempt
        serves it now: then only if the copy here is ``attempt``), and drop its in-flight record if
        ``record`` and the record is still this copy's."""
        stream = self.streams.get(request_id)
        if stream is None or attempt is not None and stream.request.recoveries != attempt:
            return
        del self.streams[request_id]
        self.engine.abort(request_id)
        if record:
            await self.records.end({request_id: stream.request.recoveries})
        else:  # another attempt serves it: what this copy sent is not sent again
            self.delivery.resend.forget(request_id)

    def aborted_lately(self, req: GenerateRequest) -> bool:
        """Whether an abort for ``req`` came lately: a gateway's, or its sender's (an app stops only its own)."""
        now = time.monotonic()
        return self.aborted.lately(req.request_id, None, now) or self.aborted.lately(req.request_id, req.owner, now)

    async def _add(self, cmd: Add) -> None:
        try:
            await admit(self, cmd)
        finally:
            self.pending.discard(cmd.req.request_id)

    # Methods (the work is their modules'), so that a test can pace or count them on one worker
    async def _step(self) -> None:
        """One step, its outputs sent and recorded (``stepping.step``)."""
        await stepping.step(self)

    async def _reconcile(self) -> None:
        """The in-flight records reconciled with what is held here (``upkeep.reconcile``)."""
        await upkeep.reconcile(self)

    async def run_loop(self, stop: asyncio.Event, done: asyncio.Event) -> None:
        """Steps until ``stop``, drains (``drain_timeout_s``), hands over the rest; then ``done``."""
        drain_until: float | None = None
        try:
            while self.taken_over_by is None:  # (then stopping at once: nothing here is ours to send)
                notifier.beat()  # a step that never returns stops these, and systemd's watchdog restarts us
                if stop.is_set():
                    drain_until = drain_until or await drain.start(self)
                    idle = not self.engine.has_unfinished() and self.commands.empty() and not self.preparing
                    if time.monotonic() >= drain_until or idle or hurried(stop):  # (Ctrl-C twice: at once)
                        await drain.hand_over(self)
                        return
                await self._turn()
        except Exception as e:  # a device lost for good, wherever it showed: hand over, then raise
            if device_lost(e):
                await drain.device_lost(self, e)
            raise
        finally:
            done.set()

    async def _turn(self) -> None:
        """One turn of the loop: reconcile now and then, take commands, step, refresh the stats."""
        if time.monotonic() - self._swept_at > min(self.s.heartbeat_ttl_s / 4, upkeep.HANDBACK_GRACE_S):
            self._swept_at = time.monotonic()
            try:
                await self._reconcile()
                self.reconciling.succeeded()
            except (*bus.STATE_OUTAGE, NatsError) as e:  # reconciled next time; said once, not at each try
                self.reconciling.failed(e)
            except Exception as e:  # noqa: BLE001 - tried again next time
                logger.warning("in-flight reconciliation failed", error=f"{type(e).__name__}: {e}")
        if not self.engine.runnable():  # (requests may wait for their adapter's read: its end wakes us)
            self.cycles.idle()
            try:  # idle: wait for work
                async with asyncio.timeout(0.2):  # not wait_for: see the gateway's _relay
                    cmd = await self.commands.get()
            except TimeoutError:
                await upkeep.expire(self)  # requests waiting for their adapter's read have deadlines too
                self._refresh_stats()  # idle, read again all the same: a dispatcher waits for a fresh reading
                return
            await self._take(cmd)
        # Those queued now, not any that come meanwhile: a flood of commands (aborts) would hold
        # off every step, and with a yield now and then nor the heartbeats (a helper's finding).
        for i in range(self.commands.qsize()):
            await self._take(self.commands.get_nowait())
            if i % 256 == 255:
                await asyncio.sleep(0)
        await upkeep.expire(self)
        if self.engine.runnable():
            await self._step()
            self.adapters.tidy()
        self._refresh_stats()

    def _refresh_stats(self) -> None:
        """The snapshot walks every request: taken as often as stats go out, not every step (and
        at once when the engine falls idle, so the last stats say so)."""
        now, idle = time.monotonic(), not self.engine.has_unfinished()
        if now - self._snapshot_at >= self.s.stats_interval_s / 2 or idle:
            self.stats, self._snapshot_at = self._snapshot(), now
        if idle and self._busy:  # (a request that came and went between two snapshots too)
            self.fell_idle.set()
        self._busy = not idle

    # ---- stats, heartbeat, checkpoint -----------------------------------------------------
    def _snapshot(self) -> WorkerStats:
        # Those waiting on arrival (a grammar, a moved cache, a long text prompt's tokens) or queued for
        # this loop (``Commands.queued``) wait too, as vLLM counts a request waiting for its grammar
        preparing = [*(p.req for p in self.preparing.values()), *self.commands.queued.values()]
        retired, stays = self.adapters.retired(), self.records.outage  # (stays: its moves refused, move_out)
        stats = worker_stats(
            self.s.worker_id, self.engine, self.lengths, self.kv_seconds, self.kv_tokens, retired, preparing, stays
        )
        reads = self.adapters.reads_stats()
        return msgspec.structs.replace(
            stats, incarnation=self.incarnation, started=self.started, draining=self.draining, **reads
        )

    async def run(self, stop: asyncio.Event) -> None:
        policy = functools.partial(self.store.load_policy, self.s.worker_id)
        if state := await bus.when_reachable(policy, "redis (worker start)", stop):
            self.engine.policy.restore(state)
        self.started = await refuse_if_taken(self.store, self.s)  # one process per id, or both run its requests
        self.stats = self._snapshot()  # (the start in it, before the first beat compares it)
        subs = [
            await bus.subscribe(
                self.nc,
                subjects.worker_requests(self.s.worker_id),
                GenerateRequest,
                self._on_request,
                refused=lambda msg, error: refuse_unreadable(self, msg, error),
            ),
            await bus.subscribe(self.nc, subjects.ABORT, AbortRequest, self._on_abort),
            await bus.subscribe_senders(self.nc, subjects.APP_ABORTS, AbortRequest, self._on_app_abort),
            await bus.subscribe(self.nc, subjects.ADAPTER_EVENTS, AdapterEvent, self._on_adapter_event),
            await bus.subscribe_requests(
                self.nc, subjects.PREFIX_CACHE_RESET, PrefixCacheReset, self._on_prefix_cache_reset
            ),
            await bus.subscribe(self.nc, subjects.MOVES, MovePlan, self._on_moves),
            await bus.subscribe(self.nc, subjects.kv_inbox(self.s.worker_id), KVChunk, self._on_kv_chunk, msgpack=True),
            await bus.subscribe(self.nc, subjects.PLACEMENT, Placement, self._on_placement),
            await bus.subscribe(self.nc, subjects.CLIENTS, ClientAlive, self._on_client),
            await bus.subscribe_senders(self.nc, subjects.APP_CLIENTS, ClientAlive, self._on_app_client),
        ]
        await bus.flush(self.nc)
        warm = asyncio.create_task(asyncio.to_thread(self.engine.grammars.warm))  # ~1 s: off the loop
        logger.info(
            "worker ready",
            worker=self.s.worker_id,
            cuda_graphs=self.engine.graphs is not None,  # what a vLLM user looks for in the start-up line
            async_scheduling=self.engine.config.async_scheduling,
            **self.settings,  # what took effect (vLLM logs its engine config at start)
        )
        notifier.ready(f"worker {self.s.worker_id} taking requests")
        try:
            done = asyncio.Event()  # stopped and drained: the stats and heartbeat go on until then
            ended = await asyncio.gather(self.run_loop(stop, done), publish_stats(self, done), return_exceptions=True)
            if errors := [e for e in ended if isinstance(e, BaseException)]:  # both over: no beat after a hand-over
                raise errors[0]
        finally:
            warm.cancel()
            stop_preparing(self)  # (after a hand-over, only those that came late: their records go back)
            self.adapters.close()
            await bus.unsubscribe(subs)
            await asyncio.gather(self.delivery.close(), self.records.close())  # (no ClientAlive starts a re-send now)
            if self.taken_over_by is None:  # (else its key, records and placement are the other's)
                await drain.leave(self)
        if self.taken_over_by is not None:
            raise StartupError(given_up(self.s.worker_id, self.taken_over_by))


def build_engine(s: WorkerSettings) -> LLMEngine:
    if s.torch_threads:
        import torch

        torch.set_num_threads(s.torch_threads)
    engine = LLMEngine(s.model, s.engine)
    engine.grammars.compile_timeout_s = s.grammar_compilation_timeout_s
    engine.grammars.compile_memory_mb = s.grammar_compilation_memory_mb
    return engine


async def serve(s: WorkerSettings, stop: asyncio.Event) -> None:
    structlog.contextvars.bind_contextvars(worker=s.worker_id)  # every line says whose (several under dlora up)
    try:
        with killed_by_signals(stop):  # (nothing to undo yet, and the load may hold the GIL: run.py)
            engine = await asyncio.to_thread(build_engine, s)
    except (OSError, ValueError) as e:  # the model directory, device or kernels: LLMEngine says which
        raise StartupError(f"the engine cannot start on {s.model}: {e}") from e
    async with connections(s, stop) as (nc, store):
        service = WorkerService(s, nc, store, engine)
        async with metrics_endpoint(s, service.metrics.registry, service.metrics.take):
            await service.run(stop)
