"""One process per worker id (services/worker/one_id.py): a second worker under an id that another
live worker beats under refuses to start, naming the id, the other incarnation and the fix; one
that follows a crash (the key still there, no longer rewritten) starts; so does an ordinary one,
at once."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest
import structlog
from redis.asyncio import Redis

from dlora.common import subjects
from dlora.common.messages import GenerateRequest, LostRequests, SamplingParams, WorkerStats
from dlora.common.state import StateStore
from dlora.model.make_tiny import TinyOutput
from dlora.services.dispatcher.main import Dispatcher
from dlora.services.dispatcher.settings import DispatcherSettings
from dlora.services.run import StartupError
from dlora.services.servers import Server
from dlora.services.worker import admit, beats, drain
from dlora.services.worker.commands import Add
from dlora.services.worker.main import WorkerService
from dlora.services.worker.one_id import refuse_if_taken
from dlora.services.worker.settings import WorkerSettings
from tests.integration.conftest import sigstop, spawn_worker, worker_by_hand, worker_settings

TTL_S = 2.0


def beat(incarnation: str, started: float = 0.0) -> WorkerStats:
    return WorkerStats(
        worker="w-a",
        incarnation=incarnation,
        started=started,
        running=0,
        waiting=0,
        free_blocks=1,
        total_blocks=1,
        block_size=16,
        max_loras=1,
        sent=time.time(),
    )


def another_id() -> WorkerStats:
    return WorkerStats(
        worker="w-b", running=0, waiting=0, free_blocks=1, total_blocks=1, block_size=16, max_loras=1, sent=time.time()
    )


@contextlib.asynccontextmanager
async def live_worker(store: StateStore, incarnation: str = "other1", ttl_s: float = TTL_S) -> AsyncIterator[None]:
    """Another process under "w-a": its heartbeat rewritten every 0.1 s (its stats interval)."""

    async def beats() -> None:
        while True:
            await store.heartbeat(beat(incarnation), ttl_s)
            await asyncio.sleep(0.1)

    task = asyncio.create_task(beats())
    await asyncio.sleep(0.05)
    try:
        yield
    finally:
        task.cancel()


def settings(**fields: Any) -> WorkerSettings:
    fields = {"heartbeat_ttl_s": TTL_S, "stats_interval_s": 0.1} | fields
    return WorkerSettings(redis_url="unused", worker_id="w-a", model="m", **fields)


async def test_an_id_nobody_beats_under_starts_at_once(redis: Redis) -> None:
    store = StateStore(redis)
    await store.heartbeat(another_id(), TTL_S)  # another id's beat is no matter
    with structlog.testing.capture_logs() as logs:
        await refuse_if_taken(store, settings())
    assert not [line for line in logs if "heartbeat found" in line["event"]]  # no wait: no watching


async def test_an_id_a_live_worker_beats_under_is_refused(redis: Redis) -> None:
    store = StateStore(redis)
    # Watched for 10 s (4 stats intervals of 2.5 s), the other beating every 0.1 s: refused at the
    # first look again (1.25 s). With the usual 0.4 s a loaded machine's pause past it let it start.
    async with live_worker(store, ttl_s=60.0):
        # (told by a beat it saw rewritten: the only way to the error; a quiet key lets it start)
        with pytest.raises(StartupError) as refused:
            await refuse_if_taken(store, settings(heartbeat_ttl_s=60.0, stats_interval_s=2.5))
    said = str(refused.value)
    assert "'w-a'" in said and "other1" in said and "--worker-id" in said and "worker_id" in said


async def test_a_restart_after_a_crash_starts(redis: Redis) -> None:
    """The dead incarnation's key is still there (systemd restarts at once) but never rewritten."""
    store = StateStore(redis)
    await store.heartbeat(beat("dead1"), 60.0)  # a long TTL (the fencing tests'): not waited out
    # its age read as 0 (no TTL left to tell it by), not the moment between writing and reading it:
    # past 0.1 s on a loaded machine, the wait came out below the 0.3 s this test allowed
    await redis.persist("dlora:worker:w-a")
    # 4 stats intervals of quiet: that much waited (not less), not half the TTL nor the key's 60 s
    # (the wait it chose, as it logs it; how long that took is the machine's business)
    started = time.monotonic()
    with structlog.testing.capture_logs() as logs:
        await refuse_if_taken(store, settings())
    assert 0.3 < time.monotonic() - started
    (seconds,) = [line["seconds"] for line in logs if "heartbeat found" in line["event"]]
    assert seconds == 0.4
    # and one whose key is already that quiet starts after one interval
    await redis.pexpire("dlora:worker:w-a", 59_000)
    with structlog.testing.capture_logs() as logs:
        await refuse_if_taken(store, settings())
    assert [line["seconds"] for line in logs if "heartbeat found" in line["event"]] == [0.1]
    # and one whose key expires while it watches is let through then, with its start time (a
    # review: it returned none, and its stats' "started": null made every heartbeat unreadable)
    await redis.pexpire("dlora:worker:w-a", 150)
    assert abs(await refuse_if_taken(store, settings()) - time.time()) < 5


