"""Workers carrying out move plans sent by hand (as the migrator publishes them): a deposed
leader's plans are dropped, a moved request's stream and usage stay its own, and a cache shipped
to a worker that never takes it up does not stay there."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import msgspec
import nats
import pytest
import torch
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from dlora.common import bus, subjects
from dlora.common.inflight import Inflight
from dlora.common.messages import (
    GenerateRequest,
    KVChunk,
    MovePlan,
    MoveRequest,
    SamplingParams,
    TokenChunk,
    WorkerStats,
)
from dlora.common.state import StateStore
from dlora.model.make_tiny import TinyOutput
from dlora.services.gateway.replies import ReplyStream
from dlora.services.migrator.looks import cluster_snapshot
from dlora.services.migrator.main import Migrator
from dlora.services.migrator.settings import MigratorSettings
from dlora.services.servers import Server
from dlora.services.worker import move_out
from dlora.services.worker.admit import abort
from dlora.services.worker.engine.kv_transfer import KVSnapshot
from dlora.services.worker.main import WorkerService
from dlora.services.worker.moves import Move, handoff
from dlora.services.worker.settings import WorkerSettings
from tests.integration.conftest import small_engine, worker_by_hand
from tests.integration.test_migration import start_workers


async def _send(client: nats.NATS, owner: str, rid: str, prompt: list[int], max_tokens: int) -> None:
    """A greedy request straight to w0, its chunks to ``owner``'s replies."""
    req = GenerateRequest(
        request_id=rid,
        reply_to=subjects.reply_inbox(rid, owner),
        prompt_token_ids=prompt,
        params=SamplingParams(max_tokens=max_tokens, ignore_eos=True),
    )
    await client.publish(subjects.worker_requests("w0"), msgspec.json.encode(req))


async def _plan(client: nats.NATS, epoch: int, request_id: str, marks: bool = False, ship_kv: bool = False) -> None:
    """A plan of ``epoch`` moving ``request_id`` to w1 (``marks``: the migrator read that w1 marks)."""
    moves = [MoveRequest(request_id=request_id, adapter=None, to_worker="w1", to_marks_taken=marks, ship_kv=ship_kv)]
    plan = MovePlan(plan_id=f"p{epoch}", epoch=epoch, created=time.time(), moves=moves)
    await client.publish(subjects.MOVES, msgspec.json.encode(plan))
    await bus.flush(client)


def _paced(worker: WorkerService) -> None:
    """``worker``'s steps 10 ms each at least: a request of 400 tokens outlasts the plans and stats
    a test waits for (on an idle machine, unpaced, it had ended first: 'r' gone from its streams)."""
    step = worker.engine.step

    def paced() -> object:
        time.sleep(0.01)
        return step()

    worker.engine.step = paced  # type: ignore[method-assign]


@asynccontextmanager
async def _workers(
    nats_server: Server,
    store: StateStore,
    tiny_llama: TinyOutput,
    names: tuple[str, ...] = ("w0", "w1"),
    **settings: object,
) -> AsyncIterator[tuple[dict[str, WorkerService], nats.NATS]]:
    """Workers ``names`` running (``start_workers``, with ``settings``) and a client, stopped and
    closed after."""
    stop = asyncio.Event()
    conns: list[nats.NATS] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        workers = await start_workers(names, nats_server, store, tiny_llama, stop, conns, tasks, **settings)
        client = await nats.connect(nats_server.url)
        conns.append(client)
        yield workers, client
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in conns:
            await c.drain()


