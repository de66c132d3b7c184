"""LoRA kernel tiles measured on a GPU and kept under version control, one JSON file per device in
``dlora_kernels/tuned/`` (as vLLM keeps its fused-MoE kernel configs per device name).

``dlora bench tune-lora`` times the shrink and the expand over candidate tiles at the shapes the
engine runs (a fused projection's input width, slices and rank; a decode batch's tokens per group
and groups) and writes the fastest of each. ``LoraBlocks.choose`` asks ``lookup`` first: the entry
of the same projection and rank whose batch is nearest (in powers of two of tokens per group and
of groups); without one, its own rule. Entries never change what a kernel computes, only how it is
tiled, so a table from another Triton version is safe, if perhaps not fastest.
"""

from __future__ import annotations

import functools
import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

TUNED = Path(__file__).parent / "tuned"


@dataclass(frozen=True)
class Shape:
    """What a tile choice depends on: the projection (input features, slices, the widest slice),
    the rank (a power of two, at least 16), and the batch (tokens in the largest group, groups)."""

    in_features: int
    n_slices: int
    max_size: int
    rank: int
    tokens: int
    groups: int

    @property
    def projection(self) -> str:
        return f"K{self.in_features} S{self.n_slices} N{self.max_size} R{self.rank}"

    @property
    def key(self) -> str:
        return f"{self.projection} M{self.tokens} G{self.groups}"

    @classmethod
    def parse(cls, key: str) -> Shape:
        """ValueError for a key ``key`` does not produce."""
        m = re.fullmatch(r"K(\d+) S(\d+) N(\d+) R(\d+) M(\d+) G(\d+)", key)
        if m is None:
            raise ValueError(f"not a tuning key: {key!r}")
        return cls(*(int(g) for g in m.groups()))


def device_file(device_name: str, folder: Path = TUNED) -> Path:
    """The table of a device, by its name as CUDA gives it ("NVIDIA H200" -> nvidia-h200.json)."""
    return folder / (re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-") + ".json")


@functools.cache
def load(path: Path) -> dict[str, dict[str, int]]:
    """Key -> tile fields (``LoraBlocks``' names) from a table file; empty when there is none, or
    when it cannot be read (with a warning: the rule's tiles then serve, slower perhaps, never wrong)."""
    if not path.exists():
        return {}
    try:
        entries: dict[str, dict[str, int]] = json.loads(path.read_text())["entries"]
        for key in entries:
            Shape.parse(key)
    except (OSError, ValueError, KeyError, TypeError) as e:
        warnings.warn(f"{path}: not a LoRA tile table ({e}); the rule's tiles serve", stacklevel=2)
        return {}
    return entries


# How far (powers of two of tokens plus of groups) a tuned batch may be from the one asked about:
# a table tuned at decode says nothing about a 2,048-token prefill.
NEAR = 1.0


def lookup(shape: Shape, entries: dict[str, dict[str, int]]) -> dict[str, int] | None:
    """The tiles of the entry for ``shape``'s projection and rank whose batch is nearest (the sum of
    the distances in powers of two of tokens and of groups, at most NEAR; ties to the larger
    batch); None when the table has none that near."""
    best: tuple[float, int, dict[str, int]] | None = None
    for key, tiles in entries.items():
        other = Shape.parse(key)
        if other.projection != shape.projection:
            continue
        distance = abs(math.log2(other.tokens / shape.tokens)) + abs(math.log2(other.groups / shape.groups))
        if distance > NEAR:
            continue
        rank = (distance, -other.tokens * other.groups, tiles)
        if best is None or rank[:2] < best[:2]:
            best = rank
    return None if best is None else best[2]


@functools.cache
def tuned_tiles(device: torch.device, shape: Shape, folder: Path = TUNED) -> dict[str, int] | None:
    """``lookup`` in the table of ``device`` (CUDA only; None elsewhere or without a table); cached,
    as the engine asks for every projection of every layer."""
    if device.type != "cuda":
        return None
    return lookup(shape, load(device_file(_device_name(device), folder)))


@functools.cache
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


def bucket(n: int) -> int:
    """The power of two at or above ``n`` (at least 1)."""
    return 1 << max(0, math.ceil(math.log2(max(1, n))))
