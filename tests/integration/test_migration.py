"""Co-migration end to end: an overloaded worker hands requests to idle ones mid-stream, outputs
still equal the oracle; and the migrator lease fails over."""

from __future__ import annotations

import asyncio
import time
import uuid

import msgspec
import nats
import pytest
from redis.asyncio import Redis

from dlora.common import bus, subjects
from dlora.common.messages import GenerateRequest, MovePlan, RequestLoad, SamplingParams, TokenChunk, WorkerStats
from dlora.common.state import POLICY_TTL_S, StateStore
from dlora.model.make_tiny import TinyOutput
from dlora.services.migrator.main import Migrator
from dlora.services.migrator.settings import MigratorSettings
from dlora.services.migrator.trigger import TriggerBounds
from dlora.services.servers import Server
from dlora.services.worker.main import WorkerService, build_engine
from dlora.services.worker.settings import WorkerSettings
from tests.integration.conftest import small_engine
from tests.integration.test_gateway import offline
from tests.unit.planner_cases import whole_core

# Tokens each: the first plan moves requests a dozen or two tokens in, and what is left after
# that is enough to show the moved streams stay exact.
N_TOKENS = 150


async def start_workers(
    names: tuple[str, ...],
    nats_server: Server,
    store: StateStore,
    tiny_llama: TinyOutput,
    stop: asyncio.Event,
    conns: list,
    tasks: list,
    **settings,
) -> dict[str, WorkerService]:
    """Real workers in this process, running until ``stop``; their connections and tasks go into
    ``conns`` and ``tasks`` for the test to close. They stop at once, as run_stack's do (all stop
    together: none to drain to), unless ``settings`` give a ``drain_timeout_s``: a request a test
    left running held the stop for the 10 s default drain."""
    workers = {}
    settings.setdefault("engine", small_engine())
    settings.setdefault("drain_timeout_s", 0.0)
    for name in names:
        ws = WorkerSettings(nats_url=nats_server.url, worker_id=name, model=str(tiny_llama.model), **settings)
        nc = await nats.connect(nats_server.url)
        conns.append(nc)
        workers[name] = WorkerService(ws, nc, store, build_engine(ws))
        tasks.append(asyncio.create_task(workers[name].run(stop)))
    return workers


