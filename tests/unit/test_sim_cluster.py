"""A simulated cluster: replicas behind the dispatcher's own choice, on simulated time."""

import json
import random
from pathlib import Path

import pytest

from dlora.services.dispatcher.choose import DispatchMode
from dlora.sim.cluster import Cluster, SimRequest, summary
from dlora.sim.cost import ARTIFACT, H200


def _workload(n: int, rate: float, adapters: list[str], seed: int = 0) -> list[SimRequest]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(n):
        t += rng.expovariate(rate)
        prompt = [rng.randrange(3, 30000) for _ in range(rng.randint(8, 64))]
        out.append(SimRequest(f"q{i}", t, rng.choice(adapters), prompt, rng.randint(4, 64)))
    return out


def test_every_request_is_served_to_its_length_under_each_dispatch_mode() -> None:
    adapters = {f"a{i}": 16 for i in range(6)}
    requests = _workload(200, rate=40.0, adapters=[*adapters, None])  # type: ignore[list-item]
    results = {}
    for mode in DispatchMode:
        cluster = Cluster(ARTIFACT, replicas=4, adapters=adapters, mode=mode)
        served = cluster.run(requests)
        assert all(s.tokens == s.request.output_len and s.finish_reason == "stop" for s in served)
        assert all(s.request.arrival_s < s.first_token_s <= s.finish_s for s in served)  # type: ignore[operator]
        assert len({s.replica for s in served}) == 4  # the load spread over every replica
        results[mode] = summary(served)
    for r in results.values():
        assert r["completed"] == 200 and r["norm_latency_mean_s"] >= 15e-3  # no step is faster than 15 ms
    # deterministic: the same workload gives the same figures
    again = summary(Cluster(ARTIFACT, replicas=4, adapters=adapters).run(requests))
    assert again == results[DispatchMode.PROACTIVE]


def test_the_migrator_moves_requests_off_an_overloaded_replica_and_they_end_exact() -> None:
    """Round-robin sends every long request to one replica (they alternate with short ones): the
    migrator's own trigger and planner move some of them, shipped or recomputed, and each ends at
    its length on its new replica."""
    from dlora.services.migrator.settings import MigratorSettings

    requests = [SimRequest(f"q{i}", 0.01 * i, None, [7 + i % 50] * 32, 1500 if i % 2 == 0 else 4) for i in range(24)]
    settings = MigratorSettings(interval_s=0.5)
    cluster = Cluster(H200, replicas=2, adapters={}, mode=DispatchMode.ROUND_ROBIN, migrator=settings)
    served = cluster.run(requests)
    assert all(s.tokens == s.request.output_len and s.finish_reason == "stop" for s in served)
    moved = [s for s in served if s.moves]
    assert cluster.plans and moved and {s.replica for s in moved} == {"r001"}
    without = summary(Cluster(H200, replicas=2, adapters={}, mode=DispatchMode.ROUND_ROBIN).run(requests))
    assert summary(served)["norm_latency_mean_s"] < without["norm_latency_mean_s"]  # the moves paid
    # shipping priced far below recomputing: the plan ships the cache, and the request decodes on
    cheap_kv = MigratorSettings(interval_s=0.5, kv_transfer_seconds_per_token=1e-9, recompute_seconds_per_token=1e-2)
    shipped = Cluster(H200, replicas=2, adapters={}, mode=DispatchMode.ROUND_ROBIN, migrator=cheap_kv)
    served = shipped.run(requests)
    assert any(m.ship_kv for p in shipped.plans for m in p.moves)
    assert all(s.tokens == s.request.output_len and s.finish_reason == "stop" for s in served)


