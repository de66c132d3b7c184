"""Unmerged LoRA: add s · (x·A)·B to a projection's output, per token, for the adapters in a batch.

The shrink (x·A, down to the adapter's rank) and expand (·B, back up, scaled) pair runs per
segment: tokens are grouped by the scheduler into contiguous runs of one adapter slot, so each
segment is two small dense matmuls (SGMV-style). This torch version is the CPU path and the
reference the Triton kernels (``lora_triton.py``) are tested against.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch


def _runs(token_slots: list[int]) -> list[tuple[int, int, int]]:
    """(slot, start, end) for each maximal run of equal slots >= 0."""
    runs: list[tuple[int, int, int]] = []
    start = 0
    for t in range(1, len(token_slots) + 1):
        if t == len(token_slots) or token_slots[t] != token_slots[start]:
            if token_slots[start] >= 0:
                runs.append((token_slots[start], start, t))
            start = t
    return runs


@dataclass
class LoraSegments:
    """Per-step metadata, built once and shared by every layer.

    Example: slots per token [3, 3, -1, 0, 0, 0] gives segments [(3, 0, 2), (0, 3, 6)]; the
    token with slot -1 runs the base model only. ``negative`` segments subtract their slot's
    delta: a mixed step's correction for the adapter merged into the weights, on every token
    that is not that adapter's (y = x·W' + s_i·(x·A_i)·B_i − s_m·(x·A_m)·B_m).
    """

    segments: list[tuple[int, int, int]]  # (slot, start, end): tokens [start, end) use slot >= 0
    negative: list[tuple[int, int, int]] = field(default_factory=list)  # (slot, start, end): subtracted

    @classmethod
    def from_token_slots(
        cls, token_slots: list[int], device: torch.device | None = None, minus_slots: list[int] | None = None
    ) -> LoraSegments | None:
        """The segments of ``token_slots`` (added) and ``minus_slots`` (subtracted; per token, -1
        for none), or None when no token uses LoRA (``device`` is unused: the torch path keeps
        its metadata on the host)."""
        segments, negative = _runs(token_slots), _runs(minus_slots or [])
        return cls(segments, negative) if segments or negative else None


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


@dataclass
class LoraTables:
    """One fused projection's slot weights as the Triton kernels read them: an address per
    (slice, slot), so every adapter stays at its own rank in memory (no padding to the largest).
    The addresses are only valid while the tensors in the slices live: rebuild after any change."""

    a_ptrs: torch.Tensor  # (n_slices, num_slots) int64: address of A (rank, in_features), contiguous; 0: none
    b_ptrs: torch.Tensor  # (n_slices, num_slots) int64: address of B (size, rank), contiguous; 0: none
    ranks: torch.Tensor  # (n_slices, num_slots) int32: the slot's rank for the slice; 0 where it has none
    scales: torch.Tensor  # (n_slices, num_slots) float32
    offsets: torch.Tensor  # (n_slices,) int32: first output column of each slice
    sizes: torch.Tensor  # (n_slices,) int32: output columns of each slice
    max_rank: int  # over every slice and slot (0: no adapter loaded)
    max_size: int  # the widest slice
    out_features: int  # columns the slices reach (offset + size of the last)
    in_features: int  # A's width (0: no adapter loaded)
    dtype: torch.dtype | None  # of every A and B (None: no adapter loaded)

    @classmethod
    def build(cls, slices: list[LoraSlice], device: torch.device) -> LoraTables:
        a_ptrs = [[0 if a is None else a.data_ptr() for a in sl.a] for sl in slices]
        b_ptrs = [[0 if b is None else b.data_ptr() for b in sl.b] for sl in slices]
        ranks = [[0 if a is None else a.shape[0] for a in sl.a] for sl in slices]
        loaded = [(a, b, sl.size) for sl in slices for a, b in zip(sl.a, sl.b) if a is not None]
        # The kernels trust these addresses: whatever they point at must be what the tables say.
        assert len({(a.dtype, a.shape[1], a.device) for a, _, _ in loaded}) <= 1, "one dtype, width and device"
        for a, b, size in loaded:
            assert a.is_contiguous() and b.is_contiguous(), "slot weights must be contiguous"
            assert b.dtype == a.dtype and b.shape == (size, a.shape[0]), f"B {tuple(b.shape)} does not fit A"
        return cls(
            a_ptrs=torch.tensor(a_ptrs, dtype=torch.int64, device=device),
            b_ptrs=torch.tensor(b_ptrs, dtype=torch.int64, device=device),
            ranks=torch.tensor(ranks, dtype=torch.int32, device=device),
            scales=torch.tensor([sl.scale for sl in slices], dtype=torch.float32, device=device),
            offsets=torch.tensor([sl.offset for sl in slices], dtype=torch.int32, device=device),
            sizes=torch.tensor([sl.size for sl in slices], dtype=torch.int32, device=device),
            max_rank=max((r for row in ranks for r in row), default=0),
            max_size=max(sl.size for sl in slices),
            out_features=max(sl.offset + sl.size for sl in slices),
            in_features=loaded[0][0].shape[1] if loaded else 0,
            dtype=loaded[0][0].dtype if loaded else None,
        )


@dataclass
class LoraProjection:
    """Every slot's LoRA weights for one fused projection ('qkv', 'o', 'gate_up', 'down') of one
    layer: the slices (what the torch path reads) and their tables (what the Triton path reads)."""

    slices: list[LoraSlice]
    tables: LoraTables | None = None  # None until ``refresh``
    # The torch path's per-slot weights of every slice at once (``stacked``), made on first use.
    _stacked: dict[int, tuple[torch.Tensor, list[tuple[LoraSlice, int, int, torch.Tensor, float]]] | None] = field(
        default_factory=dict
    )

    def refresh(self, device: torch.device) -> None:
        """Rebuild the tables after slot weights changed, into the tensors already there: a CUDA
        graph captured over them (``engine/graphs.py``) reads them at the addresses it was captured
        with, so the next replay sees the slots as they are now."""
        new = LoraTables.build(self.slices, device)
        old = self.tables
        if old is not None:
            for name in ("a_ptrs", "b_ptrs", "ranks", "scales", "offsets", "sizes"):
                setattr(new, name, getattr(old, name).copy_(getattr(new, name)))
        self.tables = new

    def forget(self) -> None:
        """Drop the stacked weights after slot weights changed."""
        self._stacked.clear()

    def stacked(self, slot: int) -> tuple[torch.Tensor, list[tuple[LoraSlice, int, int, torch.Tensor, float]]] | None:
        """The slot's shrink for every slice at once: A (K, R), the slices' A stacked (R: the slot's
        ranks summed over the slices it targets), and per slice its columns [r0, r1) of the shrunk
        activations, its Bᵀ (rank, size) and its scale. One shrink matmul
        per projection instead of one per slice: on a CPU a small matmul costs more in the call
        than in arithmetic (issue 19, LoRA tax); the expands stay per slice, as one expand against
        a block-diagonal B does the zeros' arithmetic too (measured slower). None: no slice."""
        if slot not in self._stacked:
            parts = [
                (sl, a, b) for sl in self.slices if (a := sl.a[slot]) is not None and (b := sl.b[slot]) is not None
            ]
            if not parts:
                self._stacked[slot] = None
            else:
                # The scale is applied at the expand, as PEFT ((x·A)·B·s) and the Triton path do:
                # folded into A in half precision, x·(s·A) overflowed where x·A·B·s does not.
                a_all = torch.cat([a for _, a, _ in parts]).t().contiguous()
                bounds = list(itertools.accumulate((a.shape[0] for _, a, _ in parts), initial=0))
                expands = [(sl, r0, r1, b.t(), sl.scale[slot]) for (sl, _, b), r0, r1 in zip(parts, bounds, bounds[1:])]
                self._stacked[slot] = (a_all, expands)
        return self._stacked[slot]


def add_lora_torch(out: torch.Tensor, x: torch.Tensor, proj: LoraProjection, meta: LoraSegments) -> None:
    """In place: out[t, slice] += scale[slot] · (x[t] · A[slot]ᵀ) · B[slot]ᵀ for every token t of a
    segment, and -= for every token of a negative segment.

    out (T, N) is the fused projection's output, x (T, K) its input. Tokens outside every segment
    are untouched.
    """
    for segments, sign in ((meta.segments, 1.0), (meta.negative, -1.0)):
        for slot, start, end in segments:
            stacked = proj.stacked(slot)
            if stacked is None:
                continue
            a, expands = stacked
            shrunk = x[start:end] @ a  # (n, R)
            for sl, r0, r1, bt, scale in expands:
                out[start:end, sl.offset : sl.offset + sl.size].addmm_(shrunk[:, r0:r1], bt, alpha=sign * scale)
