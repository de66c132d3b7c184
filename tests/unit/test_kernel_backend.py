"""The engine's kernel path is chosen once, by name and device."""

from __future__ import annotations

import pytest
import torch

from dlora.kernels.backend import TORCH, select_kernels


def test_auto_is_torch_on_cpu_and_names_are_checked() -> None:
    assert select_kernels("auto", torch.device("cpu")) is TORCH
    assert select_kernels("torch", torch.device("cpu")) is TORCH
    with pytest.raises(ValueError, match="expected one of auto, torch, triton"):
        select_kernels("cuda-graphs", torch.device("cpu"))


def test_triton_on_cpu_runs_under_the_interpreter() -> None:
    # The test session sets TRITON_INTERPRET=1 where there is no GPU.
    kernels = select_kernels("triton", torch.device("cpu"))
    assert kernels.name == "triton" and kernels.lora_tables
