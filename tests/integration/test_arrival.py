"""A request that must wait on arrival (a moved one for its shipped cache, a structured one for
its grammar's compile, a long text prompt for its tokenizing) waits beside the worker's steps: the
requests running there, and those arriving after it, go on meanwhile (arrival.py)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import msgspec
import nats
import torch
from redis.asyncio import Redis

from dlora.common import bus, subjects
from dlora.common.messages import AbortRequest, GenerateRequest, SamplingParams, TokenChunk
from dlora.common.state import StateStore
from dlora.model.make_tiny import TinyOutput
from dlora.services.servers import Server
from dlora.services.worker.arrival import LONG_PROMPT, arrive
from dlora.services.worker.engine.kv_transfer import KVSnapshot
from dlora.services.worker.main import WorkerService
from dlora.services.worker.moves import handoff
from tests.integration.conftest import worker_by_hand, worker_settings
from tests.integration.test_migration import start_workers


def _request(rid: str, owner: str, **params: object) -> GenerateRequest:
    return GenerateRequest(
        request_id=rid,
        reply_to=subjects.reply_inbox(rid, owner),
        prompt_token_ids=[5, 6, 7],
        params=SamplingParams(max_tokens=8, ignore_eos=True, **params),  # type: ignore[arg-type]
    )


@asynccontextmanager
async def _worker(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput
) -> AsyncIterator[tuple[WorkerService, nats.NATS, str, set[str]]]:
    """w0 running, a client, its replies' owner, and the requests whose last chunk came."""
    stop = asyncio.Event()
    conns: list[nats.NATS] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        client = await nats.connect(nats_server.url)
        conns.append(client)
        beats = await client.subscribe(subjects.stats("w0"))
        await bus.flush(client)
        w0 = (await start_workers(("w0",), nats_server, StateStore(redis), tiny_llama, stop, conns, tasks))["w0"]
        await beats.next_msg(timeout=60)  # its first stats go out once it listens: a request sent before is lost
        await beats.unsubscribe()
        owner, ended = uuid.uuid4().hex[:8], set()

        async def on_chunk(msg) -> None:  # type: ignore[no-untyped-def]
            if (chunk := msgspec.json.decode(msg.data, type=TokenChunk)).finish_reason is not None:
                ended.add(chunk.request_id)

        await client.subscribe(subjects.replies_of(owner), cb=on_chunk)
        await bus.flush(client)
        yield w0, client, owner, ended
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in conns:
            await c.drain()


@contextmanager
def _held_compiles(w0: WorkerService) -> Iterator[threading.Event]:
    """``w0``'s grammar compiles held (30 s at most) until the block ends; the event set once one
    began."""
    grammars, compiling, release = w0.engine.grammars, threading.Event(), threading.Event()
    prepare = grammars.prepare

    def held(params: SamplingParams) -> None:
        compiling.set()
        release.wait(30)
        prepare(params)

    grammars.prepare = held  # type: ignore[method-assign]
    try:
        yield compiling
    finally:
        release.set()


async def _until(ended: set[str], rid: str) -> None:
    async with asyncio.timeout(20):
        while rid not in ended:
            await asyncio.sleep(0.01)


async def _send(client: nats.NATS, req: GenerateRequest) -> None:
    await client.publish(subjects.worker_requests("w0"), msgspec.json.encode(req))


async def test_a_moved_request_waiting_for_its_cache_holds_no_other_request(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput
) -> None:
    """A moved request whose shipped cache came late (chunks NATS dropped, a slow link) was waited
    for in the worker's one command loop: every stream there stalled up to the inbox's wait (5 s).
    With the wait made a minute, a request sent after it is served meanwhile; the moved one is taken
    up with its cache once the chunks come."""
    async with _worker(nats_server, redis, tiny_llama) as (w0, client, owner, ended):
        w0.kv_inbox.wait_s = 60.0
        kv = KVSnapshot(tokens=3, k=torch.zeros(2, 3, 2, 16), v=torch.zeros(2, 3, 2, 16)).to_bytes()
        moved, chunks = handoff(_request("m", owner), [8], 0, 1, kv, 0.0)
        await _send(client, moved)  # its cache not yet
        await _send(client, _request("r", owner))
        await _until(ended, "r")
        assert "m" in w0.preparing and "m" not in ended
        for chunk in chunks:
            await w0._on_kv_chunk(chunk)
        await _until(ended, "m")
        assert w0.kv_tokens == 3 and not w0.preparing  # taken up with the cache shipped, not recomputed


