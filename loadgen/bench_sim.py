"""``dlora bench simulate``: the simulator's experiments (issue 21), each a run of ``dlora.sim``
with the real policies, dispatch and planner against a cost profile.

1. **Policy ablation** (dLoRA Fig. 10): one replica with a device slot for every adapter (as
   dLoRA's unmerged mode has), Azure conversation lengths, adapters by the
   stride mapping over the Azure Functions popularity, Poisson arrivals at ``load`` times the
   replica's capacity (``capacity_rps``), for each profile, stride and policy.
2. **Cluster** (dLoRA Fig. 11): ``replicas`` replicas and ``adapters`` adapters (a slot for
   each on every replica), stride 4, bursty
   arrivals whose popularity rotates: round-robin, proactive dispatch, and proactive with the
   migrator.
3. **Regime map** (``bench_regime``): Zipf skew × unmerged overhead × load, dLoRA against the
   static modes.
4. **Co-migration's regime map** (``bench_migration_regime``): device slots × Zipf skew × load on
   a small cluster, proactive + migration against proactive-only and round-robin.
5. **Scale** (``bench_scale``): the trace's hour at 32 and 256 replicas and a bursty run at 256
   whose planner solves, each a ``dlora simulate`` command: the simulator's speed and the
   planner's time per round.

Every run also reports its wall time: the simulator's speed is part of what is measured.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from dlora.loadgen.bench_common import figure, grouped_bars, machine, save, today, writable
from dlora.loadgen.bench_policy import ADAPTER_RANKS
from dlora.loadgen.bench_validate import TITLE as VALIDATE_TITLE
from dlora.loadgen.bench_validate import check_measured, markdown_validate, validate
from dlora.loadgen.spec import WorkloadSpec
from dlora.loadgen.workload import Traces, load_traces
from dlora.services.dispatcher.choose import DispatchMode
from dlora.services.migrator.settings import MigratorSettings
from dlora.services.worker.engine.config import EngineConfig
from dlora.services.worker.policy.config import PolicyConfig, PolicyName
from dlora.sim.cluster import Cluster, SimRequest, p90, summary
from dlora.sim.cost import CostProfile, StepShape
from dlora.sim.main import profile, requests_of, with_slots

if TYPE_CHECKING:
    from matplotlib.figure import Figure

TITLES = {
    "policy": "Cluster simulator: policy ablation over adapter skew (`dlora bench simulate --experiment policy`)",
    "cluster": "Cluster simulator: dispatch and migration at scale (`dlora bench simulate --experiment cluster`)",
    "regime": "Cluster simulator: where dynamic merging pays (`dlora bench simulate --experiment regime`)",
    "migration": "Cluster simulator: where co-migration pays (`dlora bench simulate --experiment migration`)",
    "scale": "Cluster simulator: speed and the planner at scale (`dlora bench simulate --experiment scale`)",
    "validate": VALIDATE_TITLE,
}
RANKS = ADAPTER_RANKS  # given to the adapters in turn, as `bench policy` makes them
# A run ends at this many times its arrivals' span: a policy that falls behind leaves a backlog
# (counted at its latency so far, ``summary``) rather than hours of it to simulate.
CUT = 2.0
# The cluster experiments' dispatch configurations (dLoRA Fig. 11's): label -> ``Cluster`` options.
DISPATCH: dict[str, dict[str, object]] = {
    "round-robin": dict(mode=DispatchMode.ROUND_ROBIN),
    "proactive": dict(mode=DispatchMode.PROACTIVE),
    "proactive + migration": dict(mode=DispatchMode.PROACTIVE, migrator=MigratorSettings(interval_s=1.0)),
}


def capacity_rps(cost: CostProfile, config: EngineConfig, mean_prompt: float, mean_output: float) -> float:
    """Requests/s one replica serves unmerged with a full batch: ``max_num_seqs`` decoding over as
    many adapters as it has slots, each request's prompt priced at the profile's per-token cost."""
    batch = config.max_num_seqs
    segments = min(batch, config.max_loras)
    shape = StepShape(batch, 0, int(batch * (mean_prompt + mean_output / 2)), segments, batch * RANKS[1])
    per_request = mean_output * cost.step_seconds(shape) / batch + (
        cost.prompt_token_s * mean_prompt + cost.prefill_seq_s
    )
    return 1.0 / per_request


def _run(
    cost: CostProfile, requests: list[SimRequest], replicas: int, config: EngineConfig, until: float, **kw: object
) -> dict[str, float]:
    names = sorted({r.adapter for r in requests if r.adapter is not None})
    adapters = {name: RANKS[i % len(RANKS)] for i, name in enumerate(names)}
    cluster = Cluster(cost, replicas, adapters, config=config, **kw)  # type: ignore[arg-type]
    start = time.perf_counter()
    served = cluster.run(requests, until)
    out = summary(served, until)
    stats = [r.stats for r in cluster.replica_summaries]
    steps = sum(s.steps for s in stats)
    out |= {
        "wall_s": time.perf_counter() - start,
        "requests": len(requests),
        "simulated_s": max(s.finish_s or until for s in served),
        "steps": steps,
        "merged_steps": sum(s.steps_by_mode.get("merged", 0) for s in stats) / max(1, steps),
        "mixed_steps": sum(s.steps_by_mode.get("mixed", 0) for s in stats) / max(1, steps),
        "merges": sum(s.merges for s in stats),
        "plans": len(cluster.plans),
        "solves": len(cluster.solve_seconds),
        "solve_s_max": max(cluster.solve_seconds, default=0.0),
        "moved": sum(s.moves for s in served),
    }
    return out


def _at(spec: WorkloadSpec, rate: float, traces: Traces) -> list[SimRequest]:
    """``spec``'s requests at ``rate``, as many as arrive in its duration (``traces``: the bundled
    ones, read once a run: ``run_bench_simulate``)."""
    return requests_of(replace(spec, rate=rate, requests=int(rate * spec.duration * 1.5) + 10), traces)


def _means(requests: list[SimRequest]) -> tuple[float, float]:
    return (
        statistics.fmean(len(r.prompt_token_ids) for r in requests),
        statistics.fmean(r.output_len for r in requests),
    )


def ablation(args: argparse.Namespace) -> list[dict]:
    rows = []
    for name, cost in args.costs.items():
        for stride in args.strides:
            spec = replace(_spec(args, args.adapters, args.duration), stride=stride)
            probe = requests_of(spec, args.traces)
            # Every adapter has a device slot, as in dLoRA's unmerged mode: only the policy differs.
            slots = with_slots(args.adapters)
            rate = args.load * capacity_rps(cost, slots, *_means(probe))
            requests = _at(spec, rate, args.traces)
            for policy in args.policies:
                config = msgspec.structs.replace(slots, policy=PolicyConfig(name=PolicyName(policy)))
                m = _run(cost, requests, 1, config, CUT * args.duration)
                top = max(Counter(r.adapter for r in requests).values()) / len(requests)
                rows.append(
                    {"profile": name, "stride": stride, "top_adapter_share": top, "policy": policy, "rate": rate} | m
                )
                print(
                    f"{name:>14} stride {stride:>2} {policy:>13}: {m['throughput_tok_s']:8.1f} tok/s  "
                    f"norm latency {m['norm_latency_mean_s'] * 1e3:7.1f} ms/token  ({m['wall_s']:.1f} s)",
                    flush=True,
                )
    return rows


def cluster(args: argparse.Namespace) -> list[dict]:
    cost = args.cluster_cost
    spec = replace(
        _spec(args, args.cluster_adapters, args.cluster_duration),
        stride=4,
        arrivals="gamma",
        cv=args.cv,
        shift_every=args.shift_every,
    )
    # Capacity with a slot for every adapter, as in the ablation (with fewer, an unmerged step runs
    # only as many adapters as slots): the rate is the same for every slot count.
    full = with_slots(args.cluster_adapters)
    per_replica = capacity_rps(cost, full, *_means(requests_of(spec, args.traces)))
    rate = args.cluster_load * args.replicas * per_replica
    requests = _at(spec, rate, args.traces)
    reference = rebalancing_reference(cost, requests, args.replicas, full)
    rows = []
    for slots in args.cluster_slots:
        config = with_slots(slots)
        for label, kw in DISPATCH.items():
            m = _run(cost, requests, args.replicas, config, CUT * args.cluster_duration, **kw)
            rows.append({"dispatch": label, "slots": slots, "rate": rate} | m | reference)
            print(
                f"{slots:>4} slots {label:>22}: {m['throughput_tok_s']:9.1f} tok/s  norm latency "
                f"{m['norm_latency_mean_s'] * 1e3:7.1f} ms/token  P90 {m['norm_latency_p90_s'] * 1e3:7.1f}  "
                f"moved {m['moved']}  ({m['wall_s']:.1f} s)",
                flush=True,
            )
    return rows


def rebalancing_reference(
    cost: CostProfile, requests: list[SimRequest], replicas: int, config: EngineConfig
) -> dict[str, float]:
    """``bench cluster``'s rebalancing reference (``cluster_bound``) on a simulated workload: every
    request in flight evened out over the replicas at every step, for free, oldest first, each step
    priced as the profile prices an unmerged decode of its requests (a slot each, rank 16) plus its
    prompt tokens; adapters, slots and KV ignored. Mean and P90 normalized latency (s/token)."""
    from dlora.loadgen.cluster_bound import simulate
    from dlora.loadgen.workload import RequestSpec

    specs = [RequestSpec(r.arrival_s, r.adapter, len(r.prompt_token_ids), r.output_len) for r in requests]
    context = statistics.fmean(s.prompt_len + s.output_len / 2 for s in specs)

    def step_seconds(batch: int) -> float:
        slots = min(batch, config.max_loras)
        return cost.step_seconds(StepShape(batch, 0, int(batch * context), slots, batch * RANKS[1]))

    def prompt_seconds(prompts: list[int]) -> float:
        return cost.prompt_token_s * sum(prompts) + cost.prefill_seq_s * len(prompts)

    norm = sorted(simulate(specs, step_seconds, replicas, True, config.max_num_seqs, prompt_seconds))
    return {
        "reference_mean_s": statistics.fmean(norm),
        "reference_p90_s": p90(norm),  # as ``summary`` takes it
    }


def _spec(args: argparse.Namespace, adapters: int, duration: float) -> WorkloadSpec:
    """The workload at 2 requests/s for its lengths' means; ``_at`` sets the rate."""
    return WorkloadSpec(
        requests=1000,
        duration=duration,
        seed=args.seed,
        arrivals="poisson",
        lengths="trace",
        max_prompt=args.max_prompt,
        max_output=args.max_output,
        adapters=adapters,
        popularity="stride",
    )


