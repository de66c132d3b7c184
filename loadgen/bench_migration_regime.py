"""``dlora bench simulate --experiment migration``: where co-migration pays (issue 21's regime map,
its second mechanism; ``bench_regime`` maps the first, dynamic merging).

A small cluster (``migration_replicas`` replicas, ``migration_adapters`` adapters, ranks 8/16/32)
under the dLoRA artifact's engine, Gamma arrivals (CV ``cv``) whose Zipf popularity (exponent
``alpha``) rotates every third of the run, at ``load`` times the replicas' unmerged capacity with a
slot for every adapter, each replica with ``slots`` device slots (fewer slots than adapters is the
paper's Fig. 11 regime: an adapter's requests crowd the replicas holding it). For each cell the
real dispatcher runs round-robin, proactive, and proactive with the real migrator (its trigger
and ILP planner); co-migration's gain is proactive-only's mean normalized latency over proactive +
migration's (above 1: moving running requests and their adapters pays), beside proactive's gain
over round-robin.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import TYPE_CHECKING

from dlora.loadgen.bench_regime import ZIPF, gain_panels
from dlora.loadgen.bench_sim import CUT, DISPATCH, _at, _header, _means, _run, _spec, capacity_rps
from dlora.sim.cost import ARTIFACT
from dlora.sim.main import requests_of, with_slots

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def migration_regime(args: argparse.Namespace) -> list[dict]:
    """One row per (slots, alpha, load) with each dispatch's figures and the two gains."""
    rows = []
    duration = args.migration_duration
    for alpha in args.migration_alphas:
        spec = replace(
            _spec(args, args.migration_adapters, duration),
            popularity="zipf",
            alpha=alpha,
            arrivals="gamma",
            cv=args.cv,
            shift_every=duration / 3,
        )
        full = with_slots(args.migration_adapters)
        per_replica = capacity_rps(ARTIFACT, full, *_means(requests_of(spec, args.traces)))
        for load in args.migration_loads:
            requests = _at(spec, load * args.migration_replicas * per_replica, args.traces)
            for slots in args.migration_slots:
                runs = {
                    label: _run(ARTIFACT, requests, args.migration_replicas, with_slots(slots), CUT * duration, **kw)
                    for label, kw in DISPATCH.items()
                }
                mean = {label: m["norm_latency_mean_s"] for label, m in runs.items()}
                rows.append(
                    {"slots": slots, "alpha": alpha, "load": load}
                    | {f"{label}_norm_latency_mean_s": v for label, v in mean.items()}
                    | {
                        "proactive_gain": mean["round-robin"] / mean["proactive"],
                        "migration_gain": mean["proactive"] / mean["proactive + migration"],
                        "moved": runs["proactive + migration"]["moved"],
                        "solves": runs["proactive + migration"]["solves"],
                        "solve_s_max": runs["proactive + migration"]["solve_s_max"],
                        "wall_s": sum(m["wall_s"] for m in runs.values()),
                    }
                )
                x = rows[-1]
                print(
                    f"slots {slots:>3} alpha {alpha:>4g} load {load:>4g}: "
                    + "  ".join(f"{label} {v * 1e3:7.1f}" for label, v in mean.items())
                    + f"  ms/token; migration gain {x['migration_gain']:.2f} ({x['moved']} moved)",
                    flush=True,
                )
    return rows


def markdown_migration_regime(r: dict) -> str:
    s = r["settings"]
    lines = [
        _header(r, ZIPF),
        "",
        f"`dlora bench simulate --experiment migration`: {s['migration_replicas']} replicas × "
        f"{s['migration_adapters']} adapters under `dlora-artifact`, Gamma arrivals (CV {s['cv']}) for "
        f"{s['migration_duration']:.0f} s at `load` × the replicas' unmerged capacity with a slot for every adapter, "
        "popularity rotating every third of that; each replica with `slots` device slots. Gains: round-robin's mean "
        "normalized latency over proactive's, and proactive-only's over proactive + migration's (> 1: it pays).",
        "",
        "| slots | alpha | load | round-robin / proactive / + migration (ms/token) | proactive gain | "
        "migration gain | moved (solves, slowest s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for x in r["rows"]:
        latency = " / ".join(f"{x[f'{label}_norm_latency_mean_s'] * 1e3:.1f}" for label in DISPATCH)
        lines.append(
            f"| {x['slots']} | {x['alpha']:g} | {x['load']:g} | {latency} | {x['proactive_gain']:.2f} | "
            f"**{x['migration_gain']:.2f}** | {x['moved']} ({x['solves']}, {x['solve_s_max']:.2f}) |"
        )
    return "\n".join(lines)


def plot_migration_regime(r: dict) -> Figure:
    """Co-migration's gain over proactive-only against skew, a line per slot count, a panel per load."""
    return gain_panels(r["rows"], "slots", "{} slots", "migration_gain", "proactive-only / proactive + migration")