async def test_a_grammar_compiling_holds_no_other_request(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput
) -> None:
    """A structured output's grammar was compiled while the command loop waited (a new 400 KB
    schema: ~0.4 s of every stream on the worker). A compile held until released: a request sent
    after it is served meanwhile; the structured one once its grammar is ready."""
    async with _worker(nats_server, redis, tiny_llama) as (w0, client, owner, ended):
        with _held_compiles(w0):
            await _send(client, _request("g", owner, regex="[ab]{3}"))
            await _send(client, _request("r", owner))
            await _until(ended, "r")
            assert "g" in w0.preparing and "g" not in ended
        await _until(ended, "g")


async def test_a_grammar_is_compiled_only_once_its_record_is_marked_taken(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput
) -> None:
    """A compile that kills the worker (a schema's memory, a crash in the grammar engine) is the
    request's death: the loop marked the records of what it had received before it compiled. Moved
    beside the steps, the compile began at arrival, and on an idle worker nothing marked it: the
    death went uncounted and the request went round every worker in turn."""
    async with _worker(nats_server, redis, tiny_llama) as (w0, client, owner, ended):
        with _held_compiles(w0) as compiling:
            req = msgspec.structs.replace(_request("poison", owner, regex="[cd]{4}"), recorded=True)
            assert await StateStore(redis).put_inflight(req, "w0", new=True, incarnation=w0.incarnation)
            await _send(client, req)
            assert await asyncio.to_thread(compiling.wait, 10)
            record = await StateStore(redis).get_inflight("poison")
            assert record is not None and record.taken  # its death, were the compile to kill the process
        await _until(ended, "poison")


async def test_grammars_compiling_at_once_hold_no_step(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput
) -> None:
    """Compiled on asyncio's default threads, which the engine's steps take too, a few distinct
    schemas compiling at once (as many as that pool has threads: 6 on 2 cores) held every step on
    the worker until one ended. Compiles held until released: a plain request is served meanwhile."""
    async with _worker(nats_server, redis, tiny_llama) as (w0, client, owner, ended):
        structured = [f"g{i}" for i in range(min(32, (os.cpu_count() or 1) + 4) + 1)]  # (the default pool's size)
        with _held_compiles(w0):
            for i, rid in enumerate(structured):
                await _send(client, _request(rid, owner, regex=f"[ab]{{{i + 1}}}"))
            await _send(client, _request("r", owner))
            await _until(ended, "r")
        for rid in structured:
            await _until(ended, rid)


async def test_an_abort_stops_a_request_being_prepared_at_once(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput
) -> None:
    """An abort of a request still waiting on arrival (for its shipped cache, or its grammar's
    compile: minutes for some schemas) was answered only once that wait ended, its record kept
    meanwhile. It stops the wait: answered at once, its record ended."""
    async with _worker(nats_server, redis, tiny_llama) as (w0, client, owner, ended):
        with _held_compiles(w0):
            req = msgspec.structs.replace(_request("g", owner, regex="[ef]{3}"), recorded=True)
            assert await StateStore(redis).put_inflight(req, "w0", new=True, incarnation=w0.incarnation)
            await _send(client, req)
            async with asyncio.timeout(60):
                while "g" not in w0.preparing:
                    await asyncio.sleep(0.01)
            await client.publish(subjects.ABORT, msgspec.json.encode(AbortRequest(request_id="g")))
            await _until(ended, "g")
            assert "g" not in w0.preparing and "g" not in w0.pending
            assert await StateStore(redis).get_inflight("g") is None
        await asyncio.sleep(0.3)  # (its compile ends: nothing more of it runs)
        assert "g" not in w0.streams


async def test_a_request_its_abort_overtook_is_answered_without_waiting_on_arrival(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput
) -> None:
    """A moved request whose client left mid-move (the gateway's abort, sent to every worker, came
    first) was answered at once, before its cache was awaited. Waiting on arrival beside the steps,
    it waited for a cache that need not come (up to the inbox's 5 s) before its abort was answered."""
    async with _worker(nats_server, redis, tiny_llama) as (w0, client, owner, ended):
        w0.kv_inbox.wait_s = 60.0
        kv = KVSnapshot(tokens=2048, k=torch.zeros(2, 2048, 2, 16), v=torch.zeros(2, 2048, 2, 16)).to_bytes()
        moved, chunks = handoff(_request("m", owner), [8], 0, 1, kv, 0.0)
        assert len(chunks) > 1
        await w0._on_kv_chunk(chunks[0])  # (the rest never comes)
        await client.publish(subjects.ABORT, msgspec.json.encode(AbortRequest(request_id="m")))
        async with asyncio.timeout(60):
            while not w0.aborted.lately("m", None, time.monotonic()):
                await asyncio.sleep(0.01)
        await _send(client, moved)
        await _until(ended, "m")
        assert "m" not in w0.streams and len(w0.kv_inbox) == 0


