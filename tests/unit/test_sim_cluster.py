"""A simulated cluster: replicas behind the dispatcher's own choice, on simulated time."""

import random

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
    """Skipping the steps that repeat the last one changes nothing a policy that does not weigh
    costs decides (unmerged-only: every request's first token and end at the same instant); under
    dLoRA's policy, which is not asked again within such a run, the figures move by under 1 %."""
    from dlora.services.worker.engine.config import EngineConfig
    from dlora.services.worker.policy.config import PolicyConfig, PolicyName

    adapters = {f"a{i}": 16 for i in range(6)}
    requests = _workload(300, rate=30.0, adapters=[*adapters, None])  # type: ignore[list-item]
    unmerged = EngineConfig(policy=PolicyConfig(name=PolicyName.UNMERGED_ONLY))
    for config in (unmerged, None):
        runs = [Cluster(H200, 4, adapters, config=config, fast_forward=ff) for ff in (True, False)]
        fast, exact = (r.run(requests) for r in runs)
        assert [s.tokens for s in fast] == [s.tokens for s in exact]
        steps = [sum(r.engine.stats.steps for r in run.replicas) for run in runs]
        skipped = sum(r.engine.fast_forwarded for r in runs[0].replicas)
        assert steps[0] == steps[1] and 0.3 * steps[0] < skipped  # each counted as a step
        if config is unmerged:
            assert [(s.first_token_s, s.finish_s) for s in fast] == [(s.first_token_s, s.finish_s) for s in exact]
        else:
            a, b = summary(fast), summary(exact)
            assert abs(a["norm_latency_mean_s"] / b["norm_latency_mean_s"] - 1) < 0.01
