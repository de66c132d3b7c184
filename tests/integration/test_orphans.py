"""Requests that nobody holds are re-dispatched or answered, never left to the client's chunk
timeout (issue 18: in the multi-host test two requests went silent for 60 s after their worker's
host was cut off). Against real NATS and Redis: records left on a worker no dispatcher recovered,
a message that never reached its worker, a request of a client judged gone, and the gateway's
own check for a request whose record went while it waited."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import aiohttp
import msgspec
import pytest
from redis.asyncio import Redis

from dlora.common import bus, subjects
from dlora.common.messages import (
    MAX_RECOVERIES,
    AbortRequest,
    ClientAlive,
    ErrorCode,
    GenerateRequest,
    SamplingParams,
    TokenChunk,
    WorkerStats,
)
from dlora.model.make_tiny import TinyOutput
from dlora.services.gateway.replies import ReplyStream
from dlora.services.servers import Server
from dlora.services.worker import drain
from dlora.services.worker.commands import Add
from tests.integration.conftest import Stack, run_stack
from tests.integration.fencing_cluster import PROMPT, Cluster, _read, _until, cluster  # noqa: F401 - a fixture


async def _recorded(c: Cluster, request_id: str, worker: str, incarnation: str = "") -> asyncio.Queue[TokenChunk]:
    """A request recorded as in flight on ``worker``, as a dispatcher records it before it sends,
    but never sent: its chunks, if any come, arrive on the queue."""
    chunks: asyncio.Queue[TokenChunk] = asyncio.Queue()

    async def on_chunk(msg) -> None:  # type: ignore[no-untyped-def]
        chunks.put_nowait(msgspec.json.decode(msg.data, type=TokenChunk))

    reply = f"test.reply.{request_id}"
    await c.nc.subscribe(reply, cb=on_chunk)
    req = GenerateRequest(
        request_id=request_id,
        reply_to=reply,
        prompt_token_ids=PROMPT,
        params=SamplingParams(max_tokens=8, ignore_eos=True),
        recorded=True,
    )
    assert await c.store.put_inflight(req, worker, new=True, incarnation=incarnation)
    return chunks


async def test_records_left_on_a_worker_nobody_recovered_are_re_dispatched(cluster) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    """A record on a worker that is neither heard from nor beating, whose loss no dispatcher saw
    (one that died before this dispatcher started, or whose recovery broke off mid-way), is
    re-dispatched by the dispatcher's periodic sweep and runs to its end elsewhere."""
    c: Cluster = await cluster(ttl_s=1.0)
    await c.worker("w-a")
    chunks = await _recorded(c, "orphan", "w-dead")
    stream = ReplyStream("orphan")
    await asyncio.wait_for(_read(stream, chunks), 60)
    assert stream.done and stream.error is None and stream.tokens == 8
    assert not await c.store.indexed_workers() - {"w-a"}  # the dead worker's index is gone
    assert c.dispatcher is not None
    assert (c.dispatcher.metrics.registry.get_sample_value("dlora_requests_recovered_total") or 0) >= 1


async def test_an_abort_heard_while_its_request_s_worker_was_dead_ends_the_request_at_its_recovery(cluster) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    """A helper's finding: a worker SIGKILLed and restarted (systemd), its client aborting in
    between: no live worker heard the abort, the restarted worker handed the request back, and it
    ran to its end for nobody. The dispatchers remember aborts too, and a recovery ends the request
    with the abort's last chunk instead of re-dispatching it."""
    c: Cluster = await cluster(ttl_s=1.0)
    assert c.dispatcher is not None
    while not c.dispatcher.aborted.lately("aborted-meanwhile", None, time.monotonic()):  # (once it listens)
        await c.nc.publish(subjects.ABORT, msgspec.json.encode(AbortRequest(request_id="aborted-meanwhile")))
        await asyncio.sleep(0.05)
    chunks = await _recorded(c, "aborted-meanwhile", "w-dead")
    await c.worker("w-a")  # the restarted one: it never heard the abort
    chunk = await asyncio.wait_for(chunks.get(), 60)
    assert (chunk.finish_reason, chunk.token_ids, chunk.seq) == ("abort", [], 0)
    await asyncio.sleep(1.0)  # nothing runs after it
    assert chunks.empty() and await c.store.get_inflight("aborted-meanwhile") is None