async def test_a_heartbeat_that_does_not_decode_hides_no_other_worker(redis: Redis) -> None:
    """Another version's shape (or the review's "started": null) made every reading of the
    heartbeats raise: /healthz and /v1/models answered 500 for the whole cluster."""
    store = StateStore(redis)
    await store.heartbeat(another_id(), TTL_S)
    await redis.set("dlora:worker:w-a", b'{"worker": "w-a", "started": null}', px=2000)
    assert [st.worker for st in await store.live_workers()] == ["w-b"]
    assert [st.worker for st, _ in await store.beats(TTL_S)] == ["w-b"]
    assert await store.beat_of("w-a", TTL_S) is None


async def test_a_start_removes_its_own_heartbeat_not_its_successors(redis: Redis) -> None:
    """A process that gave its id up (or a dispatcher forgetting a lost start) deleted the key its
    successor beats under, and its placement (a review)."""
    store = StateStore(redis)
    await store.heartbeat(beat("new1", started=2.0), TTL_S)
    await store.set_placement("w-a", ["lora-1"])
    assert not await store.forget_worker("w-a", "old1")
    assert (await store.beat_of("w-a", TTL_S))[0].incarnation == "new1"
    assert await store.workers_with("lora-1") == {"w-a"}
    assert await store.forget_worker("w-a", "new1")
    assert await store.beat_of("w-a", TTL_S) is None and not await store.workers_with("lora-1")
    assert await store.forget_worker("w-a", "new1")  # none there: gone already


async def test_a_second_worker_under_a_live_id_does_not_subscribe(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput
) -> None:
    """The probe's case: both processes took every request sent to "w-a", and ran it twice."""
    store = StateStore(redis)
    ws = _beating(nats_server, tiny_llama)
    # (the worker first: its engine is built with the loop held, which would hold the other's beats)
    async with worker_by_hand(nats_server, store, ws) as (service, _), live_worker(store):
        with pytest.raises(StartupError, match="'w-a' is in use"):
            await asyncio.wait_for(service.run(asyncio.Event()), 60)
        nc = await nats.connect(nats_server.url)
        try:  # nobody took the id's subject: a request sent there finds no responder
            with pytest.raises(nats.errors.NoRespondersError):
                await nc.request(subjects.worker_requests("w-a"), b"{}", timeout=10)
        finally:
            await nc.close()
        assert (await store.beat_of("w-a", 60.0))[0].incarnation == "other1"  # its key left alone


def _beating(nats_server: Server, tiny_llama: TinyOutput, **more: Any) -> WorkerSettings:
    """A worker "w-a" beating every 0.1 s under a TTL_S heartbeat."""
    return worker_settings(
        nats_server.url,
        tiny_llama,
        "w-a",
        heartbeat_ttl_s=TTL_S,
        stats_interval_s=0.1,
        **more,
    )


