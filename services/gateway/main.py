"""The gateway service: OpenAI-compatible HTTP in, GenerateRequest on NATS out, chunks back as JSON
or server-sent events. Requests are checked here (adapter known, parameters, context length) so
bad input gets a 4xx before it reaches a worker."""

from __future__ import annotations

import asyncio
import hmac
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from dlora.common import bus, log, subjects
from dlora.common.bus import connections
from dlora.common.messages import (
    AbortRequest,
    AdapterEntry,
    AdapterEvent,
    ErrorCode,
    GenerateRequest,
    TokenChunk,
    WorkerStats,
)
from dlora.services.gateway.settings import GatewaySettings
from dlora.common.state import StateStore
from dlora.services.gateway import openai
from dlora.services.gateway.admin import check_adapter
from dlora.services.gateway.metrics import Metrics
from dlora.services.gateway.openai import APIError, ChatBody, CompletionBody, Shape
from dlora.services.gateway.replies import ReplyStream
from dlora.model.config import ModelConfig

logger = log.get("gateway")
_decode_chunk = msgspec.json.Decoder(TokenChunk)
MAX_CHOICES = 256  # prompts x n in one request
_STATUS = {ErrorCode.BAD_REQUEST: 400, ErrorCode.NOT_FOUND: 404, ErrorCode.UNAVAILABLE: 503, ErrorCode.INTERNAL: 500}


@dataclass
class _Choice:
    """One choice in flight: its request to the workers and what came back so far."""

    out: openai.Choice
    request: GenerateRequest | None = None  # None: nothing to generate (max_tokens 0)
    replies: ReplyStream | None = None  # its chunks, with the request
    offset: int = 0  # characters of text so far, for completions' text_offset
    parts: list[dict[str, Any]] = field(default_factory=list)  # logprobs objects, non-streamed


@dataclass
class _Job:
    """One HTTP request: its response shape, body and choices."""

    shape: Shape
    body: Any
    adapter: str | None
    prompt_tokens: int
    choices: list[_Choice] = field(default_factory=list)


