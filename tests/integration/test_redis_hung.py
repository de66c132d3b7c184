"""Redis hung (SIGSTOP, a partition) or refusing a service's writes under a running cluster: the
steps go on, requests are refused at once or bounded to seconds, a write cut off is taken back,
and nothing waits out redis-py's tries (20 s a call)."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import Callable

import msgspec
import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from dlora.common import subjects
from dlora.common.messages import ErrorCode, GenerateRequest, SamplingParams, TokenChunk
from dlora.common.state import StateStore
from dlora.model.make_tiny import TinyOutput
from dlora.services.servers import Server
from tests.integration.conftest import sigstop
from tests.integration.test_redis_restart import _generate, _worker_and_dispatcher


async def test_steps_do_not_wait_for_progress_writes_redis_refuses(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each step awaited its failing progress write (redis-py's retries: a stream got 2 tokens a
    second while Redis refused, none while it hung). After a failure the steps' chunks are kept and
    a write beside the steps tries again; once Redis answers, the record holds every token in order."""
    from dlora.common.inflight import Sent
    from dlora.services.worker import records as records_module
    from dlora.services.worker.records import ProgressRecords

    store = StateStore(redis)
    assert await store.put_inflight(GenerateRequest(request_id="r", reply_to="x", prompt_token_ids=[1]), "w-a")
    records = ProgressRecords(store, "w-a", 5.0)
    calls, real, down = [0], store.record_progress, [True]

    async def refusing(*args: object) -> set[str]:
        calls[0] += 1
        if down[0]:
            raise RedisConnectionError("Connection refused")
        return await real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "record_progress", refusing)
    monkeypatch.setattr(records_module, "_WRITE_AGAIN_S", 0.2)
    step = iter(range(100))

    async def write_step() -> set[str]:
        seq = next(step)
        return await records.write_step({"r": Sent(0, seq, [10 + seq], 0)})

    for _ in range(5):
        assert await write_step() == set()
    assert calls[0] == 1  # the first step's write failed; the next four did not try
    # kept as one chunk (64 streams' chunks kept apart filled the cap in 3 s: the oldest were
    # dropped, and the record skipped tokens a resume then lacked)
    assert [(rid, sent.seq, sent.last) for rid, sent in records.unwritten] == [("r", 0, 4)]
    await asyncio.sleep(0.3)
    assert calls[0] == 2 and await write_step() == set()  # tried again beside the steps: still refused
    down[0] = False
    async with asyncio.timeout(60):
        while records.behind:
            await write_step()
            await asyncio.sleep(0.05)
    written = await store.get_inflight("r")
    sent = next(step)
    assert written is not None and written.tokens == [10 + seq for seq in range(sent)] and written.next_seq == sent


