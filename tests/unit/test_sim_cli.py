"""`dlora simulate` end to end: options in, the summary out and as JSON."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dlora.sim.main import run_simulate
from dlora.sim.options import add_arguments


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


def test_a_workload_through_the_simulated_cluster(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sim.json"
    argv = ["--requests", "120", "--rate", "30", "--replicas", "3", "--adapters", "6", "--popularity", "zipf"]
    argv += ["--dispatch", "round-robin", "--migrate", "--ranks", "8,16,32", "--json", str(out)]
    argv += ["--max-num-seqs", "16"]
    assert run_simulate(_args(*argv)) == 0
    result = json.loads(out.read_text())
    assert result["completed"] == result["requests"] == 120 and result["replicas"] == 3
    assert result["profile"] == "dlora-artifact" and result["dispatch"] == "round-robin" and result["migrate"]
    assert result["solves"] >= result["plans"] and result["solve_s_max"] >= result["solve_s_mean"] >= 0
    assert sum(result["steps_by_mode"].values()) > 0 and set(result["steps_by_mode"]) <= {"merged", "unmerged", "mixed"}
    assert result["norm_latency_mean_s"] >= 0.015  # no step is faster than the artifact's 15 ms
    assert "norm_latency_mean_s" in capsys.readouterr().out


def test_an_unknown_profile_is_refused_with_the_choices(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_simulate(_args("--profile", "a100")) == 2
    assert "dlora-artifact" in capsys.readouterr().err


def test_a_calibration_file_of_another_kind_says_which_kinds_it_takes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A loadgen result.json printed only "dlora simulate: 'bound'"."""
    (tmp_path / "result.json").write_text(json.dumps({"rows": [], "spec": {}}))
    (tmp_path / "broken.json").write_text("{")
    (tmp_path / "policy.json").write_text(json.dumps({"rows": [{"stride": 8, "runs": [{"finished": 1}]}]}))
    # a user's trial: these printed Python's own words inside "(no ... where those have it)"
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "typed.json").write_text(json.dumps({"bound": "x"}))
    kinds = "is not the JSON of `dlora bench engine`, `bench cluster`, `bench policy` or `bench e2e`"
    for name, why in (
        ("result.json", kinds),
        ("broken.json", "is not JSON"),
        ("policy.json", "policy.json: its runs logged no steps"),  # a bench policy run from before they were
        ("list.json", f"{kinds} (its fields are not of the types those have)"),
        ("typed.json", f"{kinds} (its fields are not of the types those have)"),
        ("missing.json", "missing.json (No such file or directory)"),
        ("", "calibrated: needs the path of a benchmark's JSON"),
    ):
        assert run_simulate(_args("--profile", f"calibrated:{tmp_path / name if name else ''}")) == 2
        err = capsys.readouterr().err
        assert why in err and "Errno" not in err, (name, err)


def test_more_device_slots_than_host_memory_takes_are_refused_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    """--max-loras 257 was refused as "--max-cpu-loras 256 must be in [max_loras (257), 4096]", an
    option simulate does not have: host memory now holds as many as the slots, up to its bound."""
    assert run_simulate(_args("--max-loras", "5000", "--requests", "5")) == 2
    assert "--max-loras 5000" in capsys.readouterr().err
    assert run_simulate(_args("--max-loras", "8", "--max-cpu-loras", "4", "--requests", "5")) == 2
    assert "--max-cpu-loras 4: must be in [max_loras (8), 4096]" in capsys.readouterr().err


def test_a_bounded_host_memory_reads_adapters_from_disk(tmp_path: Path) -> None:
    """``--max-cpu-loras``: the disk tier, its reads in the result and the option in its record;
    without it nothing is read."""
    out = tmp_path / "sim.json"
    # 60 requests: 17 reads of the 12 adapters (200 took 3 times as long for 21)
    argv = ["--requests", "60", "--rate", "20", "--replicas", "2", "--adapters", "12", "--max-loras", "2"]
    for host in ("2", None):
        assert run_simulate(_args(*argv, *(("--max-cpu-loras", host) if host else ()), "--json", str(out))) == 0
        result = json.loads(out.read_text())
        assert result["completed"] == 60 and result["options"]["max_cpu_loras"] == (int(host) if host else None)
        assert (result["disk_loads"] > 12) if host else result["disk_loads"] == 0  # read again after evictions
    assert run_simulate(_args("--max-loras", "300", "--requests", "5", "--adapters", "300")) == 0


