"""`dlora bench` refuses the numbers a benchmark cannot run with as usage errors naming the option."""

from __future__ import annotations

from pathlib import Path

import pytest

from dlora.services.cli import build_parser


@pytest.mark.parametrize(
    "argv",
    [
        ["engine", "--batch-sizes", "abc"],
        ["engine", "--batch-sizes", "1,0"],
        ["engine", "--steps", "0"],
        ["engine", "--rounds", "0"],
        ["kernels", "--reps", "0"],
        ["simulate", "--strides", "x"],
        ["simulate", "--loads", "nan"],
        ["policy", "--strides", "0"],
        ["cluster", "--workers", "0"],
        ["control-plane", "--requests", "-5"],
        ["e2e", "--rates", "-1"],
        ["e2e", "--window", "nan"],
        ["migration", "--sizes", "4x16"],
        ["migration", "--sizes", "4x0x100"],
        ["features", "--preset", "huge"],
        # found when their turn came, after the runs before them (a helper's trial)
        ["simulate", "--migration-alphas", "x"],
        ["simulate", "--migration-slots", "0"],
        ["simulate", "--migration-loads", "0.3,0"],
        ["policy", "--policies", "dlora,dlora-typo"],
        ["simulate", "--policies", ","],
    ],
)
def test_a_number_no_benchmark_runs_with_is_a_usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """A user's trial: each of these ended in a traceback (or, for e2e --rates -1, ran, reported
    every rate sustained at 0 and rewrote its BENCHMARKS section)."""
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["bench", *argv])
    assert e.value.code == 2 and argv[1] in capsys.readouterr().err


def test_the_defaults_and_what_may_be_zero_still_parse() -> None:
    p = build_parser()
    assert p.parse_args(["bench", "features", "--adapters", "0", "--think-s", "0"]).adapters == 0  # 0: the base
    args = p.parse_args(["bench", "engine", "--batch-sizes", "1, 32", "--steps", "3"])
    assert (args.batch_sizes, args.steps) == ("1, 32", 3)  # lists stay text for the benchmark to split
    for name in ("engine", "kernels", "policy", "e2e", "cluster", "simulate", "migration", "control-plane"):
        assert p.parse_args(["bench", name]).func is not None


def test_validate_without_its_measured_file_says_which(capsys: pytest.CaptureFixture[str]) -> None:
    from dlora.services.cli import main

    assert main(["bench", "simulate", "--experiment", "validate", "--measured", "/nonexistent.json"]) == 2
    assert "--measured /nonexistent.json: no such file" in capsys.readouterr().err


def test_an_engine_bench_on_a_device_this_machine_lacks_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """A user's trial: --device cuda:3 ended in a traceback after the model was made."""
    import torch

    from dlora.services.cli import main

    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last (none here: cuda:0)
    assert main(["bench", "engine", "--device", missing, "--preset", "tiny"]) == 2
    assert f"device '{missing}'" in capsys.readouterr().err


def test_keys_takes_its_config_before_or_after_the_command() -> None:
    """An operator's trial: `dlora keys list --config dlora.toml` was an argparse error, though
    `dlora up --config` takes it there."""
    p = build_parser()
    assert p.parse_args(["keys", "--config", "a.toml", "list"]).config == "a.toml"
    assert p.parse_args(["keys", "list", "--config", "b.toml"]).config == "b.toml"
    assert p.parse_args(["keys", "revoke", "k1", "--config", "c.toml"]).config == "c.toml"
    assert p.parse_args(["keys", "list"]).config is None


@pytest.mark.parametrize("bench", ["engine", "kernels", "features", "policy", "e2e", "migration", "cluster"])
def test_an_output_path_it_cannot_write_is_said_before_the_run(
    bench: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found after minutes of work, as a traceback that lost the results (a helper's trial)."""
    from dlora.services.cli import main

    assert main(["bench", bench, "--json", str(tmp_path)]) == 2
    assert f"--json {tmp_path} is a directory" in capsys.readouterr().err
    if bench in ("engine", "features", "policy", "e2e", "cluster"):
        (file := tmp_path / "file").write_text("")
        assert main(["bench", bench, "--workdir", str(file)]) == 2
        assert "is a file, not a folder" in capsys.readouterr().err


def test_simulate_without_profiles_is_refused_before_it_runs(capsys: pytest.CaptureFixture[str]) -> None:
    from dlora.services.cli import main

    assert main(["bench", "simulate", "--profiles", ","]) == 2
    assert "--profiles: none given" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["--chunk-budget", "32"], "--chunk-budget: max_num_batched_tokens=32"),
        (["--preset", "tiny"], "--long-prompt 1500"),
    ],
)
def test_features_settings_the_engine_refuses_are_said_before_any_run(
    argv: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Found after the multi-turn half had run (a helper's trial)."""
    from dlora.services.cli import main

    assert main(["bench", "features", *argv]) == 2
    assert said in capsys.readouterr().err


def test_policy_takes_a_rate_or_a_load_not_both(capsys: pytest.CaptureFixture[str]) -> None:
    """--rate overrode --load without a word (a helper's trial)."""
    from dlora.services.cli import main

    assert main(["bench", "policy", "--rate", "2", "--load", "0.5"]) == 2
    assert "give --rate or --load, not both" in capsys.readouterr().err