async def test_a_hung_redis_holds_a_step_a_second_at_most(redis: Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hung Redis (SIGSTOP) held each step for redis-py's four tries of its 5 s socket timeout;
    the first write is now bounded, and the writes go on beside the steps from then on."""
    from dlora.common.inflight import Sent
    from dlora.services.worker.records import ProgressRecords

    store = StateStore(redis)
    records = ProgressRecords(store, "w-a", 5.0)

    async def hung(*args: object) -> set[str]:
        await asyncio.sleep(3600)
        return set()

    monkeypatch.setattr(store, "record_progress", hung)
    with pytest.raises(TimeoutError):  # a caller's own bound, shorter: the chunk, sent, is kept all the same
        async with asyncio.timeout(0.1):
            await records.write_step({"r": Sent(0, 0, [1], 0)})
    assert [sent.seq for _, sent in records.unwritten] == [0] and not records.outage
    async with asyncio.timeout(60):
        assert await records.write_step({}) == set()
        assert records.outage and await records.write_step({"r": Sent(0, 1, [2], 0)}) == set()
    assert [(sent.seq, sent.last, sent.token_ids) for _, sent in records.unwritten] == [(0, 1, [1, 2])]


async def test_a_hung_redis_gets_requests_refused_at_once_and_a_deadline_ends_its_request(
    nats_server: Server, tiny_llama: TinyOutput, start_redis_here: Callable[..., Server]
) -> None:
    """With Redis hung (SIGSTOP) the dispatcher, taking requests one at a time, waited out
    redis-py's tries for each (20 s): the third's answer came after its client's 60 s timeout. And
    a request whose deadline passed while Redis was down ended the worker (its drop wrote the record
    in line, and raised)."""

    redis = start_redis_here()
    common = dict(nats_url=nats_server.url, redis_url=redis.url, heartbeat_ttl_s=2.0)
    async with _worker_and_dispatcher(nats_server.url, common, tiny_llama) as (client, tasks, _, _):
        try:  # (Redis let go before the services stop: their drain writes to it)
            await asyncio.sleep(1.0)
            owner = uuid.uuid4().hex[:8]
            ended: asyncio.Queue[TokenChunk] = asyncio.Queue()

            async def on_chunk(msg) -> None:  # type: ignore[no-untyped-def]
                if (chunk := msgspec.json.decode(msg.data, type=TokenChunk)).finish_reason is not None:
                    await ended.put(chunk)

            await client.subscribe(subjects.replies_of(owner), cb=on_chunk)
            params = SamplingParams(max_tokens=480, ignore_eos=True)
            late = GenerateRequest(
                request_id="late", reply_to=subjects.reply_inbox("late", owner), prompt_token_ids=[5], params=params
            )
            await client.publish(subjects.REQUESTS, msgspec.json.encode(late))
            await asyncio.sleep(0.5)  # running
            sigstop(redis.proc)
            # the running one's deadline passes while Redis hangs (sent to the worker as an app's would be)
            expiring = msgspec.structs.replace(late, request_id="x", reply_to=subjects.reply_inbox("x", owner))
            expiring = msgspec.structs.replace(expiring, deadline=time.time() + 1.0)
            await client.publish(subjects.worker_requests("w0"), msgspec.json.encode(expiring))
            for i in range(3):
                req = msgspec.structs.replace(late, request_id=f"r{i}", reply_to=subjects.reply_inbox(f"r{i}", owner))
                await client.publish(subjects.REQUESTS, msgspec.json.encode(req))
            got: dict[str, TokenChunk] = {}
            async with asyncio.timeout(20):
                while len(got) < 5:
                    chunk = await ended.get()
                    got[chunk.request_id] = chunk
            assert all("Redis" in (got[f"r{i}"].error or "") for i in range(3))
            assert "deadline" in (got["x"].error or "") and got["late"].finish_reason == "length"
            assert not any(t.done() for t in tasks), [t.exception() for t in tasks if t.done()]
        finally:
            redis.proc.send_signal(signal.SIGCONT)


async def test_a_write_redis_ran_after_its_caller_gave_up_leaves_no_hole(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write cut off by the step's bound that Redis ran all the same moved the record's next past
    its chunk; that chunk, kept and joined with the next ones, was then skipped whole: the record
    lacked their tokens, and a resume from it went on from the wrong ones (a review)."""
    from dlora.common.inflight import Sent
    from dlora.services.worker import records as records_module
    from dlora.services.worker.records import ProgressRecords

    store = StateStore(redis)
    assert await store.put_inflight(GenerateRequest(request_id="r", reply_to="x", prompt_token_ids=[1]), "w-a")
    records = ProgressRecords(store, "w-a", 5.0)
    real, late = store.record_progress, [True]

    async def applied_then_lost(*args: object) -> set[str]:
        fenced = await real(*args)  # type: ignore[arg-type]
        if late[0]:  # the reply never came back
            late[0] = False
            raise RedisConnectionError("Connection reset by peer")
        return fenced

    monkeypatch.setattr(store, "record_progress", applied_then_lost)
    monkeypatch.setattr(records_module, "_WRITE_AGAIN_S", 0.05)
    for seq in range(4):  # the first one's write applied, then counted failed; the others joined to it
        await records.write_step({"r": Sent(0, seq, [10 + seq, 20 + seq], 0)})
    assert [(sent.seq, sent.last, sent.counts) for _, sent in records.unwritten] == [(0, 3, (2, 2, 2, 2))]
    async with asyncio.timeout(60):
        while records.behind or records.outage:
            await records.write_step({})
            await asyncio.sleep(0.02)
    written = await store.get_inflight("r")
    assert written is not None and written.tokens == [t for seq in range(4) for t in (10 + seq, 20 + seq)]
    assert written.next_seq == 4


async def test_a_record_whose_write_was_cut_off_is_taken_back_once_redis_answers(
    nats_server: Server, tiny_llama: TinyOutput, start_redis_here: Callable[..., Server]
) -> None:
    """A dispatcher's record write cut off by its 2 s bound (Redis hung), its client told UNAVAILABLE:
    Redis ran the write when it woke, and the record named a worker that never got the request (a
    review): handed back by that worker's sweep, it ran for nobody, or an application's retry under
    the same id met it as a duplicate and waited out its timeout."""
    redis = start_redis_here()
    common = dict(nats_url=nats_server.url, redis_url=redis.url, heartbeat_ttl_s=2.0)
    async with _worker_and_dispatcher(nats_server.url, common, tiny_llama) as (client, tasks, store, _):
        await asyncio.sleep(1.0)
        assert (await _generate(client))[-1].error is None  # (Redis has the record's script: run late, it writes)
        owner = uuid.uuid4().hex[:8]
        got: asyncio.Queue[TokenChunk] = asyncio.Queue()

        async def on_chunk(msg) -> None:  # type: ignore[no-untyped-def]
            await got.put(msgspec.json.decode(msg.data, type=TokenChunk))

        await client.subscribe(subjects.replies_of(owner), cb=on_chunk)
        params = SamplingParams(max_tokens=4, ignore_eos=True)
        req = GenerateRequest(
            request_id="cut", reply_to=subjects.reply_inbox("cut", owner), prompt_token_ids=[5], params=params
        )
        try:
            sigstop(redis.proc)
            await client.publish(subjects.REQUESTS, msgspec.json.encode(req))
            told = await asyncio.wait_for(got.get(), 10)
            assert told.error_code == ErrorCode.UNAVAILABLE and "Redis" in (told.error or ""), told
        finally:
            redis.proc.send_signal(signal.SIGCONT)
        # Run when Redis wakes (idle, always: without take_back the record stayed and the request ran
        # for nobody), then taken back. Under load the cut-off write may not have left redis-py
        # before the bound (a CI run: no late write to take back); the end state is the same.
        seen, deadline = False, time.monotonic() + 8
        while time.monotonic() < deadline and not (seen and await store.get_inflight("cut") is None):
            seen = seen or await store.get_inflight("cut") is not None
            await asyncio.sleep(0.05)
        await asyncio.sleep(2.5)  # (a second delete a second later, which finds nothing)
        assert await store.get_inflight("cut") is None and got.empty()


async def test_a_hung_redis_holds_an_adapter_requests_admission_seconds_not_the_worker(
    nats_server: Server, tiny_llama: TinyOutput, start_redis_here: Callable[..., Server]
) -> None:
    """A request of an adapter the worker does not hold reads the registry as it is admitted, in
    line in the worker's loop: with Redis hung it waited out redis-py's tries (20 s), and every
    running stream's steps with it. Bounded: it is answered UNAVAILABLE and the streams go on."""
    redis = start_redis_here()
    common = dict(nats_url=nats_server.url, redis_url=redis.url, heartbeat_ttl_s=2.0)
    async with _worker_and_dispatcher(nats_server.url, common, tiny_llama) as (client, tasks, _, _):
        try:
            await asyncio.sleep(1.0)
            owner = uuid.uuid4().hex[:8]
            got: dict[str, asyncio.Queue[TokenChunk]] = {k: asyncio.Queue() for k in ("long", "lora", "base")}

            async def on_chunk(msg) -> None:  # type: ignore[no-untyped-def]
                chunk = msgspec.json.decode(msg.data, type=TokenChunk)
                await got[chunk.request_id].put(chunk)

            await client.subscribe(subjects.replies_of(owner), cb=on_chunk)

            def request(rid: str, tokens: int, **extra: object) -> bytes:
                params = SamplingParams(max_tokens=tokens, ignore_eos=True)
                reply = subjects.reply_inbox(rid, owner)
                return msgspec.json.encode(GenerateRequest(request_id=rid, reply_to=reply, params=params, **extra))

            await client.publish(subjects.REQUESTS, request("long", 480, prompt_token_ids=[5]))
            await asyncio.wait_for(got["long"].get(), 60)  # running
            sigstop(redis.proc)
            lora = request("lora", 2, prompt_token_ids=[5], adapter="lora-0", adapter_version="v1")
            await client.publish(subjects.worker_requests("w0"), lora)
            told = await asyncio.wait_for(got["lora"].get(), 10)
            assert told.error_code == ErrorCode.UNAVAILABLE and "Redis" in (told.error or ""), told
            # a request that needs no registry read is taken meanwhile (a review: the pause after
            # the cut-off read refused every request for a second)
            await client.publish(subjects.worker_requests("w0"), request("base", 2, prompt_token_ids=[5]))
            async with asyncio.timeout(30):
                for rid in ("base", "long"):
                    while (chunk := await got[rid].get()).finish_reason is None:
                        pass
                    assert chunk.error is None, chunk
            assert not any(t.done() for t in tasks)
        finally:
            redis.proc.send_signal(signal.SIGCONT)
