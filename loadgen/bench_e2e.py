"""``dlora bench e2e``: dlora beside its baselines on the same trace (paper Fig. 8/9 at this
machine's scale), sweeping the request rate.

Systems: HF PEFT (``baselines.HFPeftServer``), and the engine under merged-only, unmerged-only
and dlora. Arrivals and lengths replay the Azure 2023 conversation trace (timestamps rescaled to
each rate, lengths divided and capped: recorded in the result), adapters by dLoRA's stride
mapping over the Azure Functions popularity. For each system: throughput and mean / P90
normalized latency per rate, and the highest rate whose mean normalized latency stays under the
bound with every request finished. Writes JSON, a plot under docs/, and the BENCHMARKS.md section
between its markers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from dlora.loadgen import bundled, workload
from dlora.loadgen.baselines import HFPeftServer
from dlora.loadgen.bench_common import ensure_model, figure, machine, save
from dlora.loadgen.bench_policy import ADAPTER_RANKS, StepLog, make_engine, replay, switch_ms
from dlora.loadgen.metrics import summarize
from dlora.loadgen.spec import WorkloadSpec

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SYSTEMS = ("hf-peft", "merged-only", "unmerged-only", "dlora")
TITLE = "End to end against HF PEFT (`dlora bench e2e`)"


def batching_gain(server: HFPeftServer, batch: int = 32, tokens: int = 16) -> dict[str, float]:
    """HF's own output tokens/s at batch 1 and at ``batch`` (base model), so the ratio to HF is
    read beside what batching alone gains on this machine."""
    out = {}
    for b in (1, batch):
        prompts = [[5 + i, 6, 7, 8, 9, 10, 11, 12] for i in range(b)]
        server.generate(None, prompts, 2)  # warm-up
        start = time.perf_counter()
        server.generate(None, prompts, tokens)
        out[f"batch_{b}_tok_s"] = b * tokens / (time.perf_counter() - start)
    out["gain"] = out[f"batch_{batch}_tok_s"] / out["batch_1_tok_s"]
    return out


def workload_spec(args: argparse.Namespace, rate: float) -> WorkloadSpec:
    """The workload at one rate of the sweep: the Azure conversation trace's first requests (as many
    as ``--window`` seconds at that rate, within the request bounds) with their own timestamps
    rescaled to it and their own lengths scaled to fit, adapters by the stride mapping over the
    Azure Functions popularity (clipped at the n-th function)."""
    traces = Path(args.traces)
    return WorkloadSpec(
        trace=(str(traces / bundled.AZURE_CONV), str(traces / bundled.AZURE_FUNCTIONS)),
        requests=int(min(args.max_requests, max(args.min_requests, rate * args.window))),
        rate=rate,
        arrivals="trace",
        lengths="trace",
        length_divide=args.length_divide,
        max_prompt=args.max_prompt,
        max_output=args.max_output,
        adapters=args.adapters,
        popularity="stride",
        stride=args.stride,
        duration=args.max_seconds,
        seed=args.seed,
    )


def run(args: argparse.Namespace) -> dict:
    n = args.adapters
    root = ensure_model(Path(args.workdir), args.preset, n, ranks=list(ADAPTER_RANKS))
    first = workload_spec(args, args.rates[0])
    traces = workload.load_traces(first)  # read once: every rate replays the same two traces
    weights = workload.adapter_weights(first, traces[1])  # the same at every rate
    scaling = workload.LengthScaling(first.length_divide, first.max_prompt, first.max_output)
    hf, gain = None, None  # without hf-peft among the systems neither is made (it was, and published)
    if "hf-peft" in args.systems:
        hf = HFPeftServer(root / "model", {f"lora-{i}": root / "adapters" / f"lora-{i}" for i in range(n)})
        gain = batching_gain(hf)
        print(
            f"HF batching gain on this machine: {gain['batch_1_tok_s']:.1f} -> {gain['batch_32_tok_s']:.1f} "
            f"tok/s ({gain['gain']:.1f}x)",
            flush=True,
        )
    rows, stats = [], []
    for rate in args.rates:
        spec = workload_spec(args, rate)
        count = spec.requests
        requests = workload.build_specs(spec, traces)
        for system in args.systems:
            steps: list[list[float]] = []  # what the simulator's calibrated profile is fitted to
            if hf is not None and system == "hf-peft":
                results, end = hf.serve(requests, spec.duration)
            else:
                engine = make_engine(root, system, n, "float32")
                stats.append(engine.stats)
                log = StepLog(engine)
                results, end = replay(engine, requests, spec.duration, log)
                steps = log.rows
            s = summarize(results, end)
            row = {
                "rate": rate,
                "system": system,
                "requests": count,
                "finished": s["completed"],
                "throughput_tok_s": s["throughput_tok_s"],
                "norm_latency_mean_s": s["normalized_latency_s"]["mean"],
                "norm_latency_p90_s": s["normalized_latency_s"]["p90"],
                "workload": spec.options(),  # what `bench simulate --experiment validate` replays
                **({"steps": steps} if steps else {}),
            }
            rows.append(row)
            print(
                f"rate {rate:5.2f} {system:>13}: {row['throughput_tok_s']:7.1f} tok/s  norm latency mean "
                f"{row['norm_latency_mean_s']:.3f} p90 {row['norm_latency_p90_s']:.3f}  "
                f"finished {row['finished']}/{count}",
                flush=True,
            )
    sustained = {
        system: max(
            (
                r["rate"]
                for r in rows
                if r["system"] == system
                and r["finished"] == r["requests"]
                and r["norm_latency_mean_s"] <= args.latency_bound
            ),
            default=0.0,
        )
        for system in args.systems
    }
    result = {
        "machine": machine(),
        "date": datetime.date.today().isoformat(),
        "preset": args.preset,
        "adapters": n,
        "stride": args.stride,
        "top_adapter_share": max(weights),
        "length_scaling": vars(scaling),
        "latency_bound_s_per_token": args.latency_bound,
        "hf_batching": gain,
        "rows": rows,
        **switch_ms(stats),
        "sustained_rate_req_s": sustained,
        "dlora_over_hf": (sustained.get("dlora", 0) / sustained["hf-peft"]) if sustained.get("hf-peft") else None,
    }
    return result


def markdown(result: dict) -> str:
    lines = [
        f"Measured {result['date']} on **{result['machine']}**, preset `{result['preset']}`, "
        f"{result['adapters']} adapters (ranks 8/16/32), stride {result['stride']} (top adapter share "
        f"{result['top_adapter_share']:.2f}). Lengths: Azure conversation trace divided by "
        f"{result['length_scaling']['divide']:g}, capped at {result['length_scaling']['max_prompt']} prompt / "
        f"{result['length_scaling']['max_output']} output tokens. Bound for 'sustained': mean normalized "
        f"latency ≤ {result['latency_bound_s_per_token']} s/token with every request finished.",
        "",
        "| rate (req/s) | system | finished | throughput (tok/s) | norm. latency mean (s/token) | P90 |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['rate']:g} | {r['system']} | {r['finished']}/{r['requests']} | "
            f"{r['throughput_tok_s']:.1f} | {r['norm_latency_mean_s']:.3f} | {r['norm_latency_p90_s']:.3f} |"
        )
    g = result["hf_batching"]
    ratio = result["dlora_over_hf"]
    lines += ["", "| system | highest sustained rate (req/s) |", "|---|---|"]
    lines += [f"| {k} | {v:g} |" for k, v in result["sustained_rate_req_s"].items()]
    if g is not None:
        lines += [
            "",
            f"dlora / HF PEFT sustained rate: **{'n/a' if ratio is None else f'{ratio:.1f}x'}** (target on this "
            f"CPU ≥ 6×), read beside HF's own batching gain here: {g['batch_1_tok_s']:.1f} → "
            f"{g['batch_32_tok_s']:.1f} output tok/s from batch 1 to 32 (**{g['gain']:.1f}×**).",
        ]
    return "\n".join(lines)


def plot(result: dict) -> Figure:
    """Throughput and mean normalized latency against the request rate, one line per system."""
    fig, ax = figure(2)
    for system in dict.fromkeys(r["system"] for r in result["rows"]):
        rs = [r for r in result["rows"] if r["system"] == system]
        ax[0].plot([r["rate"] for r in rs], [r["throughput_tok_s"] for r in rs], marker="o", label=system)
        ax[1].plot([r["rate"] for r in rs], [r["norm_latency_mean_s"] for r in rs], marker="o", label=system)
    ax[0].set(xlabel="request rate (req/s)", ylabel="throughput (tok/s)", xscale="log", title="Throughput")
    ax[1].set(
        xlabel="request rate (req/s)",
        ylabel="mean normalized latency (s/token)",
        xscale="log",
        yscale="log",
        title="Latency (dotted: the bound)",
    )
    ax[1].axhline(result["latency_bound_s_per_token"], color="grey", linestyle=":")
    ax[0].legend(fontsize=7)
    return fig


def write_outputs(result: dict, json_path: str | None, benchmarks: Path, docs: Path | None = None) -> None:
    """The JSON, the plot (``docs``, by default docs/ beside BENCHMARKS.md) and the BENCHMARKS.md section."""
    save(result, json_path, benchmarks, "e2e", TITLE, markdown(result), plot=plot, docs=docs)


def run_bench_e2e(args: argparse.Namespace) -> int:
    args.rates = [float(r) for r in args.rates.split(",")]
    args.systems = [s for s in args.systems.split(",")]
    unknown = set(args.systems) - set(SYSTEMS)
    if unknown:
        print(f"dlora bench e2e: unknown systems {sorted(unknown)}; expected some of {SYSTEMS}")
        return 2
    result = run(args)
    write_outputs(result, args.json, Path(args.benchmarks), Path(args.docs))
    print(
        json.dumps({"sustained_rate_req_s": result["sustained_rate_req_s"], "dlora_over_hf": result["dlora_over_hf"]})
    )
    return 0