async def test_workers_drop_plans_from_a_deposed_migrator(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput
) -> None:
    store = StateStore(redis)
    async with _workers(nats_server, store, tiny_llama) as (workers, client):
        owner = uuid.uuid4().hex[:8]
        seen: list[TokenChunk] = []
        moved: list[Inflight | None] = []  # the record as w1's first chunk came

        async def on_chunk(msg) -> None:  # type: ignore[no-untyped-def]
            seen.append(msgspec.json.decode(msg.data, type=TokenChunk))
            if seen[-1].worker == "w1" and not moved:  # read then: a CI run's checked after it had ended
                moved.append(await store.get_inflight("r"))

        await client.subscribe(subjects.replies_of(owner), cb=on_chunk)
        _paced(workers["w0"])
        await asyncio.sleep(0.3)
        await _send(client, owner, "r", [5, 6, 7], 400)
        while not seen:
            await asyncio.sleep(0.01)

        async def send_plan(epoch: int, request_id: str = "r") -> None:
            await _plan(client, epoch, request_id, marks=True)
            await asyncio.sleep(0.3)

        await send_plan(2, "not-here")  # w0 takes a plan of epoch 2 (for a request it does not have)
        assert workers["w0"].plan_epoch == 2
        await send_plan(1)  # the leader before it, still sending
        assert "r" in workers["w0"].streams and not seen[-1].finish_reason  # stayed
        await send_plan(2)
        async with asyncio.timeout(30):
            while not moved:
                await asyncio.sleep(0.01)
        # recorded with the move: the plan said w1 marks what it takes up (the poison guard)
        assert (rec := moved[0]) is not None and rec.worker == "w1" and rec.marks_taken
        async with asyncio.timeout(30):
            while not seen[-1].finish_reason:
                await asyncio.sleep(0.02)
        assert seen[-1].worker == "w1" and [c.seq for c in seen] == list(range(len(seen)))


async def test_a_moved_request_reports_its_first_runs_prefix_cache_hit(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput
) -> None:
    """A trial: after a move the usage's cached_tokens was the destination's recompute hit (0 for a
    first run's 32). A 40-token prompt, its two full blocks cached on w0 by an earlier request, runs
    there and is moved to w1 (which has nothing cached) by a plan: the reader reports 32."""
    store = StateStore(redis)
    async with _workers(nats_server, store, tiny_llama) as (_, client):
        owner = uuid.uuid4().hex[:8]
        streams = {rid: ReplyStream(rid) for rid in ("warm", "r")}

        async def on_chunk(msg) -> None:  # type: ignore[no-untyped-def]
            chunk = msgspec.json.decode(msg.data, type=TokenChunk)
            streams[chunk.request_id].accept(chunk)

        await client.subscribe(subjects.replies_of(owner), cb=on_chunk)
        await asyncio.sleep(0.3)
        prompt = [5 + i for i in range(40)]
        for rid, max_tokens in (("warm", 2), ("r", 400)):
            await _send(client, owner, rid, prompt, max_tokens)
            async with asyncio.timeout(30):
                while not (streams[rid].done if rid == "warm" else streams[rid].tokens):
                    await asyncio.sleep(0.01)
        await _plan(client, 1, "r")  # not saying w1 marks (an older migrator's): recorded as not
        async with asyncio.timeout(60):
            while streams["r"].worker != "w1":
                await asyncio.sleep(0.01)
        assert (rec := await store.get_inflight("r")) is not None and rec.worker == "w1" and not rec.marks_taken
        async with asyncio.timeout(60):
            while not streams["r"].done:
                await asyncio.sleep(0.02)
        r = streams["r"]
        assert r.error is None and r.tokens == 400 and r.worker == "w1"  # it moved, and finished there
        assert streams["warm"].cached_tokens == 0 and r.cached_tokens == 32


async def test_a_cache_shipped_for_a_request_refused_on_arrival_is_not_kept(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput
) -> None:
    """A trial: a client that left while its request moved (the gateway's abort, sent to every
    worker, came to the destination before the request) had the request refused there, and the
    cache shipped ahead of it kept in the destination's memory until another move's came (never,
    on a worker no more moves reached; a 4k-token context of Llama-3-8B's is 0.5 GB)."""
    ws = WorkerSettings(
        nats_url=nats_server.url, redis_url="unused", worker_id="w1", model=str(tiny_llama.model), engine=small_engine()
    )
    async with worker_by_hand(nats_server, StateStore(redis), ws) as (service, _):
        kv = KVSnapshot(tokens=3, k=torch.zeros(2, 3, 2, 16), v=torch.zeros(2, 3, 2, 16)).to_bytes()
        first = GenerateRequest(request_id="r", reply_to="test.r", prompt_token_ids=[5, 6, 7])
        moved, chunks = handoff(first, [8], 0, 1, kv, 0.0)  # as the source sends it: its cache first
        for chunk in chunks:
            await service._on_kv_chunk(chunk)
        await abort(service, "r", None)
        await service._on_request(moved)
        async with asyncio.timeout(60):  # (its cache taken up beside the loop: arrival.py)
            await service._take(await service.commands.get())
        assert "r" not in service.streams and len(service.kv_inbox) == 0
        # A cache whose request never comes (its source died after sending it) goes once stale,
        # at the worker's next look, not only when another move's cache begins to come.
        service.kv_inbox.stale_s = 0.0
        for chunk in handoff(msgspec.structs.replace(first, request_id="q"), [8], 0, 1, kv, 0.0)[1]:
            await service._on_kv_chunk(chunk)
        await service._reconcile()
        assert len(service.kv_inbox) == 0