async def test_two_workers_started_at_once_leave_one(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both find no heartbeat under the id and pass the check at start; at their first beats the
    earlier start gives the id up, to the later (``WorkerStats.started``, Redis's clock), and exits
    saying why; the other serves on."""
    store = StateStore(redis)
    ws = _beating(nats_server, tiny_llama)
    async with (
        worker_by_hand(nats_server, store, ws) as (first, _),
        worker_by_hand(nats_server, store, ws) as (
            second,
            _,
        ),
    ):
        heartbeat = store.heartbeat

        async def once_both_started(stats: WorkerStats, ttl_s: float) -> WorkerStats | None:
            # At once, as this test means it: under load (a CI run) the first beat got out before
            # the other's check read the id, which then found it in use (right, but not this case)
            while not (first.started and second.started):
                await asyncio.sleep(0.01)
            return await heartbeat(stats, ttl_s)

        monkeypatch.setattr(store, "heartbeat", once_both_started)
        stop = asyncio.Event()
        runs = {asyncio.create_task(w.run(stop)): w for w in (first, second)}
        try:
            done, running = await asyncio.wait(runs, timeout=60, return_when=asyncio.FIRST_COMPLETED)
            assert len(done) == 1 and len(running) == 1
            (gave_up,), (kept,) = (runs[t] for t in done), (runs[t] for t in running)
            error = next(iter(done)).exception()
            assert isinstance(error, StartupError)
            assert "'w-a' was taken over" in str(error) and kept.incarnation in str(error)
            assert (gave_up.started, gave_up.incarnation) < (kept.started, kept.incarnation)
            # its last beat overwrote the other's: put back as it gave up (a review), not a beat later
            assert (await store.beat_of("w-a", 60.0))[0].incarnation == kept.incarnation
            await asyncio.sleep(0.3)  # a few of the other's beats: still its id
            assert not next(iter(running)).done()
            assert (await store.beat_of("w-a", 60.0))[0].incarnation == kept.incarnation
        finally:
            stop.set()
            await asyncio.wait(runs, timeout=10)


async def test_a_worker_resumed_after_its_replacement_started_gives_the_id_up(
    nats_server: Server, redis_server: Server, redis: Redis, tiny_llama: TinyOutput, tmp_path: Path
) -> None:
    """The review's case: a worker stopped (SIGSTOP) long enough to be taken for dead is replaced
    under its id; when it resumes, its next beat finds the later start's and it exits (2), naming
    the other, without removing the other's heartbeat; the replacement serves a request alone."""
    store = StateStore(redis)
    log = (tmp_path / "stalled.log").open("wb")
    stalled = spawn_worker(
        nats_server.url, redis_server.url, str(tiny_llama.model), "w-a", log, DLORA_HEARTBEAT_TTL_S=str(TTL_S)
    )
    stop = asyncio.Event()
    try:
        async with worker_by_hand(nats_server, store, _beating(nats_server, tiny_llama)) as (replacement, _):
            while await store.beat_of("w-a", TTL_S) is None:  # the stalled one's process is up
                assert stalled.poll() is None, (tmp_path / "stalled.log").read_text()
                await asyncio.sleep(0.1)
            sigstop(stalled)
            running = asyncio.create_task(replacement.run(stop))  # after its check's wait (~0.4 s)
            while (await store.beat_of("w-a", TTL_S))[0].incarnation != replacement.incarnation:
                await asyncio.sleep(0.05)
            stalled.send_signal(signal.SIGCONT)
            # (60 s: a process that does not give the id up never stops; a loaded machine took
            # over 10 s to beat, give up and exit)
            assert await asyncio.to_thread(stalled.wait, 60) == 2
            said = (tmp_path / "stalled.log").read_text()
            assert "'w-a' was taken over" in said and replacement.incarnation in said
            assert not running.done()
            assert (await store.beat_of("w-a", 60.0))[0].incarnation == replacement.incarnation
            stop.set()
            await asyncio.wait_for(running, 60)  # (it stops; how soon is the machine's)
    finally:
        stop.set()
        stalled.send_signal(signal.SIGCONT)
        stalled.kill()
        stalled.wait()
        log.close()


async def test_a_drain_taken_over_meanwhile_hands_nothing_over(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput
) -> None:
    """The review's case: stopped (SIGTERM), then silent through its drain long enough to be
    replaced, a worker handed the copies it held back (they were its successor's attempts: run
    again elsewhere) before its first beat told it. It asks just before."""
    store = StateStore(redis)
    async with worker_by_hand(nats_server, store, _beating(nats_server, tiny_llama)) as (worker, handed):
        await started_before_its_successor(worker, store)
        worker.commands.put_nowait(Add(REQUEST))  # came during the drain: handed over unrun
        await drain.hand_over(worker)
        await none_handed_while_taken_over(worker, store, handed)
        worker.commands.put_nowait(Add(REQUEST))
        await drain.hand_over(worker)
        assert (await asyncio.wait_for(handed.get(), 30)).requests == {"r1": 0} and handed.empty()


async def test_a_process_taken_over_hands_back_none_of_its_successors_records(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput
) -> None:
    """A helper's partition trial: back after its replacement started, a worker's sweep of the
    in-flight records found its successor's running requests under the id, took them for a
    predecessor's and handed them back (run again elsewhere) before its beat told it to stop."""
    store = StateStore(redis)
    async with worker_by_hand(nats_server, store, _beating(nats_server, tiny_llama)) as (worker, handed):
        assert await store.put_inflight(REQUEST, "w-a", new=True, incarnation="new1")  # running on the successor
        await started_before_its_successor(worker, store)
        await asyncio.sleep(0.01)  # (recorded a millisecond ago at least: past the sweep's grace)
        await admit.hand_back_unheld(worker, grace_s=0.0)
        await none_handed_while_taken_over(worker, store, handed)
        await admit.hand_back_unheld(worker, grace_s=0.0)  # a predecessor's record, then
        assert (await asyncio.wait_for(handed.get(), 30)).requests == {"r1": 0} and handed.empty()


REQUEST = GenerateRequest(
    request_id="r1", reply_to="test.r1", prompt_token_ids=[5, 6], params=SamplingParams(max_tokens=2)
)


async def started_before_its_successor(worker: WorkerService, store: StateStore) -> None:
    """``worker`` started at 1.0, and a later start ("new1", at 2.0) beating under its id."""
    worker.started = 1.0
    worker.stats = worker._snapshot()
    await store.heartbeat(beat("new1", started=2.0), TTL_S)


async def none_handed_while_taken_over(
    worker: WorkerService, store: StateStore, handed: asyncio.Queue[LostRequests]
) -> None:
    """``worker`` gave the id up and handed nothing back; then the successor is gone (its beat
    ``worker``'s own again), for the same call to be made with none."""
    assert worker.taken_over_by is not None and worker.taken_over_by.incarnation == "new1"
    assert handed.empty()
    await store.heartbeat(beat(worker.incarnation, started=1.0), TTL_S)
    worker.taken_over_by = None


async def test_a_dispatcher_recovering_a_lost_start_leaves_its_successors_requests(
    nats_server: Server, redis: Redis
) -> None:
    """A review: recovering a lost start of w-a while a later start already beats under the id (the
    gap between the watch's look and the recovery) re-dispatched every record under the id, the
    successor's running request included, and counted it a death. The successor's own sweep hands
    back what was lost."""
    store = StateStore(redis)
    nc = await nats.connect(nats_server.url)
    try:
        dispatcher = Dispatcher(DispatcherSettings(nats_url=nats_server.url, redis_url="unused"), nc, store)
        await store.heartbeat(beat("new1", started=2.0), TTL_S)
        assert await store.put_inflight(REQUEST, "w-a", new=True, incarnation="new1")
        await dispatcher.recover("w-a", "old1")
        record = await store.get_inflight(REQUEST.request_id)
        assert record is not None and (record.worker, record.recoveries, record.deaths) == ("w-a", 0, 0)
        assert (await store.beat_of("w-a", TTL_S))[0].incarnation == "new1"
        assert dispatcher.metrics.losses._value.get() == 0  # not a loss: the id lives
    finally:
        await nc.close()


async def test_a_process_giving_the_id_up_puts_its_successors_beat_back(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput
) -> None:
    """Its beat (SET ... GET) wrote its own stats over the successor's: a start under the id in the
    next beat's time was refused naming the dead incarnation (a review)."""
    store = StateStore(redis)
    async with worker_by_hand(nats_server, store, _beating(nats_server, tiny_llama)) as (worker, _):
        await started_before_its_successor(worker, store)
        await beats._heartbeat(worker, worker.stats)
        assert worker.taken_over_by is not None and worker.taken_over_by.incarnation == "new1"
        assert (await store.beat_of("w-a", TTL_S))[0].incarnation == "new1"