def test_fast_forward_serves_as_stepping_does() -> None:
    """Skipping the steps that repeat the last one changes nothing: every request's first token and
    end come at the same instant, and the stats are the same (a fast-forward that also skipped the
    step after a horizon moved these figures; one that recorded a step's cost where a step records
    its clock after less before, its step seconds in the last digit), under unmerged-only and
    under dLoRA's policy, which learns from the steps a fast-forward runs and is asked again
    before each (``SimEngine.fast_forward``)."""
    from dlora.services.worker.engine.config import EngineConfig
    from dlora.services.worker.policy.config import PolicyConfig, PolicyName

    adapters = {f"a{i}": 16 for i in range(6)}
    requests = _workload(300, rate=30.0, adapters=[*adapters, None])  # type: ignore[list-item]
    unmerged = EngineConfig(policy=PolicyConfig(name=PolicyName.UNMERGED_ONLY))
    for config in (unmerged, None):
        runs = [Cluster(H200, 4, adapters, config=config, fast_forward=ff) for ff in (True, False)]
        fast, exact = (r.run(requests) for r in runs)
        assert fast == exact
        assert [r.stats for r in runs[0].replica_summaries] == [r.stats for r in runs[1].replica_summaries]
        skipped = sum(r.fast_forwarded for r in runs[0].replica_summaries)
        assert 0.3 * sum(r.stats.steps for r in runs[0].replica_summaries) < skipped  # each counted as a step


def test_fast_forward_serves_as_stepping_does_across_stats_and_switches(tmp_path: Path) -> None:
    """The same through ``dlora simulate`` on a workload with merges, mixed steps and stats ticks
    between the steps: every figure but the wall time the same. A review's: a fast-forward that
    went on past a tick without asking the policy moved its throughput from 516.38 to 518.21 tok/s
    and its merges from 82 to 73. A helper's: one that asked it only at the steps it ran for real
    went on mixed past the step where the overhead fit came to price the unmerged step cheaper
    (26 merges against 21 here, its latency 0.3 % off; the same figures at 300 requests, by luck)."""
    from dlora.services.cli import build_parser

    argv = "simulate --replicas 4 --requests 150 --rate 6 --adapters 12 --ranks 8,16,32 --seed 3"
    results = []
    for exact in ([], ["--exact"]):
        args = build_parser().parse_args([*argv.split(), *exact, "--json", str(tmp_path / "r.json")])
        assert args.func(args) == 0
        result = json.loads((tmp_path / "r.json").read_text())
        results.append({k: v for k, v in result.items() if k not in ("exact", "options", "wall_s")})
    fast, stepped = results
    assert fast.pop("fast_forwarded_steps") > 0
    assert stepped.pop("fast_forwarded_steps") == 0
    assert fast["merges"] and fast["steps_by_mode"]["mixed"] and fast["steps_by_mode"]["merged"]
    assert fast == stepped


def test_the_replicas_split_over_processes_serve_exactly_as_in_one() -> None:
    """Replicas meet only at the stats and the migrator's looks, so shards in forked processes run
    the stretches between in parallel: every request's figures are the same to the last digit,
    moves included (the migrator test's workload, which moves requests)."""
    from dlora.services.migrator.settings import MigratorSettings

    requests = [SimRequest(f"q{i}", 0.01 * i, None, [7 + i % 50] * 32, 1500 if i % 2 == 0 else 4) for i in range(24)]
    adapters = {f"a{i}": 8 * (1 + i % 3) for i in range(6)}
    mixed = _workload(150, rate=40.0, adapters=[*adapters, None])  # type: ignore[list-item]
    for workload, mode, replicas in ((requests, DispatchMode.ROUND_ROBIN, 2), (mixed, DispatchMode.PROACTIVE, 3)):
        runs = [
            Cluster(H200, replicas, adapters, mode=mode, migrator=MigratorSettings(interval_s=0.5), jobs=jobs)
            for jobs in (1, replicas)
        ]
        served = [run.run(workload) for run in runs]
        assert served[0] == served[1]
        assert [r.stats for r in runs[0].replica_summaries] == [r.stats for r in runs[1].replica_summaries]
        assert [r.name for r in runs[1].replica_summaries] == [f"r{i:03d}" for i in range(replicas)]
        if workload is requests:
            assert any(s.moves for s in served[1])