async def test_a_request_taken_after_its_abort_is_ended_not_dispatched(cluster) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    """A gateway whose hand-over timed out answered its client and aborted; the dispatcher that
    took the request later sent it on: with no live worker it was failed ("no worker is
    available"), and to a worker taken for live that had died it was recorded, to wait (no other
    worker live) as an orphan past the abort's memory and run for nobody. Now it ends at once with
    the abort's last chunk, as a worker ends it, and nothing is recorded or sent (the TTL of 30 s:
    no loss or sweep meanwhile)."""
    c: Cluster = await cluster(ttl_s=30.0)
    assert c.dispatcher is not None
    for rid in ("redis-refused", "none-live", "dead"):
        while not c.dispatcher.aborted.lately(rid, None, time.monotonic()):  # (once it listens)
            await c.nc.publish(subjects.ABORT, msgspec.json.encode(AbortRequest(request_id=rid)))
            await asyncio.sleep(0.05)
    # Redis failed a moment ago, as when a hung Redis held the intake past the gateway's hand-over
    # timeout: the abort needs no Redis, and was answered "the state store is unreachable; try again"
    c.dispatcher._state_bound.down_until = float("inf")
    chunk = await asyncio.wait_for((await c.send("redis-refused")).get(), 60)
    c.dispatcher._state_bound.down_until = 0.0
    assert (chunk.finish_reason, chunk.error) == ("abort", None)
    answered = {"none-live": await c.send("none-live")}
    dead = WorkerStats(
        worker="w-dead", running=0, waiting=0, free_blocks=100, total_blocks=100, block_size=16, max_loras=4
    )
    await c.nc.publish(subjects.stats("w-dead"), msgspec.json.encode(dead))  # its last stats before it died
    await _until(lambda: _taken_for_live(c, "w-dead"))
    # what reaches the dead worker's subject: sent there, the request was still ended with the abort's
    # chunk once the loss was found (within the abort's memory here), and its record dropped
    sent: list[bytes] = []

    async def on_request(msg) -> None:  # type: ignore[no-untyped-def]
        sent.append(msg.data)

    await c.nc.subscribe(subjects.worker_requests("w-dead"), cb=on_request)
    answered["dead"] = await c.send("dead")
    for rid, chunks in answered.items():
        chunk = await asyncio.wait_for(chunks.get(), 60)
        assert (chunk.request_id, chunk.finish_reason, chunk.error, chunk.seq) == (rid, "abort", None, 0)
        assert await c.store.get_inflight(rid) is None
    await c.nc.flush()
    assert not sent


async def _taken_for_live(c: Cluster, worker: str) -> bool:
    return c.dispatcher is not None and worker in {w.worker for w in c.dispatcher.live()}


async def test_records_of_a_worker_that_stopped_cleanly_are_not_counted_as_deaths(cluster) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    """A worker that drained and stopped handed back what it held; when no dispatcher heard that
    (none was up), the records wait for the sweep, which must not count a death. Two requests that
    had each lost one worker already (MAX_RECOVERIES deaths): the one whose last worker stopped
    cleanly runs to its end; the one whose last worker (an earlier start) died is given up."""
    c: Cluster = await cluster(ttl_s=1.0)
    await c.worker("w-a")
    # Beating while the records are set up, so the sweep cannot take one half made.
    gone = WorkerStats(
        worker="w-gone", draining=True, running=0, waiting=0, free_blocks=0, total_blocks=1, block_size=16, max_loras=1
    )
    await c.store.heartbeat(gone, ttl_s=60)
    stopped = await _recorded(c, "stopped", "w-gone", incarnation="start-2")
    died = await _recorded(c, "died", "w-gone", incarnation="start-1")
    for rid in ("stopped", "died"):
        await c.store.r.hset(f"{c.store.p}:inflight:{rid}", "deaths", MAX_RECOVERIES)
    await c.store.mark_taken("w-gone", {"stopped": 0, "died": 0})  # both taken up there
    await c.store.mark_stopped("w-gone", "start-2")
    assert await c.store.forget_worker("w-gone", "")  # its heartbeat gone: the sweep takes its records
    ran, given_up = ReplyStream("stopped"), ReplyStream("died")
    await asyncio.wait_for(asyncio.gather(_read(ran, stopped), _read(given_up, died)), 20)
    assert ran.error is None and ran.tokens == 8
    assert given_up.error is not None and "died" in given_up.error


