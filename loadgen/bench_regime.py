"""``dlora bench simulate --experiment regime``: where dynamic merging pays (issue 21's regime map).

One replica with a device slot for each of its adapters, as in the policy ablation, but with the
skew and the price of unmerged execution set by hand instead of read from a trace: adapter
popularity is Zipf over the adapters (exponent ``alpha``), and the engine is the dLoRA artifact's
(a merged iteration 15 ms whatever its batch) with an unmerged iteration ``overhead`` times that
(the artifact's own is 27/15 = 1.8). For each (overhead, alpha, load) the real dLoRA policy runs
against the two static modes; its gain is the better static mode's mean normalized latency over
its own (above 1: dynamic merging pays).

Merging serves one adapter at the merged rate while the others wait, so it can only pay once an
adapter holds more of the batch than ``1 / overhead`` (15/27 = 56 % under the artifact's
constants); the map shows how far the real policy gets from that line, and what it costs where
unmerged execution is the right answer.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections import Counter
from dataclasses import replace
from typing import TYPE_CHECKING

import msgspec

from dlora.loadgen.bench_common import figure
from dlora.loadgen.bench_sim import CUT, _at, _header, _means, _run, _spec, capacity_rps
from dlora.services.worker.policy.config import PolicyConfig, PolicyName
from dlora.sim.cost import ARTIFACT, CostProfile
from dlora.sim.main import requests_of, with_slots

if TYPE_CHECKING:
    from matplotlib.figure import Figure

POLICIES = ("dlora", "merged-only", "unmerged-only")
ZIPF = "Zipf popularity (exponent alpha)"  # the maps' popularity, for their header


def with_overhead(overhead: float) -> CostProfile:
    """The artifact's profile with an unmerged iteration ``overhead`` times a merged one."""
    return dataclasses.replace(
        ARTIFACT, name=f"artifact-x{overhead:g}", unmerged_step_s=ARTIFACT.step_s * (overhead - 1.0)
    )


def regime(args: argparse.Namespace) -> list[dict]:
    """One row per (overhead, alpha, load) with each policy's figures and dLoRA's gain."""
    rows = []
    for overhead in args.overheads:
        cost = with_overhead(overhead)
        for alpha in args.alphas:
            spec = replace(_spec(args, args.adapters, args.regime_duration), popularity="zipf", alpha=alpha)
            slots = with_slots(args.adapters)
            capacity = capacity_rps(cost, slots, *_means(requests_of(spec, args.traces)))
            for load in args.loads:
                requests = _at(spec, load * capacity, args.traces)
                top = max(Counter(r.adapter for r in requests).values()) / len(requests)
                runs = {}
                for policy in POLICIES:
                    config = msgspec.structs.replace(slots, policy=PolicyConfig(name=PolicyName(policy)))
                    runs[policy] = _run(cost, requests, 1, config, CUT * args.regime_duration)
                best_static = min(
                    runs["merged-only"]["norm_latency_mean_s"], runs["unmerged-only"]["norm_latency_mean_s"]
                )
                gain = best_static / runs["dlora"]["norm_latency_mean_s"]
                rows.append(
                    {"overhead": overhead, "alpha": alpha, "load": load, "top_adapter_share": top, "gain": gain}
                    | {f"{p}_norm_latency_mean_s": m["norm_latency_mean_s"] for p, m in runs.items()}
                    | {
                        "dlora_merged_steps": runs["dlora"]["merged_steps"],
                        "dlora_mixed_steps": runs["dlora"]["mixed_steps"],
                    }
                    | {"wall_s": sum(m["wall_s"] for m in runs.values())}
                )
                print(
                    f"overhead {overhead:>4g} alpha {alpha:>4g} load {load:>4g} (top {top:.2f}): "
                    + "  ".join(f"{p} {m['norm_latency_mean_s'] * 1e3:8.1f}" for p, m in runs.items())
                    + f"  ms/token; dlora gain {gain:.2f}",
                    flush=True,
                )
    return rows


def markdown_regime(r: dict) -> str:
    s = r["settings"]
    lines = [
        _header(r, ZIPF),
        "",
        f"`dlora bench simulate --experiment regime`: one replica, {s['adapters']} adapters (a slot each), Poisson "
        f"arrivals for {s['regime_duration']:.0f} s at `load` × its unmerged capacity; the artifact's engine (merged "
        "iteration 15 ms) with an unmerged iteration `overhead` × that. Gain: the better static mode's mean "
        "normalized latency over dLoRA's (> 1: dynamic merging pays).",
        "",
        "| overhead | alpha (top adapter share) | load | dlora / merged-only / unmerged-only (ms/token) | "
        "dlora gain | dlora merged / mixed steps |",
        "|---|---|---|---|---|---|",
    ]
    for x in r["rows"]:
        latency = " / ".join(f"{x[f'{p}_norm_latency_mean_s'] * 1e3:.1f}" for p in POLICIES)
        lines.append(
            f"| {x['overhead']:g} | {x['alpha']:g} ({x['top_adapter_share']:.2f}) | {x['load']:g} | {latency} | "
            f"**{x['gain']:.2f}** | {x['dlora_merged_steps']:.2f} / {x['dlora_mixed_steps']:.2f} |"
        )
    return "\n".join(lines)


def plot_regime(r: dict) -> Figure:
    """dLoRA's gain over the better static mode against skew, a line per unmerged overhead, a panel per load."""
    return gain_panels(r["rows"], "overhead", "unmerged {:g}× merged", "gain", "dLoRA gain over the best static mode")


def gain_panels(rows: list[dict], series: str, label: str, gain: str, ylabel: str) -> Figure:
    """``gain`` against the Zipf exponent, a line per value of ``series`` (named by ``label``), a panel
    per load."""
    loads = sorted({x["load"] for x in rows})
    fig, axes = figure(len(loads))
    for ax, load in zip(axes, loads):
        for value in sorted({x[series] for x in rows}):
            xs = sorted((x for x in rows if x["load"] == load and x[series] == value), key=lambda x: x["alpha"])
            ax.plot([x["alpha"] for x in xs], [x[gain] for x in xs], "o-", label=label.format(value))
        ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
        gains = [x[gain] for x in rows if x["load"] == load]
        if max(gains) / min(gains) > 3:  # a log scale only where gains span orders, with plain tick labels
            from matplotlib.ticker import NullFormatter, ScalarFormatter

            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(ScalarFormatter())
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set(xlabel="Zipf exponent (adapter skew)")
        ax.set_title(f"load {load:g} × unmerged capacity", fontsize=9)
        ax.legend(fontsize=7)
    axes[0].set(ylabel=ylabel)
    fig.tight_layout()
    return fig
