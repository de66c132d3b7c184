"""``dlora simulate``: a workload (``dlora loadgen``'s options) through a simulated cluster, printed
and optionally written as JSON."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import Counter
from pathlib import Path

from dlora.loadgen.spec import WorkloadSpec
from dlora.loadgen.workload import build_specs, prompt_ids
from dlora.services.dispatcher.choose import DispatchMode
from dlora.services.migrator.settings import MigratorSettings
from dlora.services.worker.engine.config import EngineConfig
from dlora.services.worker.policy.config import PolicyConfig, PolicyName
from dlora.sim.cluster import Cluster, SimRequest, summary
from dlora.sim.cost import PROFILES, CostProfile, calibrated
from dlora.sim.replica import LLAMA_7B


def profile(name: str) -> CostProfile:
    """A named profile, or ``calibrated:PATH``. Raises ValueError naming the choices."""
    if name.startswith("calibrated:"):
        path = Path(name.removeprefix("calibrated:"))
        try:
            bench = json.loads(path.read_text())
            return calibrated(bench)
        except (KeyError, TypeError, AttributeError) as e:  # JSON of another kind (a loadgen result, ...)
            raise ValueError(
                f"{path} is not the JSON of `dlora bench engine`, `bench cluster`, `bench policy` or `bench e2e` "
                f"(no {e} where those have it)"
            ) from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not JSON ({e})") from None
        except ValueError as e:  # a benchmark's JSON that cannot calibrate (too few points, no steps)
            raise ValueError(f"{path}: {e}") from None
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}: {', '.join(PROFILES)} or calibrated:PATH")
    return PROFILES[name]


def requests_of(spec: WorkloadSpec) -> list[SimRequest]:
    """The workload's requests, with prompts of real token ids (shared prefixes stay shared)."""
    return [
        SimRequest(f"q{i}", r.arrival_s, r.adapter, prompt_ids(i, r, LLAMA_7B.vocab_size), max(1, r.output_len))
        for i, r in enumerate(build_specs(spec))
    ]


def run_simulate(args: argparse.Namespace) -> int:
    try:
        cost = profile(args.profile)
        spec = WorkloadSpec.from_args(args)
        ranks = args.ranks
        config = EngineConfig(
            max_loras=args.max_loras, max_num_seqs=args.max_num_seqs, policy=PolicyConfig(name=PolicyName(args.policy))
        )
        if bad := config.check():
            raise ValueError("; ".join(f"--{f.replace('_', '-')} {v!r} {why}" for f, v, why in bad))
    except (OSError, ValueError, KeyError) as e:
        print(f"dlora simulate: {e}")
        return 2
    requests = requests_of(spec)
    names = sorted({r.adapter for r in requests if r.adapter is not None})
    adapters = {name: ranks[i % len(ranks)] for i, name in enumerate(names)}
    cluster = Cluster(
        cost,
        args.replicas,
        adapters,
        DispatchMode(args.dispatch),
        config,
        stats_interval_s=args.stats_interval,
        migrator=MigratorSettings(interval_s=args.migrate_interval) if args.migrate else None,
        fast_forward=not args.exact,
        jobs=args.jobs,
    )
    start = time.perf_counter()
    served = cluster.run(requests)
    wall = time.perf_counter() - start
    result = {
        "profile": cost.name,
        "replicas": args.replicas,
        "adapters": len(adapters),
        "requests": len(requests),
        "policy": args.policy,
        "dispatch": args.dispatch,
        "migrate": args.migrate,
        "exact": args.exact,
        "workload": spec.options(),
        **summary(served),
        "simulated_s": max(s.finish_s or 0.0 for s in served),
        "wall_s": wall,
        "plans": len(cluster.plans),
        "moved": sum(s.moves for s in served),
        # the planner's wall time per solve (this machine's): every round that asked it
        "solves": len(cluster.solve_seconds),
        "solve_s_mean": statistics.fmean(cluster.solve_seconds) if cluster.solve_seconds else 0.0,
        "solve_s_max": max(cluster.solve_seconds, default=0.0),
        "steps_by_mode": {
            str(mode): n
            for mode, n in sum((Counter(r.stats.steps_by_mode) for r in cluster.replica_summaries), Counter()).items()
        },
        "fast_forwarded_steps": sum(r.fast_forwarded for r in cluster.replica_summaries),
        "merges": sum(r.stats.merges for r in cluster.replica_summaries),
        "preemptions": sum(r.stats.preemptions for r in cluster.replica_summaries),
        "jobs": args.jobs,
    }
    for key, value in result.items():
        if key != "workload":
            print(f"{key:>20}: {value}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0