async def test_a_request_being_prepared_is_stopped_at_its_deadline(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput
) -> None:
    """Held by the command loop, or in the engine, a request is stopped at its deadline; waiting on
    arrival for its grammar's compile (minutes for some schemas) it was answered only once the
    compile ended, long past it."""
    async with _worker(nats_server, redis, tiny_llama) as (w0, client, owner, ended):
        with _held_compiles(w0):
            req = msgspec.structs.replace(_request("late", owner, regex="[gh]{3}"), deadline=time.time() + 0.5)
            await _send(client, req)
            async with asyncio.timeout(60):
                while "late" not in ended:
                    await asyncio.sleep(0.01)
            assert "late" not in w0.preparing and "late" not in w0.streams


async def test_a_stale_copy_arriving_does_not_unmark_a_later_attempt(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput
) -> None:
    """A review: a copy of an earlier attempt delivered late overwrote the later attempt's pending
    mark with its own attempt (refused by the record, so the later one went unmarked: its death
    here would not count)."""
    ws = worker_settings(
        nats_server.url,
        tiny_llama,
        "w-a",
    )
    async with worker_by_hand(nats_server, StateStore(redis), ws) as (service, _):
        later = GenerateRequest(request_id="r", reply_to="test.r", prompt_token_ids=[5, 6, 7], recorded=True)
        await service._on_request(msgspec.structs.replace(later, recoveries=2))
        await service._on_request(msgspec.structs.replace(later, recoveries=1))
        assert service.records.taken == {"r": 2}


async def test_a_long_text_prompt_tokenizing_holds_no_other_request(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput
) -> None:
    """A long text prompt (an application's, over NATS) was tokenized in the bus handler, which
    takes requests in order: a 1 MB one held every request arriving after it for ~1 s. Its
    tokenizing held until released: a request sent after it is served meanwhile."""
    async with _worker(nats_server, redis, tiny_llama) as (w0, client, owner, ended):
        tokenizer, tokenizing, release = w0.tokenized.tokenizer, threading.Event(), threading.Event()

        class Held:
            def __getattr__(self, name: str) -> object:
                return getattr(tokenizer, name)

            def encode(self, text: str, **kwargs: object) -> list[int]:
                if len(text) >= LONG_PROMPT:
                    tokenizing.set()
                    release.wait(30)
                    return [5, 6, 7]
                return tokenizer.encode(text, **kwargs)

        w0.tokenized.tokenizer = Held()
        try:
            long = msgspec.structs.replace(_request("long", owner), prompt="x" * LONG_PROMPT, prompt_token_ids=None)
            await _send(client, long)
            assert await asyncio.to_thread(tokenizing.wait, 10)
            await _send(client, _request("r", owner))
            await _until(ended, "r")
            assert "long" in w0.preparing and "long" not in ended
        finally:
            release.set()
        await _until(ended, "long")