# Async scheduling with the recompute moves: a move takes in the step in flight first, so the
# token it holds reaches the client before the request leaves (else it was lost, or sent twice).
@pytest.mark.parametrize(("ship_kv", "overlap"), [(False, True), (True, False)], ids=["recompute-async", "kv"])
async def test_overloaded_worker_moves_requests_and_outputs_stay_exact(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput, ship_kv: bool, overlap: bool
) -> None:
    store = StateStore(redis)
    common = dict(nats_url=nats_server.url, redis_url="unused")
    stop = asyncio.Event()
    conns, tasks = [], []
    try:
        engine = small_engine(async_scheduling=overlap)
        workers = await start_workers(
            ("w0", "w1", "w2"), nats_server, store, tiny_llama, stop, conns, tasks, stats_interval_s=0.05, engine=engine
        )
        mnc = await nats.connect(nats_server.url)
        conns.append(mnc)
        # Shipping KV is free here, or dearer than any recompute: the planner picks accordingly.
        kv_cost = 0.0 if ship_kv else 1.0
        migrator = Migrator(
            MigratorSettings(
                **common,
                interval_s=0.05,
                trigger=TriggerBounds(imbalance=0.25, min_gain_s=0.01),
                kv_transfer_seconds_per_token=kv_cost,
            ),
            mnc,
            store,
        )
        tasks.append(asyncio.create_task(migrator.run(stop)))

        # A burst straight onto w0 (the NATS-native API lets an app pick a worker's subject).
        client = await nats.connect(nats_server.url)
        conns.append(client)
        owner = uuid.uuid4().hex[:8]
        chunks: dict[str, list[TokenChunk]] = {}
        done = asyncio.Event()
        prompts = {f"r{i}": [5 + i, 40, 41, 300, 17] for i in range(12)}

        async def on_chunk(msg) -> None:
            c = msgspec.json.decode(msg.data, type=TokenChunk)
            chunks.setdefault(c.request_id, []).append(c)
            if sum(1 for cs in chunks.values() if cs[-1].finish_reason) == len(prompts):
                done.set()

        await client.subscribe(subjects.replies_of(owner), cb=on_chunk)
        await bus.flush(client)
        async with asyncio.timeout(30):  # the migrator has seen every worker
            while not {"w0", "w1", "w2"} <= migrator.stats.keys():
                await asyncio.sleep(0.02)
        for rid, prompt in prompts.items():
            req = GenerateRequest(
                request_id=rid,
                reply_to=subjects.reply_inbox(rid, owner),
                prompt_token_ids=prompt,
                params=SamplingParams(max_tokens=N_TOKENS, ignore_eos=True),
            )
            await client.publish(subjects.worker_requests("w0"), msgspec.json.encode(req))
        await asyncio.wait_for(done.wait(), timeout=120)

        assert migrator.plans >= 1
        moved = {rid for rid, cs in chunks.items() if {c.worker for c in cs} != {"w0"}}
        assert moved, "no request finished away from w0"
        expected = offline(
            tiny_llama,
            [
                {"id": rid, "prompt_token_ids": p, "max_tokens": N_TOKENS, "ignore_eos": True}
                for rid, p in prompts.items()
            ],
        )
        for exp in expected:
            cs = chunks[exp["id"]]
            assert [c.seq for c in cs] == list(range(len(cs)))  # continuous numbering, nothing repeated
            assert [t for c in cs for t in c.token_ids] == exp["token_ids"]
            assert cs[-1].finish_reason == "length" and cs[-1].usage.completion_tokens == N_TOKENS
        # w1 and w2 only ever received moved requests: with KV shipped they never prefilled.
        recomputed = sum(workers[w].engine.stats.prefill_tokens for w in ("w1", "w2"))
        assert (recomputed == 0) if ship_kv else (recomputed > 0)
        # Receivers measure what a shipped cache cost them; the migrator prices later moves with it.
        measured = [workers[w].stats.kv_transfer_seconds_per_token for w in ("w1", "w2") if workers[w].kv_tokens]
        assert (len(measured) > 0 and all(m > 0 for m in measured)) if ship_kv else not measured
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in conns:
            await c.drain()


async def test_the_leader_bounds_policy_checkpoints_an_older_version_left(nats_server: Server, redis: Redis) -> None:
    """A helper's upgrade trial: an older version wrote dlora:policy:<worker> without expiry, and
    the key of a worker id never run again stayed for good after the upgrade."""
    store = StateStore(redis)
    nc = await nats.connect(nats_server.url)
    try:
        await redis.set("dlora:policy:worker-5", b"{}")  # as the older version wrote it
        await store.save_policy("worker-0", {})  # as this one writes it
        kept = await redis.ttl("dlora:policy:worker-0")
        await Migrator(MigratorSettings(nats_url=nats_server.url), nc, store).tick()
        assert 0 < await redis.ttl("dlora:policy:worker-5") <= POLICY_TTL_S
        assert await redis.ttl("dlora:policy:worker-0") <= kept  # its own left as it was
    finally:
        await nc.drain()


async def test_a_migrator_forgets_workers_silent_past_the_ttl(nats_server: Server, redis: Redis) -> None:
    """A helper's churn of worker ids (pods): the migrator kept the last stats of every id ever
    heard (cleared only when a plan went out, which a balanced cluster never sends)."""
    store = StateStore(redis)
    nc = await nats.connect(nats_server.url)
    try:
        migrator = Migrator(MigratorSettings(nats_url=nats_server.url, heartbeat_ttl_s=5.0), nc, store)
        for worker, at in (("pod-gone", time.monotonic() - 60), ("pod-live", time.monotonic())):
            stats = WorkerStats(
                worker=worker, running=0, waiting=0, free_blocks=1, total_blocks=1, block_size=16, max_loras=1
            )
            migrator.stats[worker] = (stats, at)
        await migrator.tick()
        assert set(migrator.stats) == {"pod-live"}
    finally:
        await nc.drain()


