"""``dlora bench cluster``: round-robin dispatch vs proactive (dLoRA dispatch + placement) vs
proactive + co-migration, on the same imbalanced workload, one worker per core.

Each configuration is a fresh `dlora up`-style stack (NATS, Redis, dispatcher, workers, gateway,
and the migrator when asked); the load generator replays the workload over NATS. Output lengths
vary widely (the Azure trace) and adapter popularity shifts during the run, so replicas drift out
of balance even under an even dispatch: the paper's Fig. 11 setting at this machine's scale.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from dlora.loadgen import bundled
from dlora.loadgen.bench_common import ensure_model, figure, grouped_bars, machine, save, today
from dlora.loadgen.main import EXIT_AFTER
from dlora.loadgen.main import run as run_loadgen
from dlora.loadgen.spec import WorkloadSpec
from dlora.services.launcher import LocalStack
from dlora.services.servers import free_port
from dlora.sim.cost import pooled_cycles

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CONFIGS = (
    ("round-robin", "round-robin", False),
    ("proactive", "proactive", False),
    ("proactive + migration", "proactive", True),
)
TITLE = "Cluster: dispatch and co-migration (`dlora bench cluster`, the paper's Fig. 11)"


def workload_spec(args: argparse.Namespace) -> WorkloadSpec:
    """The workload every configuration replays: bursty Gamma arrivals, Azure conversation lengths
    scaled to fit, Zipf popularity (alpha 1.2) that rotates every ``--shift-every`` seconds."""
    return WorkloadSpec(
        trace=(str(Path(args.traces) / bundled.AZURE_CONV),),
        requests=args.requests,
        rate=args.rate,
        arrivals="gamma",
        cv=args.cv,
        lengths="trace",
        length_divide=args.length_divide,
        max_prompt=args.max_prompt,
        max_output=args.max_output,
        adapters=args.adapters,
        popularity="zipf",
        alpha=1.2,
        shift_every=args.shift_every,
        duration=args.max_seconds,
        seed=args.seed,
    )


def measure_step_seconds(
    root: Path, adapters: int, sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
) -> dict[int, float]:
    """Median decode step time of one single-thread worker's engine at each batch size, its
    requests spread unmerged over as many adapters as it has slots (as under round-robin)."""
    import torch

    from dlora.loadgen.bench_engine import measure
    from dlora.services.worker.engine import LLMEngine

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        engine = LLMEngine(str(root / "model"))
        names: list[str | None] = [f"lora-{i}" for i in range(min(adapters, engine.config.max_loras))] or [None]
        for name in filter(None, names):
            engine.register_adapter(name, str(root / "adapters" / name))
        return {b: measure(engine, [names[i % len(names)] for i in range(b)], merged=None, steps=4) for b in sizes}
    finally:
        torch.set_num_threads(threads)


def balancing_bound(args: argparse.Namespace, root: Path) -> dict:
    """Round-robin and perfect free balancing, simulated on this workload from measured step times."""
    from dlora.loadgen.cluster_bound import interpolate, simulate
    from dlora.loadgen.workload import build_specs

    specs = build_specs(workload_spec(args))
    steps = measure_step_seconds(root, args.adapters)
    f = interpolate(steps)
    rr, best = (simulate(specs, f, args.workers, balanced) for balanced in (False, True))
    from dlora.sim.cluster import p90  # numpy's percentile, as loadgen's

    return {
        "step_seconds": {str(b): round(s, 4) for b, s in steps.items()},
        "round_robin_mean_s": sum(rr) / len(rr),
        "round_robin_p90_s": p90(rr),
        "balanced_mean_s": sum(best) / len(best),
        "balanced_p90_s": p90(best),
    }


# The samples ``step_cycles`` reads, and where each goes in a bucket's entry.
_CYCLE_SAMPLES = {
    "dlora_step_cycle_seconds_count": 0,
    "dlora_step_cycle_seconds_sum": 1,
    "dlora_step_cycle_sequences_total": 2,
}


def step_cycles(metrics_urls: dict[str, str]) -> dict[str, list[float]]:
    """The workers' ``dlora_step_cycle_seconds`` (and ``_sequences``) summed over workers: batch
    bucket -> [decode steps, their cycles' seconds, their sequences], the loop's time per step
    measured under the run's own load."""
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list[float]] = {}
    for name, url in metrics_urls.items():
        if not name.startswith("worker-"):
            continue
        with urlopen(url, timeout=10) as reply:
            text = reply.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                kind = _CYCLE_SAMPLES.get(sample.name)
                if kind is not None:
                    out.setdefault(sample.labels["batch"], [0.0, 0.0, 0.0])[kind] += sample.value
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def run(args: argparse.Namespace) -> dict:
    root = ensure_model(Path(args.workdir), args.preset, args.adapters, ranks=[8, 16, 32])
    loras = [f"lora-{i}={root / 'adapters' / f'lora-{i}'}" for i in range(args.adapters)]
    bound = balancing_bound(args, root)
    rows = []
    for name, dispatch, migrate in CONFIGS:
        worker_env = {"DLORA_TORCH_THREADS": "1", "DLORA_STATS_INTERVAL_S": "0.25"}
        if args.kv_cache_mb:
            worker_env["DLORA_ENGINE__KV_CACHE_BYTES"] = str(int(args.kv_cache_mb * 2**20))
        stack = LocalStack(
            args.workers,
            str(root / "model"),
            loras,
            free_port(),
            None,
            worker_env=worker_env,
            env={"DLORA_DISPATCH": dispatch, "DLORA_INTERVAL_S": "0.5"},
            migrator=migrate,
        )
        stack.start()
        try:
            with open(os.devnull, "w") as quiet:
                summary = asyncio.run(
                    run_loadgen(
                        workload_spec(args),
                        stack.app_nats_url,
                        str(Path(args.out) / name.replace(" ", "")),
                        Console(file=quiet),
                    )
                )
            if summary["interrupted"]:  # Ctrl-C or SIGTERM ended that run: not the next configuration's too
                print(f"interrupted ({summary['stopped_by']}) during {name}: stopping", file=sys.stderr)
                sys.exit(EXIT_AFTER[summary["stopped_by"]])
            cycles = step_cycles(stack.metrics_urls)
        finally:
            stack.stop()
        row = {
            "config": name,
            "sent": summary["sent"],
            "completed": summary["completed"],
            "lost": summary["lost"],
            "throughput_tok_s": summary["throughput_tok_s"],
            "norm_latency_mean_s": summary["normalized_latency_s"]["mean"],
            "norm_latency_p90_s": summary["normalized_latency_s"]["p90"],
            "cycles": cycles,
        }
        rows.append(row)
        print(
            f"{name:>22}: {row['throughput_tok_s']:6.1f} tok/s  norm latency mean {row['norm_latency_mean_s']:.3f}"
            f" p90 {row['norm_latency_p90_s']:.3f}  completed {row['completed']}/{row['sent']}",
            flush=True,
        )
    return {
        "machine": machine(),
        "date": today(),
        "preset": args.preset,
        "workers": args.workers,
        "adapters": args.adapters,
        "rate_req_s": args.rate,
        "cv": args.cv,
        "requests": args.requests,
        "shift_every_s": args.shift_every,
        "length_divide": args.length_divide,
        "max_prompt": args.max_prompt,
        "max_output": args.max_output,
        "kv_cache_mb": args.kv_cache_mb,
        "rows": rows,
        "bound": bound,
    }