async def test_a_shipped_cache_s_cost_counts_its_import_into_the_engine(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The destination's measure of a shipped cache (``kv_transfer_seconds_per_token``, which the
    migrator weighs against recomputing) counted its wait, its read and its import into the KV
    cache; with the wait moved beside the steps (arrival.py) the import, a copy of the whole cache
    into the blocks (host to device on a GPU), was left out and shipping read as cheaper than it is."""
    from dlora.services.worker.engine import adding

    real = adding.import_kv

    def slow_import(*args: object, **kwargs: object) -> object:
        time.sleep(0.3)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(adding, "import_kv", slow_import)
    ws = WorkerSettings(
        nats_url=nats_server.url, redis_url="unused", worker_id="w1", model=str(tiny_llama.model), engine=small_engine()
    )
    async with worker_by_hand(nats_server, StateStore(redis), ws) as (service, _):
        kv = KVSnapshot(tokens=3, k=torch.zeros(2, 3, 2, 16), v=torch.zeros(2, 3, 2, 16)).to_bytes()
        moved, chunks = handoff(
            GenerateRequest(request_id="r", reply_to="test.r", prompt_token_ids=[5, 6, 7]), [8], 0, 1, kv, 0.0
        )
        for chunk in chunks:
            await service._on_kv_chunk(chunk)
        await service._on_request(moved)
        async with asyncio.timeout(60):
            await service._take(await service.commands.get())
        assert "r" in service.streams and service.kv_tokens == 3
        assert service.kv_seconds >= 0.3


async def test_a_plan_moving_others_requests_leaves_a_worker_s_steps_alone(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput
) -> None:
    """A trial: a plan of 4,000 moves between other workers made w0 (async scheduling, streaming
    one request) take each up as a command, taking its step in flight in early for each: 4,000
    early takes and a 0.47 s stall of its stream."""
    engine = small_engine(async_scheduling=True)
    async with _workers(nats_server, StateStore(redis), tiny_llama, ("w0",), engine=engine) as (workers, client):
        w0 = workers["w0"].engine
        early: list[int] = []
        drain = w0.drain
        w0.drain = lambda: early.append(1) or drain()  # type: ignore[method-assign]
        owner = uuid.uuid4().hex[:8]
        got: list[TokenChunk] = []

        async def on_chunk(msg) -> None:  # type: ignore[no-untyped-def]
            got.append(msgspec.json.decode(msg.data, type=TokenChunk))

        await client.subscribe(subjects.replies_of(owner), cb=on_chunk)
        await asyncio.sleep(0.3)
        await _send(client, owner, "r", [5, 6, 7], 400)
        async with asyncio.timeout(30):
            while not got:
                await asyncio.sleep(0.01)
        moves = [MoveRequest(request_id=f"x{i}", adapter=None, to_worker="w1") for i in range(4000)]
        await client.publish(
            subjects.MOVES, msgspec.json.encode(MovePlan(plan_id="p", epoch=1, created=time.time(), moves=moves))
        )
        await bus.flush(client)
        async with asyncio.timeout(30):
            while workers["w0"].plan_epoch != 1:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)
        assert not early and workers["w0"].commands.empty()


async def test_a_request_moved_while_it_waited_reports_its_whole_queue_time(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput
) -> None:
    """A request that waited on a full worker (one request a step) and was moved before its first
    token: the destination's first chunk said only its own wait (a few ms) as the queue time, so
    vllm:request_queue_time_seconds lost the wait of exactly the requests the migrator moves for
    waiting. It says both (WAIT_S here at least: the source held it that long unscheduled)."""
    store = StateStore(redis)
    wait_s = 1.0
    engine = small_engine(max_num_seqs=1, device="cpu", dtype="float32")
    async with _workers(nats_server, store, tiny_llama, engine=engine) as (workers, client):
        step = workers["w0"].engine.step

        def slow():  # type: ignore[no-untyped-def]
            time.sleep(0.02)  # (in the step's thread) so that "busy" outlasts the test: 400 steps
            return step()

        workers["w0"].engine.step = slow  # type: ignore[method-assign]
        owner = uuid.uuid4().hex[:8]
        first: dict[str, TokenChunk] = {}

        async def on_chunk(msg) -> None:  # type: ignore[no-untyped-def]
            chunk = msgspec.json.decode(msg.data, type=TokenChunk)
            first.setdefault(chunk.request_id, chunk)

        await client.subscribe(subjects.replies_of(owner), cb=on_chunk)
        await asyncio.sleep(0.3)
        await _send(client, owner, "busy", [5, 6, 7], 400)  # w0's one seat, for the whole test
        async with asyncio.timeout(30):
            while "busy" not in first:
                await asyncio.sleep(0.01)
        await _send(client, owner, "r", [8, 9, 10], 4)
        async with asyncio.timeout(30):
            while "r" not in workers["w0"].streams:
                await asyncio.sleep(0.01)
        await asyncio.sleep(wait_s)  # it waits behind "busy"
        assert "r" not in first
        await _plan(client, 1, "r")
        async with asyncio.timeout(30):
            while "r" not in first:
                await asyncio.sleep(0.01)
        assert first["r"].worker == "w1" and first["r"].queue_seconds is not None
        assert first["r"].queue_seconds >= wait_s, first["r"]


async def test_a_move_refused_while_progress_writes_lag_frees_its_request_for_the_next_plan(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput, monkeypatch: pytest.MonkeyPatch
) -> None:
    """w0's progress writes fail (Redis refusing them): it rightly refuses a plan's move of its
    request, whose record lacks the tokens sent (a resume from it would lose them). The migrator took
    that move as made and left the request out of its plans for ``settle_s`` (10 s; left by the last
    session): w0's stats now say the moves it refused, by plan, and the migrator frees them; and
    while its writes fail they pin its requests, or each was planned and refused again at each look."""
    store = StateStore(redis)
    async with _workers(nats_server, store, tiny_llama) as (workers, client):
        seen: list[TokenChunk] = []

        async def on_chunk(msg) -> None:  # type: ignore[no-untyped-def]
            seen.append(msgspec.json.decode(msg.data, type=TokenChunk))

        owner = uuid.uuid4().hex[:8]
        await client.subscribe(subjects.replies_of(owner), cb=on_chunk)
        stats = await client.subscribe(subjects.stats("w0"))
        await bus.flush(client)
        settings = MigratorSettings(nats_url=nats_server.url, redis_url="unused")
        migrator = Migrator(settings, client, store)  # (its loop not running: no plan of its own)
        await bus.subscribe(client, subjects.STATS_ALL, WorkerStats, migrator._on_stats)

        async def refused(*args: object) -> set[str]:
            raise RedisConnectionError("Connection reset by peer")

        monkeypatch.setattr(store, "record_progress", refused)
        _paced(workers["w0"])
        await _send(client, owner, "r", [5, 6, 7], 400)
        async with asyncio.timeout(30):
            while not workers["w0"].records.outage:
                await asyncio.sleep(0.01)
        failing = time.time()  # (stats read before it may say the refusal, their requests not pinned)
        migrator.looks.moved("p1", ["r"], time.monotonic())
        await _plan(client, 1, "r")
        async with asyncio.timeout(30):
            while not (st := msgspec.json.decode((await stats.next_msg()).data, type=WorkerStats)).refused_moves:
                pass
            while st.taken < failing:
                st = msgspec.json.decode((await stats.next_msg()).data, type=WorkerStats)
        await stats.unsubscribe()  # (unread, its queue held the connection's drain 30 s)
        # and while its writes fail, its requests stay pinned: planned again, each was refused again
        assert st.refused_moves == {"p1": ["r"]} and [(r.request_id, r.pinned) for r in st.requests] == [("r", True)]
        assert st.stats_interval_s == workers["w0"].s.stats_interval_s > 0  # (the age bound the migrator plans to)
        free = msgspec.structs.replace(st, requests=[msgspec.structs.replace(r, pinned=False) for r in st.requests])
        async with asyncio.timeout(30):  # (the migrator's handler has the same stats): free for the next plan
            while migrator.looks.settled(cluster_snapshot([free], {}, settings), time.monotonic()).requests[0].pinned:
                await asyncio.sleep(0.01)
        assert "r" in workers["w0"].streams and not any(c.worker == "w1" for c in seen)


async def test_a_request_moved_away_is_news_when_refused_again_before_the_next_stats(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput
) -> None:
    """A refusal is logged once an episode, which ends when its request leaves (``Refusals.left``,
    the pure rule in ``test_moves``): ``move_out`` ends it as the request goes, not the worker's
    next stats, so a request moved away and back within one stats interval, and refused again for
    the reason it was refused for before, is logged. w0 sends its stats every 10 s and stays busy
    (no early stats as it falls idle): none goes out between r's move and the refusal after it."""
    store = StateStore(redis)
    slow = {"stats_interval_s": 10.0, "heartbeat_ttl_s": 30.0}
    async with _workers(nats_server, store, tiny_llama, **slow) as (workers, client):
        await _send(client, "o", "busy", [5, 6, 7], 400)
        await _send(client, "o", "r", [8, 9, 10], 400)
        async with asyncio.timeout(30):
            while not {"busy", "r"} <= set(workers["w0"].streams):
                await asyncio.sleep(0.01)
        refusals = workers["w0"].refusals
        assert refusals.add(Move("r", "w1", False, plan_id="p0"), time.monotonic(), why="outage")  # (Redis lagged)
        await _plan(client, 1, "r")
        async with asyncio.timeout(30):
            while "r" in workers["w0"].streams:
                await asyncio.sleep(0.01)
        # back here (as the same request), and refused for the same reason: news, its episode over
        assert refusals.add(Move("r", "w1", False, plan_id="p2"), time.monotonic(), why="outage")


