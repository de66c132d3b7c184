"""A worker told to stop (SIGTERM: ``systemctl stop``) drops no request: with a drain timeout it
finishes what it runs, given nothing new meanwhile; past it (here 0 s) it hands the rest back at
once, not as a death, and each resumes on another worker with the stream continuous."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import msgspec
import nats
import pytest
import structlog
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from dlora.common import bus, subjects
from dlora.common.messages import LostRequests, TokenChunk, WorkerStats
from dlora.common.state import StateStore
from dlora.model.make_tiny import TinyOutput
from dlora.services.dispatcher.main import Dispatcher
from dlora.services.dispatcher.settings import DispatcherSettings
from dlora.services.servers import Server
from dlora.services.worker import records
from dlora.services.worker.chunks import open_stream
from dlora.services.worker.engine.faults import DeviceLost
from dlora.services.worker.main import WorkerService, build_engine
from dlora.services.worker.settings import WorkerSettings
from tests.integration.conftest import small_engine, sse_events, start_gateway, worker_by_hand, worker_settings
from tests.integration.test_gateway import offline

N = 160  # tokens: the stop comes after 10 of them
PROMPT = [5, 40, 41, 300, 17]


def lose_the_device(worker: WorkerService) -> None:
    """Fault injection: every forward from now on raises a sticky CUDA error, as after a kernel's
    illegal memory access (engine/faults.py)."""

    def lost(inputs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    worker.engine.model.forward = lost


async def _until(live: Callable[[], list[WorkerStats]], n: int) -> None:
    """Until the dispatcher counts ``n`` workers live (heard from, not draining): counted, not a
    fixed wait for the stats to come (a loaded machine's took longer)."""
    async with asyncio.timeout(60):
        while len(live()) != n:
            await asyncio.sleep(0.02)


@pytest.mark.parametrize(
    ("trigger", "drain_timeout_s"),
    [("stop", 0.0), ("stop", 60.0), ("device-lost", 60.0)],
    ids=["hand-over", "finish", "device-lost"],
)
async def test_a_stopped_worker_finishes_or_hands_over_its_requests(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput, trigger: str, drain_timeout_s: float
) -> None:
    """A worker whose device failed for good (a sticky CUDA error) hands every request over at
    once, as a drain past its timeout does, and exits with the error (to be restarted)."""
    store = StateStore(redis)
    common = dict(nats_url=nats_server.url, redis_url="unused")
    conns: list[nats.NATS] = []
    stop, stop_victim = asyncio.Event(), asyncio.Event()
    tasks: list[asyncio.Task] = []

    async def worker(name: str, until: asyncio.Event) -> WorkerService:
        ws = WorkerSettings(
            **common,
            worker_id=name,
            model=str(tiny_llama.model),
            stats_interval_s=0.1,
            drain_timeout_s=drain_timeout_s,
            engine=small_engine(),
        )
        nc = await nats.connect(nats_server.url)
        conns.append(nc)
        service = WorkerService(ws, nc, store, build_engine(ws))
        tasks.append(asyncio.create_task(service.run(until)))
        return service

    try:
        # On a tie the dispatcher picks "a-victim" (by name).
        victim, survivor = await worker("a-victim", stop_victim), await worker("b-survivor", stop)
        victim_done = tasks[0]
        nc = await nats.connect(nats_server.url)
        conns.append(nc)
        dispatcher = Dispatcher(DispatcherSettings(**common), nc, store)
        tasks.append(asyncio.create_task(dispatcher.run(stop)))
        handed: list[LostRequests] = []
        drain_stats: list[WorkerStats] = []

        async def on_lost(msg) -> None:
            handed.append(msgspec.json.decode(msg.data, type=LostRequests))

        async def on_stats(msg) -> None:
            if (st := msgspec.json.decode(msg.data, type=WorkerStats)).draining:
                drain_stats.append(st)

        await nc.subscribe(subjects.LOST, cb=on_lost)
        await nc.subscribe(subjects.stats("a-victim"), cb=on_stats)
        base_url, runner = await start_gateway(nats_server.url, store, str(tiny_llama.model), conns)
        await _until(lambda: dispatcher.state.live(time.monotonic()), 2)  # (a fixed 0.3 s: not under load)

        # A stop string never met: while it runs, the last 19 characters are held back (they could
        # begin one), and they go with the hand-over (they were lost: the record kept tokens only).
        body = {"model": "model", "prompt": PROMPT, "max_tokens": N, "temperature": 0, "ignore_eos": True}
        body["stop"] = ["@" * 20]
        texts: list[str] = []
        async with aiohttp.ClientSession() as http:
            url = f"{base_url}/v1/completions"
            async with http.post(url, json={**body, "stream": True}) as r:
                async for event in sse_events(r):
                    if event == "[DONE]":
                        continue
                    texts.append(event["choices"][0]["text"])
                    if len(texts) == 10:
                        assert survivor.engine.stats.steps == 0  # the victim has the request
                        if trigger == "device-lost":
                            lose_the_device(victim)
                        else:
                            stop_victim.set()  # what SIGTERM does (services/run.py)
                        await _until(lambda: dispatcher.state.live(time.monotonic()), 1)  # its draining stats are in
                        # meanwhile a new request goes to the other worker, not the draining one
                        async with http.post(url, json={**body, "max_tokens": 4}) as other:
                            assert other.status == 200 and survivor.engine.stats.steps > 0
            if trigger == "device-lost":  # it exits with the error, its requests handed over
                with pytest.raises(DeviceLost, match="illegal memory access"):
                    await asyncio.wait_for(victim_done, timeout=60)
            else:
                await asyncio.wait_for(victim_done, timeout=60)  # it stops once drained
        expected = offline(tiny_llama, [{"id": "x", "prompt_token_ids": PROMPT, "max_tokens": N, "ignore_eos": True}])
        assert "".join(texts) == expected[0]["text"]  # continuous: nothing repeated, nothing missing
        assert drain_stats and drain_stats[0].running == 1
        # A stop is clean: a record left naming it would not be counted as a death, nor, once its
        # heartbeat lapses, the worker as lost (a rolling restart set off every alert on the
        # losses counter). A failed device is a loss (a review: it was marked stopped, and a
        # request it took up that broke it was handed back late as no death).
        lost = trigger == "device-lost"
        assert await store.stopped_cleanly("a-victim", victim.incarnation) is not lost
        await redis.delete("dlora:worker:a-victim")
        await dispatcher._look(time.monotonic() + 100)
        assert "a-victim" not in dispatcher.workers
        assert dispatcher.metrics.registry.get_sample_value("dlora_worker_losses_total") == int(lost)
        if trigger == "stop" and drain_timeout_s:  # finished where it ran; nothing handed back
            assert handed == [] and victim.engine.stats.steps > N - 10
        else:  # handed over at once; the survivor generated the rest
            # not as a death at a stop; as one when the device failed (a request that breaks every
            # GPU it runs on fails after MAX_RECOVERIES instead of taking the workers down in turn)
            assert [(h.worker, h.draining) for h in handed] == [("a-victim", trigger == "stop")]
            assert len(handed[0].requests) == 1
        await runner.cleanup()
    finally:
        stop.set()
        stop_victim.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in conns:
            await c.drain()


async def test_a_failed_devices_hand_over_blames_what_it_took_up_not_what_waited(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput
) -> None:
    """A review: after a device loss the request being taken up (its adapter loading, its KV
    imported) was in no list and went back late as a drain's, no death; requests queued behind it,
    marked taken in the same batch, went back as deaths; queued moves ran on the dead device. And
    requests that arrive during the hand-over never ran there either."""
    from dlora.common.messages import GenerateRequest
    from dlora.services.worker import drain

    store = StateStore(redis)
    ws = worker_settings(
        nats_server.url,
        tiny_llama,
        "w-a",
    )
    async with worker_by_hand(nats_server, store, ws) as (service, handed):
        culprit, queued = (
            GenerateRequest(request_id=rid, reply_to="test.x", prompt_token_ids=PROMPT, recorded=True)
            for rid in ("culprit", "queued")
        )
        service.admitting = culprit  # the device failed while it took this one up
        await service._on_request(queued)
        service.device_failed = True
        await drain.hand_over(service, died=True)
        lost = await asyncio.wait_for(handed.get(), 60)
        assert lost.requests == {"culprit": 0, "queued": 0} and not lost.draining
        assert lost.never_arrived == ["queued"]  # waited, never ran: not a death
        # A trial: requests a dispatcher sent before it heard of the loss arrive during the hand-over
        # (one a text prompt, tokenized here): not marked taken, and handed back late as never run.
        late = [
            GenerateRequest(request_id="late-ids", reply_to="test.x", prompt_token_ids=PROMPT, recorded=True),
            GenerateRequest(request_id="late-text", reply_to="test.x", prompt="kalo " * 14_000, recorded=True),
        ]
        for req in late:
            assert await store.put_inflight(req, "w-a", new=True, incarnation=service.incarnation)
            await service._on_request(req)
        await drain.hand_back_late(service)
        lost = await asyncio.wait_for(handed.get(), 60)
        assert lost.requests == {"late-ids": 0, "late-text": 0} and sorted(lost.never_arrived) == [
            "late-ids",
            "late-text",
        ]
        assert not any([(await store.get_inflight(r.request_id)).taken for r in late])  # type: ignore[union-attr]


async def test_a_request_waiting_on_arrival_for_its_cache_is_handed_over_at_a_stop(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput
) -> None:
    """A moved request waits for its shipped cache beside the loop (arrival.py), in no queue: a
    stop must hand it back with the rest (unrun), not leave it to the heartbeat TTL."""
    from dlora.common.messages import GenerateRequest
    from dlora.services.worker import drain

    ws = worker_settings(
        nats_server.url,
        tiny_llama,
        "w-a",
    )
    async with worker_by_hand(nats_server, StateStore(redis), ws) as (service, handed):
        moved = GenerateRequest(
            request_id="moved", reply_to="test.x", prompt_token_ids=PROMPT, recorded=True, kv_chunks=2, kv_transfer="t"
        )
        await service._on_request(moved)
        assert "moved" in service.preparing and service.commands.empty()
        await drain.hand_over(service)
        lost = await asyncio.wait_for(handed.get(), 60)
        assert lost.requests == {"moved": 0} and lost.draining
        assert not service.preparing and "moved" not in service.pending
        service.draining = True
        # one a dispatcher sent before it heard of the drain, its message not come: handed back late
        late = GenerateRequest(request_id="late", reply_to="test.x", prompt_token_ids=PROMPT, recorded=True)
        assert await service.store.put_inflight(late, "w-a", new=True, incarnation=service.incarnation)
        with structlog.testing.capture_logs() as logs:  # the stop's last line says how it ended
            await drain.leave(service)
        assert (await asyncio.wait_for(handed.get(), 60)).requests == {"late": 0}
        assert [(e["drained"], e["handed_over"]) for e in logs if e["event"] == "worker stopped"] == [(True, 2)]


async def test_a_failed_devices_hand_over_names_what_waited_in_no_step_as_never_run(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput
) -> None:
    """A trial (max_num_seqs 2, four waiting): every request admitted counted a death at a device
    loss, though those waiting in no step could not have failed it. Those go back as never run;
    one in a step (its blocks held) counts."""
    from dlora.common.messages import GenerateRequest
    from dlora.services.worker import drain

    store = StateStore(redis)
    ws = worker_settings(
        nats_server.url,
        tiny_llama,
        "w-a",
        engine=small_engine(max_num_seqs=1),
    )
    async with worker_by_hand(nats_server, store, ws) as (service, handed):
        for rid in ("ran", "waited"):
            await service._on_request(
                GenerateRequest(request_id=rid, reply_to="test.x", prompt_token_ids=PROMPT, recorded=True)
            )
            await service._take(service.commands.get_nowait())
        service.engine.step()  # one sequence a step: "ran" only
        # A request moved here with its KV cache, waiting for its adapter's read (a review: its
        # blocks held, it read as run here; it was in no step)
        moved = GenerateRequest(request_id="moved", reply_to="test.x", prompt_token_ids=PROMPT, recorded=True)
        service.engine.loading.add("x@")
        kv = service.engine.export_kv("ran")
        out = list(service.engine.seqs["ran"].output_ids)
        service.engine.add_request("moved", prompt_token_ids=PROMPT, adapter="x@", kv=kv, resume_token_ids=out)
        assert service.engine.blocks.holds("moved")
        service.streams["moved"] = open_stream(moved, 0.0)
        service.device_failed = True
        await drain.hand_over(service, died=True)
        lost = await asyncio.wait_for(handed.get(), 60)
        assert lost.requests == {"ran": 0, "waited": 0, "moved": 0} and sorted(lost.never_arrived) == [
            "moved",
            "waited",
        ]


async def test_a_device_lost_in_a_merge_is_its_requests_death(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review: a step merges before it schedules, so the requests whose adapter's merge lost the
    device were in no step yet, and went back as never run: a poison adapter went round every GPU.
    They count a death. And a hand-over whose records write fails still keeps what it handed over
    out of the late hand-back (which named them all never run)."""
    from dlora.common.messages import AdapterEntry, GenerateRequest
    from dlora.services.worker import drain
    from dlora.services.worker.policy.config import PolicyConfig, PolicyName

    store = StateStore(redis)
    name, path = next(iter(tiny_llama.adapters.items()))
    await store.put_adapter(AdapterEntry(name=name, path=str(path), rank=8, created=0.0))
    merged_only = small_engine(policy=PolicyConfig(name=PolicyName.MERGED_ONLY))
    ws = WorkerSettings(
        nats_url=nats_server.url, redis_url="unused", worker_id="w-a", model=str(tiny_llama.model), engine=merged_only
    )
    async with worker_by_hand(nats_server, store, ws) as (service, handed):
        for rid in ("p1", "p2"):
            req = GenerateRequest(
                request_id=rid, reply_to="test.x", prompt_token_ids=PROMPT, adapter=name, recorded=True
            )
            assert await store.put_inflight(req, "w-a", new=True, incarnation=service.incarnation, marks_taken=True)
            await service._on_request(req)
            await service._take(service.commands.get_nowait())
        await asyncio.gather(*service.adapters.reads.values())  # read beside the steps; its end, a command:
        await service._take(service.commands.get_nowait())

        def poisoned(*args: object) -> None:  # the adapter's merge hits an illegal address
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        monkeypatch.setattr(service.engine.merger, "merge", poisoned)
        with pytest.raises(DeviceLost):
            await service._step()
        service.device_failed = True
        await drain.hand_over(service, died=True)
        lost = await asyncio.wait_for(handed.get(), 60)
        assert lost.requests == {"p1": 0, "p2": 0} and not lost.never_arrived

        # Another worker, its hand-over's records write failing: nothing is sent (recovered after the
        # TTL, as deaths), and the late hand-back does not name what it held never run.
        other = WorkerService(msgspec.structs.replace(ws, worker_id="w-b"), service.nc, store, service.engine)
        req = GenerateRequest(request_id="ran", reply_to="test.x", prompt_token_ids=PROMPT, recorded=True)
        assert await store.put_inflight(req, "w-b", new=True, incarnation=other.incarnation, marks_taken=True)
        await other._on_request(req)
        await other._take(other.commands.get_nowait())
        other.device_failed = True

        async def down(*args: object) -> None:
            raise ConnectionError("redis hiccup")

        monkeypatch.setattr(other.records, "write", down)
        other.records.unrecorded_ends["gone"] = 0  # behind: the hand-over writes first, and fails
        await drain.hand_over(other, died=True)
        await drain.hand_back_late(other)
        await asyncio.sleep(0.3)
        assert handed.empty()  # "ran" is left to the TTL's recovery: a death, as it ran there


async def test_a_failed_devices_hand_over_counts_a_request_that_ran_though_another_copy_waited(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput
) -> None:
    """A review: a request's id can be here twice, a copy running and another still waiting on
    arrival (a later attempt re-dispatched here after a stall, or a copy delivered late). At a
    device loss the waiting copy named the id never run, and the copy that ran in the steps that
    failed the device went back without a death: a poison request could go round every GPU."""
    from dlora.common.messages import GenerateRequest
    from dlora.services.worker import drain

    store = StateStore(redis)
    ws = worker_settings(
        nats_server.url,
        tiny_llama,
        "w-a",
    )
    async with worker_by_hand(nats_server, store, ws) as (service, handed):
        ran = GenerateRequest(request_id="r", reply_to="test.x", prompt_token_ids=PROMPT, recorded=True, recoveries=1)
        await service._on_request(ran)
        await service._take(service.commands.get_nowait())
        service.engine.step()  # it runs
        late = GenerateRequest(
            request_id="r", reply_to="test.x", prompt_token_ids=PROMPT, recorded=True, kv_chunks=2, kv_transfer="t"
        )
        await service._on_request(late)  # its earlier attempt, moved here, comes late: waits for its cache
        assert "r" in service.preparing
        service.device_failed = True
        await drain.hand_over(service, died=True)
        lost = await asyncio.wait_for(handed.get(), 60)
        assert lost.requests == {"r": 1} and lost.never_arrived == [] and not lost.draining


async def test_a_copy_waiting_on_arrival_that_a_later_attempt_replaces_is_stopped(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput
) -> None:
    """A review: a later attempt of a request arriving while an earlier copy still waited on arrival
    (for its moved cache) took its place in ``preparing`` and left it running unseen: a stop (or an
    abort) stopped only the later one, and the earlier one's wait ended by putting it in the queue
    of a worker that had handed everything over. Admission drops an earlier attempt for a later
    one anyway: it is stopped at once; a copy no later than the one waiting is ignored."""
    from dlora.common.messages import GenerateRequest
    from dlora.services.worker import drain

    ws = worker_settings(
        nats_server.url,
        tiny_llama,
        "w-a",
    )
    async with worker_by_hand(nats_server, StateStore(redis), ws) as (service, handed):
        service.kv_inbox.wait_s = 0.3
        first, later = (
            GenerateRequest(
                request_id="r", reply_to="test.x", prompt_token_ids=PROMPT, kv_chunks=2, kv_transfer=t, recoveries=n
            )
            for n, t in ((0, "t0"), (1, "t1"))
        )
        await service._on_request(first)
        await service._on_request(later)
        await service._on_request(first)  # delivered again: ignored
        assert service.preparing["r"][1] is later
        await drain.hand_over(service)
        lost = await asyncio.wait_for(handed.get(), 60)
        assert lost.requests == {"r": 1}
        await asyncio.sleep(0.6)  # past the inbox's wait: nothing of either copy comes to the queue
        assert service.commands.empty() and not service.preparing


async def test_a_stop_leaves_no_re_send_of_chunks_running(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Re-sends of recent chunks (a reader's reconnect, ``Delivery.resend_to``; the worker's own,
    ``reconnected``) under way at a stop were left running: they outlived the worker, to publish
    on the connection closed under them or be destroyed pending. The stop cancels and awaits them,
    and the records' write in the background after a failed one (``write_step``) too."""
    ws = worker_settings(nats_server.url, tiny_llama, "w-a", stats_interval_s=0.1)
    async with worker_by_hand(nats_server, StateStore(redis), ws) as (service, _):
        real = service.store.record_progress

        async def refused_once(*args: Any, **kwargs: Any) -> set[str]:  # Redis restarting, once
            monkeypatch.setattr(service.store, "record_progress", real)
            raise RedisConnectionError("restarting")

        monkeypatch.setattr(service.store, "record_progress", refused_once)
        monkeypatch.setattr(records, "_WRITE_AGAIN_S", 3600.0)  # its write again is due after the stop
        await service.records.end({"r": 0})
        assert service.records.outage
        stop = asyncio.Event()
        running = asyncio.create_task(service.run(stop))
        delivery = service.delivery

        async def held(_: dict[str, int]) -> set[str]:  # each re-send holds in its Redis read
            await asyncio.Event().wait()
            return set()

        delivery.superseded = held
        await delivery.publish("test.resent", TokenChunk(request_id="r", seq=0), "gw")
        delivery.resend_to("gw")
        async with asyncio.timeout(60):
            while delivery._reconnects is None:  # (the stats loop's first look)
                await asyncio.sleep(0.01)
            delivery._reconnects -= 1  # as if NATS reconnected: its passes are due in 1 s and 3 s
            while delivery._resending is None:
                await asyncio.sleep(0.01)
        stop.set()
        await asyncio.wait_for(running, 60)
        left = {t.get_coro().__qualname__ for t in asyncio.all_tasks()}  # type: ignore[union-attr]
        assert not left & {"Delivery._resend", "ProgressRecords._write_later"}


async def test_a_drains_first_stats_are_the_shape_of_every_other(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput
) -> None:
    """A review: the stats a drain sends at once were the bare snapshot, without when they were sent,
    the worker's stats interval and the moves it refused lately, which every other stats message
    carries (beats.py): a reader took it for an older worker's, and a refusal it held went unsaid."""
    from dlora.services.worker import drain
    from dlora.services.worker.moves import Move

    ws = worker_settings(nats_server.url, tiny_llama, "w-a", stats_interval_s=0.7)
    async with worker_by_hand(nats_server, StateStore(redis), ws) as (service, _):
        heard: asyncio.Queue[WorkerStats] = asyncio.Queue()

        async def on_stats(msg) -> None:  # type: ignore[no-untyped-def]
            heard.put_nowait(msgspec.json.decode(msg.data, type=WorkerStats))

        listener = await nats.connect(nats_server.url)
        try:
            await listener.subscribe(subjects.stats("w-a"), cb=on_stats)
            await bus.flush(listener)
            service.refusals.add(Move("r", "w-b", ship_kv=False, plan_id="p1"), time.monotonic())
            before = time.time()
            await drain.start(service)
            st = await asyncio.wait_for(heard.get(), 60)
        finally:
            await listener.close()
    assert st.draining and st.sent >= before
    assert (st.stats_interval_s, st.refused_moves) == (0.7, {"p1": ["r"]})
