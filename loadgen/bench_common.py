"""Pieces every benchmark shares: the machine's description and the benchmark model."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from dlora.model.make_tiny import make_tiny


def machine(device: torch.device | None = None) -> str:
    """The machine a figure was measured on: the GPU's name when ``device`` is one, else the CPU."""
    if device is not None and device.type == "cuda":
        return (
            f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
            f"{os.cpu_count()} CPU cores"
        )
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def ensure_model(workdir: Path, preset: str, num_adapters: int, ranks: list[int]) -> Path:
    """A benchmark model with adapters, made once under ``workdir`` and reused."""
    root = workdir / f"{preset}-{num_adapters}-r{'-'.join(map(str, ranks))}"
    if not (root / "adapters" / f"lora-{num_adapters - 1}" / "adapter_config.json").exists():
        make_tiny(root, preset=preset, num_adapters=num_adapters, ranks=ranks, seed=0)
    return root


def write_section(benchmarks: Path, key: str, title: str, body: str) -> None:
    """Replace the generated part of one benchmark's section in BENCHMARKS.md (between its
    markers), or append the section. Text outside the markers (the reading of the figures) stays."""
    begin, end = f"<!-- bench-{key}:begin -->", f"<!-- bench-{key}:end -->"
    block = f"{begin}\n{body.strip()}\n{end}"
    text = benchmarks.read_text() if benchmarks.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + f"\n\n## {title}\n\n{block}\n"
    benchmarks.write_text(text)


def today() -> str:
    import datetime

    return datetime.date.today().isoformat()


def save(result: dict, json_path: str | None, benchmarks: str, key: str, title: str, body: str) -> None:
    """A benchmark's outputs: the JSON (if asked) and its section of BENCHMARKS.md."""
    import json

    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    write_section(Path(benchmarks), key, title, body)
