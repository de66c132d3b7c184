"""The dispatcher service: takes requests off the shared subject, picks a worker, records the
in-flight entry, forwards. Several dispatchers share the load as one NATS queue group."""

from __future__ import annotations

import asyncio
import time

import msgspec
import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from dlora.common import log, subjects
from dlora.common.messages import ErrorCode, GenerateRequest, TokenChunk, WorkerStats
from dlora.common.settings import DispatcherSettings
from dlora.common.state import StateStore
from dlora.services.dispatcher.choose import choose_worker

logger = log.get("dispatcher")
_decode_request = msgspec.json.Decoder(GenerateRequest)
_decode_stats = msgspec.json.Decoder(WorkerStats)
_encode = msgspec.json.Encoder()


class Dispatcher:
    def __init__(self, settings: DispatcherSettings, nc: NATS, store: StateStore) -> None:
        self.s, self.nc, self.store = settings, nc, store
        # Latest stats per worker and when they arrived (monotonic); stale ones are ignored.
        self.workers: dict[str, tuple[WorkerStats, float]] = {}
        # Requests sent to each worker since its last stats: a burst must not all go to the
        # worker that looked idlest a moment ago.
        self.sent_since_stats: dict[str, int] = {}

    def live(self) -> list[WorkerStats]:
        now = time.monotonic()
        return [
            msgspec.structs.replace(st, waiting=st.waiting + self.sent_since_stats.get(st.worker, 0))
            for st, at in self.workers.values()
            if now - at <= self.s.heartbeat_ttl_s
        ]

    async def _on_stats(self, msg: Msg) -> None:
        try:
            st = _decode_stats.decode(msg.data)
        except msgspec.DecodeError:
            return
        self.workers[st.worker] = (st, time.monotonic())
        self.sent_since_stats[st.worker] = 0

    async def _on_request(self, msg: Msg) -> None:
        try:
            req = _decode_request.decode(msg.data)
        except msgspec.DecodeError as e:
            logger.warning("bad request message", error=str(e))
            return
        worker = choose_worker(self.live(), req.adapter)
        if worker is None:
            chunk = TokenChunk(request_id=req.request_id, seq=req.next_seq, error="no worker is available",
                               error_code=ErrorCode.UNAVAILABLE, finish_reason="error")
            await self.nc.publish(req.reply_to, _encode.encode(chunk))
            return
        self.sent_since_stats[worker] = self.sent_since_stats.get(worker, 0) + 1
        # Forward first: the Redis round trip stays off the request's path.
        await self.nc.publish(subjects.worker_requests(worker), msg.data)
        await self.store.put_inflight(req, worker)

    async def _seed_from_redis(self) -> None:
        # Workers seen before this dispatcher started, so the first requests need not wait a beat.
        for st in await self.store.live_workers():
            self.workers.setdefault(st.worker, (st, time.monotonic()))

    async def run(self, stop: asyncio.Event) -> None:
        await self._seed_from_redis()
        subs = [
            await self.nc.subscribe(subjects.STATS_ALL, cb=self._on_stats),
            await self.nc.subscribe(subjects.REQUESTS, queue=subjects.DISPATCHERS, cb=self._on_request),
        ]
        await self.nc.flush()
        logger.info("dispatcher ready")
        try:
            await stop.wait()
        finally:
            for sub in subs:
                await sub.unsubscribe()


async def serve(s: DispatcherSettings, stop: asyncio.Event) -> None:
    from redis.asyncio import Redis

    nc = await nats.connect(s.nats_url)
    redis = Redis.from_url(s.redis_url)
    try:
        await Dispatcher(s, nc, StateStore(redis, s.redis_prefix)).run(stop)
    finally:
        await nc.drain()
        await redis.aclose()
