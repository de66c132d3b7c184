"""``dlora bench simulate --experiment validate``: each measured run replayed by the simulator,
priced by the steps it ran."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from dlora.loadgen import bench_validate
from dlora.loadgen.bundled import AZURE_CONV, AZURE_FUNCTIONS, data_dir
from dlora.loadgen.spec import WorkloadSpec

WORKLOAD = WorkloadSpec(
    trace=(str(data_dir() / AZURE_CONV), str(data_dir() / AZURE_FUNCTIONS)),
    requests=24,
    rate=4.0,
    arrivals="poisson",
    lengths="trace",
    length_divide=8,
    max_prompt=32,
    max_output=16,
    adapters=6,
    popularity="stride",
    stride=4,
).options()


def _steps(scale: float) -> list[list[float]]:
    """Steps of a machine where a step costs scale x (20 ms + 3 ms a decode + 1 ms a prompt token + 2 ms a segment)."""
    rows = []
    for decode in range(0, 20, 3):
        for prompt, seqs in ((0, 0), (12, 1), (40, 2)):
            for segments in (0, 1, 4):
                if decode + seqs:
                    rows.append(
                        [
                            decode,
                            prompt,
                            seqs,
                            segments,
                            16 * segments,
                            scale * (0.02 + 0.003 * decode + 0.001 * prompt + 0.002 * segments),
                        ]
                    )
    return rows


def test_each_run_is_simulated_with_its_own_steps_and_the_pooled_ones(tmp_path: Path) -> None:
    measured = {"throughput_tok_s": 30.0, "norm_latency_mean_s": 0.1, "norm_latency_p90_s": 0.2}
    policy = {  # bench policy's shape: a row per (stride, policy), its repeats as runs
        "merge_ms": 50.0,
        "rows": [
            {"stride": 4, "policy": p, "workload": WORKLOAD, "runs": [{**measured, "steps": _steps(s)}]}
            for p, s in (("unmerged-only", 1.0), ("dlora", 2.0))
        ],
    }
    e2e = {"rows": [{"rate": 4.0, "system": "unmerged-only", "workload": WORKLOAD, **measured, "steps": _steps(1.0)}]}
    e2e["rows"].append({"rate": 4.0, "system": "hf-peft", "workload": WORKLOAD, **measured})  # no steps: not ours
    paths = [tmp_path / "policy.json", tmp_path / "e2e.json"]
    for path, bench in zip(paths, (policy, e2e)):
        path.write_text(json.dumps(bench))
    rows = bench_validate.validate(argparse.Namespace(measured=[str(p) for p in paths]))
    assert [r["config"] for r in rows] == [
        "policy, stride 4, unmerged-only",
        "policy, stride 4, dlora",
        "e2e, 4 req/s, unmerged-only",
    ]
    slow, fast = rows[1]["own"], rows[0]["own"]
    # the run on a machine twice as slow is simulated twice as slow per token by its own steps
    assert slow["norm_latency_mean_s"] > 1.5 * fast["norm_latency_mean_s"]
    # pooled over both runs of the file, the two policies are priced alike: between the two
    assert fast["norm_latency_mean_s"] < rows[0]["pooled"]["norm_latency_mean_s"] < slow["norm_latency_mean_s"]
    assert rows[2]["own"] == pytest.approx(rows[2]["pooled"])  # one run in its file: the same fit
    # each run's steps against the pooled price: the slow machine's 4/3 of it, the fast one's 2/3
    assert [r["steps_over_pooled"] for r in rows] == pytest.approx([2 / 3, 4 / 3, 1.0], rel=1e-6)
    text = bench_validate.markdown_validate(
        {"date": "d", "machine": "m", "settings": {"measured": paths}, "rows": rows}
    )
    assert "| e2e, 4 req/s, unmerged-only | 1.00 | 30.0 / " in text and "of 3 runs" in text


def test_a_record_made_before_the_ramp_options_still_reads(tmp_path: Path) -> None:
    """A bench's workload record written before --ramp-up-strategy existed lacks its keys: the
    whole file was refused as "not the JSON of `dlora bench policy`" (no attribute ramp_up_strategy)."""
    old = {k: v for k, v in WORKLOAD.items() if not k.startswith("ramp_up_")}
    measured = {"throughput_tok_s": 30.0, "norm_latency_mean_s": 0.1, "norm_latency_p90_s": 0.2}
    bench = {"rows": [{"rate": 4.0, "system": "dlora", "workload": old, **measured, "steps": _steps(1.0)}]}
    (tmp_path / "e2e.json").write_text(json.dumps(bench))
    bench_validate.check_measured(str(tmp_path / "e2e.json"))
    assert WorkloadSpec.from_args(argparse.Namespace(**old)) == WorkloadSpec.from_args(argparse.Namespace(**WORKLOAD))