def test_with_a_disk_tier_the_dispatcher_s_placement_has_replicas_prefetch_adapters() -> None:
    """``max_cpu_loras`` below the adapters: replicas start holding none, read each in as requests
    ask (their clocks pay it), and the dispatcher's own placement (``placement_of``, every placement
    interval) has a replica prefetch an adapter with traffic that no request of it ran on there."""
    from dlora.services.worker.engine.config import EngineConfig

    adapters = {f"a{i}": 16 for i in range(4)}
    requests = [SimRequest(f"q{i}", 0.5 * i, "a0", [7 + i] * 16, 8) for i in range(20)]
    config = EngineConfig(max_loras=2, max_cpu_loras=2)
    cluster = Cluster(H200, replicas=2, adapters=adapters, config=config)
    served = cluster.run(requests)
    assert all(s.tokens == 8 for s in served)
    ran = {s.replica for s in served}
    assert ran == {"r000"}  # proactive: the replica holding a0, light as the load is
    loads = {r.name: r.disk_loads for r in cluster.replica_summaries}
    assert loads == {"r000": 1, "r001": 1}  # r001 prefetched a0, placed there for burst tolerance
    assert cluster.state.placement == {"r000": ["a0"], "r001": ["a0"]}
    warm = Cluster(H200, replicas=2, adapters=adapters, config=EngineConfig(max_loras=2, max_cpu_loras=4))
    held = warm.run(requests)  # every adapter held from the start: nothing read, nothing placed
    assert {r.disk_loads for r in warm.replica_summaries} == {0} and not warm.state.placement
    waited = [s.first_token_s - s.request.arrival_s for s in (served[0], held[0])]  # type: ignore[operator]
    assert waited[0] == pytest.approx(waited[1] + H200.host_load_seconds(16))  # the first waited for the read


def test_an_adapter_read_from_disk_holds_up_only_the_requests_that_wait_for_it() -> None:
    """A worker reads an adapter beside its steps: a request of a held adapter decodes on through
    another's 10 s read (it stalled for the whole read when the read held up the command loop)."""
    import dataclasses

    from dlora.services.worker.engine.config import EngineConfig

    slow_disk = dataclasses.replace(H200, disk_load_s_per_rank=10.0 / 16)
    adapters = {"a0": 16, "a1": 16}
    requests = [SimRequest("q0", 0.0, "a0", [7] * 16, 200), SimRequest("q1", 0.1, "a1", [8] * 16, 8)]
    config = EngineConfig(max_loras=1, max_cpu_loras=1)
    first, second = sorted(
        Cluster(slow_disk, 1, adapters, config=config).run(requests), key=lambda s: s.request.request_id
    )
    assert first.first_token_s == pytest.approx(10.0, abs=0.1)  # its own adapter's read
    assert second.first_token_s >= 20.0  # a1's read, after a0's (one at a time)
    assert first.finish_s < 15.0  # 200 tokens at ~15 ms a step, not stalled until 20 s  # type: ignore[operator]


def test_a_replica_reads_what_requests_wait_for_before_what_the_placement_prefetches() -> None:
    """One read at a time, as a worker reads: the reads requests ask for go ahead of the prefetches
    queued, and a queued prefetch a request asks for goes ahead too."""
    from dlora.services.worker.engine.config import EngineConfig
    from dlora.sim.shard import Shard

    adapters = {a: 16 for a in ("first", "pre", "hurried", "asked")}
    shard = Shard(H200, ["r0"], adapters, EngineConfig(max_loras=1, max_cpu_loras=1), fast_forward=True)
    replica = shard.replicas["r0"]
    installed: list[str] = []
    install = replica.engine.install
    replica.engine.install = lambda a, rank: installed.append(a) or install(a, rank)  # type: ignore[method-assign]
    for adapter in ("first", "pre", "hurried"):  # the placement's, in its order
        shard._hold(replica, adapter, 0.0, prefetch=True)
    shard._hold(replica, "asked", 0.001)
    shard._hold(replica, "hurried", 0.002)
    shard.advance([], [], end=10.0, report=False)
    assert installed == ["first", "asked", "hurried", "pre"]


def test_with_a_disk_tier_fast_forward_and_processes_serve_as_stepping_in_one() -> None:
    """Reads from disk and prefetches change what a replica runs: a fast-forward stops at them,
    and the placement's prefetches reach each shard alike (under mixed-only)."""
    from dlora.services.worker.engine.config import EngineConfig
    from dlora.services.worker.policy.config import PolicyConfig, PolicyName

    adapters = {f"a{i}": 16 for i in range(12)}
    requests = _workload(300, rate=20.0, adapters=[*adapters, None], seed=1)  # type: ignore[list-item]
    config = EngineConfig(max_loras=2, max_cpu_loras=3, policy=PolicyConfig(name=PolicyName.MIXED_ONLY))
    runs = [
        Cluster(H200, 3, adapters, config=config, fast_forward=ff, jobs=jobs)
        for ff, jobs in ((True, 1), (False, 1), (True, 3))
    ]
    served = [run.run(requests) for run in runs]
    assert served[0] == served[1] == served[2]
    assert sum(r.disk_loads for r in runs[0].replica_summaries) > len(adapters)  # evicted and read again


