"""The gateway service: OpenAI-compatible HTTP in, GenerateRequest on NATS out, chunks back as JSON
or server-sent events. Requests are checked before they are published (adapter known, parameters,
context length: ``shaping``, pure) so bad input gets a 4xx before it reaches a worker; this module
does the I/O around it."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import cast

import msgspec
from aiohttp import web
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from dlora.common import bus, log, lograte, subjects
from dlora.common.bus import connections
from dlora.common.clients import announce
from dlora.common.inflight import Inflight
from dlora.common.key_registry import KeyRegistry
from dlora.common.messages import (
    AbortRequest,
    AdapterEntry,
    ErrorCode,
    GenerateRequest,
    MovePlan,
    TokenChunk,
    WorkerStats,
)
from dlora.common.registry import AdapterRegistry
from dlora.common.state import StateStore
from dlora.common.urls import http_url
from dlora.model.config import ModelConfig, model_digest, sampling_defaults, served_name
from dlora.model.token_bytes import TokenText
from dlora.model.tokenizer import load_tokenizer
from dlora.services.gateway import access, monitoring, openai
from dlora.services.gateway.auth import Auth, Principal
from dlora.services.gateway.background import Background
from dlora.services.gateway.body import read_body
from dlora.services.gateway.chunk_wait import next_chunk
from dlora.services.gateway.connections import listen
from dlora.services.gateway.dialects import Dialect
from dlora.services.gateway.errors import error_response, failure_status
from dlora.services.gateway.grammar_pool import shaped
from dlora.services.gateway.hand_over import hand_over
from dlora.services.gateway.hosts import host_name, is_loopback
from dlora.services.gateway.metrics import SHUTTING_DOWN, Metrics, RequestTimer, keep_tidy
from dlora.services.gateway.openai import APIError, ChatBody, CompletionBody
from dlora.services.gateway.replies import GAP_WAIT_S
from dlora.services.gateway.responses import STATUS, ResponseWriter, RunningChoice
from dlora.services.gateway.responses_lease import SPAN_HEARTBEATS
from dlora.services.gateway.routes import make_app
from dlora.services.gateway.served_model import ServedModel, Tokenizer, model_problems
from dlora.services.gateway.settings import GatewaySettings
from dlora.services.gateway.shaping import Job, shape_request
from dlora.services.gateway.status import ClusterView
from dlora.services.gateway.stopping import drained
from dlora.services.notify import notifier
from dlora.services.run import StartupError

logger = log.get("gateway")
_encode_request = msgspec.json.Encoder()


class Gateway:
    """The OpenAI-compatible HTTP front: has each request checked and shaped (``shaping``: adapter
    version, prompt, parameters, context), publishes one ``GenerateRequest`` per choice to the dispatchers, relays
    the workers' chunks back as JSON or server-sent events, and administers the adapter registry.

    Runs on one asyncio loop; replies for every request it relays arrive on one subscription and
    are routed to the waiting handler by request id. It holds no request state beyond a handler's
    life: a gateway restart loses only the connections it had.
    """

    def __init__(self, settings: GatewaySettings, nc: NATS, store: StateStore) -> None:
        self.s, self.nc, self.store = settings, nc, store
        self.base_name = served_name(settings.model, settings.served_model_name)
        self.cfg = ModelConfig.from_dir(settings.model)
        self.tokenizer = load_tokenizer(settings.model)  # (transformers imported there)
        self.token_text = TokenText(self.tokenizer, self.cfg.vocab_size).prepare()  # on serve()'s thread, not the loop
        self.context = self.cfg.context_length()
        given = sampling_defaults(settings.model) if settings.generation_config == "auto" else {}
        if given:  # as vLLM says it
            logger.info("default sampling parameters from the model's generation_config.json", **given)
        # cast: HF types decode as str | list[str]; for a list of ids it is a str, as shaping expects
        compiling = (settings.grammar_compilation_timeout_s, settings.grammar_compilation_memory_mb)
        self.served = dataclasses.replace(
            ServedModel.of(cast(Tokenizer, self.tokenizer), self.cfg, self.context, given, *compiling),
            tool_call_parser=settings.tool_call_parser,
            reasoning_parser=settings.reasoning_parser,
            content_format=settings.chat_template_content_format,
            model_digest=model_digest(self.cfg, self.tokenizer.get_vocab()),
        )
        for what, problem in model_problems(self.served):
            logger.warning(what, error=problem)
        # Tokenizing a long prompt takes a while (a 1 MB one ~1 s): off the event loop, on one
        # thread, so it never stalls other requests' streams and the tokenizer sees one caller.
        self.shaping = ThreadPoolExecutor(1, thread_name_prefix="shaping")
        self.metrics = Metrics(self.base_name, settings.max_adapter_labels, self.served.context)
        self._redis_id: str | None = None  # data_epoch of the Redis the records live in, as last seen
        self._other_model: set[str] = set()  # workers heard serving another base model (logged once)
        self.cluster = ClusterView()  # the workers' latest stats and the migrator's plans, for /v1/status
        # One subscription for every reply to this gateway; chunks are routed to the waiting request.
        self.gateway_id = uuid.uuid4().hex[:12]
        self.replies: dict[str, asyncio.Queue[bytes]] = {}
        self.closing = False  # set by shutdown(): new requests are refused
        self.handling = 0  # completion and chat requests taken and not yet answered (shutdown_timeout_s waits for them)
        self._stopped = asyncio.Event()  # ends the announcements (shutdown)
        self._announcer: asyncio.Task[None] | None = None
        self.registry = AdapterRegistry(store, None)  # with its durable copy once started
        self.auth = Auth(settings, KeyRegistry(store, None))  # likewise
        self.state_bound = self.auth.state_bound  # a request's Redis reads (redis-py's tries: 20 s, Redis hung)
        self.background = Background(  # background responses, their runs' leases a few heartbeats long
            nc, store, self.state_bound, self.gateway_id, SPAN_HEARTBEATS * settings.heartbeat_ttl_s
        )

    # ---- handlers -----------------------------------------------------------------------
    async def generate(self, dialect: Callable[[], Dialect], request: web.Request) -> web.StreamResponse:
        """A completion, chat or Responses request (``dialect``: which; ``routes`` binds each path's)."""
        api, adapter_label, public = dialect(), "?", True  # the metrics' label; whether it may be shown (``metrics``)
        self.handling += 1
        try:
            if self.closing:  # those taken before go on for shutdown_timeout_s (shutdown)
                raise APIError(503, "the gateway is shutting down; try again")
            # Who asks, and within their key's limits, before the body is even read: a refusal
            # costs one Redis lookup.
            who = await self.auth.inference(request)
            with contextlib.ExitStack() as held:  # (a background response's run takes it over)
                held.enter_context(self.auth.admitted(who))
                raw, arrived = await self.read_body(request), time.monotonic()  # (vLLM's arrival: before tokenizing)
                try:
                    body, refused = await api.decode(raw, who), None
                except APIError as e:  # still counted under the model it names, read past the rest
                    body, refused = None, e
                # none named, or "": the base model, as vLLM serves it (and shaping)
                name = (body.model or self.base_name) if body is not None else openai.model_named(raw, self.base_name)
                access.note(request, model=name)
                entry = await self.entry(name, who) if name else None
                if entry is not None or name == self.base_name:  # a name never served stays "?"
                    adapter_label, public = name, entry is None or not entry.owner
                if body is None:
                    raise cast(APIError, refused)
                if traced := access.traced(request):  # the client's X-Request-Id: vLLM reads it first
                    body = msgspec.structs.replace(body, request_id=traced)
                access.note(request, traced=body.request_id)  # (where only the body names it)
                with RequestTimer(self.metrics, adapter_label, public, arrived) as timer:  # (its abort counted)
                    job = api.answer(await self._job(request, body, entry, who, api))
                    if (keeping := api.background()) is None:
                        return await self._relay(request, job, timer)
                # A background response is counted by its run (``_detached``): its streamed POST's
                # client leaving is no abort, the run goes on
                run = functools.partial(self._detached, adapter_label, public, arrived)
                return await self.background.start(request, job, keeping, held, run)
        except APIError as e:
            self.metrics.failed(adapter_label, e.status, public)
            return error_response(api.refused(e))
        except ConnectionResetError:
            raise
        except Exception as e:  # answered by json_errors (a 503 for Redis or NATS, else a 500): counted here
            self.metrics.failed(adapter_label, failure_status(e), public)
            raise
        finally:
            self.handling -= 1

    async def entry(self, model: str, who: Principal) -> AdapterEntry | None:
        """The adapter registered as ``model``, or None for the base model's name (no lookup) and
        for an adapter ``who`` may not use: the same 404 as a name never registered."""
        if model == self.base_name:
            return None
        entry = await self.registry.lookup(model, self.state_bound)
        return entry if entry is None or who.may_use(entry) else None

    async def _job(
        self,
        request: web.Request,
        body: CompletionBody | ChatBody,
        entry: AdapterEntry | None,
        who: Principal,
        api: Dialect,
    ) -> Job:
        """The request body shaped into its choices' requests (``shaping``), on the shaping thread,
        under an id made of the one the gateway drew for ``request`` (``access.ours``) as ``api`` answers it; its
        structured output compiled after shaping's checks, off that thread (``grammar_pool``)."""
        access.note(request, internal=(rid := api.response_id(isinstance(body, ChatBody), access.ours(request))))
        shape = functools.partial(
            shape_request,
            body,
            entry,
            self.served,
            base_name=self.base_name,
            request_id=rid,
            gateway_id=self.gateway_id,
            now=time.time(),
            tenant=who.tenant,
        )
        # (then its grammar compiled: a slow one holds no other's shaping)
        return await shaped(body, shape, self.shaping, self.served.grammars, self._stopped)

    async def _submit(self, request: GenerateRequest) -> None:
        """Hand one request to a dispatcher and wait until one has taken it: a NATS request to the
        dispatchers' queue group; with none running it is sent again until ``dispatch_timeout_s``
        is spent, and the client gets a 503 then, not after the chunk timeout.

        Raises:
            APIError(413): the request, encoded, is over what the message bus carries (less what
                the dispatcher adds to it).
            APIError(503): no dispatcher was subscribed, or none took the request, within
                ``dispatch_timeout_s``.
        """
        data = _encode_request.encode(request)
        if len(data) > (limit := self.nc.max_payload - _DISPATCH_ADDS):
            raise APIError(413, f"the request is {len(data)} bytes as sent to the workers; at most {limit}")
        if (k := request.params.prompt_logprobs) is not None:  # its first reply carries an entry a prompt token
            size = len(request.prompt_token_ids or []) * (_ENTRY_BYTES + _ALTERNATIVE_BYTES * k)
            if size > self.nc.max_payload - _DISPATCH_ADDS:
                raise APIError(
                    413,
                    f"the logprobs of {len(request.prompt_token_ids or [])} prompt tokens with {k} alternatives "
                    f"each come to about {size} bytes, over what the message bus carries ({self.nc.max_payload}); "
                    "ask for fewer alternatives or send a shorter prompt",
                    param="logprobs",
                )
        try:  # a dispatcher restarting is waited for (``hand_over``)
            await hand_over(
                self.nc, subjects.REQUESTS, data, self.s.dispatch_timeout_s, self.metrics.dispatch_waits.inc
            )
        except NoRespondersError:
            raise APIError(
                503, f"no dispatcher is running (waited {self.s.dispatch_timeout_s:g} s); try again"
            ) from None
        except NatsTimeoutError:
            raise APIError(503, f"no dispatcher took the request within {self.s.dispatch_timeout_s} s") from None

    async def _relay(self, request: web.Request, job: Job, timer: RequestTimer) -> web.StreamResponse:
        """Publishes the job's requests and writes their chunks back until every choice is over,
        one fails (the others are aborted), or the client goes away (all are aborted).

        Raises:
            APIError(503): the gateway is shutting down, or no dispatcher took the request.
        """
        # Checked here, with no wait before the request is registered, so that shutdown() sees it:
        # one taken before the stop and shaped past its wait would otherwise run for nobody.
        if self._stopped.is_set():
            raise APIError(503, "the gateway is shutting down; try again")
        choices = [RunningChoice.of(p, keep_ids=job.return_token_ids) for p in job.choices]
        by_id = {c.request.request_id: c for c in choices if c.request is not None}
        replies: asyncio.Queue[bytes] = asyncio.Queue()
        self.replies.update(dict.fromkeys(by_id, replies))
        redis_id = self._redis_id  # the Redis data its records go to, as last seen
        response = ResponseWriter(request, job, choices, self.token_text, self.s.send_timeout_s)
        try:
            # Every hand-over waited for: those taken are counted (vllm:request_success, aborts)
            sent = await asyncio.gather(*(self._submit(c.request) for c in by_id.values()), return_exceptions=True)
            handed = [c for c, e in zip(by_id.values(), sent) if e is None]
            timer.began(handed)
            if refused := next((e for e in sent if e is not None), None):
                await self._abort(list(by_id.values()))  # they would run for nobody (one timed out: taken later)
                raise refused
            while (late := next((c for c in choices if c.out.finish_reason is None), None)) is not None:
                # A choice with a gap in its chunks waits for it only so long (the re-sends)
                gap = next((c for c in choices if c.replies and c.replies.gap_open), None)
                timeout_s = GAP_WAIT_S if gap else self.s.chunk_timeout_s
                if replies.empty():  # nothing more waiting to go out with the events held
                    await response.flush()
                chunk = await next_chunk(
                    replies,
                    gap or late,
                    timeout_s,
                    check_s=2 * self.s.heartbeat_ttl_s,
                    record=functools.partial(self._record, redis_id=redis_id),
                    stepped_since=self.cluster.stepped_since,
                    subject=subjects.replies_of(self.gateway_id),
                    patient=gap is None,
                )
                if chunk is None:
                    continue
                if request.transport is None or request.transport.is_closing():
                    raise ConnectionResetError("the client went away")  # whether or not we were cancelled
                choice = by_id.get(chunk.request_id)
                if choice is None:
                    continue
                # none for a duplicate after a resume; several when it fills a gap (chunks re-sent)
                ready = choice.replies.take(chunk, time.monotonic())
                for taken in ready:
                    # (before an error: the chunks a gap's re-send released in order were the
                    # client's, dropped when the gap left behind them then timed out)
                    if taken.error is None:
                        timer.chunk(taken, choice.replies.tokens)
                        await response.add(choice, taken)
                if choice.replies.error is not None:
                    # Every choice that may still run, the failed one too: a chunk timeout is made
                    # here, and the request it gave up on may still be queued or running (an abort
                    # of a request that already ended is harmless).
                    await self._abort([c for c in choices if c.out.finish_reason is None])
                    if response.stream is not None:  # else the APIError it raises is counted
                        timer.failed(STATUS.get(choice.replies.error_code or ErrorCode.INTERNAL, 500))
                    return await response.fail(choice.replies)
            per_choice = [c.completion_tokens for c in choices]
            answer = await response.finish(sum(per_choice))  # then counted: a client gone in it is an abort
            timer.done(max(per_choice), sum(per_choice))
            return answer
        except (asyncio.CancelledError, ConnectionResetError) as e:
            # The client went away: stop the work wherever it runs.
            await self._abort([c for c in choices if c.out.finish_reason is None])
            timer.aborted()
            if isinstance(e, asyncio.CancelledError):
                raise
            # Nobody reads it; raised, aiohttp would log a traceback for a client that hung up.
            return response.stream or web.Response(status=499)
        finally:
            access.note(request, workers=sorted({c.replies.worker for c in choices if c.replies and c.replies.worker}))
            for rid in by_id:
                del self.replies[rid]

    async def _detached(self, label: str, public: bool, arrived: float, request: web.Request, job: Job) -> None:
        """A background response's relay (``background``), timed and counted as a request's."""
        with RequestTimer(self.metrics, label, public, arrived) as timer:
            try:
                await self._relay(request, job, timer)
            except APIError as e:
                self.metrics.failed(label, e.status, public)
                raise

    async def _record(self, request_id: str, redis_id: str | None) -> Inflight | None | bool:
        """``request_id``'s in-flight record in the Redis data ``redis_id``; None: it has none;
        False: Redis cannot say, or holds other data now."""
        try:
            async with self.state_bound():
                self._redis_id = await self.store.data_epoch()
                return await self.store.get_inflight(request_id) if self._redis_id == redis_id else False
        except bus.STATE_OUTAGE:
            return False

    async def shutdown(self, stop: asyncio.Event | None = None) -> int:
        """Before the gateway stops: refuse new requests (503); let those taken finish for up to
        ``shutdown_timeout_s`` (less if ``stop`` is hurried); then abort every request still in
        flight on its worker (published and flushed, so they go out before NATS is drained), and
        end each one's response at once with a 503 (or an error event on a stream already open)
        instead of leaving the work to run on for a client that will be cut off. The
        announcements go on while it waits: a worker drops a silent gateway's requests. Returns how
        many it ended so (0: every one finished)."""
        self.closing = True

        def running() -> int:  # (background runs drain too)
            return self.handling + len(self.background.running)

        if self.s.shutdown_timeout_s > 0 and running():
            logger.info("finishing requests", requests=running(), timeout_s=self.s.shutdown_timeout_s)
            if left := await drained(running, self.s.shutdown_timeout_s, stop, lambda: self.nc.is_closed):
                logger.warning("requests still running at the shutdown timeout are ended", requests=left)
        self._stopped.set()
        in_flight = dict(self.replies)
        # The error (from "": it ends its choice whatever its seq) before the aborts: a worker's abort
        # chunk came back first during the flush, a 200 "abort" where the 503 was owed (CI, loaded)
        for rid, queue in in_flight.items():
            chunk = TokenChunk(request_id=rid, seq=0, error=SHUTTING_DOWN, error_code=ErrorCode.UNAVAILABLE)
            queue.put_nowait(msgspec.json.encode(chunk))
        try:
            for rid in in_flight:
                await bus.publish(self.nc, subjects.ABORT, AbortRequest(request_id=rid))
            await bus.flush(self.nc, round_trip_s=2)
        except (NatsError, TimeoutError) as e:  # NATS is down: nothing can reach the workers anyway
            logger.warning("aborts on shutdown not confirmed", requests=len(in_flight), error=type(e).__name__)
        await self.background.settled(5.0)  # failed by the errors above: their records written before Redis closes
        return len(in_flight)

    def close(self) -> None:
        """After the listener closed (no handler left to shape a request): the shaping thread ends."""
        self.shaping.shutdown(wait=False)

    async def _abort(self, choices: list[RunningChoice]) -> None:
        for c in choices:
            if c.request is not None:
                await bus.publish(self.nc, subjects.ABORT, AbortRequest(request_id=c.request.request_id))

    async def _on_reply(self, msg: Msg) -> None:
        queue = self.replies.get(msg.subject.rsplit(".", 1)[-1])
        if queue is not None:  # else: the request is already over (client gone)
            queue.put_nowait(msg.data)

    async def read_body(self, request: web.Request) -> bytes:
        return await read_body(request, self.s.max_body_bytes, self.s.body_timeout_s)

    def app(self) -> web.Application:
        """The HTTP application: every route (``routes.make_app``)."""
        return make_app(self)

    async def start(self) -> None:
        self.registry = await AdapterRegistry.open(self.nc, self.store, self.s.nats_kv_replicas)
        self.auth.keys = await KeyRegistry.open(self.nc, self.store, self.s.nats_kv_replicas)
        if self.s.auth == "none" and not is_loopback(host_name(self.s.host)):
            logger.warning("inference is open to anyone who reaches this address (auth = none)", host=self.s.host)
        await bus.subscribe(self.nc, subjects.STATS_ALL, WorkerStats, functools.partial(monitoring.on_stats, self))
        await bus.subscribe(self.nc, subjects.MOVES, MovePlan, functools.partial(monitoring.on_plan, self))
        await self.nc.subscribe(subjects.replies_of(self.gateway_id), cb=self._on_reply)
        await self.background.listen()
        await bus.flush(self.nc)
        with contextlib.suppress(*bus.STATE_OUTAGE):  # down at start: learnt at the first check
            self._redis_id = await self.store.data_epoch()
        # Workers drop this gateway's requests once these stop (it died without aborting them).
        self._announcer = asyncio.create_task(announce(self.nc, self.gateway_id, self._stopped))
        self._reconciler = asyncio.create_task(self.auth.keys.keep_reconciled(self._stopped))
        self._tidier = asyncio.create_task(keep_tidy(self.metrics, self.store, self.state_bound, self._stopped))


async def serve(s: GatewaySettings, stop: asyncio.Event) -> None:
    lograte.install()  # before the first connection: asyncio's and aiohttp's per-connection lines
    async with connections(s, stop) as (nc, store):
        try:
            gw = await asyncio.to_thread(Gateway, s, nc, store)
        except (OSError, ValueError) as e:  # the model directory: its config or tokenizer
            raise StartupError(f"the gateway cannot read the model in {s.model}: {e}") from e
        await gw.start()
        listener = await listen(gw.app(), s)
        logger.info("gateway ready", url=http_url(s.host, s.port))
        ready = asyncio.create_task(notifier.ready_when(store.r.ping, f"serving on {http_url(s.host, s.port)}"))
        try:
            await stop.wait()
        finally:
            ready.cancel()
            ended = await gw.shutdown(stop)
            await listener.close()
            gw.close()
    log.stopped("gateway", ended=ended)


# Bytes a dispatcher may add to a request before forwarding it (a seed, the adapter's version, its
# flags): a request within them of NATS's max_payload would be refused there, after the 200.
_DISPATCH_ADDS = 1024
# A prompt logprob entry's JSON, at most (a 128k vocabulary's ids): the entry (its rank too), and each alternative.
_ENTRY_BYTES, _ALTERNATIVE_BYTES = 48, 30