async def test_migrator_lease_fails_over(nats_server: Server, redis: Redis) -> None:
    store = StateStore(redis)
    nc = await nats.connect(nats_server.url)
    try:
        a = Migrator(MigratorSettings(nats_url=nats_server.url, migrator_id="m-a", lease_s=0.3), nc, store)
        b = Migrator(MigratorSettings(nats_url=nats_server.url, migrator_id="m-b", lease_s=0.3), nc, store)
        await a.tick()
        await b.tick()
        assert a.leader and not b.leader and await store.lease_holder("migrator") == a.holder
        assert a.holder.startswith("m-a/")
        await asyncio.sleep(0.4)  # a stops renewing (crashed)
        await b.tick()
        assert b.leader and await store.lease_holder("migrator") == b.holder
        assert b.epoch > a.epoch  # b's plans outrank whatever a still sends
        await a.tick()
        assert not a.leader  # the old leader stands by
    finally:
        await nc.drain()


async def test_dispatcher_places_replicas_of_hot_adapters(nats_server: Server, redis: Redis) -> None:
    """Decayed traffic shares persist in Redis and drive the placement."""
    from dlora.common.messages import AdapterEntry, AdapterResidency, WorkerStats
    from dlora.services.dispatcher.main import Dispatcher
    from dlora.services.dispatcher.settings import DispatcherSettings

    store = StateStore(redis)
    for name in ("hot", "cold"):
        await store.put_adapter(AdapterEntry(name=name, path=f"/{name}", rank=16, created=0.0))
    nc = await nats.connect(nats_server.url)
    try:
        d = Dispatcher(DispatcherSettings(nats_url=nats_server.url), nc, store)
        for i in range(3):
            st = WorkerStats(
                worker=f"w{i}",
                running=0,
                waiting=0,
                free_blocks=100,
                total_blocks=100,
                block_size=16,
                max_loras=4,
                adapters=[AdapterResidency(name="cold", slot=0, merged=False)] if i == 0 else [],
            )
            d.workers[st.worker] = (st, time.monotonic())
        for _ in range(9):
            d._count("hot")
        d._count("cold")
        await d.replan_placement()
        holders = [w for w, ads in d.placement.items() if "hot" in ads]
        assert len(holders) == 3 and "cold" in d.placement["w0"]
        traffic = await store.load_traffic()
        assert traffic["hot"] > traffic["cold"]
    finally:
        await nc.drain()


def _stats(name: str, n: int) -> WorkerStats:
    reqs = [
        RequestLoad(request_id=f"{name}-{i}", adapter=None, context_tokens=8, remaining_tokens=200) for i in range(n)
    ]
    return WorkerStats(
        worker=name,
        running=n,
        waiting=0,
        free_blocks=1000,
        total_blocks=1000,
        block_size=16,
        max_loras=4,
        seconds_per_token=0.01,
        prefill_seconds_per_token=0.0001,
        requests=reqs,
    )


async def test_migrator_waits_for_persistent_imbalance_and_cools_down(nats_server: Server, redis: Redis) -> None:
    store = StateStore(redis)
    nc = await nats.connect(nats_server.url)
    try:
        m = Migrator(
            MigratorSettings(
                nats_url=nats_server.url, trigger=TriggerBounds(patience=2, cooldown_s=60, min_gain_s=0.0)
            ),
            nc,
            store,
        )

        def feed() -> None:
            for name, n in (("w0", 12), ("w1", 0)):
                m.stats[name] = (_stats(name, n), time.monotonic())

        feed()
        await m.tick()
        assert m.plans == 0  # one imbalanced look is not enough
        feed()
        await m.tick()
        assert m.plans == 1
        feed()
        await m.tick()
        feed()
        await m.tick()
        assert m.plans == 1  # cooling down
    finally:
        await nc.drain()


