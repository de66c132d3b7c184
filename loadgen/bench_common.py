"""Pieces every benchmark shares: the machine's description and the benchmark model."""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dlora.model.make_tiny import make_tiny

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

Plot = Callable[[dict], "Figure"]


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
    """A benchmark model with adapters, made once under ``workdir`` and reused, also one made with
    more adapters (``make_tiny`` draws each adapter from its own index's seed, so the first ones
    are the same): at 7B widths making one takes a GPU check's seconds and gigabytes."""
    ranked = f"-r{'-'.join(map(str, ranks))}"

    def complete(root: Path, n: int) -> bool:
        return (root / "adapters" / f"lora-{n - 1}" / "adapter_config.json").exists()

    for root in workdir.glob(f"{preset}-*{ranked}") if workdir.is_dir() else ():
        n = root.name[len(preset) + 1 : -len(ranked)]
        if n.isdigit() and int(n) >= num_adapters and complete(root, int(n)):
            return root
    root = workdir / f"{preset}-{num_adapters}{ranked}"
    if not complete(root, num_adapters):
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


def figure(ncols: int = 1) -> tuple[Figure, list[Axes]]:
    """A figure of ``ncols`` axes side by side, drawn off-screen (Agg)."""
    # matplotlib is imported here, not at the top: most of dlora never draws, and its import is slow.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # 9 x 3.5 in at 80 dpi keeps each PNG at ~30-60 KB: they are committed beside BENCHMARKS.md.
    fig, axes = plt.subplots(1, ncols, figsize=(9, 3.5), dpi=80, squeeze=False)
    return fig, list(axes[0])


def grouped_bars(ax: Axes, groups: list[str], series: dict[str, list[float]]) -> None:
    """Bars side by side: one cluster per group, one bar (and legend entry) per series."""
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        ax.bar([g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))], values, width, label=name)
    ax.set_xticks(range(len(groups)), groups, fontsize=8)
    ax.legend(fontsize=7)


def embed_plot(body: str, result: dict, plot: Plot, benchmarks: Path, key: str, docs: Path | None = None) -> str:
    """Draw ``plot(result)`` to ``docs/bench-<key>.png`` beside BENCHMARKS.md; ``body`` ending with its image."""
    import matplotlib.pyplot as plt

    docs = benchmarks.parent / "docs" if docs is None else docs
    docs.mkdir(parents=True, exist_ok=True)
    png = docs / f"bench-{key}.png"
    fig = plot(result)
    try:
        fig.tight_layout()
        fig.savefig(png)
    finally:
        plt.close(fig)
    # The link is read from BENCHMARKS.md's folder, whatever the working directory was.
    image = f"![{key}]({Path(os.path.relpath(png, benchmarks.parent)).as_posix()})"
    body = body.rstrip()
    return body if body.endswith(image) else f"{body}\n\n{image}"


def writable(path: str | Path, option: str) -> None:
    """Raises OSError now, not after a run of minutes, when ``path`` (given as ``option``) cannot
    be written: a directory, a parent that is a file or cannot be made, a place that takes no new
    file. A new file is tried for real (permissions say nothing of /proc, or of a read-only mount
    to root): the folders made as the run would, the file made and removed again; one that exists
    (a FIFO too, which an open would wait on) is asked of its permissions. A link is followed: its
    target is what the run writes."""
    target = Path(path).resolve() if Path(path).is_symlink() else Path(path)
    if target.is_dir():
        raise IsADirectoryError(f"{option} {path} is a directory")
    if (file := next((p for p in target.parents if p.exists() and not p.is_dir()), None)) is not None:
        raise NotADirectoryError(f"{option} {path}: {file} is a file, not a folder")
    if target.exists():
        if not os.access(target, os.W_OK):
            raise PermissionError(f"{option} {path} cannot be written")
        return
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.open("x").close()
    except OSError as e:
        raise OSError(f"{option} {path} cannot be written ({e.strerror or e})") from None
    target.unlink()


def save(
    result: dict,
    json_path: str | None,
    benchmarks: str | Path,
    key: str,
    title: str,
    body: str,
    *,
    plot: Plot | None = None,
    docs: Path | None = None,
) -> None:
    """A benchmark's outputs: the JSON (if asked), its plot (if given) and its section of BENCHMARKS.md."""
    import json

    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    if plot is not None:
        body = embed_plot(body, result, plot, Path(benchmarks), key, docs)
    write_section(Path(benchmarks), key, title, body)
