"""make gpu-check's plan: its parts fit the 8 minutes the GPU issue allows (a lent device has 15,
its start included), and without a GPU it refuses with exit 2 and a reason."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dlora.loadgen import gpu_check


def test_the_parts_time_bounds_sum_to_eight_minutes_at_most() -> None:
    parts = gpu_check.parts(Path("out"), "BENCHMARKS.md")
    assert sum(limit for *_, limit in parts) <= 480
    assert parts[0][0] == "tune-lora"  # first: every later part runs on its tiles


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for a machine without a GPU")
def test_without_a_gpu_it_refuses_with_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert gpu_check.main(["--out", "/nonexistent"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_every_part_is_a_command_this_tree_accepts() -> None:
    """A GPU session is too short to find a misspelt option or a moved test file: each benchmark
    part parses with the real command line, and each test part names files that exist."""
    from dlora.services.cli import build_parser

    root = Path(__file__).resolve().parents[2]
    for name, command, _, _ in gpu_check.parts(Path("out"), "BENCHMARKS.md"):
        module = command[command.index("-m") + 1]
        args = command[command.index("-m") + 2 :]
        if module == "dlora.services.cli":
            assert build_parser().parse_args(args).func is not None, name
        else:
            assert module == "pytest", name
            paths = [a for a in args if a.startswith("tests/")]
            assert paths and all((root / p).exists() for p in paths), (name, paths)


def test_the_bundle_holds_what_a_run_made_or_rewrote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A device machine hands back a few files, not folders: one archive carries them all."""
    import tarfile

    monkeypatch.chdir(tmp_path)
    for name in (
        "out/engine.json",
        "out/kernel-tests.log",
        "BENCHMARKS.md",
        "docs/bench-engine.png",
        "dlora_kernels/tuned/x.json",
    ):
        Path(name).parent.mkdir(parents=True, exist_ok=True)
        Path(name).write_text(name)
    Path("docs/dashboard.png").write_text("not the run's")
    gpu_check.bundle(tmp_path / "back/gpu-check.tgz", Path("out"), Path("BENCHMARKS.md"))
    with tarfile.open(tmp_path / "back/gpu-check.tgz") as tar:
        files = {m.name for m in tar.getmembers() if m.isfile()}
    assert files == {
        "out/engine.json",
        "out/kernel-tests.log",
        "BENCHMARKS.md",
        "docs/bench-engine.png",
        "dlora_kernels/tuned/x.json",
    }


def test_a_run_split_into_parts_names_only_known_ones(capsys: pytest.CaptureFixture[str]) -> None:
    """A lent machine may not last (the first one stopped answering mid-run): the run is split into
    calls with --only, and a misspelt part is refused before any GPU time is spent."""
    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--only", "bench-engine,bench-engin"])
    assert e.value.code == 2 and "unknown part(s) bench-engin" in capsys.readouterr().err


def test_a_split_run_keeps_the_parts_an_earlier_call_recorded_on_the_same_gpu(tmp_path: Path) -> None:
    import json

    path = tmp_path / "gpu-check.json"
    assert gpu_check.earlier_parts(path, "H100") == {}  # none yet
    path.write_text(json.dumps({"gpu": "H100", "parts": {"bench-engine": {"rc": 0, "seconds": 80.0}}}))
    assert gpu_check.earlier_parts(path, "H100") == {"bench-engine": {"rc": 0, "seconds": 80.0}}
    assert gpu_check.earlier_parts(path, "H200") == {}  # another GPU's figures are not this run's
