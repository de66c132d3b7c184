"""``dlora bench simulate --experiment scale``: the simulator's speed and the planner's time per
round at issue 21's scale, each run a ``dlora simulate`` command as a user would type it.

- The bundled Azure conversation trace's hour (19,366 requests at its own rate) at 32 replicas ×
  128 adapters: target two minutes of this machine's time.
- The same hour at 256 replicas × 1,000 adapters with the migrator: target twenty minutes.
- Bursty, skewed arrivals at 256 × 1,000 (Gamma CV 3, Zipf popularity rotating every 10 s) with
  the migrator, so that its trigger fires and the ILP planner runs: its wall time per round at
  that scale (the planner's own target, 1 s at 128 replicas × 1,024 adapters × 10,000 requests,
  is ``dlora bench migration``'s).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from dlora.loadgen.bench_common import figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_HOUR = (
    "--arrivals trace --lengths trace --max-prompt 2048 --max-output 2048 --requests 19366 --duration 3600 "
    "--rate 5.53 --popularity power --alpha 1.5"
)
_BURSTY = (
    "--arrivals gamma --cv 3 --popularity zipf --alpha 1.0 --shift-every 10 --lengths trace --max-prompt 1024 "
    "--max-output 512 --requests {requests} --duration 60 --rate 1280"
)
# label -> (the `dlora simulate` options, the target in seconds of wall time or None)
RUNS: dict[str, tuple[str, float | None]] = {
    "the trace's hour, 32 × 128": (f"--replicas 32 --adapters 128 {_HOUR}", 120.0),
    "the trace's hour, 256 × 1,000, migrator": (f"--replicas 256 --adapters 1000 {_HOUR} --migrate", 1200.0),
    "bursty, 256 × 1,000, migrator": (f"--replicas 256 --adapters 1000 {_BURSTY} --migrate", None),
}


def scale(args: argparse.Namespace) -> list[dict]:
    """One row per run: its command, wall and simulated seconds, latency, and planner rounds."""
    from dlora.services.cli import build_parser

    rows = []
    for label, (options, target) in RUNS.items():
        command = options.format(requests=args.scale_bursty_requests)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "run.json"
            run = build_parser().parse_args(["simulate", *command.split(), "--json", str(out)])
            if run.func(run) != 0:
                raise RuntimeError(f"dlora simulate {command} failed")
            m = json.loads(out.read_text())
        rows.append({"run": label, "command": f"dlora simulate {command}", "target_s": target} | m)
        print(
            f"{label:>40}: {m['wall_s']:7.1f} s wall for {m['simulated_s']:7.1f} s simulated, "
            f"{m['solves']} solves (mean {m['solve_s_mean']:.2f} s, slowest {m['solve_s_max']:.2f} s)",
            flush=True,
        )
    return rows


def markdown_scale(r: dict) -> str:
    lines = [
        f"{r['date']}, **{r['machine']}** (simulated time; the wall time is this machine's).",
        "",
        "`dlora bench simulate --experiment scale`: each row one `dlora simulate` command (the artifact profile, "
        "8 device slots a replica, proactive dispatch), its wall time against issue 21's target:",
        "",
        "| run | requests finished | simulated (s) | wall (s) | target (s) | norm. latency mean / P90 (ms/token) | "
        "planner rounds: solves, mean / slowest (s) | moved |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for x in r["rows"]:
        target = (
            f"{x['target_s']:.0f} ({'met' if x['wall_s'] <= x['target_s'] else 'not met'})" if x["target_s"] else "—"
        )
        lines.append(
            f"| {x['run']} | {x['completed']}/{x['requests']} | {x['simulated_s']:.0f} | {x['wall_s']:.1f} | "
            f"{target} | {x['norm_latency_mean_s'] * 1e3:.1f} / {x['norm_latency_p90_s'] * 1e3:.1f} | {x['solves']}, "
            f"{x['solve_s_mean']:.2f} / {x['solve_s_max']:.2f} | {x['moved']} |"
        )
    lines += ["", "Commands:", "", *(f"- {x['run']}: `{x['command']}`" for x in r["rows"])]
    return "\n".join(lines)


def plot_scale(r: dict) -> Figure:
    """Wall time per run against its target; the planner's wall time per round where it solved."""
    rows = r["rows"]
    fig, (walls, rounds) = figure(2)
    bars = walls.bar(range(len(rows)), [x["wall_s"] for x in rows], 0.5, label="wall")
    targets = [(i, x["target_s"]) for i, x in enumerate(rows) if x["target_s"]]
    walls.scatter([i for i, _ in targets], [t for _, t in targets], marker="_", s=600, color="red", label="target")
    walls.bar_label(bars, [f"{x['wall_s']:.0f} s" for x in rows], fontsize=7)
    walls.set_yscale("log")
    walls.set_xticks(range(len(rows)), [x["run"].replace(", ", "\n", 1) for x in rows], fontsize=7)
    walls.set(ylabel="seconds of this machine's time")
    walls.legend(fontsize=7)
    walls.set_title("Simulator speed", fontsize=9)
    for x in rows:
        if x.get("solve_seconds"):
            rounds.plot(range(1, len(x["solve_seconds"]) + 1), x["solve_seconds"], "o-", label=x["run"])
    rounds.set(xlabel="planner round", ylabel="ILP solve (s, wall)")
    rounds.set_title("The planner's time per round", fontsize=9)
    if rounds.lines:
        rounds.legend(fontsize=7)
    fig.tight_layout()
    return fig