async def test_a_message_that_never_reached_its_worker_goes_to_another(cluster) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    """A worker hands back a record of its own incarnation that it never received: the request is
    sent to another worker, not the same route again (both idle, w-a would be chosen first)."""
    c: Cluster = await cluster(ttl_s=1.0)
    a, _, _ = await c.worker("w-a")
    await c.worker("w-b")
    chunks = await _recorded(c, "never-came", "w-a", incarnation=a.incarnation)
    stream, workers = ReplyStream("never-came"), set()
    while not stream.done:
        chunk = await asyncio.wait_for(chunks.get(), 60)
        workers.add(chunk.worker)
        stream.accept(chunk)
    assert stream.error is None and stream.tokens == 8 and workers == {"w-b"}


async def test_a_request_of_a_client_judged_gone_is_answered_not_dropped(cluster) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    """A worker that judges a request's client gone when it arrives says so (UNAVAILABLE): a client
    only cut off for a while hears at once, instead of after its chunk timeout."""
    c: Cluster = await cluster(ttl_s=1.0)
    worker, _, _ = await c.worker("w-a")
    # Another client keeps announcing: a worker that heard no one for the TTL (a heartbeat to a
    # loaded Redis timing out) forgives every client as the request comes (Clients.noted), and
    # the test would then judge the worker's silence, not the quiet client's.
    async with _announcing(c, "gw-loud"):
        await c.nc.publish(subjects.CLIENTS, msgspec.json.encode(ClientAlive(client="gw-quiet")))
        await _until(lambda: _judged_gone(worker, "gw-quiet"))
        chunks = await c.send("from-quiet", client="gw-quiet", to_worker="w-a")
        chunk = await asyncio.wait_for(chunks.get(), 60)
    assert chunk.error_code == ErrorCode.UNAVAILABLE and "not heard from" in (chunk.error or "")
    assert await c.store.get_inflight("from-quiet") is None


async def test_a_resumed_request_of_a_client_silent_about_the_ttl_is_taken(cluster) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    """The deploy test, now and then: a gateway cut off with the worker host was silent about as
    long as the worker when its request was resumed elsewhere; the new worker refused it. A resumed
    request's client counts as gone only past twice the TTL (as the dispatcher judges it)."""
    c: Cluster = await cluster(ttl_s=2.0)
    worker, _, _ = await c.worker("w-a")
    async with _announcing(c, "gw-loud"):
        await c.nc.publish(subjects.CLIENTS, msgspec.json.encode(ClientAlive(client="gw-cut")))
        await _until(lambda: _judged_gone(worker, "gw-cut"))  # silent past the TTL
        replies: asyncio.Queue = asyncio.Queue()
        await c.nc.subscribe("test.reply.resumed", cb=replies.put)
        resumed = GenerateRequest(
            request_id="resumed",
            reply_to="test.reply.resumed",
            prompt_token_ids=PROMPT,
            params=SamplingParams(max_tokens=4, ignore_eos=True),
            client="gw-cut",
            recoveries=1,
        )
        await c.nc.publish(subjects.worker_requests("w-a"), msgspec.json.encode(resumed))
        first = msgspec.json.decode((await asyncio.wait_for(replies.get(), 60)).data, type=TokenChunk)
    assert first.error is None and first.token_ids


async def test_a_request_stopped_because_its_client_went_quiet_ends_with_a_last_chunk(cluster) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    """A trial: a reader away longer than the heartbeat TTL came back to its replayed chunks and
    then nothing (the worker dropped the request without a word): it waited for its own timeout.
    The worker now says why the request stopped."""
    c: Cluster = await cluster(ttl_s=1.0)
    worker, _, _ = await c.worker("w-a")
    step = worker.engine.step

    def slow_step(*args, **kwargs):  # type: ignore[no-untyped-def]  # 400 tokens take 8 s or more
        time.sleep(0.02)
        return step(*args, **kwargs)

    worker.engine.step = slow_step  # type: ignore[method-assign]
    async with _announcing(c, "gw-loud"):  # the worker hears someone
        async with _announcing(c, "gw-away"):
            await _until(lambda: _heard(worker, "gw-away"))
            chunks = await c.send("left", client="gw-away", max_tokens=400, to_worker="w-a")
            assert (await asyncio.wait_for(chunks.get(), 60)).finish_reason is None  # running
        # the reader goes away
        while (chunk := await asyncio.wait_for(chunks.get(), 60)).finish_reason is None:
            pass
    assert chunk.error_code == ErrorCode.UNAVAILABLE and "not heard from" in (chunk.error or ""), chunk


