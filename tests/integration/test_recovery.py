"""A worker killed mid-stream (SIGKILL) loses no request: its requests resume on a live worker
from the tokens already delivered, and the client's stream is continuous; only a worker that took
a request up counts its loss as a death. The dispatcher's side alone: test_recovery_dispatch.py."""

from __future__ import annotations

import asyncio
import signal

import aiohttp
import nats
import pytest
from redis.asyncio import Redis

from dlora.common.state import StateStore
from dlora.model.make_tiny import TinyOutput
from dlora.services.dispatcher.main import Dispatcher
from dlora.services.dispatcher.settings import DispatcherSettings
from dlora.services.servers import Server
from dlora.services.worker.main import WorkerService, build_engine
from dlora.services.worker.settings import WorkerSettings
from tests.integration.conftest import small_engine, spawn_worker, sse_events, start_gateway, worker_settings
from tests.integration.test_gateway import offline

N = 400  # tokens: long enough that the victim is still generating when it dies


async def _live(store: StateStore, worker: str, timeout: float = 120.0) -> None:
    for _ in range(int(timeout / 0.1)):
        if any(w.worker == worker for w in await store.live_workers()):
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"{worker} never came up")


# Sampled only: a resume that draws what it would have drawn is exact for greedy a fortiori (the
# same path with a seed on top), and each run costs a worker process's start (about 17 s here).
@pytest.mark.parametrize("sampling", [{"temperature": 1.0, "top_p": 0.95, "seed": 1234}], ids=["sampled"])
async def test_sigkilled_worker_loses_no_request(
    nats_server: Server, redis_server: Server, redis: Redis, tiny_llama: TinyOutput, sampling: dict
) -> None:
    store = StateStore(redis)
    common = dict(nats_url=nats_server.url, redis_url=redis_server.url)
    # Its heartbeat lapses 2 s after it dies (5 s by default): only how soon its death is noticed.
    victim = spawn_worker(
        nats_server.url, redis_server.url, str(tiny_llama.model), "a-victim", DLORA_HEARTBEAT_TTL_S="2.0"
    )
    stop = asyncio.Event()
    conns, tasks = [], []
    try:
        # While the victim's process starts (the longest wait here), the survivor's engine is built
        # and the expected output computed, in this process.
        expected = offline(
            tiny_llama,
            [{"id": "x", "prompt_token_ids": [5, 40, 41, 300, 17], "max_tokens": N, "ignore_eos": True, **sampling}],
        )[0]
        ws = WorkerSettings(
            **common,
            worker_id="b-survivor",
            model=str(tiny_llama.model),
            stats_interval_s=0.1,
            engine=small_engine(),
            drain_timeout_s=0.0,  # (nothing here is of the drain: the stop hands over at once)
        )
        wnc = await nats.connect(nats_server.url)
        conns.append(wnc)
        survivor = WorkerService(ws, wnc, store, build_engine(ws))
        await _live(store, "a-victim")
        # The survivor is up from the start; on a tie the dispatcher picks "a-victim" (by name).
        tasks.append(asyncio.create_task(survivor.run(stop)))
        await _live(store, "b-survivor")
        nc = await nats.connect(nats_server.url)
        conns.append(nc)
        dispatcher = Dispatcher(DispatcherSettings(**common, heartbeat_ttl_s=1.0), nc, store)
        tasks.append(asyncio.create_task(dispatcher.run(stop)))
        base_url, runner = await start_gateway(nats_server.url, store, str(tiny_llama.model), conns)
        async with asyncio.timeout(30):  # the dispatcher has seen both workers' stats
            while not {"a-victim", "b-survivor"} <= dispatcher.workers.keys():
                await asyncio.sleep(0.02)

        body = {
            "model": "model",
            "prompt": [5, 40, 41, 300, 17],
            "max_tokens": N,
            **sampling,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        texts, finish, usage, killed = [], None, None, False
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{base_url}/v1/completions", json=body) as r:
                async for event in sse_events(r):
                    if event == "[DONE]":
                        continue
                    if event.get("usage"):
                        usage = event["usage"]
                        continue
                    texts.append(event["choices"][0]["text"])
                    finish = event["choices"][0]["finish_reason"] or finish
                    if len(texts) == 10 and not killed:
                        assert survivor.engine.stats.steps == 0  # the victim has the request
                        victim.send_signal(signal.SIGKILL)  # dies without a word
                        killed = True
        assert killed and finish == "length" and survivor.engine.stats.steps > 0
        assert usage["completion_tokens"] == N and len(texts) >= N  # one event per token, none lost
        # Continuous: nothing repeated, nothing missing; a sampled request draws on the survivor
        # what it would have drawn on the victim.
        assert "".join(texts) == expected["text"]
        await runner.cleanup()
    finally:
        victim.kill()
        victim.wait()
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in conns:
            await c.drain()


async def test_only_a_worker_that_took_a_request_up_counts_its_loss_as_a_death(
    nats_server: Server, redis: Redis
) -> None:
    """Trials: two workers SIGKILLed together, or 2 s apart, or with the dispatcher restarted, or a
    move onto a worker just killed: a request re-dispatched (or moved) to a worker already dead but
    not yet declared lost had that loss counted as its second death, and failed as poison though
    it never ran there. A death counts only once the worker marked the attempt taken up (at its
    arrival, or by a progress write); and dispatch passes over a worker gone quiet (silent past
    half the TTL) while another can take the request."""
    import time

    import msgspec

    from dlora.common import subjects
    from dlora.common.messages import GenerateRequest, TokenChunk, WorkerStats

    store = StateStore(redis)
    nc = await nats.connect(nats_server.url)
    dispatcher = Dispatcher(DispatcherSettings(nats_url=nats_server.url, redis_url="unused"), nc, store)
    ttl = dispatcher.s.heartbeat_ttl_s
    forwarded: dict[str, asyncio.Queue] = {w: asyncio.Queue() for w in ("w-quiet", "w-live")}
    replies: asyncio.Queue = asyncio.Queue()
    for w, q in forwarded.items():
        await nc.subscribe(subjects.worker_requests(w), cb=q.put)
    await nc.subscribe("test.taken.reply", cb=replies.put)

    def stats(worker: str) -> WorkerStats:  # "w-live" is the busier: only quiet would keep it from w-quiet
        busy = 5000 if worker == "w-live" else 0
        return WorkerStats(
            worker=worker,
            running=1,
            waiting=0,
            free_blocks=100,
            total_blocks=100,
            block_size=16,
            max_loras=4,
            unlisted_requests=1,
            unlisted_remaining_tokens=busy,
            marks_taken=True,
        )

    async def taken(worker: str) -> GenerateRequest:
        return msgspec.json.decode((await asyncio.wait_for(forwarded[worker].get(), 60)).data, type=GenerateRequest)

    def request(rid: str) -> GenerateRequest:
        return GenerateRequest(request_id=rid, reply_to="test.taken.reply", prompt_token_ids=[5, 6, 7])

    try:
        now = time.monotonic()
        dispatcher.workers["w-quiet"] = (stats("w-quiet"), now - 0.6 * ttl)
        dispatcher.workers["w-live"] = (stats("w-live"), now)
        await store.put_inflight(request("routed"), "w-dead", new=True)
        await dispatcher.recover("w-dead", "")  # a live worker heard lately takes it, though busier
        assert (await taken("w-live")).request_id == "routed" and forwarded["w-quiet"].empty()

        # A worker that took a request up and died: a death; one sent it that never took it up: none.
        del dispatcher.workers["w-live"]
        await store.put_inflight(request("counted"), "w-first", new=True)
        await store.mark_taken("w-first", {"counted": 0})
        await dispatcher.recover("w-first", "")
        assert (await taken("w-quiet")).recoveries == 1  # the only live worker, quiet or not
        rec = await store.get_inflight("counted")
        assert rec is not None and rec.deaths == 1 and not rec.taken
        dispatcher.workers["w-live"] = (stats("w-live"), time.monotonic())
        del dispatcher.workers["w-quiet"]
        await dispatcher.recover("w-quiet", "")  # dead before it took it up
        assert (await taken("w-live")).recoveries == 2
        rec = await store.get_inflight("counted")
        assert rec is not None and rec.deaths == 1
        # Taken up where it runs, then that worker dies too: its second death, given up as before.
        await store.mark_taken("w-live", {"counted": 2})
        await dispatcher.recover("w-live", "")
        chunk = msgspec.json.decode((await asyncio.wait_for(replies.get(), 60)).data, type=TokenChunk)
        assert chunk.request_id == "counted" and chunk.error is not None and "not retried again" in chunk.error
    finally:
        await nc.drain()


async def test_an_older_worker_that_does_not_mark_has_its_loss_counted_as_a_death(
    nats_server: Server, redis: Redis
) -> None:
    """A rolling upgrade: a worker of a version before marks never marks what it takes up, so its
    loss went uncounted and a poison request could kill every old worker in turn. The put records
    whether its worker marks (``WorkerStats.marks_taken``); where it does not, a loss counts as
    before, taken or not, and the second is given up."""
    import time

    import msgspec

    from dlora.common.messages import GenerateRequest, TokenChunk, WorkerStats

    store = StateStore(redis)
    nc = await nats.connect(nats_server.url)
    dispatcher = Dispatcher(DispatcherSettings(nats_url=nats_server.url, redis_url="unused"), nc, store)
    replies: asyncio.Queue = asyncio.Queue()
    await nc.subscribe("test.old.reply", cb=replies.put)
    try:
        old = WorkerStats(
            worker="w-old", running=0, waiting=0, free_blocks=100, total_blocks=100, block_size=16, max_loras=4
        )
        dispatcher.workers["w-old"] = (old, time.monotonic())
        req = GenerateRequest(request_id="p", reply_to="test.old.reply", prompt_token_ids=[5, 6, 7])
        assert await store.put_inflight(req, "w-gone", new=True, marks_taken=False)
        await dispatcher.recover("w-gone", "")  # never marked, but its worker does not mark: a death
        rec = await store.get_inflight("p")
        assert rec is not None and rec.worker == "w-old" and rec.deaths == 1 and not rec.marks_taken
        del dispatcher.workers["w-old"]
        await dispatcher.recover("w-old", "")
        chunk = msgspec.json.decode((await asyncio.wait_for(replies.get(), 60)).data, type=TokenChunk)
        assert chunk.request_id == "p" and chunk.error is not None and "not retried again" in chunk.error
    finally:
        await nc.drain()


async def test_a_worker_marks_a_request_taken_before_it_works_on_it(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput
) -> None:
    """The mark precedes the work: a request that kills its worker while its adapter loads or its
    first step runs (a poison request) has its death counted."""
    from dlora.common.messages import GenerateRequest

    store = StateStore(redis)
    ws = worker_settings(
        nats_server.url,
        tiny_llama,
        "w-a",
    )
    nc = await nats.connect(nats_server.url)
    try:
        service = WorkerService(ws, nc, store, build_engine(ws))  # its loop not running: driven by hand
        req = GenerateRequest(request_id="t", reply_to="test.t", prompt_token_ids=[5, 6, 7], recorded=True)
        assert await store.put_inflight(req, "w-a", new=True)
        await service._on_request(req)
        await service._take(service.commands.get_nowait())
        assert (rec := await store.get_inflight("t")) is not None and rec.taken
        assert "t" in service.streams and service.engine.stats.steps == 0  # admitted, not yet run
        # A long text prompt is tokenized beside the bus, marked before that (one that kills the
        # process as it is tokenized is its death); a short one waits for the loop's mark (a mark
        # waits on Redis, and would hold up the requests behind it).
        for rid, words in (("long", 14_000), ("short", 2)):
            text = GenerateRequest(request_id=rid, reply_to="test.t", prompt="kalo " * words, recorded=True)
            assert await store.put_inflight(text, "w-a", new=True)
            await service._on_request(text)
            if rid == "long":
                prepared = service.preparing["long"][0]
        await prepared
        assert (rec := await store.get_inflight("long")) is not None and rec.taken and "long" not in service.streams
        assert (rec := await store.get_inflight("short")) is not None and not rec.taken
    finally:
        await nc.drain()


async def test_a_mark_waits_for_the_one_in_flight(redis: Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """A review: a mark on a request's arrival (a long text prompt) took every record received so
    far with it, and the loop's mark before its next command, finding none left, went on to work
    on them while that write was still in flight (unmarked, had it failed). It waits for it now."""
    from dlora.common.messages import GenerateRequest
    from dlora.services.worker.records import ProgressRecords

    store = StateStore(redis)
    assert await store.put_inflight(GenerateRequest(request_id="r", reply_to="x", prompt_token_ids=[1]), "w-a")
    records = ProgressRecords(store, "w-a", 5.0)
    records.taken["r"] = 0
    writing, real = asyncio.Event(), store.mark_taken

    async def slow(worker: str, attempts: dict[str, int]) -> None:  # a Redis round trip, made long
        writing.set()
        await asyncio.sleep(0.3)
        await real(worker, attempts)

    monkeypatch.setattr(store, "mark_taken", slow)
    first = asyncio.create_task(records.mark_taken())
    await writing.wait()
    await records.mark_taken()  # the loop's, before its next command
    assert (rec := await store.get_inflight("r")) is not None and rec.taken
    await first


async def test_a_mark_cancelled_in_flight_leaves_its_batch_for_the_next(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review: a request prepared on arrival marks the records received so far from its own task
    (arrival.py), which an abort or a stop cancels. Cancelled mid-write, the mark lost the batch it
    had taken (other requests' marks too): their deaths went uncounted. The next mark makes them."""
    from dlora.common.messages import GenerateRequest
    from dlora.services.worker.records import ProgressRecords

    store = StateStore(redis)
    assert await store.put_inflight(GenerateRequest(request_id="r", reply_to="x", prompt_token_ids=[1]), "w-a")
    records = ProgressRecords(store, "w-a", 5.0)
    records.taken["r"] = 0
    writing = asyncio.Event()

    async def hung(worker: str, attempts: dict[str, int]) -> None:  # a write that never ends
        writing.set()
        await asyncio.sleep(60)

    real = store.mark_taken
    monkeypatch.setattr(store, "mark_taken", hung)
    first = asyncio.create_task(records.mark_taken())
    await writing.wait()
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    monkeypatch.setattr(store, "mark_taken", real)
    await records.mark_taken()  # the loop's, before its next command
    assert (rec := await store.get_inflight("r")) is not None and rec.taken
