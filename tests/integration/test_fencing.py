"""Workers that restart, stall or lose their client (issue 16, faults 1, 4 and 5), against real NATS
and Redis: a restarted worker hands back what its previous incarnation held, a stalled one is
fenced once its requests were given up, and a request whose client went away is dropped."""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import msgspec
import nats
import pytest
from redis.asyncio import Redis

from dlora.common import subjects
from dlora.common.messages import ClientAlive, GenerateRequest, SamplingParams, TokenChunk, WorkerStats
from dlora.common.state import StateStore
from dlora.model.make_tiny import TinyOutput
from dlora.services.gateway.replies import ReplyStream
from dlora.services.servers import Server
from dlora.services.worker import stepping
from dlora.services.worker.chunks import chunk_for
from dlora.services.worker.engine.config import EngineConfig
from dlora.services.worker.main import WorkerService
from tests.integration import fencing_cluster
from tests.integration.conftest import sigstop, spawn_worker
from tests.integration.fencing_cluster import PROMPT, SHORT, Cluster, N, _live, _read, _until
from tests.integration.test_gateway import offline

cluster = fencing_cluster.cluster  # the fixture, for pytest to find here


def _expected(tiny: TinyOutput, n: int = N) -> str:
    return offline(tiny, [{"id": "x", "prompt_token_ids": PROMPT, "max_tokens": n, "ignore_eos": True}])[0]["text"]


async def test_a_worker_restarted_within_the_heartbeat_hands_back_its_requests(cluster) -> None:  # type: ignore[no-untyped-def]
    """Killed and back under the same id before its heartbeat lapsed, the dispatcher never sees it
    go: the new incarnation finds its predecessor's in-flight records and hands them back, and the
    request resumes, exact, instead of hanging until the client's timeout."""
    c: Cluster = await cluster(ttl_s=60.0)  # far beyond the test: only the hand-back can save it
    first, first_stop, first_task = await c.worker("w-a")
    chunks = await c.send("restarted", max_tokens=SHORT)
    stream = ReplyStream("restarted")
    await _read(stream, chunks, until_tokens=10)
    # SIGKILL, in-process: its connection closed without a word, then the task ended.
    await c.conns[-1].close()
    first_stop.set()
    await asyncio.wait_for(asyncio.gather(first_task, return_exceptions=True), timeout=60)
    second, _, _ = await c.worker("w-a")
    assert second.incarnation != first.incarnation
    await _read(stream, chunks)
    assert stream.finish_reason == "length" and stream.attempt == 1 and stream.error is None
    assert stream.text == _expected(c.tiny, SHORT)
    await _until(lambda: _gone(c.store, "restarted"))


async def _gone(store: StateStore, request_id: str) -> bool:
    return await store.get_inflight(request_id) is None


async def test_a_later_attempt_sent_back_to_a_stalled_worker_replaces_its_copy(cluster) -> None:  # type: ignore[no-untyped-def]
    """The request was given up on this worker while it stalled, and re-dispatched to it: it runs
    the later attempt instead of failing it as 'already in flight', and drops the stale copy."""
    c: Cluster = await cluster(ttl_s=60.0)
    worker, _, _ = await c.worker("w-a")
    chunks = await c.send("twice", max_tokens=SHORT)
    stream = ReplyStream("twice")
    await _read(stream, chunks, until_tokens=5)
    rec = await c.store.get_inflight("twice")
    assert rec is not None and rec.taken and rec.marks_taken  # the worker says it marks; the dispatcher recorded that
    again = msgspec.structs.replace(
        rec.request,
        resume_token_ids=rec.tokens,
        resume_text_pending=rec.text_pending,
        next_seq=rec.next_seq,
        recoveries=1,
    )
    assert await c.store.put_inflight(again, "w-a", expect=("w-a", 0))
    await c.nc.publish(subjects.worker_requests("w-a"), msgspec.json.encode(again))
    await _read(stream, chunks)
    assert stream.error is None and stream.attempt == 1 and stream.text == _expected(c.tiny, SHORT)
    assert worker.streams == {} and not worker.engine.has_unfinished()