async def test_no_request_moves_to_a_worker_gone_quiet(nats_server: Server, redis: Redis) -> None:
    """A worker killed or hung stays in the migrator's view until the TTL: its last stats said it
    idle, so a plan sent requests there, to stall until a dispatcher recovered them elsewhere."""
    nc = await nats.connect(nats_server.url)
    plans: list[MovePlan] = []

    async def got(plan: MovePlan) -> None:
        plans.append(plan)

    sub = await bus.subscribe(nc, subjects.MOVES, MovePlan, got)
    try:
        trigger = TriggerBounds(patience=1, cooldown_s=0, min_gain_s=0.0)
        m = Migrator(
            MigratorSettings(nats_url=nats_server.url, heartbeat_ttl_s=5.0, trigger=trigger), nc, StateStore(redis)
        )
        now = time.monotonic()
        # w-quiet: silent 3 s (past half the TTL; its stats came every half second until then)
        for name, n, heard in (("w0", 12, now), ("w-quiet", 0, now - 3.0), ("w-live", 0, now)):
            m.stats[name] = (_stats(name, n), heard)
        await m.tick()
        await nc.flush()
        for _ in range(50):
            if plans:
                break
            await asyncio.sleep(0.05)
        assert m.plans == 1 and plans and plans[0].moves
        assert {mv.to_worker for mv in plans[0].moves} == {"w-live"}
    finally:
        await bus.unsubscribe([sub])
        await nc.drain()