def test_moves_that_arrive_at_once_join_in_the_plan_s_order_however_split() -> None:
    """Two replicas in lockstep (identical long requests) both move requests to a third: those
    arriving at the same instant joined it in the order their shards answered, so two processes
    gave other figures than one (review)."""
    from dlora.services.migrator.settings import MigratorSettings

    requests = [
        SimRequest(f"q{3 * k + r}", 0.001 * k, None, [7 + 3 * k + r] * 64, 1500 if r else 4)
        for k in range(12)
        for r in range(3)
    ]
    runs = [
        Cluster(H200, 3, {}, mode=DispatchMode.ROUND_ROBIN, migrator=MigratorSettings(interval_s=0.5), jobs=jobs)
        for jobs in (1, 2)
    ]
    one, two = (run.run(requests) for run in runs)
    assert runs[0].plans and one == two


def test_a_shard_process_that_dies_is_named_and_nothing_is_left_running() -> None:
    import multiprocessing
    import os

    from dlora.sim import shard

    advance = shard.Shard.advance

    def dies(self, *args):  # type: ignore[no-untyped-def]
        if "r001" in self.replicas:
            os._exit(3)
        return advance(self, *args)

    shard.Shard.advance = dies  # type: ignore[method-assign]  # in the forked children too
    try:
        with pytest.raises(RuntimeError, match="shard 1 ended \\(exit code 3\\)"):
            Cluster(H200, 2, {}, jobs=2).run(_workload(20, rate=40.0, adapters=[None]))  # type: ignore[list-item]
    finally:
        shard.Shard.advance = advance  # type: ignore[method-assign]
    assert not multiprocessing.active_children()


def test_a_cut_run_counts_each_waiting_request_at_a_lower_bound_and_none_arriving_after() -> None:
    """A user's trial: cut at its time limit, a run read 5 ms/token where no step is under 27: a
    request arriving after the cut counted negative, and one queued with no token its whole wait
    as seconds per token (not the lower bound the docs promised, 38x its real figure)."""
    from dlora.sim.shard import Served

    def req(i: int, arrival: float, output: int) -> SimRequest:
        return SimRequest(f"q{i}", arrival, None, [5, 6, 7], output)

    served = [
        Served(req(0, 0.0, 10), "r", finish_s=2.0, tokens=10),  # 0.2 s/token
        Served(req(1, 1.0, 100), "r", tokens=0),  # waiting at the cut (5 s): at least 4 s / 100 tokens
        Served(req(2, 4.0, 10), "r", tokens=2),  # at least 1 s / 10 tokens
        Served(req(3, 6.0, 10), "r"),  # arrived after the cut: not counted
    ]
    out = summary(served, until=5.0)
    assert out["completed"] == 1 and out["norm_latency_mean_s"] == pytest.approx((0.2 + 0.04 + 0.1) / 3)
    assert out["throughput_tok_s"] == pytest.approx(12 / 5.0)