async def _heard(worker, client: str) -> bool:  # type: ignore[no-untyped-def]
    return client in worker.clients._last


@contextlib.asynccontextmanager
async def _announcing(c: Cluster, client: str) -> AsyncIterator[None]:
    """``client`` announced every 0.1 s while inside."""
    stop = asyncio.Event()

    async def announce() -> None:
        while not stop.is_set():
            await c.nc.publish(subjects.CLIENTS, msgspec.json.encode(ClientAlive(client=client)))
            await asyncio.sleep(0.1)

    task = asyncio.create_task(announce())
    try:
        yield
    finally:
        stop.set()
        await task


async def _judged_gone(worker, client: str) -> bool:  # type: ignore[no-untyped-def]
    return client in worker.clients._last and worker.clients.gone(client, time.monotonic())


@pytest.fixture
async def quick_stack(nats_server: Server, redis: Redis, tiny_llama: TinyOutput):  # type: ignore[no-untyped-def]
    # the record checks at 1 s and 2 s answer 2 s before the chunk timeout does
    async with run_stack(nats_server, redis, tiny_llama, heartbeat_ttl_s=0.5, chunk_timeout_s=4.0) as s:
        yield s


async def test_the_gateway_answers_a_request_whose_record_went_without_an_answer(
    quick_stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request dropped in silence (here every worker drops what it is sent and its record, as a
    worker once did for a client it judged gone) is answered 503 by the gateway once its record is
    found gone twice, 2 × heartbeat_ttl_s apart: seconds, not the chunk timeout; but only while
    Redis holds the data the request was recorded in."""
    stack = quick_stack

    async def drop(self, add: Add) -> None:  # type: ignore[no-untyped-def]
        await self.store.record_progress(self.s.worker_id, {}, {add.req.request_id: add.req.recoveries})
        self.pending.discard(add.req.request_id)

    for w in stack.workers:
        monkeypatch.setattr(w, "_add", drop.__get__(w))
    assert await _answer(stack) == "the request was lost on its way to a worker; try again"
    # Redis lost its data since the request was sent (restarted without persistence: its epoch
    # key went with it): a record can be missing only because the data went, and a request that
    # runs must not be failed for that; the chunk timeout answers.
    answer = asyncio.create_task(_answer(stack))
    await asyncio.sleep(0.3)  # sent, and not yet checked (the first check is at 2 x TTL = 1 s)
    assert await stack.store.r.delete(f"{stack.store.p}:epoch") == 1
    assert await answer == "no worker answered in time"


async def _answer(stack: Stack) -> str:
    """The 503's message for a completion no worker answers (within the 4 s chunk timeout and a margin)."""
    body = {"model": "model", "prompt": "kalo", "max_tokens": 4}
    async with aiohttp.ClientSession() as http:
        async with asyncio.timeout(10), http.post(f"{stack.url}/v1/completions", json=body) as r:
            assert r.status == 503, await r.text()
            return str((await r.json())["error"]["message"])


async def test_a_request_that_reaches_a_stopping_worker_after_its_hand_over_runs_elsewhere(
    cluster,  # type: ignore[no-untyped-def]  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A dispatcher that had not heard of a drain sends one more request: it comes after the
    worker handed over what it held. The worker hands it back as it exits, not a death, and it
    runs elsewhere at once (the TTL here is 30 s: neither a loss nor the sweep could be that soon)."""
    c: Cluster = await cluster(ttl_s=30.0)
    _, stop_a, task_a = await c.worker("w-a")
    await c.worker("w-b")
    handed = drain.hand_over
    chunks: list[asyncio.Queue[TokenChunk]] = []

    async def then_one_more(w) -> None:  # type: ignore[no-untyped-def]
        await handed(w)
        chunks.append(await _recorded(c, "late", "w-a"))
        req = (await c.store.get_inflight("late")).request  # type: ignore[union-attr]
        await c.nc.publish(subjects.worker_requests("w-a"), msgspec.json.encode(req))
        await bus.flush(c.nc)

    monkeypatch.setattr(drain, "hand_over", then_one_more)
    stop_a.set()
    await asyncio.wait_for(task_a, 60)
    stream = ReplyStream("late")
    await asyncio.wait_for(_read(stream, chunks[0]), 60)
    assert stream.error is None and stream.tokens == 8 and stream.worker == "w-b"
    assert c.dispatcher is not None
    assert c.dispatcher.metrics.registry.get_sample_value("dlora_worker_losses_total") == 0