def markdown(r: dict) -> str:
    rr = next(x for x in r["rows"] if x["config"] == "round-robin")
    lines = [
        f"Measured {r['date']} on **{r['machine']}**: {r['workers']} workers (one torch thread each), preset "
        f"`{r['preset']}`, {r['adapters']} adapters, {r['requests']} requests at {r['rate_req_s']:g} req/s "
        f"(Gamma CV {r['cv']:g}), Azure conversation lengths divided by {r['length_divide']:g} (prompts at most "
        f"{r['max_prompt']}, outputs at most {r['max_output']} tokens), Zipf popularity rotating every "
        f"{r['shift_every_s']:g} s.",
        "",
        "| configuration | completed | throughput (tok/s) | norm. latency mean (s/token) | P90 | mean vs round-robin |",
        "|---|---|---|---|---|---|",
    ]
    for x in r["rows"]:
        lines.append(
            f"| {x['config']} | {x['completed']}/{x['sent']} | {x['throughput_tok_s']:.1f} | "
            f"{x['norm_latency_mean_s']:.3f} | {x['norm_latency_p90_s']:.3f} | "
            f"{x['norm_latency_mean_s'] / rr['norm_latency_mean_s']:.2f}x |"
        )
    b = r["bound"]
    steps = ", ".join(f"{k}: {v * 1000:.0f}" for k, v in b["step_seconds"].items())
    lines += [
        "",
        f"Rebalancing reference (simulated from this machine's measured decode step times, ms by batch size: "
        f"{steps}): round-robin {b['round_robin_mean_s']:.3f} s/token mean (P90 {b['round_robin_p90_s']:.3f}), "
        f"even, free rebalancing at every step {b['balanced_mean_s']:.3f} (P90 {b['balanced_p90_s']:.3f}): "
        f"**rebalancing reaches {b['balanced_mean_s'] / b['round_robin_mean_s']:.2f}x round-robin's mean "
        f"on these workers**.",
    ]
    if cycles := pooled_cycles(r["rows"]):
        inside = ", ".join(f"{k:.1f}: {v * 1000:.0f}" for k, v in cycles.items())
        lines += [
            "",
            f"The workers' own loop time per decode step during the runs (`dlora_step_cycle_seconds`, ms by "
            f"mean batch, pooled over the configurations; what `dlora simulate --profile calibrated:` reads): "
            f"{inside}.",
        ]
    return "\n".join(lines)


def plot(r: dict) -> Figure:
    """Fig. 11's analog: normalized latency and throughput per dispatch mode, beside the simulated bounds."""
    fig, ax = figure(2)
    rows, b = r["rows"], r["bound"]
    configs = [x["config"].replace(" + ", "\n+ ") for x in rows]
    grouped_bars(
        ax[0],
        configs,
        {"mean": [x["norm_latency_mean_s"] for x in rows], "P90": [x["norm_latency_p90_s"] for x in rows]},
    )
    ax[0].axhline(b["round_robin_mean_s"], color="grey", linestyle=":", label="simulated round-robin mean")
    ax[0].axhline(b["balanced_mean_s"], color="grey", linestyle="--", label="simulated balanced mean")
    ax[0].legend(fontsize=7)
    ax[0].set(ylabel="normalized latency (s/token)", title="Latency per dispatch mode")
    ax[1].bar(range(len(rows)), [x["throughput_tok_s"] for x in rows], 0.5)
    ax[1].set_xticks(range(len(rows)), configs, fontsize=8)
    ax[1].set(ylabel="throughput (tok/s)", title=f"Throughput ({r['workers']} workers)")
    return fig


def run_bench_cluster(args: argparse.Namespace) -> int:
    result = run(args)
    save(result, args.json, args.benchmarks, "cluster", TITLE, markdown(result), plot=plot)
    return 0