@pytest.mark.parametrize(
    ("argv", "why"),
    [
        (["--stats-interval", "6"], "--stats-interval must be under the dispatcher's heartbeat, 5 s"),
        (["--rate", "0.001", "--duration", "1"], "the workload holds no request"),
        (["--lengths", "uniform", "--max-prompt", "256"], "--max-prompt applies to --lengths trace only, not uniform"),
        (["--migrate-interval", "2"], "--migrate-interval applies with --migrate only"),  # a user's trial: ignored
        (
            ["--lengths", "trace", "--prompt-len", "64"],
            "--prompt-len applies to --lengths fixed, uniform or random only",
        ),
        (["--lengths", "fixed", "--prompt-len", "5000"], "a prompt has 5000 tokens; the simulated model's context"),
        (["--popularity", "power", "--alpha", "0"], "alpha must be > 0"),
        (["--popularity", "zipf", "--alpha", "-1"], "alpha must be >= 0"),
        (["--trace", "/nowhere.csv"], "/nowhere.csv"),
    ],
)
def test_a_workload_that_cannot_run_is_refused_before_it_starts(
    argv: list[str], why: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A user's trial: each of these was a traceback (exit 1), some after minutes of running (the
    JSON lost), or did nothing silently (--max-prompt with uniform lengths)."""
    assert run_simulate(_args(*argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("dlora simulate: ") and why in err, err


@pytest.mark.parametrize(
    "where,says",
    [
        ("", "is a directory"),
        ("file/x.json", "file is a file, not a folder"),  # was "[Errno 17] File exists: 'file'"
        ("/proc/x.json", "cannot be written"),  # passed os.access as root; a traceback after the run
    ],
)
def test_an_unwritable_json_is_refused_before_the_run(
    where: str, says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("")
    assert run_simulate(_args("--requests", "5", "--json", str(tmp_path / where))) == 2
    assert says in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == ""


def test_the_write_check_leaves_a_link_and_an_existing_file_as_they_were(tmp_path: Path) -> None:
    """A review: the check made a link's missing target, then removed the link."""
    from dlora.loadgen.bench_common import writable

    (tmp_path / "link.json").symlink_to(tmp_path / "real" / "target.json")
    writable(tmp_path / "link.json", "--json")
    assert (tmp_path / "link.json").is_symlink() and not (tmp_path / "real" / "target.json").exists()
    (tmp_path / "kept.md").write_text("kept")
    writable(tmp_path / "kept.md", "--benchmarks")
    assert (tmp_path / "kept.md").read_text() == "kept"