async def test_a_leader_that_lost_its_lease_while_solving_does_not_publish(
    nats_server: Server, redis: Redis, redis_server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    import redis as sync_redis

    from dlora.services.migrator import main as migrator_main

    store = StateStore(redis)
    nc = await nats.connect(nats_server.url)
    published = []

    async def on_plan(msg) -> None:
        published.append(msg.data)

    await nc.subscribe(subjects.MOVES, cb=on_plan)
    real_plan = migrator_main.plan

    def slow_plan(*args, **kwargs):  # the real planner, during which a standby takes the lease over
        with sync_redis.Redis.from_url(redis_server.url) as r:
            r.set(f"{store.p}:lease:migrator", "m-standby", px=3000)
        return real_plan(*args, **kwargs)

    monkeypatch.setattr(migrator_main, "plan", slow_plan)
    try:
        m = Migrator(
            MigratorSettings(nats_url=nats_server.url, trigger=TriggerBounds(patience=1, min_gain_s=0.0)), nc, store
        )
        for name, n in (("w0", 12), ("w1", 0)):
            m.stats[name] = (_stats(name, n), time.monotonic())
        await m.tick()
        await bus.flush(nc)
        await asyncio.sleep(0.1)
        assert m.leader and m.plans == 0 and not published
    finally:
        await nc.drain()


@pytest.mark.parametrize("marks", [True, False])
async def test_kv_pressure_sets_off_a_plan_that_says_so(
    nats_server: Server, redis: Redis, marks: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """And each move says whether its destination marks what it takes up (its stats' word), for the
    record the move writes (the poison guard during a rolling upgrade). Planned as on a machine of
    its own: the relief here is a swap (a long request out, a short one back), which the ILP finds
    and the greedy pass does not; under load (13 here) the pace left CBC no time and the plan was
    greedy's, with no move."""
    whole_core(monkeypatch)
    from dlora.common.messages import MovePlan, RequestLoad, WorkerStats

    store = StateStore(redis)
    nc = await nats.connect(nats_server.url)
    plans: list[MovePlan] = []

    async def on_plan(msg) -> None:
        plans.append(msgspec.json.decode(msg.data, type=MovePlan))

    await nc.subscribe(subjects.MOVES, cb=on_plan)
    try:
        # Even completion times (no queue-delay spread), but w0's long contexts need 95 of its 100
        # blocks, and shipping a cache costs less than the recompute its preemptions would
        # (``test_kv_pressure_is_relieved_even_when_completion_times_are_even``).
        settings = MigratorSettings(
            nats_url=nats_server.url,
            trigger=TriggerBounds(patience=1, kv_pressure=0.8, min_gain_s=0.0),
            recompute_seconds_per_token=0.001,
            kv_transfer_seconds_per_token=0.0005,
        )
        m = Migrator(settings, nc, store)
        for name, context in (("w0", 19 * 16), ("w1", 16)):
            reqs = [
                RequestLoad(request_id=f"{name}-{i}", adapter=None, context_tokens=context, remaining_tokens=10)
                for i in range(5)
            ]
            st = WorkerStats(
                worker=name,
                running=5,
                waiting=0,
                free_blocks=0,
                total_blocks=100,
                block_size=16,
                max_loras=4,
                seconds_per_token=0.01,
                requests=reqs,
                marks_taken=marks,
            )
            m.stats[name] = (st, time.monotonic())
        await m.tick()
        await bus.flush(nc)
        for _ in range(50):
            if plans:
                break
            await asyncio.sleep(0.02)
        assert m.plans == 1 and plans[0].trigger == "kv-pressure"
        assert any(mv.request_id.startswith("w0") and mv.to_worker == "w1" and mv.ship_kv for mv in plans[0].moves)
        assert all(mv.to_marks_taken == marks for mv in plans[0].moves)
    finally:
        await nc.drain()


async def test_workers_prefetch_the_adapters_placed_on_them(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput
) -> None:
    from dlora.common.messages import AdapterEntry
    from dlora.services.dispatcher.main import Dispatcher
    from dlora.services.dispatcher.settings import DispatcherSettings

    store = StateStore(redis)
    for name, path in tiny_llama.adapters.items():
        await store.put_adapter(AdapterEntry(name=name, path=str(path), rank=8, created=0.0))
    stop = asyncio.Event()
    conns, tasks = [], []
    try:
        workers = list(
            (
                await start_workers(
                    ("w0", "w1"), nats_server, store, tiny_llama, stop, conns, tasks, stats_interval_s=0.05
                )
            ).values()
        )
        dnc = await nats.connect(nats_server.url)
        conns.append(dnc)
        d = Dispatcher(DispatcherSettings(nats_url=nats_server.url), dnc, store)
        await bus.subscribe(dnc, subjects.STATS_ALL, WorkerStats, d._on_stats)
        await asyncio.sleep(0.3)
        for _ in range(20):
            d._count("lora-0")
        await d.replan_placement()
        for _ in range(100):
            if all("lora-0" in w.engine.adapters for w in workers):
                break
            await asyncio.sleep(0.05)
        assert all("lora-0" in w.engine.adapters for w in workers)  # the hot adapter, everywhere
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in conns:
            await c.drain()


async def test_a_migrator_stopped_while_it_takes_the_lease_releases_it(nats_server: Server, redis: Redis) -> None:
    """A stop breaks off the look under way (``bus.unless_stopped``): broken off after Redis gave
    it the lease but before its answer came (a slow Redis), the migrator did not know itself
    leader and left the lease held; a standby could not lead until it expired."""
    store = StateStore(redis)
    nc = await nats.connect(nats_server.url)
    taken = asyncio.Event()
    hold = store.hold_lease

    async def slow_answer(role: str, holder: str, ttl_s: float) -> int:
        epoch = await hold(role, holder, ttl_s)
        taken.set()
        await asyncio.sleep(60)  # the answer on its way
        return epoch

    store.hold_lease = slow_answer  # type: ignore[method-assign]
    try:
        migrator = Migrator(MigratorSettings(nats_url=nats_server.url, lease_s=30.0), nc, store)
        stop = asyncio.Event()
        running = asyncio.create_task(migrator.run(stop))
        await asyncio.wait_for(taken.wait(), 60)
        assert await store.lease_holder("migrator") == migrator.holder
        stop.set()
        await asyncio.wait_for(running, 60)
        assert await store.lease_holder("migrator") is None
    finally:
        await nc.drain()