def test_a_replica_s_stats_are_built_again_only_after_something_happened_there() -> None:
    """An idle replica's stats are the message it sent last (building one lists every adapter it
    holds, half an idle cluster's run); a join, a step or a move makes them again, and they say so."""
    from dlora.services.worker.snapshot import worker_stats
    from dlora.sim.shard import Served, Shard

    shard = Shard(ARTIFACT, ["r0", "r1"], {"a0": 16, "a1": 8}, None, fast_forward=True)
    first = {st.worker: st for st in shard.advance([], [], 1.0, report=True)[1]}
    again = {st.worker: st for st in shard.advance([], [], 2.0, report=True)[1]}
    assert all(again[w] is first[w] for w in first)  # nothing happened: the same messages
    request = SimRequest("q0", 2.5, "a0", list(range(3, 40)), 500)
    stats = {st.worker: st for st in shard.advance([Served(request, "r0")], [], 3.0, report=True)[1]}
    assert stats["r1"] is first["r1"] and stats["r0"] is not first["r0"]
    assert (stats["r0"].running, stats["r0"].requests[0].request_id) == (1, "q0")
    built = worker_stats("r0", shard.replicas["r0"].engine, shard.replicas["r0"].lengths)
    assert [a.name for a in stats["r0"].adapters] == [a.name for a in built.adapters] == ["a0", "a1"]
    assert stats["r0"].steps == built.steps > 0 and stats["r0"].requests == built.requests
    (moving,) = shard.take([("q0", "r1", False)], 3.0, 0.0)
    gone = {st.worker: st for st in shard.stats()}  # taken off r0, not yet on r1
    assert gone["r0"].running == 0 and gone["r1"] is first["r1"]
    after = {st.worker: st for st in shard.advance([], [moving], 4.0, report=True)[1]}
    assert after["r0"].running == 0 and after["r1"].requests[0].request_id == "q0"


def test_a_replica_reads_an_adapter_as_host_memory_has_room_as_a_worker_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker begins a read only while fewer than ``max_cpu_loras`` adapters with requests are in
    host memory, or once a request's read has waited ``READ_ROOM_WAIT_S``; the simulator read at
    once, its host memory and first tokens a worker's without that rule."""
    from dlora.services.worker.engine.config import EngineConfig
    from dlora.services.worker.reads import READ_ROOM_WAIT_S
    from dlora.sim.shard import Shard

    reads: list[tuple[str, float]] = []
    read = Shard._read
    monkeypatch.setattr(Shard, "_read", lambda self, r, now: reads.append((r.adapter, now)) or read(self, r, now))
    adapters = {"a0": 16, "a1": 16, "a2": 16}
    load = H200.host_load_seconds(16)
    for tokens in (40, 2000):  # the first two end before READ_ROOM_WAIT_S, or long after it
        reads.clear()
        requests = [SimRequest(f"q{i}", 0.0, f"a{i}", [7 + i] * 16, tokens) for i in range(2)]
        requests.append(SimRequest("q2", 0.1, "a2", [9] * 16, 8))
        config = EngineConfig(max_loras=2, max_cpu_loras=2)
        served = sorted(Cluster(H200, 1, adapters, config=config).run(requests), key=lambda s: s.request.request_id)
        assert all(s.tokens == s.request.output_len for s in served)
        at = dict(reads)["a2"]
        if tokens == 40:  # room once q0 ended (the first done)
            assert served[0].finish_s is not None and at == pytest.approx(served[0].finish_s + load, abs=0.02)
        else:
            assert 0.1 + READ_ROOM_WAIT_S + load <= at < 0.1 + READ_ROOM_WAIT_S + load + 0.05


def test_a_replica_reports_a_request_moved_to_it_while_its_cache_is_on_the_way() -> None:
    """A worker counts a moved request waiting on arrival (its KV blocks, its work) in its stats; a
    replica did not, and one that had just taken a plan's moves looked as roomy as before to the
    next plan and to the dispatcher's placement until they arrived (left by the last session)."""
    from dlora.sim.shard import Served, Shard

    shard = Shard(ARTIFACT, ["r0", "r1"], {"a0": 16}, None, fast_forward=True)
    request = SimRequest("q0", 0.5, "a0", list(range(3, 40)), 500)
    shard.advance([Served(request, "r0")], [], 1.0, report=True)
    (moving,) = shard.take([("q0", "r1", True)], 1.0, 0.01)  # (37+ tokens shipped: 0.37 s and more)
    coming = {st.worker: st for st in shard.advance([], [moving], 1.2, report=True)[1]}["r1"]
    blocks = -(-(37 + len(moving.produced)) // coming.block_size)
    assert (coming.waiting, coming.unlisted_kv_blocks, coming.arriving_kv_blocks) == (1, blocks, blocks)
    assert coming.unlisted_remaining_tokens > 0 and coming.unlisted_by_adapter == {"a0": (0, 1)}
    came = {st.worker: st for st in shard.advance([], [], 2.0, report=True)[1]}["r1"]
    assert (came.arriving_kv_blocks, came.requests[0].request_id) == (0, "q0")