def test_requests_arriving_after_the_duration_are_not_sent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--duration was ignored: 100 requests over 60 s simulated with --duration 0.001, the JSON
    saying 0.001. As `dlora loadgen`, sending stops at the duration from the first arrival, and
    says so (a trace replay cut by the default 60 s did not)."""
    out = tmp_path / "sim.json"
    assert run_simulate(_args("--requests", "100", "--rate", "10", "--duration", "2", "--json", str(out))) == 0
    result = json.loads(out.read_text())
    assert 5 <= result["requests"] <= 40 and result["options"]["max_loras"] == 8, result
    unsent = 100 - result["requests"]
    assert f"--duration 2 s ended sending: {unsent} of 100 requests not sent" in capsys.readouterr().err
    assert run_simulate(_args("--requests", "10", "--rate", "10")) == 0
    assert "ended sending" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["simulate", "--replicas", "0"],
        ["simulate", "--ranks", "8,x"],
        ["simulate", "--max-num-seqs", "0"],
        ["simulate", "--max-loras", "-1"],
        ["simulate", "--stats-interval", "0"],  # these three hung for good
        ["simulate", "--stats-interval", "nan"],
        ["simulate", "--migrate-interval", "-1"],
        ["simulate", "--migrate-interval", "inf"],  # turned migration off silently
        ["simulate", "--seed", "-1"],
        ["model", "make-tiny", "--out", "x", "--ranks", "abc"],
        ["model", "make-tiny", "--out", "x", "--ranks", "0"],
        ["model", "make-tiny", "--out", "x", "--ranks", "8,,16"],  # the empty item was dropped
        ["model", "make-tiny", "--out", "x", "--adapters", "-1"],  # wrote "0 adapters"
        ["loadgen", "--adapters", "0"],  # these were ZeroDivisionErrors and a numpy message
        ["loadgen", "--length-divide", "0"],
        ["loadgen", "--requests", "-3"],
        ["loadgen", "--duration", "-1"],
        ["loadgen", "--slo-ttft", "-1"],
        ["loadgen", "--target", "ftp://x"],
    ],
)
def test_bad_numbers_are_a_usage_error_not_a_traceback(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from dlora.services.cli import build_parser

    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(argv)
    assert exited.value.code == 2 and "error: argument" in capsys.readouterr().err


def test_the_command_line_parser_does_not_load_torch() -> None:
    """Every ``dlora`` command builds the whole parser; a service (dispatcher, migrator, gateway)
    must not load torch for ``simulate``'s options (it took a dispatcher from 63 to 280 MB)."""
    code = "import sys; from dlora.services.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize(
    "argv, says",
    [
        (["up"], "start the whole stack on this machine"),
        (["serve"], "run one service"),
        (["bench", "engine"], "decode throughput"),
        (["model", "make-tiny"], "write a random Llama-family model"),
    ],
)
def test_each_command_help_says_what_it_does(argv: list[str], says: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`dlora up --help` gave its options alone: what it does was in `dlora --help`'s list only."""
    from dlora.services.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--help"])
    _, _, rest = capsys.readouterr().out.partition("\n\n")
    assert rest.startswith(says), rest[:200]


@pytest.mark.parametrize(
    "argv,says",
    [
        (["--ranks", "1024"], "above max_lora_rank=512"),  # written, then refused by every engine
        (["--out", "{file}/x"], "Not a directory"),  # these two were tracebacks
        (["--out", "{file}"], "Not a directory"),
    ],
)
def test_make_tiny_refuses_what_it_cannot_write_in_a_line(
    argv: list[str], says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dlora.services.cli import main

    (tmp_path / "file").write_text("")
    argv = [a.format(file=tmp_path / "file") for a in argv]
    out = [] if "--out" in argv else ["--out", str(tmp_path / "m")]
    assert main(["model", "make-tiny", *out, *argv]) == 2
    assert says in capsys.readouterr().err and not (tmp_path / "m").exists()


@pytest.mark.parametrize("option", [["--max-retries", "2"], ["--api-key", "sk-abc"]])
def test_loadgen_refuses_http_options_a_nats_target_never_uses(
    option: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A trial: --max-retries 2 with a NATS target was taken without a word (its retries are of
    HTTP 429 and 503 answers); so was --api-key (a NATS server takes the URL's user and password),
    which a user took for the run's credentials. Refused before anything connects."""
    from dlora.loadgen.main import run_loadgen
    from dlora.services.cli import build_parser

    argv = ["loadgen", "--target", "nats://127.0.0.1:1", *option, "--out", str(tmp_path / "out")]
    assert run_loadgen(build_parser().parse_args(argv)) == 2
    assert option[0] in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv", [["--stats-interval", "1e-9"], ["--migrate", "--migrate-interval", "1e-16"]])
def test_an_interval_simulated_time_cannot_move_by_is_refused(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """At 1e-9 s a run of 5 requests did not end; at 1e-16 simulated time stood still (a helper's trial)."""
    assert run_simulate(_args("--requests", "5", *argv)) == 2
    assert f"{argv[-2]} {float(argv[-1]):g}: at least 0.001 s" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["--max-num-seqs", "3000"], "--max-num-seqs 3000: must be at most the step's token budget"),
        (["--ranks", "8,600"], "--ranks 600: above max_lora_rank 512"),
    ],
)
def test_limits_are_said_by_the_options_the_simulator_has(
    argv: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """It named --max-num-batched-tokens, which it has not, and simulated rank 600 the engine refuses."""
    assert run_simulate(_args("--requests", "5", *argv)) == 2
    assert said in capsys.readouterr().err


def test_the_simulators_p90_is_the_measured_runs_and_takes_one_value() -> None:
    """Its rank was one high (the maximum at ten requests), the measured side's is numpy's
    interpolated percentile; and bench cluster --requests 1 crashed on one value (a review)."""
    import numpy as np

    from dlora.sim.cluster import p90

    values = [float(i) for i in range(1, 11)]
    assert p90(values) == pytest.approx(float(np.percentile(values, 90))) == pytest.approx(9.1)
    assert p90([3.0]) == 3.0
