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
