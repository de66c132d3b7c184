"""Unmerged LoRA: add s · (x·A)·B to a projection's output, per token, for the adapters in a batch.

The shrink (x·A, down to the adapter's rank) and expand (·B, back up, scaled) pair runs per
segment: tokens are grouped by the scheduler into contiguous runs of one adapter slot, so each
segment is two small dense matmuls (SGMV-style). This torch version is the CPU path and the
reference the Triton kernels are tested against.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LoraSegments:
    """Per-step metadata, built once and shared by every layer.

    Example: slots per token [3, 3, -1, 0, 0, 0] gives segments [(3, 0, 2), (0, 3, 6)]; the
    token with slot -1 runs the base model only.
    """

    segments: list[tuple[int, int, int]]  # (slot, start, end): tokens [start, end) use slot >= 0

    @classmethod
    def from_token_slots(cls, token_slots: list[int]) -> LoraSegments:
        segments: list[tuple[int, int, int]] = []
        start = 0
        for t in range(1, len(token_slots) + 1):
            if t == len(token_slots) or token_slots[t] != token_slots[start]:
                if token_slots[start] >= 0:
                    segments.append((token_slots[start], start, t))
                start = t
        return cls(segments)


@dataclass
class LoraSlice:
    """One target projection inside a (possibly fused) output: columns [offset, offset+size).

    Per device slot: A (rank, in_features), B (size, rank) and the scaling, or None where the
    adapter in that slot does not target this projection.
    """

    offset: int
    size: int
    a: list[torch.Tensor | None] = field(default_factory=list)
    b: list[torch.Tensor | None] = field(default_factory=list)
    scale: list[float] = field(default_factory=list)


def add_lora_torch(out: torch.Tensor, x: torch.Tensor, slices: list[LoraSlice], meta: LoraSegments) -> None:
    """In place: out[t, slice] += scale[slot] · (x[t] · A[slot]ᵀ) · B[slot]ᵀ for every token t of a segment.

    out (T, N) is the fused projection's output, x (T, K) its input. Tokens outside every segment
    are untouched.
    """
    for slot, start, end in meta.segments:
        xs = x[start:end]
        for sl in slices:
            a = sl.a[slot]
            if a is None:
                continue
            shrunk = xs @ a.t()  # (n, rank)
            out[start:end, sl.offset : sl.offset + sl.size] += (shrunk @ sl.b[slot].t()) * sl.scale[slot]