async def test_a_copy_another_attempt_serves_is_not_sent_again(cluster) -> None:  # type: ignore[no-untyped-def]
    """A NATS reconnect after a stall re-sends the worker's recent chunks before a step has learned
    that its copy was given up: the re-send asks which copies are superseded (a missing record is
    not), and a fenced copy's chunks are no longer kept for one."""
    c: Cluster = await cluster(ttl_s=60.0)
    worker, _, _ = await c.worker("w-a")
    chunks = await c.send("moved-on")
    await _read(ReplyStream("moved-on"), chunks, until_tokens=5)
    assert await worker.records.superseded({"moved-on": 0, "finished": 0}) == set()
    rec = await c.store.get_inflight("moved-on")
    assert rec is not None
    assert await c.store.put_inflight(msgspec.structs.replace(rec.request, recoveries=1), "w-b", expect=("w-a", 0))
    assert await worker.records.superseded({"moved-on": 0, "finished": 0}) == {"moved-on"}
    await _until(lambda: _dropped(worker, "moved-on"))  # its next progress write is fenced
    assert not [c for _, c in worker.delivery.resend.recent(time.monotonic()) if c.request_id == "moved-on"]


async def test_a_stall_after_a_step_is_asked_about_before_its_chunks_go_out(
    cluster,  # type: ignore[no-untyped-def]
    redis_server: Server,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The chaos run's last stale chunk: a worker stopped after its step's stall check and before
    the chunks went out sent one chunk of a copy given up on meanwhile. Here the whole process
    stops while the chunk is made (past half the TTL), and another attempt takes the request over
    meanwhile: the worker asks before handing the chunk to NATS, drops its copy, and that chunk
    never arrives."""
    c: Cluster = await cluster(ttl_s=2.0)
    worker, _, _ = await c.worker("w-a")
    chunks = await c.send("taken-over")
    await _read(ReplyStream("taken-over"), chunks, until_tokens=5)
    made: list[TokenChunk] = []

    def stalled_while_made(out, stream, worker_id, now):  # type: ignore[no-untyped-def]
        chunk = chunk_for(out, stream, worker_id, now)
        if not made:  # the process stops; another attempt takes the request over meanwhile
            made.append(chunk)
            thread = threading.Thread(target=asyncio.run, args=(_take_over(redis_server.url, "taken-over"),))
            thread.start()
            time.sleep(1.2)
            thread.join()
        return chunk

    monkeypatch.setattr(stepping, "chunk_for", stalled_while_made)
    await _until(lambda: _dropped(worker, "taken-over"))
    await asyncio.sleep(0.3)  # anything sent would have arrived by now
    assert made and worker.records.stalls >= 1
    assert not [c.seq for _, c in c.arrivals if c.request_id == "taken-over" and c.seq >= made[0].seq]
    rec = await c.store.get_inflight("taken-over")
    assert rec is not None and rec.worker == "w-b" and rec.recoveries == 1


async def _take_over(redis_url: str, request_id: str) -> None:
    """Another attempt of the request, on another worker, as a dispatcher records it (own loop);
    that worker beats, as a live one does (else the dispatcher re-dispatches what it holds)."""
    redis = Redis.from_url(redis_url)
    store = StateStore(redis)
    live = WorkerStats(worker="w-b", running=1, waiting=0, free_blocks=1, total_blocks=1, block_size=16, max_loras=1)
    await store.heartbeat(live, ttl_s=60)
    rec = await store.get_inflight(request_id)
    assert rec is not None
    later = msgspec.structs.replace(rec.request, recoveries=1)
    assert await store.put_inflight(later, "w-b", expect=(rec.worker, rec.recoveries))
    await redis.aclose()


async def test_a_request_whose_client_went_away_is_dropped(cluster) -> None:  # type: ignore[no-untyped-def]
    """A gateway killed mid-request cannot abort what it sent: its requests stop once it has been
    silent for the heartbeat TTL, and their in-flight records go."""
    c: Cluster = await cluster(ttl_s=1.0)
    worker, _, _ = await c.worker("w-a")
    await c.nc.publish(subjects.CLIENTS, msgspec.json.encode(ClientAlive(client="gw-1")))
    await _until(lambda: _heard(worker, "gw-1"))
    chunks = await c.send("orphaned", client="gw-1")
    stream = ReplyStream("orphaned")
    await _read(stream, chunks, until_tokens=3)
    # gw-1 says nothing more: within the TTL and a reconciliation the request stops
    await _until(lambda: _gone(c.store, "orphaned"))
    assert "orphaned" not in worker.streams and not worker.engine.has_unfinished() and not stream.done


async def _heard(worker: WorkerService, client: str) -> bool:
    return not worker.clients.gone(client, time.monotonic()) and client in worker.clients._last


async def test_a_stalled_worker_given_up_on_stops_when_it_resumes(
    cluster,  # type: ignore[no-untyped-def]
    nats_server: Server,
    redis_server: Server,
    tiny_llama: TinyOutput,
) -> None:
    """SIGSTOP past the heartbeat: the dispatcher re-dispatches the request to a live worker (the
    next attempt). On SIGCONT the stalled worker must notice before it sends anything, drop its
    copy (nothing generated twice) and leave the record to the new attempt; the client's stream
    stays exact."""
    c: Cluster = await cluster(ttl_s=1.0)
    victim = spawn_worker(
        nats_server.url,
        redis_server.url,
        str(tiny_llama.model),
        "a-stalled",
        DLORA_HEARTBEAT_TTL_S="1.0",
        DLORA_WORKER_ENGINE__DEVICE="cpu",
    )
    try:
        # While the victim's process starts (the longest wait here): the expected output, and the
        # survivor up.
        expected = _expected(tiny_llama)
        survivor, _, _ = await c.worker("b-survivor")
        await _until(lambda: _live(c.store, "a-stalled"), timeout=120)
        # The dispatcher has both: on a tie it picks "a-stalled" (by name).
        await _until(lambda: _seen(c, "a-stalled", "b-survivor"))
        chunks = await c.send("stalled")
        stream = ReplyStream("stalled")
        await _read(stream, chunks, until_tokens=10)
        assert survivor.engine.stats.steps == 0  # the victim has it
        sigstop(victim)
        await _until(lambda: _recovered(c.store, "stalled"))
        resumed_at = time.monotonic()
        victim.send_signal(signal.SIGCONT)
        await _until(lambda: _idle(c.store, "a-stalled"))
        assert not stream.done  # the stalled copy stopped while the new attempt still runs
        await _read(stream, chunks)
        assert stream.error is None and stream.attempt == 1 and stream.text == expected
        assert survivor.engine.stats.steps > 0
        # It asked before sending: not one step's chunk from it after it resumed. The step done
        # when it stopped may still have been in its buffer (it goes out on SIGCONT): the chunk
        # the new attempt started from, not beyond.
        resumed_from = min(c.seq for _, c in c.arrivals if c.recoveries == 1)
        assert not [
            c.seq for at, c in c.arrivals if c.worker == "a-stalled" and at > resumed_at and c.seq > resumed_from
        ]
    finally:
        victim.kill()
        victim.wait()


async def test_after_a_stall_a_recorded_request_whose_record_went_is_dropped(cluster) -> None:  # type: ignore[no-untyped-def]
    """Stopped mid-send, a worker resumes past the check it makes before sending; a request that
    finished elsewhere meanwhile has no record left to fence it, and was generated again to the
    end. A silence of its heartbeat counts as a stall, and the next strict check drops a copy
    whose record went though it was recorded; a request sent straight to it (never recorded)
    runs on, as does every request when only Redis lost its records (no stall)."""
    c: Cluster = await cluster(ttl_s=2.0)
    worker, _, _ = await c.worker("w-a")
    over, direct = ReplyStream("over"), ReplyStream("direct")
    over_chunks = await c.send("over")
    direct_chunks = await c.send("direct", to_worker="w-a")
    await _read(over, over_chunks, until_tokens=5)
    await _read(direct, direct_chunks, until_tokens=5)
    await c.store.delete_inflight("over")  # finished elsewhere (or Redis lost it)
    await asyncio.sleep(0.3)
    assert "over" in worker.streams  # no stall: a missing record is not taken for an end
    # The whole process stops for longer than half the TTL (its heartbeat lapses), not the TTL: the
    # dispatcher, stopped too, does not give up on it, and the check before sending is not made.
    time.sleep(1.2)
    await _until(lambda: _dropped(worker, "over"))
    while not over_chunks.empty():  # dropped, not finished: no last chunk came
        over.accept(over_chunks.get_nowait())
    assert not over.done
    # The step's check may see the silence before the heartbeat after it counts the stall.
    await _until(lambda: _counted_a_stall(worker))
    await _read(direct, direct_chunks)
    assert direct.error is None and direct.text == _expected(c.tiny)


async def _seen(c: Cluster, *workers: str) -> bool:
    assert c.dispatcher is not None
    return set(workers) <= c.dispatcher.workers.keys()


async def _counted_a_stall(worker: WorkerService) -> bool:
    return worker.records.stalls >= 1


async def _dropped(worker: WorkerService, request_id: str) -> bool:
    return request_id not in worker.streams


async def _recovered(store: StateStore, request_id: str) -> bool:
    rec = await store.get_inflight(request_id)
    return rec is not None and rec.recoveries == 1


async def _idle(store: StateStore, worker: str) -> bool:
    return any(w.worker == worker and w.running == 0 and w.waiting == 0 for w in await store.live_workers())


async def test_a_request_no_worker_can_hold_is_refused_not_cut_short(cluster) -> None:  # type: ignore[no-untyped-def]
    """A worker whose KV cache is smaller than the model's context cut long outputs short with
    finish_reason "length" (246 of 400 tokens). The dispatcher sends a request only to a worker
    that holds its prompt and max_tokens, and refuses it, saying why, when none does."""
    c: Cluster = await cluster(ttl_s=5.0)
    small = EngineConfig(device="cpu", dtype="float32", num_blocks=8, block_size=16)  # 128 tokens
    worker, _, _ = await c.worker("w-small", small)
    assert worker.engine.max_model_len == 128
    chunks = await c.send("too-long", max_tokens=200)
    stream = ReplyStream("too-long")
    await _read(stream, chunks)
    assert stream.error_code == "bad_request" and "largest worker" in (stream.error or "") and stream.tokens == 0
    assert "max_completion_tokens" in (stream.error or "")  # a chat request through the gateway names that
    chunks = await c.send("fits", max_tokens=100)
    stream = ReplyStream("fits")
    await _read(stream, chunks)
    assert stream.error is None and stream.tokens == 100 and stream.finish_reason == "length"


async def test_a_text_prompt_no_worker_can_hold_is_refused_not_cut_short(cluster) -> None:  # type: ignore[no-untyped-def]
    """A helper's trial over NATS: a text prompt of 3 tokens with max_tokens 510 on a 512-token
    context got 509 tokens and finish_reason "length", where the same prompt as token ids is
    refused (the dispatcher counts a text prompt as one token: it is tokenized on the worker).
    The worker refuses it, naming max_tokens, once it knows the prompt's length; errors about the
    prompt name ``prompt``, the field it came in, not the ids the worker made of it."""
    c: Cluster = await cluster(ttl_s=5.0)
    small = EngineConfig(device="cpu", dtype="float32", num_blocks=8, block_size=16)  # 128 tokens
    worker, _, _ = await c.worker("w-small", small)
    prompt = "kalo remi sa"
    length = len(worker.engine.tokenizer.encode(prompt))
    assert length > 1
    chunks = await c.send("too-long", max_tokens=128 - length + 1, prompt=prompt)
    stream = ReplyStream("too-long")
    await _read(stream, chunks)
    assert stream.error_code == "bad_request" and stream.tokens == 0
    assert stream.error_param == "max_tokens" and f"needs {128 + 1} tokens" in (stream.error or "")
    assert "shorten the prompt" in (stream.error or "")  # the field it sent (tokenized on arrival), not its ids'
    chunks = await c.send("longer", max_tokens=1, prompt=prompt * 40)  # past the context itself
    stream = ReplyStream("longer")
    await _read(stream, chunks)
    assert stream.error_code == "bad_request" and stream.error_param == "prompt"
    chunks = await c.send("fits", max_tokens=128 - length, prompt=prompt)
    stream = ReplyStream("fits")
    await _read(stream, chunks)
    assert stream.error is None and stream.tokens == 128 - length and stream.finish_reason == "length"


async def test_a_text_prompt_a_smaller_worker_cannot_hold_is_served_by_a_larger_one(cluster) -> None:  # type: ignore[no-untyped-def]
    """A review of the worker's refusal (573a4d0): the dispatcher counts a text prompt as one token,
    so in a fleet of mixed contexts it may send one to a worker too small for its prompt and
    max_tokens while a larger worker holds it whole; that worker answered 400, where the same
    prompt as token ids is served. Refused so, a recorded request is handed back once, for another."""
    c: Cluster = await cluster(ttl_s=5.0)
    small = EngineConfig(device="cpu", dtype="float32", num_blocks=8, block_size=16)  # 128 tokens
    worker, _, _ = await c.worker("w-small", small)
    large, _, _ = await c.worker("w-large")
    assert large.engine.max_model_len > 128 + 40
    busy = await c.send("busy", max_tokens=200)  # only the large one holds it: priced busy, not chosen next
    prompt = "kalo remi sa"
    length = len(worker.engine.tokenizer.encode(prompt))
    assert length > 1  # counted as one, 127 more fit the small one; with its own, they do not
    chunks = await c.send("text", max_tokens=127, prompt=prompt)
    stream = ReplyStream("text")
    await _read(stream, chunks)
    assert stream.error is None and stream.tokens == 127 and stream.finish_reason == "length"
    first = ReplyStream("busy")
    await _read(first, busy)
    assert first.error is None and first.tokens == 200


async def test_a_recorded_request_delivered_after_a_stall_is_asked_about_on_arrival(cluster) -> None:  # type: ignore[no-untyped-def]
    """A message that waited in the worker's socket through a stall comes after the check that
    followed it (which asks about the copies held then); meanwhile a later attempt had served the
    request and its record went. It is asked about on arrival and dropped, never generated again
    (the chaos test caught this: 2 requests in 1 run). Here the message comes just after that
    check, made for a request the worker runs (sent straight to it, never recorded: it runs on)."""
    c: Cluster = await cluster(ttl_s=2.0)
    worker, _, _ = await c.worker("w-a")
    direct = ReplyStream("direct")
    direct_chunks = await c.send("direct", to_worker="w-a")
    await _read(direct, direct_chunks, until_tokens=5)
    time.sleep(1.2)  # the whole process stops past half the TTL
    await _until(lambda: _checked(worker))  # the stall was seen, and the check after it made
    over_chunks: asyncio.Queue[TokenChunk] = asyncio.Queue()

    async def on_chunk(msg: nats.aio.msg.Msg) -> None:
        over_chunks.put_nowait(msgspec.json.decode(msg.data, type=TokenChunk))

    await c.nc.subscribe("test.reply.over", cb=on_chunk)
    req = GenerateRequest(
        request_id="over",
        reply_to="test.reply.over",
        prompt_token_ids=PROMPT,
        params=SamplingParams(max_tokens=8, ignore_eos=True),
        recorded=True,  # its record was written, then went when the later attempt ended
    )
    await c.nc.publish(subjects.worker_requests("w-a"), msgspec.json.encode(req))
    await _read(direct, direct_chunks)
    assert direct.error is None and direct.text == _expected(c.tiny)
    assert over_chunks.empty() and "over" not in worker.streams


async def _checked(worker: WorkerService) -> bool:
    return worker.records.stalls >= 1 and not worker.records.stalled()