class Gateway:
    """The OpenAI-compatible HTTP front: checks and shapes each request (adapter version, prompt,
    parameters, context), publishes one ``GenerateRequest`` per choice to the dispatchers, relays
    the workers' chunks back as JSON or server-sent events, and administers the adapter registry.

    Runs on one asyncio loop; replies for every request it relays arrive on one subscription and
    are routed to the waiting handler by request id. It holds no request state beyond a handler's
    life: a gateway restart loses only the connections it had.
    """

    def __init__(self, settings: GatewaySettings, nc: NATS, store: StateStore) -> None:
        self.s, self.nc, self.store = settings, nc, store
        self.base_name = settings.served_model_name or Path(settings.model).name
        self.cfg = ModelConfig.from_dir(settings.model)
        # Here, not at import: transformers 5's AutoTokenizer imports torch (its config machinery),
        # and only a running gateway needs the tokenizer, not the CLI or the tests importing this.
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(settings.model)
        self.context = self.cfg.context_length()
        self.metrics = Metrics()
        # One subscription for every reply to this gateway; chunks are routed to the waiting request.
        self.gateway_id = uuid.uuid4().hex[:12]
        self.replies: dict[str, asyncio.Queue[bytes]] = {}

    # ---- request preparation ------------------------------------------------------------
    async def _adapter_for(self, model: str) -> AdapterEntry | None:
        """The registered adapter (its current version) that ``model`` names; None: the base model."""
        if model == self.base_name:
            return None
        entry = await self.store.get_adapter(model)
        if entry is None:
            raise APIError(404, f"model {model!r} does not exist (neither the base model nor a registered adapter)",
                           param="model")
        return entry

    def _prompts(self, prompt: str | list[Any]) -> list[tuple[list[int], str | None]]:
        """Each prompt's ids, and its text where it came as a string: a string, a list of token
        ids, or a list of either (several prompts)."""
        many = isinstance(prompt, list) and bool(prompt) and all(isinstance(p, (str, list)) for p in prompt)
        out: list[tuple[list[int], str | None]] = []
        for p in prompt if many else [prompt]:
            if isinstance(p, str):
                out.append((list(self.tokenizer.encode(p)), p))
                continue
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in p):
                raise APIError(400, "prompt must be a string, a list of token ids, or a list of either",
                               param="prompt")
            if any(not 0 <= t < self.cfg.vocab_size for t in p):
                raise APIError(400, f"prompt token ids must be in [0, {self.cfg.vocab_size})", param="prompt")
            out.append((list(p), None))
        return out

    def _max_tokens(self, ids: list[int], asked: int | None) -> int:
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        room = self.context - len(ids)
        if room <= 0 or (asked is not None and asked > room):
            raise APIError(400, f"this model's maximum context length is {self.context} tokens; the prompt has "
                                f"{len(ids)} and max_tokens asks for {asked}", param="max_tokens")
        return room if asked is None else asked

    async def _prepare(self, raw: bytes, chat: bool) -> _Job:
        """The request body as one GenerateRequest per choice: each prompt x ``n`` samples (choice
        index prompt x n + sample). A seeded request's samples take seeds seed, seed + 1, ..."""
        body = openai.decode_body(raw, ChatBody if chat else CompletionBody)
        adapter = await self._adapter_for(body.model)
        if chat:
            prompts = [(openai.chat_prompt_ids(body.messages, self.tokenizer), None)]
            asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        else:
            prompts, asked = self._prompts(body.prompt), 16 if body.max_tokens is None else body.max_tokens
        echo = not chat and bool(body.echo)
        n = body.n or 1
        if len(prompts) * n > MAX_CHOICES:
            raise APIError(400, f"{len(prompts)} prompts x n={n} is {len(prompts) * n} choices; at most {MAX_CHOICES} "
                                "per request", param="n")
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        job = _Job(Shape.new(chat, rid, body.model), body, adapter.name if adapter else None,
                   prompt_tokens=sum(len(ids) for ids, _ in prompts))
        for p, (ids, text) in enumerate(prompts):
            generate = asked != 0  # max_tokens 0: nothing generated (with echo: the prompt back)
            params = openai.sampling_params(body, self._max_tokens(ids, asked) if generate else 1)
            # echoed as the client wrote it; token ids as text, without special tokens
            prefix = "" if not echo else text if text is not None else self.tokenizer.decode(ids, skip_special_tokens=True)
            for i in range(n):
                index = p * n + i
                choice = _Choice(openai.Choice(index, text=prefix), offset=len(prefix))
                if generate:
                    sub = f"{rid}-{index}"
                    choice.replies = ReplyStream(sub)
                    seeded = params if params.seed is None else msgspec.structs.replace(params, seed=params.seed + i)
                    choice.request = GenerateRequest(
                        request_id=sub, reply_to=subjects.reply_inbox(sub, self.gateway_id), adapter=job.adapter,
                        adapter_version=adapter.version if adapter else None, prompt_token_ids=ids, params=seeded,
                        tenant=body.user or "", created=time.time())
                else:
                    choice.out.finish_reason = "length"
                job.choices.append(choice)
        return job

    # ---- handlers -----------------------------------------------------------------------
    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        adapter_label = "?"
        try:
            raw = await _read_body(request, self.s.max_body_bytes)
            job = await self._prepare(raw, chat)
            adapter_label = job.adapter or self.base_name
            return await self._relay(request, job)
        except APIError as e:
            self.metrics.requests.labels(adapter_label, str(e.status)).inc()
            return web.json_response(e.body(), status=e.status)

    def _decode_token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _logprobs(self, job: _Job, choice: _Choice, chunk: TokenChunk) -> dict[str, Any] | None:
        if not chunk.logprobs:
            return None
        if job.shape.chat:
            return openai.chat_logprobs(chunk.logprobs, self._decode_token)
        out = openai.completion_logprobs(chunk.logprobs, self._decode_token, choice.offset)
        choice.offset += sum(len(t) for t in out["tokens"])  # the next chunk's text_offset starts here
        return out

    async def _relay(self, request: web.Request, job: _Job) -> web.StreamResponse:
        label, shape, body = job.adapter or self.base_name, job.shape, job.body
        replies: asyncio.Queue[bytes] = asyncio.Queue()
        by_id = {c.request.request_id: c for c in job.choices if c.request is not None}
        for rid in by_id:
            self.replies[rid] = replies
        start = time.monotonic()
        stream: web.StreamResponse | None = None
        first_at: float | None = None
        stream_mode = bool(body.stream)
        try:
            for c in by_id.values():
                await bus.publish(self.nc, subjects.REQUESTS, c.request)
            while any(c.out.finish_reason is None for c in job.choices):
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow the handler's
                # cancellation when get() completes at the same moment (CPython #86296), and the
                # request then ran to the end for a client long gone.
                try:
                    async with asyncio.timeout(self.s.chunk_timeout_s):
                        data = await replies.get()
                except TimeoutError:
                    late = next(c for c in job.choices if c.out.finish_reason is None)
                    chunk = TokenChunk(request_id=late.request.request_id, seq=late.replies.next_seq,
                                       error="no worker answered in time", error_code=ErrorCode.UNAVAILABLE)
                else:
                    try:
                        chunk = _decode_chunk.decode(data)
                    except msgspec.DecodeError as e:
                        bus.reject(subjects.replies_of(self.gateway_id), "(reply)", TokenChunk, e)
                        continue
                if request.transport is None or request.transport.is_closing():
                    raise ConnectionResetError("the client went away")  # whether or not we were cancelled
                choice = by_id.get(chunk.request_id)
                if choice is None or not choice.replies.accept(chunk):  # a duplicate after a resume
                    continue
                if choice.replies.error is not None:
                    await self._abort([c for c in job.choices if c is not choice and c.out.finish_reason is None])
                    if stream is None:
                        raise APIError(_STATUS.get(choice.replies.error_code or ErrorCode.INTERNAL, 500),
                                       choice.replies.error)
                    await _sse(stream, {"error": {"message": choice.replies.error, "type": "server_error"}})
                    break
                if first_at is None:
                    first_at = time.monotonic()
                    self.metrics.ttft.labels(label).observe(first_at - start)
                    if chunk.queue_seconds is not None:
                        self.metrics.queue.labels(label).observe(chunk.queue_seconds)
                if stream_mode and stream is None:  # opened at the first chunk: errors before it get a status
                    stream = await self._open_stream(request, job)
                logprobs = self._logprobs(job, choice, chunk)
                choice.out.finish_reason = chunk.finish_reason
                if stream is not None:
                    # One event per worker chunk (a step's token), text or not, so clients can time tokens.
                    await _sse(stream, shape.chunk(chunk.text, chunk.finish_reason, index=choice.out.index,
                                                   logprobs=logprobs))
                else:
                    choice.out.text += chunk.text
                    if logprobs is not None:
                        choice.parts.append(logprobs)
            else:
                per_choice = [c.replies.tokens if c.replies else 0 for c in job.choices]
                completion = sum(per_choice)
                self._observe_done(label, start, first_at, max(per_choice))
                if not stream_mode:
                    for c in job.choices:
                        c.out.logprobs = openai.merge_logprobs(shape.chat, c.parts)
                    return web.json_response(shape.full([c.out for c in job.choices], job.prompt_tokens, completion))
                stream = stream or await self._open_stream(request, job)  # echo with max_tokens 0: no chunk came
                if body.stream_options is not None and body.stream_options.include_usage:
                    await _sse(stream, shape.usage_chunk(job.prompt_tokens, completion))
            assert stream is not None
            await stream.write(b"data: [DONE]\n\n")
            await stream.write_eof()
            return stream
        except (asyncio.CancelledError, ConnectionResetError):
            # The client went away: stop the work wherever it runs.
            await self._abort([c for c in job.choices if c.out.finish_reason is None])
            self.metrics.requests.labels(label, "aborted").inc()
            raise
        finally:
            for rid in by_id:
                del self.replies[rid]

    async def _open_stream(self, request: web.Request, job: _Job) -> web.StreamResponse:
        """The SSE response, opening with each choice's role (chat) or echoed prompt (completions)."""
        stream = await _open_sse(request)
        for c in job.choices:
            if job.shape.chat or c.out.text or c.out.finish_reason:
                await _sse(stream, job.shape.chunk(c.out.text, c.out.finish_reason, first=True, index=c.out.index))
        return stream

    async def _abort(self, choices: list[_Choice]) -> None:
        for c in choices:
            if c.request is not None:
                await bus.publish(self.nc, subjects.ABORT, AbortRequest(request_id=c.request.request_id))

    def _observe_done(self, label: str, start: float, first_at: float | None, n_tokens: int) -> None:
        end = time.monotonic()
        self.metrics.requests.labels(label, "200").inc()
        self.metrics.e2e.labels(label).observe(end - start)
        if first_at is not None and n_tokens > 1:
            self.metrics.tpot.labels(label).observe((end - first_at) / (n_tokens - 1))

    async def models(self, request: web.Request) -> web.Response:
        """The base model and every adapter (with the base as parent). Where an adapter's files lie
        is for admin callers only: others see its name as its root."""
        admin = self._is_admin(request)
        created = int(time.time())
        data = [{"id": self.base_name, "object": "model", "created": created, "owned_by": "dlora",
                 "root": self.base_name, "parent": None}]
        for e in await self.store.list_adapters():
            data.append({"id": e.name, "object": "model", "created": int(e.created), "owned_by": "dlora",
                         "root": e.path if admin else e.name, "parent": self.base_name, "rank": e.rank,
                         "version": e.version})
        return web.json_response({"object": "list", "data": data})

    def _is_admin(self, request: web.Request) -> bool:
        given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        return bool(self.s.admin_key) and hmac.compare_digest(given, f"Bearer {self.s.admin_key}".encode())

    def _check_admin(self, request: web.Request) -> None:
        if not self.s.admin_key:
            raise APIError(401, "adapter admin is disabled: no admin_key is configured")
        if not self._is_admin(request):
            raise APIError(401, "adapter admin needs 'Authorization: Bearer <admin key>'")

    async def add_adapter(self, request: web.Request) -> web.Response:
        try:
            self._check_admin(request)
            raw = await _read_body(request, self.s.max_body_bytes)
            body = openai.decode_body(raw, _AdapterBody)
            taken = APIError(409, f"adapter {body.name!r} is already registered", param="name")
            if await self.store.get_adapter(body.name) is not None:  # cheap refusal before loading the files
                raise taken
            entry = await asyncio.to_thread(check_adapter, body.name, body.path, self.s.adapter_roots, self.base_name,
                                            self.cfg)
            if not await self.store.put_adapter(entry):  # atomic: of two racing registrations one wins
                raise taken
            await bus.publish(self.nc, subjects.ADAPTER_EVENTS, AdapterEvent(name=entry.name, removed=False,
                                                                                     version=entry.version))
            return web.json_response(msgspec.to_builtins(entry), status=201)
        except APIError as e:
            return web.json_response(e.body(), status=e.status)

    async def delete_adapter(self, request: web.Request) -> web.Response:
        try:
            self._check_admin(request)
            name = request.match_info["name"]
            if not await self.store.delete_adapter(name):
                raise APIError(404, f"adapter {name!r} is not registered", param="name")
            await bus.publish(self.nc, subjects.ADAPTER_EVENTS, AdapterEvent(name=name, removed=True))
            return web.json_response({"id": name, "object": "model", "deleted": True})
        except APIError as e:
            return web.json_response(e.body(), status=e.status)

    async def healthz(self, request: web.Request) -> web.Response:
        """Readiness (``/healthz``, ``/readyz``): 200 when a request can be served, i.e. NATS is
        connected and at least one worker is live (its heartbeat in Redis); else 503 with the
        reason and the counts, so a load balancer stops sending here."""
        try:
            workers = await self.store.live_workers()
        except Exception as e:  # noqa: BLE001 - Redis down is a readiness answer, not a crash
            return web.json_response({"status": "unavailable", "workers": 0, "nats": self.nc.is_connected,
                                      "reason": f"the state store (Redis) is unreachable: {type(e).__name__}"},
                                     status=503)
        body = {"workers": len(workers), "running": sum(w.running for w in workers),
                "waiting": sum(w.waiting for w in workers), "nats": self.nc.is_connected}
        reason = ("no worker is live" if not workers else None) or (
            "the message bus (NATS) is disconnected" if not self.nc.is_connected else None)
        if reason:
            return web.json_response({"status": "unavailable", **body, "reason": reason}, status=503)
        return web.json_response({"status": "ok", **body})

    async def livez(self, request: web.Request) -> web.Response:
        """Liveness: 200 while this process answers, whatever its dependencies (restart it only if not)."""
        return web.json_response({"status": "ok"})

    async def metrics_handler(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), content_type="text/plain", charset="utf-8")

    async def _on_reply(self, msg: Msg) -> None:
        queue = self.replies.get(msg.subject.rsplit(".", 1)[-1])
        if queue is not None:  # else: the request is already over (client gone)
            queue.put_nowait(msg.data)

    async def _on_stats(self, st: WorkerStats) -> None:
        self.metrics.observe_worker(st)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.s.max_body_bytes + 1024, middlewares=[_json_errors])
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/adapters", self.add_adapter)
        app.router.add_delete("/v1/adapters/{name}", self.delete_adapter)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.healthz)
        app.router.add_get("/livez", self.livez)
        app.router.add_get("/metrics", self.metrics_handler)
        return app

    async def start(self) -> None:
        await bus.subscribe(self.nc, subjects.STATS_ALL, WorkerStats, self._on_stats)
        await self.nc.subscribe(subjects.replies_of(self.gateway_id), cb=self._on_reply)
        await self.nc.flush()


