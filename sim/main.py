"""``dlora simulate``: a workload (``dlora loadgen``'s options) through a simulated cluster, printed
and optionally written as JSON."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

from dlora.common.messages import MAX_LISTED
from dlora.loadgen.bench_common import writable
from dlora.loadgen.spec import WorkloadSpec
from dlora.loadgen.workload import Traces, build_specs, prompt_ids
from dlora.services.dispatcher.choose import DispatchMode
from dlora.services.migrator.settings import MigratorSettings
from dlora.services.worker.engine.config import EngineConfig
from dlora.services.worker.policy.config import PolicyConfig, PolicyName
from dlora.sim.cluster import HEARTBEAT_TTL_S, Cluster, SimRequest, summary
from dlora.sim.cost import PROFILES, CostProfile, calibrated
from dlora.sim.replica import LLAMA_7B

DEFAULT_MIGRATE_INTERVAL_S = 1.0  # ``--migrate-interval``
MIN_INTERVAL_S = 0.001  # ``--stats-interval``, ``--migrate-interval``: a millisecond (the worker's are 0.5 s and 1 s)


def profile(name: str) -> CostProfile:
    """A named profile, or ``calibrated:PATH``. Raises ValueError naming the choices."""
    if name.startswith("calibrated:"):
        if not (given := name.removeprefix("calibrated:")):
            raise ValueError("calibrated: needs the path of a benchmark's JSON (calibrated:PATH)")
        path = Path(given)
        kind = "`dlora bench engine`, `bench cluster`, `bench policy` or `bench e2e`"
        try:
            bench = json.loads(path.read_text())
            return calibrated(bench)
        except OSError as e:
            raise ValueError(f"cannot read {path} ({e.strerror})") from None
        except KeyError as e:  # JSON of another kind (a loadgen result, ...)
            raise ValueError(f"{path} is not the JSON of {kind} (no {e} where those have it)") from None
        except (TypeError, AttributeError):  # the same, its values of other types
            raise ValueError(f"{path} is not the JSON of {kind} (its fields are not of the types those have)") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not JSON ({e})") from None
        except ValueError as e:  # a benchmark's JSON that cannot calibrate (too few points, no steps)
            raise ValueError(f"{path}: {e}") from None
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}: {', '.join(PROFILES)} or calibrated:PATH")
    return PROFILES[name]


def with_slots(slots: int, max_cpu_loras: int | None = None, **config: object) -> EngineConfig:
    """The engine with ``slots`` device slots and host memory for ``max_cpu_loras`` adapters; by
    default as many as a worker may hold, so that every adapter stays in host memory from the
    start and the disk tier is not simulated (``--max-cpu-loras`` turns it on)."""
    host = MAX_LISTED if max_cpu_loras is None else max_cpu_loras  # the most a worker's stats list
    return EngineConfig(max_loras=slots, max_cpu_loras=host, **config)  # type: ignore[arg-type]


def requests_of(spec: WorkloadSpec, traces: Traces | None = None) -> list[SimRequest]:
    """The workload's requests arriving by its ``duration`` (the clock of ``dlora loadgen``'s
    sender and of the benchmarks' replays, which stop sending then), with prompts of real token
    ids (shared prefixes stay shared). ``traces``: as ``build_specs`` takes them (None: read
    here). Raises what ``build_specs`` raises."""
    return _sent_by(planned_requests(spec, traces), spec.duration)


def planned_requests(spec: WorkloadSpec, traces: Traces | None = None) -> list[SimRequest]:
    """Every request the workload plans (``spec.requests`` of them, or the trace's), however late;
    ``traces`` as ``requests_of`` takes them."""
    return [
        SimRequest(f"q{i}", r.arrival_s, r.adapter, prompt_ids(i, r, LLAMA_7B.vocab_size), max(1, r.output_len))
        for i, r in enumerate(build_specs(spec, traces))
    ]


def _sent_by(requests: list[SimRequest], duration: float) -> list[SimRequest]:
    return [r for r in requests if r.arrival_s <= duration]


def _checked_workload(requests: list[SimRequest]) -> None:
    """Raises ValueError when ``requests`` cannot run here: none at all, or a prompt the simulated
    model's context cannot hold (the engine would refuse it midway)."""
    if not requests:
        raise ValueError("the workload holds no request (--requests 0, or none arrives within --duration)")
    context = LLAMA_7B.max_position_embeddings
    if (longest := max(len(r.prompt_token_ids) for r in requests)) >= context:
        raise ValueError(
            f"a prompt has {longest} tokens; the simulated model's context holds {context}: lower --max-prompt "
            "(trace lengths) or --prompt-len"
        )


def run_simulate(args: argparse.Namespace) -> int:
    try:
        cost = profile(args.profile)
        if (problem := WorkloadSpec.unused_option(args)) is not None:
            raise ValueError(problem)
        if args.migrate_interval is not None and not args.migrate:  # as the workload's options: none ignored
            raise ValueError("--migrate-interval applies with --migrate only")
        args.migrate_interval = args.migrate_interval or DEFAULT_MIGRATE_INTERVAL_S
        if args.stats_interval >= HEARTBEAT_TTL_S:  # every replica would read as lost between two
            raise ValueError(f"--stats-interval must be under the dispatcher's heartbeat, {HEARTBEAT_TTL_S:g} s")
        # Simulated time moves by these: at 1e-9 s a run of 5 requests did not end, at 1e-16 time
        # stood still (1.0 + 1e-16 == 1.0) (a helper's trial)
        for option, value in (("--stats-interval", args.stats_interval), ("--migrate-interval", args.migrate_interval)):
            if value < MIN_INTERVAL_S:
                raise ValueError(f"{option} {value:g}: at least {MIN_INTERVAL_S:g} s")
        spec = WorkloadSpec.from_args(args)
        ranks = args.ranks
        config = with_slots(
            args.max_loras,
            args.max_cpu_loras,
            max_num_seqs=args.max_num_seqs,
            policy=PolicyConfig(name=PolicyName(args.policy)),
        )
        if bad := config.check():
            if args.max_cpu_loras is None:  # host memory's bound is the most there is: --max-loras is past it
                bad = [
                    ("max_loras", args.max_loras, f"must be at most {MAX_LISTED}") if b[0] == "max_cpu_loras" else b
                    for b in bad
                ]
            # an option the simulator does not have was named (a helper's trial): the one given is
            budget = config.max_num_batched_tokens
            bad = [
                ("max_num_seqs", args.max_num_seqs, f"must be at most the step's token budget, {budget}")
                if b[0] == "max_num_batched_tokens"
                else b
                for b in bad
            ]
            raise ValueError("; ".join(f"--{f.replace('_', '-')} {v!r}: {why}" for f, v, why in bad))
        if over := [r for r in ranks if r > config.adapter_limits.max_lora_rank]:  # simulated without a word
            raise ValueError(f"--ranks {over[0]}: above max_lora_rank {config.adapter_limits.max_lora_rank}")
        planned = planned_requests(spec)
        requests = _sent_by(planned, spec.duration)
        _checked_workload(requests)
        if args.json:
            writable(args.json, "--json")
    except (OSError, ValueError, KeyError) as e:
        print(f"dlora simulate: {e}", file=sys.stderr)
        return 2
    if len(requests) < len(planned):  # as `dlora loadgen` says it: a trace replay cut short is no surprise
        print(
            f"dlora simulate: --duration {spec.duration:g} s ended sending: "
            f"{len(planned) - len(requests)} of {len(planned)} requests not sent",
            file=sys.stderr,
        )
    if cut := sum(len(r.prompt_token_ids) + r.output_len > LLAMA_7B.max_position_embeddings for r in requests):
        print(
            f"dlora simulate: {cut} requests' prompt and output pass the model's context "
            f"({LLAMA_7B.max_position_embeddings}); their outputs end there (finish_reason length)",
            file=sys.stderr,
        )
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
    try:
        served = cluster.run(requests)
    except KeyboardInterrupt:
        print("dlora simulate: interrupted; nothing written", file=sys.stderr)
        return 130
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
        "solve_seconds": cluster.solve_seconds,
        "steps_by_mode": {
            str(mode): n
            for mode, n in sum((Counter(r.stats.steps_by_mode) for r in cluster.replica_summaries), Counter()).items()
        },
        "fast_forwarded_steps": sum(r.fast_forwarded for r in cluster.replica_summaries),
        "merges": sum(r.stats.merges for r in cluster.replica_summaries),
        "preemptions": sum(r.stats.preemptions for r in cluster.replica_summaries),
        # adapters read from disk into host memory (with --max-cpu-loras), and loads into device slots
        "disk_loads": sum(r.disk_loads for r in cluster.replica_summaries),
        "slot_loads": sum(r.stats.adapter_loads for r in cluster.replica_summaries),
        "jobs": min(args.jobs, args.replicas),  # the processes used
        # the rest of the command, so that the record can run again
        "options": {
            "profile": args.profile,
            "ranks": args.ranks,
            "max_loras": args.max_loras,
            "max_cpu_loras": args.max_cpu_loras,
            "max_num_seqs": args.max_num_seqs,
            "stats_interval": args.stats_interval,
            "migrate_interval": args.migrate_interval,
        },
    }
    for key, value in result.items():
        if key not in ("workload", "options"):
            print(f"{key:>20}: {value}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0