def _header(r: dict, popularity: str = "the stride mapping over Azure Functions popularity") -> str:
    s = r["settings"]
    return (
        f"{r['date']}, **{r['machine']}** (simulated time; the wall time is this machine's). "
        f"Azure conversation lengths (prompts ≤ {s['max_prompt']}, outputs ≤ {s['max_output']} tokens), adapters "
        f"of ranks {'/'.join(map(str, RANKS))} by {popularity}. A run ends "
        f"at {CUT:.0f}× its arrivals' span; a request unfinished then counts at its wait so far over the tokens it "
        "asked for (a lower bound)."
    )


def _served(x: dict) -> str:
    """The finished, throughput and latency cells of a row."""
    return (
        f"{x['completed']}/{x['requests']} | {x['throughput_tok_s']:.1f} | "
        f"{x['norm_latency_mean_s'] * 1e3:.1f} / {x['norm_latency_p90_s'] * 1e3:.1f}"
    )


def markdown_policy(r: dict) -> str:
    s = r["settings"]
    lines = [
        _header(r),
        "",
        f"`dlora bench simulate --experiment policy`: one replica with a slot for every one of its {s['adapters']} "
        f"adapters, Poisson arrivals for {s['duration']:.0f} s at {s['load']} × its unmerged capacity "
        "(`capacity_rps`).",
        "",
        "| profile | stride (top adapter share) | policy | finished | throughput (tok/s) | "
        "norm. latency mean / P90 (ms/token) | merged / mixed steps | wall (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for x in r["rows"]:
        lines.append(
            f"| {x['profile']} | {x['stride']} ({x['top_adapter_share']:.2f}) | {x['policy']} | {_served(x)} | "
            f"{x['merged_steps']:.2f} / {x['mixed_steps']:.2f} | {x['wall_s']:.1f} |"
        )
    return "\n".join(lines)


def markdown_cluster(r: dict) -> str:
    s = r["settings"]
    lines = [
        _header(r),
        "",
        f"`dlora bench simulate --experiment cluster`: {s['replicas']} replicas × {s['cluster_adapters']} adapters "
        f"under `{s['cluster_profile']}`, stride 4, Gamma arrivals (CV {s['cv']}) for {s['cluster_duration']:.0f} s "
        f"at {s['cluster_load']} × the replicas' unmerged capacity with a slot for every adapter, popularity "
        f"rotating every {s['shift_every']:.0f} s; each replica with that many device slots, or fewer:",
        "",
        "| slots per replica | dispatch | finished | throughput (tok/s) | norm. latency mean / P90 (ms/token) | "
        "solves / plans / moved | slowest solve (s) | simulated (s) | wall (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for x in r["rows"]:
        lines.append(
            f"| {x.get('slots', s['cluster_adapters'])} | {x['dispatch']} | {_served(x)} | {x['solves']} / "
            f"{x['plans']} / {x['moved']} | {x['solve_s_max']:.2f} | {x['simulated_s']:.0f} | {x['wall_s']:.1f} |"
        )
    if "reference_mean_s" in (first := r["rows"][0]):
        lines += [
            "",
            "Rebalancing reference (`bench cluster`'s, `cluster_bound`: every request in flight evened out over the "
            "replicas at every step, free and oldest first, each step an unmerged decode of its requests plus its "
            f"prompt tokens, slots and adapters ignored): {first['reference_mean_s'] * 1e3:.1f} / "
            f"{first['reference_p90_s'] * 1e3:.1f} ms/token mean / P90.",
        ]
    lines += ["", *_against_targets(r["rows"])]
    return "\n".join(lines)


def _against_targets(rows: list[dict]) -> list[str]:
    """Issue 21's co-migration targets (the paper's Fig. 11): proactive + migration's mean
    normalized latency at most 0.25 x round-robin's and 0.5 x proactive-only's, per slot count."""
    out = []
    for slots in dict.fromkeys(x.get("slots") for x in rows):
        mean = {x["dispatch"]: x["norm_latency_mean_s"] for x in rows if x.get("slots") == slots}
        if {"round-robin", "proactive", "proactive + migration"} <= mean.keys():
            moved = mean["proactive + migration"]
            rr, pro = moved / mean["round-robin"], moved / mean["proactive"]
            out.append(
                f"{slots} slots: proactive + migration reads {rr:.2f} × round-robin (target ≤ 0.25: "
                f"{'met' if rr <= 0.25 else 'not met'}) and {pro:.2f} × proactive-only (target ≤ 0.5: "
                f"{'met' if pro <= 0.5 else 'not met'})."
            )
    return out


def plot_policy(r: dict) -> Figure:
    """Mean normalized latency per policy across strides, one panel per profile (Fig. 10's shape)."""
    profiles = list(dict.fromkeys(x["profile"] for x in r["rows"]))
    fig, axes = figure(len(profiles))
    for ax, name in zip(axes, profiles):
        rows = [x for x in r["rows"] if x["profile"] == name]
        strides = sorted({x["stride"] for x in rows})
        for policy in dict.fromkeys(x["policy"] for x in rows):
            xs = sorted((x for x in rows if x["policy"] == policy), key=lambda x: x["stride"])
            ax.plot([strides.index(x["stride"]) for x in xs], [x["norm_latency_mean_s"] * 1e3 for x in xs], "o-")
            ax.lines[-1].set_label(policy)
        ax.set_xticks(range(len(strides)), [str(s) for s in strides])
        ax.set(xlabel="stride", ylabel="mean normalized latency (ms/token)", title=name, yscale="log")
        ax.legend(fontsize=7)
    return fig


def plot_cluster(r: dict) -> Figure:
    """Fig. 11's shape: normalized latency and throughput per dispatch, requests moved above its bar."""
    s, rows = r["settings"], r["rows"]
    fig, ax = figure(2)
    labels = [f"{x.get('slots', s['cluster_adapters'])} slots\n" + x["dispatch"].replace(" + ", "\n+ ") for x in rows]
    grouped_bars(
        ax[0],
        labels,
        {
            "mean": [x["norm_latency_mean_s"] * 1e3 for x in rows],
            "P90": [x["norm_latency_p90_s"] * 1e3 for x in rows],
        },
    )
    means = [x["norm_latency_mean_s"] for x in rows]
    if max(means) > 20 * min(means):  # a log scale only where latencies span orders
        ax[0].set_yscale("log")
    ax[0].margins(y=0.15)  # room above the bars for the legend
    ax[0].legend(fontsize=7, loc="upper center", ncols=2)
    ax[0].set(ylabel="normalized latency (ms/token)")
    ax[0].set_title(f"Latency per dispatch ({s['cluster_profile']})", fontsize=9)
    bars = ax[1].bar(range(len(rows)), [x["throughput_tok_s"] for x in rows], 0.5)
    ax[1].bar_label(bars, [f"moved {x['moved']}" if x["moved"] else "" for x in rows], fontsize=7)
    ax[1].margins(y=0.1)
    ax[1].set_xticks(range(len(rows)), labels, fontsize=8)
    ax[1].set(ylabel="throughput (tok/s)")
    ax[1].set_title(f"Throughput ({s['replicas']} replicas × {s['cluster_adapters']} adapters)", fontsize=9)
    return fig


SETTINGS = {
    "policy": ("profiles", "strides", "policies", "adapters", "duration", "load"),
    "regime": ("overheads", "alphas", "loads", "adapters", "regime_duration"),
    "migration": (
        "migration_replicas",
        "migration_adapters",
        "migration_slots",
        "migration_alphas",
        "migration_loads",
        "migration_duration",
        "cv",
    ),
    "scale": ("scale_bursty_requests",),
    "validate": ("measured",),
    "cluster": (
        "replicas",
        "cluster_adapters",
        "cluster_slots",
        "cluster_duration",
        "cluster_profile",
        "cluster_load",
        "cv",
        "shift_every",
    ),
}


def ignored_options(args: argparse.Namespace) -> list[str]:
    """The options ``args`` set (away from their defaults) that only other experiments read: taken
    without a word, as if they had shaped the run (a helper's trial: --experiment policy with
    --replicas 7 exited 0; dlora simulate refuses an option where it does nothing, so does this)."""
    from dlora.services.cli import build_parser

    defaults = vars(build_parser().parse_args(["bench", "simulate"]))
    others = {o for options in SETTINGS.values() for o in options} - set(SETTINGS[args.experiment])
    return [f"--{o.replace('_', '-')}" for o in sorted(others) if getattr(args, o) != defaults[o]]


def run_bench_simulate(args: argparse.Namespace) -> int:
    from dlora.loadgen.bench_migration_regime import markdown_migration_regime, migration_regime, plot_migration_regime
    from dlora.loadgen.bench_regime import markdown_regime, plot_regime, regime
    from dlora.loadgen.bench_scale import markdown_scale, plot_scale, scale

    def items(text: str) -> list[str]:
        return [v.strip() for v in text.split(",") if v.strip()]

    ignored = ignored_options(args)  # (before the lists are split: as given, against the defaults)
    args.profiles = items(args.profiles)
    args.strides = [int(s) for s in items(args.strides)]
    args.cluster_slots = [int(s) for s in items(args.cluster_slots)]
    args.migration_slots = [int(s) for s in items(args.migration_slots)]
    args.policies = items(args.policies)
    args.measured = items(args.measured)
    args.overheads, args.alphas, args.loads, args.migration_alphas, args.migration_loads = (
        [float(v) for v in items(a)]
        for a in (args.overheads, args.alphas, args.loads, args.migration_alphas, args.migration_loads)
    )
    experiments = {
        "policy": (ablation, markdown_policy, plot_policy),
        "cluster": (cluster, markdown_cluster, plot_cluster),
        "regime": (regime, markdown_regime, plot_regime),
        "migration": (migration_regime, markdown_migration_regime, plot_migration_regime),
        "scale": (scale, markdown_scale, plot_scale),
        "validate": (validate, markdown_validate, None),
    }
    run, markdown, plot = experiments[args.experiment]
    # Every name and file it will need, checked before the first run: a typo in the last profile
    # lost every run before it (no JSON is written until the end).
    try:
        if ignored:
            raise ValueError(f"{', '.join(ignored)}: not read by --experiment {args.experiment}")
        if not args.profiles:  # nothing ran, then the plot failed on no columns
            raise ValueError("--profiles: none given")
        args.costs = {name: profile(name) for name in args.profiles}
        args.cluster_cost = profile(args.cluster_profile)
        # The bundled traces every experiment's workloads replay (lengths, and the stride mapping's
        # popularity), read once: each workload read them again, ten times in a run of the tests.
        args.traces = None if run is validate else load_traces(_spec(args, args.adapters, args.duration))
        if below := [o for o in args.overheads if o < 1]:
            raise ValueError(f"--overheads {below[0]:g}: an unmerged iteration costs at least a merged one (>= 1)")
        most = max(args.adapters, args.cluster_adapters, *args.cluster_slots, args.migration_adapters)
        if bad := with_slots(max(most, *args.migration_slots)).check():
            raise ValueError(
                f"--adapters / --cluster-adapters / --cluster-slots / --migration-adapters / --migration-slots: "
                f"{bad[0][0]} {bad[0][1]} {bad[0][2]}"
            )
        for path in args.measured if run is validate else ():
            if not Path(path).is_file():
                raise ValueError(f"--measured {path}: no such file (run bench policy / e2e first)")
            check_measured(path)
        for path in filter(None, (args.json, args.benchmarks)):
            writable(path, "--json" if path == args.json else "--benchmarks")
    except (OSError, ValueError) as e:
        print(f"dlora bench simulate: {e}", file=sys.stderr)
        return 2
    result = {
        "date": today(),
        "machine": machine(),
        "experiment": args.experiment,
        # validate's workloads are the measured runs' own
        "settings": {
            k: getattr(args, k)
            for k in (*SETTINGS[args.experiment], *(() if run is validate else ("max_prompt", "max_output", "seed")))
        },
        "rows": run(args),
    }
    key, title = f"simulate-{args.experiment}", TITLES[args.experiment]
    save(result, args.json, args.benchmarks, key, title, markdown(result), plot=plot)
    return 0