async def test_a_request_too_large_to_move_is_said_refused_and_stays_pinned(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request grown past what NATS carries is refused a move: w0 said nothing, the migrator held
    it moved for ``settle_s`` and then planned it again, to be refused again (left by the last
    session). Its stats now say the refusal and pin it, in one message. Grown here by its tokens
    (``resume_token_ids``) past the connection's limit, the size check itself as it runs (text held
    back for a stop string would not pin it: the next token may release it, ``moves.too_large``)."""
    store = StateStore(redis)
    grown = move_out.handoff

    def too_large(*args: object, **kwargs: object) -> tuple[GenerateRequest, list[KVChunk]]:
        resumed, chunks = grown(*args, **kwargs)  # type: ignore[arg-type]
        return msgspec.structs.replace(resumed, resume_token_ids=[7] * (1 << 20)), chunks

    monkeypatch.setattr(move_out, "handoff", too_large)
    async with _workers(nats_server, store, tiny_llama) as (workers, client):
        stats = await client.subscribe(subjects.stats("w0"))
        await _send(client, "o", "r", [5, 6, 7], 400)
        async with asyncio.timeout(30):
            while "r" not in workers["w0"].streams:
                await asyncio.sleep(0.01)
        exported: list[str] = []
        export_kv = workers["w0"].engine.export_kv
        monkeypatch.setattr(workers["w0"].engine, "export_kv", lambda rid: exported.append(rid) or export_kv(rid))
        await _plan(client, 1, "r", ship_kv=True)
        async with asyncio.timeout(30):
            while not (st := msgspec.json.decode((await stats.next_msg()).data, type=WorkerStats)).refused_moves:
                pass
        await stats.unsubscribe()
        assert st.refused_moves == {"p1": ["r"]} and [(r.request_id, r.pinned) for r in st.requests] == [("r", True)]
        assert "r" in workers["w0"].streams and exported == []  # its cache not copied off to be thrown away
