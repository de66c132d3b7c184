"""``dlora bench simulate --experiment validate``: the simulator against the real engine (issue 21).

Every run a ``dlora bench policy`` or ``bench e2e`` JSON holds (``--measured``) is simulated with
its own workload (the row's ``workload``), policy and engine limits (``bench_policy.engine_config``),
its steps priced two ways (``dlora.sim.cost.from_steps``):

- **pooled**: one profile fitted to every step of every run in the file: what a profile
  calibrated once on the machine gives;
- **own**: a profile fitted to that run's own steps: the machine as it was during that run. A
  2-core VM's speed moves by a fifth between runs minutes apart, which no single profile can
  follow; what is left against the measured run is the simulator's own error (its batching,
  queueing and switches), not the machine's drift.

Throughput and mean / P90 normalized latency, simulated over measured.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from dlora.loadgen.bench_policy import ADAPTER_RANKS, engine_config
from dlora.loadgen.spec import WorkloadSpec
from dlora.sim.cluster import Cluster, summary
from dlora.sim.cost import CostProfile, StepShape, calibrated, checked, from_steps
from dlora.sim.main import requests_of

TITLE = "Cluster simulator: validation against the real engine (`dlora bench simulate --experiment validate`)"
METRICS = ("throughput_tok_s", "norm_latency_mean_s", "norm_latency_p90_s")


def _runs(bench: dict[str, Any]) -> list[tuple[str, str, dict[str, Any], dict[str, float], list[list[float]]]]:
    """(label, policy, workload, measured figures, steps) of each engine run in a bench JSON."""
    out = []
    for row in bench["rows"]:
        if "steps" in row:  # bench e2e: a row is a run
            out.append(
                (f"e2e, {row['rate']:g} req/s, {row['system']}", row["system"], row["workload"], row, row["steps"])
            )
        for i, run in enumerate(row.get("runs", [])):  # bench policy: a row's runs are its repeats
            label = f"policy, stride {row['stride']}, {row['policy']}" + (
                f" (run {i + 1})" if len(row["runs"]) > 1 else ""
            )
            out.append((label, row["policy"], row["workload"], run, run["steps"]))
    return out


def check_measured(path: str) -> None:
    """Raises ValueError, saying why, unless ``path`` is a ``dlora bench policy`` / ``bench e2e``
    JSON whose runs can be simulated: readable JSON, a profile its steps calibrate, each run with
    its figures, workload and steps (a user's trial got a traceback for each of these)."""
    try:
        bench = json.loads(Path(path).read_text())
        calibrated(bench, name="pooled")
        runs = _runs(bench)
        for label, _, workload, measured, steps in runs:
            if not all(measured[k] > 0 for k in METRICS):
                raise ValueError(f"its run {label!r} measured {', '.join(f'{k} {measured[k]}' for k in METRICS)}")
            WorkloadSpec.from_args(argparse.Namespace(**workload))
            checked(from_steps(steps, f"its run {label!r}"))  # too few steps, or of no time
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--measured {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"--measured {path} is not JSON ({e})") from None
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"--measured {path} is not the JSON of `dlora bench policy` or `bench e2e` (no {e})") from None
    except ValueError as e:
        raise ValueError(f"--measured {path}: {e}") from None
    if not runs:
        raise ValueError(f"--measured {path} holds no runs")


def simulate(cost: CostProfile, policy: str, workload: dict[str, Any]) -> dict[str, float]:
    """One replica under ``policy`` serving ``workload`` (``WorkloadSpec.options``) as the bench's
    engine would, priced by ``cost``."""
    spec = WorkloadSpec.from_args(argparse.Namespace(**workload))
    requests = requests_of(spec)
    # The names the benchmarks' adapters have, lora-<i>, each at its rank; the measured run was cut
    # at the workload's duration (``replay``): so is this one, the unfinished counted as there.
    ranks = {f"lora-{i}": ADAPTER_RANKS[i % len(ADAPTER_RANKS)] for i in range(spec.adapters)}
    adapters = {r.adapter: ranks[r.adapter] for r in requests if r.adapter is not None}
    cluster = Cluster(cost, 1, adapters, config=engine_config(policy, spec.adapters))
    return summary(cluster.run(requests, until=spec.duration), until=spec.duration)


def priced(cost: CostProfile, steps: list[list[float]]) -> float:
    """Seconds ``cost`` gives the logged ``steps`` (``sim.cost.STEP_FIELDS``), in all."""
    return sum(
        cost.step_seconds(StepShape(d + p, p, 0, segments, rank_tokens, seqs))
        for d, p, seqs, segments, rank_tokens, _ in steps
    )


def validate(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for path in args.measured:
        bench = json.loads(Path(path).read_text())
        switches = {f"{k}_s": bench[f"{k}_ms"] / 1e3 for k in ("merge", "unmerge") if f"{k}_ms" in bench}
        pooled = calibrated(bench, name="pooled")
        for label, policy, workload, measured, steps in _runs(bench):
            own = from_steps(steps, "own", **switches)
            # How much slower than the pooled profile the machine ran during this run's steps.
            drift = sum(step[-1] for step in steps) / priced(pooled, steps)
            row = {"config": label, "measured": {k: measured[k] for k in METRICS}, "steps_over_pooled": drift}
            row |= {name: simulate(cost, policy, workload) for name, cost in (("pooled", pooled), ("own", own))}
            rows.append(row)
            print(
                label, {k: round(row[k]["norm_latency_mean_s"], 3) for k in ("measured", "pooled", "own")}, flush=True
            )
    return rows


def markdown_validate(r: dict[str, Any]) -> str:
    lines = [
        f"{r['date']}, **{r['machine']}**: each run of {', '.join(f'`{p}`' for p in r['settings']['measured'])} "
        "simulated with its workload, policy and engine limits; steps priced by a profile fitted to every "
        "step of the file's runs (pooled) or to that run's own (own). Measured / pooled (ratio) / own (ratio); "
        "its steps / pooled price: the run's logged step seconds over what the pooled profile gives them (the "
        "machine's speed during the run against the file's average).",
        "",
        "| run | its steps / pooled price | throughput (tok/s) | norm. latency mean (s/token) | P90 |",
        "|---|---|---|---|---|",
    ]
    for x in r["rows"]:
        cells = []
        for k, fmt in zip(METRICS, (".1f", ".3f", ".3f")):
            m = x["measured"][k]
            sims = (f"{x[p][k]:{fmt}} ({x[p][k] / m:.2f})" for p in ("pooled", "own"))
            cells.append(f"{m:{fmt}} / " + " / ".join(sims))
        lines.append(f"| {x['config']} | {x['steps_over_pooled']:.2f} | " + " | ".join(cells) + " |")
    lines.append("")
    for p in ("pooled", "own"):
        within = [sum(abs(x[p][k] / x["measured"][k] - 1) <= 0.1 for x in r["rows"]) for k in METRICS]
        lines.append(
            f"- {p}: within 10 % of measured in {within[0]} (throughput), **{within[1]}** (mean normalized "
            f"latency) and {within[2]} (P90) of {len(r['rows'])} runs."
        )
    return "\n".join(lines)
