"""``dlora bench migration``: how long the co-migration ILP takes as the cluster grows.

Random skewed snapshots (one hot worker holding 3x the requests of the others, adapters of ranks
8/16/32, four to eight adapters per worker) are planned for each size; reported: build + solve
seconds, how the plan was found, and the longest completion time before and after.
"""

from __future__ import annotations

import argparse
import random
from typing import TYPE_CHECKING

from dlora.loadgen.bench_common import figure, grouped_bars, machine, save, today
from dlora.services.migrator.planner import PlannerSettings, plan
from dlora.services.migrator.snapshot import ClusterSnapshot, RequestState, WorkerState

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def snapshot(workers: int, adapters: int, requests: int, seed: int = 0) -> ClusterSnapshot:
    rng = random.Random(seed)
    names = [f"a{i}" for i in range(adapters)]
    ws = [
        WorkerState(f"w{i}", 4000, 16, 8, frozenset(rng.sample(names, min(adapters, rng.randint(4, 8)))), 0.01)
        for i in range(workers)
    ]
    weights = [3.0] + [1.0] * (workers - 1)
    rs = []
    for k in range(requests):
        w = rng.choices(ws, weights)[0]
        rs.append(
            RequestState(f"r{k}", w.worker, rng.choice(sorted(w.adapters)), rng.randint(16, 1024), rng.uniform(8, 256))
        )
    # (adapters of ranks 8-32, their files ~1 MiB a rank: what a read of each is priced by)
    return ClusterSnapshot(ws, rs, file_bytes={a: rng.choice([8, 16, 32]) << 20 for a in names})


def run(sizes: list[tuple[int, int, int]], time_limit_s: float) -> dict:
    rows = []
    for workers, adapters, requests in sizes:
        p = plan(snapshot(workers, adapters, requests), PlannerSettings(time_limit_s=time_limit_s))
        rows.append(
            {
                "workers": workers,
                "adapters": adapters,
                "requests": requests,
                "seconds": p.solve_seconds,
                "method": p.label,
                "moves": len(p.moves),
                "makespan_before_s": p.makespan_before_s,
                "makespan_after_s": p.makespan_after_s,
            }
        )
        print(
            f"{workers:>4} workers {adapters:>5} adapters {requests:>6} requests: {p.solve_seconds:6.2f} s "
            f"{p.label:<16} moves {len(p.moves):>5}  makespan {p.makespan_before_s:8.1f} -> "
            f"{p.makespan_after_s:8.1f} s",
            flush=True,
        )
    return {"machine": machine(), "date": today(), "time_limit_s": time_limit_s, "rows": rows}


TITLE = "Co-migration ILP solve time (`dlora bench migration`)"


def markdown(r: dict) -> str:
    lines = [
        f"Measured {r.get('date', '?')} on **{r['machine']}**, solver bound {r['time_limit_s']:g} s (PuLP + CBC from "
        "the cbcbox wheel). Random snapshots: one worker holds 3x the requests of the others, 4-8 adapters per "
        "worker of ranks 8/16/32, 8 slots per worker. Seconds include building the model, CBC's start-up and "
        "reading the plan back.",
        "",
        "| workers x adapters x requests | seconds | found by | moves | longest completion before -> after |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {x['workers']} x {x['adapters']} x {x['requests']:,} | {x['seconds']:.2f} | {x['method']} | "
        f"{x['moves']} | {x['makespan_before_s']:.1f} -> {x['makespan_after_s']:.1f} s |"
        for x in r["rows"]
    ]
    return "\n".join(lines)


def plot(r: dict) -> Figure:
    """Build + solve seconds against the problem's size, and the longest completion before and after."""
    fig, ax = figure(2)
    rows = sorted(r["rows"], key=lambda x: x["requests"])
    ax[0].plot([x["requests"] for x in rows], [x["seconds"] for x in rows], marker="o")
    for i, x in enumerate(rows):
        last = i == len(rows) - 1  # its label goes left of the point, inside the axes
        ax[0].annotate(
            f"{x['workers']}x{x['adapters']}, {x['method']}",
            (x["requests"], x["seconds"]),
            fontsize=6,
            xytext=(-4 if last else 4, -8),
            textcoords="offset points",
            ha="right" if last else "left",
        )
    ax[0].axhline(r["time_limit_s"], color="grey", linestyle=":")
    ax[0].set(xlabel="requests in the snapshot", ylabel="build + solve (s)", xscale="log", yscale="log")
    ax[0].set_title("Solve time (dotted: solver bound)")
    sizes = [f"{x['workers']}x{x['adapters']}x{x['requests']}" for x in rows]
    grouped_bars(
        ax[1],
        sizes,
        {
            "before": [x["makespan_before_s"] for x in rows],
            "after": [x["makespan_after_s"] for x in rows],
        },
    )
    ax[1].tick_params(axis="x", labelsize=6)
    ax[1].set(xlabel="workers x adapters x requests", ylabel="longest completion (s)", title="Plan's effect")
    return fig


def run_bench_migration(args: argparse.Namespace) -> int:
    sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(",")]
    result = run(sizes, args.time_limit)
    save(result, args.json, args.benchmarks, "migration", TITLE, markdown(result), plot=plot)
    return 0
