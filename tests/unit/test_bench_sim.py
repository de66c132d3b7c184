"""``dlora bench simulate``: the simulator's experiments, run small."""

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from dlora.loadgen import workload
from dlora.loadgen.bench_sim import capacity_rps, ignored_options
from dlora.services.cli import build_parser
from dlora.services.worker.engine.config import EngineConfig
from dlora.sim.cost import ARTIFACT


def test_a_replica_s_capacity_is_a_full_unmerged_batch_over_each_request_s_steps() -> None:
    # the artifact's unmerged step is 27 ms whatever its batch, and prompts cost nothing there
    assert capacity_rps(ARTIFACT, EngineConfig(max_num_seqs=64), 500.0, 100.0) == pytest.approx(64 / (100 * 27e-3))


def test_bench_simulate_runs_each_experiment_and_writes_its_section(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, md, r = tmp_path / "r.json", tmp_path / "BENCHMARKS.md", {}
    # The bundled traces, read once a run whatever its workloads (each of them read both again:
    # ten reads in this test, most of its time).
    reads: list[str] = []

    def counted(real: Callable[[Path], object]) -> Callable[[Path], object]:
        def read(path: Path) -> object:
            reads.append(Path(path).name)
            return real(path)

        return read

    for name in ("read_azure_llm", "read_azure_functions"):
        monkeypatch.setattr(workload, name, counted(getattr(workload, name)))
    own = {  # each experiment's own options (another's are refused)
        "policy": "--profiles dlora-artifact --strides 1,16 --policies dlora,merged-only --adapters 8 --duration 4",
        "cluster": "--replicas 2 --cluster-adapters 8 --cluster-slots 8,2 --cluster-duration 3",
        "regime": "--overheads 1.8 --alphas 2 --loads 1.4 --regime-duration 4 --adapters 8",
        "migration": "--migration-replicas 2 --migration-adapters 8 --migration-slots 2 --migration-alphas 1.5"
        " --migration-loads 0.5 --migration-duration 3",
    }
    for experiment, argv in own.items():
        args = build_parser().parse_args(
            [
                "bench",
                "simulate",
                *argv.split(),
                "--experiment",
                experiment,
                "--json",
                str(out),
                "--benchmarks",
                str(md),
            ]
        )
        reads.clear()
        assert args.func(args) == 0
        assert len(reads) == 2 and len(set(reads)) == 2  # the conversation trace, the popularity source
        r[experiment] = json.loads(out.read_text())["rows"]
    assert [(x["stride"], x["policy"]) for x in r["policy"]] == [
        (1, "dlora"),
        (1, "merged-only"),
        (16, "dlora"),
        (16, "merged-only"),
    ]
    assert all(x["completed"] > 0 and x["norm_latency_mean_s"] >= 15e-3 for x in r["policy"])
    assert all(x["merged_steps"] == 1.0 for x in r["policy"] if x["policy"] == "merged-only")
    dispatch = ["round-robin", "proactive", "proactive + migration"]
    assert [(x["slots"], x["dispatch"]) for x in r["cluster"]] == [(n, d) for n in (8, 2) for d in dispatch]
    assert len({x["requests"] for x in r["cluster"]}) == 1  # one workload for all
    assert len({(x["reference_mean_s"], x["reference_p90_s"]) for x in r["cluster"]}) == 1  # one reference
    assert 0 < r["cluster"][0]["reference_mean_s"] <= r["cluster"][0]["reference_p90_s"]
    (regime,) = r["regime"]  # dLoRA against both static modes, and its gain over the better
    best_static = min(regime["merged-only_norm_latency_mean_s"], regime["unmerged-only_norm_latency_mean_s"])
    assert regime["gain"] == pytest.approx(best_static / regime["dlora_norm_latency_mean_s"])
    assert regime["top_adapter_share"] > 0.3  # Zipf 2 over 8 adapters: the first holds most
    (cell,) = r["migration"]  # the three dispatches on one workload, and the two gains
    mean = {d: cell[f"{d}_norm_latency_mean_s"] for d in dispatch}
    assert cell["migration_gain"] == pytest.approx(mean["proactive"] / mean["proactive + migration"])
    assert cell["proactive_gain"] == pytest.approx(mean["round-robin"] / mean["proactive"])
    text = md.read_text()
    assert "--experiment policy" in text and "proactive + migration" in text and "dlora gain" in text
    assert "migration gain" in text
    assert "Rebalancing reference" in text
    # each section ends with its plot
    for key in ("simulate-policy", "simulate-cluster", "simulate-regime", "simulate-migration"):
        assert f"![{key}](docs/bench-{key}.png)\n<!-- bench-{key}:end -->" in text
        assert (tmp_path / "docs" / f"bench-{key}.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("extra", "why"),
    [
        (["--profiles", "dlora-artifact,h200-llama7bb"], "unknown profile 'h200-llama7bb'"),
        (["--experiment", "regime", "--overheads", "0.5"], "--overheads 0.5: an unmerged iteration costs at least"),
        (["--experiment", "cluster", "--cluster-profile", "calibrated:/nowhere.json"], "/nowhere.json"),
    ],
)
def test_bench_simulate_refuses_what_it_would_fail_on_before_the_first_run(
    extra: list[str], why: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A typo in the last profile crashed it after every run of the first, and no JSON was kept."""
    argv = ["bench", "simulate", "--benchmarks", str(tmp_path / "B.md"), *extra]
    args = build_parser().parse_args(argv)
    assert args.func(args) == 2
    assert why in capsys.readouterr().err


def test_bench_simulate_validate_names_a_measured_file_it_cannot_use(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a.json").write_text("{")
    (tmp_path / "b.json").write_text(json.dumps({"x": 1}))
    for name, why in (("a.json", "is not JSON"), ("b.json", "is not the JSON of `dlora bench policy`")):
        argv = ["bench", "simulate", "--experiment", "validate", "--measured", str(tmp_path / name)]
        args = build_parser().parse_args([*argv, "--benchmarks", str(tmp_path / "B.md")])
        assert args.func(args) == 2
        assert why in capsys.readouterr().err


def test_the_cluster_section_says_each_slot_count_against_the_co_migration_targets() -> None:
    """Issue 21's targets (the paper's Fig. 11): proactive + migration at most 0.25 x round-robin
    and 0.5 x proactive-only, in the generated section rather than only in a reading by hand."""
    from dlora.loadgen.bench_sim import _against_targets

    def row(slots: int, dispatch: str, mean: float) -> dict:
        return {"slots": slots, "dispatch": dispatch, "norm_latency_mean_s": mean}

    rows = [row(16, "round-robin", 0.080), row(16, "proactive", 0.030), row(16, "proactive + migration", 0.012)]
    rows += [row(128, "round-robin", 0.027), row(128, "proactive", 0.027), row(128, "proactive + migration", 0.027)]
    lines = _against_targets(rows)
    assert lines[0] == (
        "16 slots: proactive + migration reads 0.15 × round-robin (target ≤ 0.25: met) and 0.40 × "
        "proactive-only (target ≤ 0.5: met)."
    )
    assert "1.00 × round-robin (target ≤ 0.25: not met)" in lines[1] and "1.00 × proactive-only" in lines[1]
    assert _against_targets(rows[:2]) == []  # no migration run: nothing to say


def test_bench_simulate_scale_runs_each_command_and_says_it_against_its_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scale experiment runs each of its `dlora simulate` commands as given (here small ones in
    their place: the real ones take minutes) and records the planner's time per round."""
    from dlora.loadgen import bench_scale

    small = "--replicas 4 --adapters 16 --arrivals gamma --cv 3 --popularity zipf --alpha 1.0 --shift-every 2"
    small += " --lengths uniform --requests {requests} --duration 6 --rate 40"
    runs = {"fast": (small, 1e6), "slow": (small + " --migrate --migrate-interval 0.5", 1e-9)}
    monkeypatch.setattr(bench_scale, "RUNS", runs)
    out, md = tmp_path / "r.json", tmp_path / "BENCHMARKS.md"
    argv = ["bench", "simulate", "--experiment", "scale", "--scale-bursty-requests", "200"]
    args = build_parser().parse_args([*argv, "--json", str(out), "--benchmarks", str(md)])
    assert args.func(args) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [x["run"] for x in rows] == ["fast", "slow"] and all(x["requests"] == 200 for x in rows)
    assert len(rows[1]["solve_seconds"]) == rows[1]["solves"]
    text = md.read_text()
    assert "| fast |" in text and "(met)" in text and "(not met)" in text
    assert "`dlora simulate " + small.format(requests=200) + "`" in text
    assert (tmp_path / "docs" / "bench-simulate-scale.png").read_bytes()[:4] == b"\x89PNG"


def test_options_only_other_experiments_read_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """--experiment policy --replicas 7 --cluster-slots 3 --migration-alphas 9 exited 0, as if they
    had shaped the run (a helper's trial)."""
    argv = ["bench", "simulate", "--replicas", "7", "--cluster-slots", "3", "--migration-alphas", "9"]
    args = build_parser().parse_args(argv)
    assert args.func(args) == 2
    assert "--cluster-slots, --migration-alphas, --replicas: not read by --experiment policy" in capsys.readouterr().err
    assert ignored_options(build_parser().parse_args([*argv, "--experiment", "cluster"])) == ["--migration-alphas"]