class _AdapterBody(msgspec.Struct, kw_only=True):
    name: str
    path: str


async def _read_body(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise APIError(400, f"request body of {request.content_length} bytes exceeds the limit of {limit}")
    raw = await request.content.read(limit + 1)
    if len(raw) > limit:
        raise APIError(400, f"request body exceeds the limit of {limit} bytes")
    return raw


async def _open_sse(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    return resp


async def _sse(stream: web.StreamResponse, obj: dict[str, Any]) -> None:
    await stream.write(b"data: " + msgspec.json.encode(obj) + b"\n\n")


@web.middleware
async def _json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Unknown routes and methods answer in the OpenAI error shape too, and so does a fault of
    ours: a 500 that names its cause, never a bare one."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return web.json_response(APIError(e.status, e.reason).body(), status=e.status)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as e:  # noqa: BLE001 - see the docstring
        logger.exception("handler failed", path=request.path)
        return web.json_response(APIError(500, f"internal error: {type(e).__name__}: {e}").body(), status=500)


async def serve(s: GatewaySettings, stop: asyncio.Event) -> None:
    async with connections(s) as (nc, store):
        gw = await asyncio.to_thread(Gateway, s, nc, store)
        await gw.start()
        runner = web.AppRunner(gw.app(), handler_cancellation=True, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, s.host, s.port).start()
        logger.info("gateway ready", url=f"http://{s.host}:{s.port}")
        try:
            await stop.wait()
        finally:
            await runner.cleanup()
