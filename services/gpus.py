"""The GPUs ``dlora up`` spreads its workers over, asking no torch (the launcher stays light)."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping


def visible_gpus(env: Mapping[str, str]) -> list[str]:
    """The GPUs this host offers, as CUDA_VISIBLE_DEVICES names them: its value when set, else one
    index per GPU ``nvidia-smi -L`` lists; empty without GPUs. Asks no torch (the launcher stays light)."""
    if "CUDA_VISIBLE_DEVICES" in env:
        return [g.strip() for g in env["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(line for line in listed.splitlines() if line.startswith("GPU "))]


def gpu_of_worker(index: int, gpus: list[str]) -> dict[str, str]:
    """The environment that gives worker ``index`` its own GPU (round robin when there are more
    workers than GPUs), so each worker's ``auto`` device is a different one; nothing without GPUs."""
    return {"CUDA_VISIBLE_DEVICES": gpus[index % len(gpus)]} if gpus else {}