async def test_a_request_waiting_on_arrival_counts_as_waiting_in_the_metrics(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput
) -> None:
    """A request compiling its grammar (a large schema: seconds; vLLM #54003: minutes) or waiting
    for its moved cache was in no figure the worker exported: num_requests_waiting 0, its mode
    "idle" and the longest wait 0 while it waited, where vLLM counts a request waiting for its
    grammar among the waiting (its scheduler's waiting queue). A helper's finding, replaying
    "num_requests_waiting wrong" reports. Counted waiting now, and timed."""
    from dlora.services.worker.metrics import families, worker_view

    def sample(name: str, **labels: str) -> float:
        found = [
            s.value
            for f in families(worker_view(w0))
            for s in f.samples
            if s.name == name and labels.items() <= s.labels.items()
        ]
        return found[0]

    async with _worker(nats_server, redis, tiny_llama) as (w0, client, owner, ended):
        with _held_compiles(w0) as compiling:
            await _send(client, _request("g", owner, regex="[ab]{3}"))
            assert await asyncio.to_thread(compiling.wait, 10)
            await asyncio.sleep(0.5)  # a stats snapshot or two (stats_interval_s / 2)
            assert "g" in w0.preparing
            assert sample("vllm:num_requests_waiting") == 1 and sample("dlora_num_requests_running") == 0
            assert sample("dlora_worker_mode", mode="idle") == 0
            assert sample("dlora_longest_wait_seconds") >= 0.4
            assert w0.stats.unlisted_remaining_tokens == 8  # its work too, where planner and dispatch read load
            assert w0.stats.unlisted_kv_blocks == 1  # and its prompt's KV, where the planner reads room
        await _until(ended, "g")
        await asyncio.sleep(0.5)
        assert sample("vllm:num_requests_waiting") == 0 and sample("dlora_longest_wait_seconds") == 0


async def test_a_request_queued_for_the_loop_counts_in_the_stats(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput
) -> None:
    """A request taken in and prepared waits in the commands for the task that owns the engine: one
    that came while a step ran was in no count when the stats were read right after that step, and
    the worker looked idle to the migrator and the dispatcher (left by the last session). It counts
    waiting, with its work and KV, from the bus handler on; once in the engine, there alone."""
    ws = worker_settings(nats_server.url, tiny_llama, "w0")
    async with worker_by_hand(nats_server, StateStore(redis), ws) as (w, _):
        await arrive(w, _request("q", "o"))  # (the loop not running: it stays queued)
        st = w._snapshot()
        assert (st.waiting, st.requests, st.unlisted_by_adapter) == (1, [], {"": (0, 1)})
        assert (st.unlisted_kv_blocks, st.arriving_kv_blocks, st.unlisted_remaining_tokens) == (1, 1, 8)
        await w._take(w.commands.get_nowait())
        st = w._snapshot()
        assert (st.waiting, [r.request_id for r in st.requests], st.unlisted_by_adapter) == (1, ["q"], {})
        assert (st.unlisted_kv_blocks, st.arriving_kv_blocks, st.unlisted_remaining_tokens) == (0, 1, 0)


async def test_a_request_resumed_with_its_whole_output_is_answered_length(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput
) -> None:
    """Resumed with all its max_tokens made (a record written with its final token, its end not),
    a request is answered as it ended, "length" with no token more, where it was refused with a
    400 (while one ending in its stop token ended "stop")."""
    async with _worker(nats_server, redis, tiny_llama) as (_, client, owner, ended):
        replies = await client.subscribe(subjects.reply_inbox("l", owner))
        await bus.flush(client)
        await _send(client, msgspec.structs.replace(_request("l", owner), resume_token_ids=[9] * 8))
        await _until(ended, "l")
        chunk = msgspec.json.decode((await replies.next_msg(timeout=20)).data, type=TokenChunk)
        assert (chunk.finish_reason, chunk.error, chunk.token_ids) == ("length", None, [])


async def test_a_resume_its_last_token_ends_compiles_no_grammar_on_arrival(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput
) -> None:
    """A structured request resumed with its stop token last (a record written with its final
    token, its end not) is ended by the engine as it is added, asking for no grammar; the worker
    compiled its grammar on arrival all the same (seconds for a large schema, for no token). It is
    answered "stop" with none compiled; a structured request that goes on has its compiled."""
    async with _worker(nats_server, redis, tiny_llama) as (w0, client, owner, ended):
        asked, prepare = [], w0.engine.grammars.prepare

        def noted(params: SamplingParams) -> None:
            asked.append(params.regex)
            prepare(params)

        w0.engine.grammars.prepare = noted  # type: ignore[method-assign]
        replies = await client.subscribe(subjects.reply_inbox("e", owner))
        await bus.flush(client)
        resumed = _request("e", owner, regex="[ab]{3}", stop_token_ids=[9])
        await _send(client, msgspec.structs.replace(resumed, resume_token_ids=[8, 9]))
        await _until(ended, "e")
        chunk = msgspec.json.decode((await replies.next_msg(timeout=20)).data, type=TokenChunk)
        assert (chunk.finish_reason, chunk.error, asked) == ("stop", None, [])
        await _send(client, _request("g", owner, regex="[cd]{2}"))
        await _until(ended, "g")
        assert asked == ["[cd]{2}"]
