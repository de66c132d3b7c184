"""The segmented torch LoRA op equals a per-token dense reference."""

from __future__ import annotations

import pytest
import torch

from dlora.kernels.lora import LoraProjection, LoraSegments, LoraSlice, add_lora_torch


def test_segments_from_token_slots() -> None:
    assert LoraSegments.from_token_slots([3, 3, -1, 0, 0, 0]).segments == [(3, 0, 2), (0, 3, 6)]
    assert LoraSegments.from_token_slots([-1, -1]) is None  # no token uses LoRA
    assert LoraSegments.from_token_slots([1, 2, 1]).segments == [(1, 0, 1), (2, 1, 2), (1, 2, 3)]
    assert LoraSegments.from_token_slots([]) is None


@pytest.mark.parametrize("token_slots", [[0, 0, 1, 1, 1, -1, 2], [-1, -1, -1], [2] * 7, [0, 1, 2, 0, 1, 2, -1]])
def test_matches_per_token_reference(token_slots: list[int]) -> None:
    torch.manual_seed(0)
    k, ranks = 24, [4, 8, 16]
    # Two slices of one fused output (like q and v inside qkv); slot 1 does not target the second.
    slices = [LoraSlice(0, 10), LoraSlice(14, 6)]
    for sl in slices:
        for slot, r in enumerate(ranks):
            skip = sl.offset == 14 and slot == 1
            sl.a.append(None if skip else torch.randn(r, k))
            sl.b.append(None if skip else torch.randn(sl.size, r))
            sl.scale.append(0.5 + slot)
    x = torch.randn(len(token_slots), k)
    base = torch.randn(len(token_slots), 20)
    out = base.clone()
    segments = LoraSegments.from_token_slots(token_slots)
    if segments is not None:
        add_lora_torch(out, x, LoraProjection(slices), segments)
    expected = base.clone()
    for t, slot in enumerate(token_slots):
        for sl in slices:
            if slot >= 0 and sl.a[slot] is not None:
                delta = sl.scale[slot] * (sl.b[slot] @ sl.a[slot] @ x[t])
                expected[t, sl.offset : sl.offset + sl.size] += delta
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    untouched = [t for t, s in enumerate(token_slots) if s < 0]
    assert torch.equal(out[untouched], base[untouched])


def test_negative_segments_from_minus_slots() -> None:
    meta = LoraSegments.from_token_slots([-1, -1, -1, 0, 0], minus_slots=[-1, 2, 2, 2, 2])
    assert (meta.segments, meta.negative) == ([(0, 3, 5)], [(2, 1, 5)])
    assert LoraSegments.from_token_slots([-1], minus_slots=[1]).negative == [(1, 0, 1)]  # a base token


def test_a_mixed_step_gives_each_token_its_own_adapter_over_merged_weights() -> None:
    """y = x·W' + s_i·(x·A_i)·B_i − s_m·(x·A_m)·B_m with W' = W + s_m·B_m·A_m equals x·W plus the
    token's own delta: adapter m's tokens (no LoRA), another adapter's, and the base model's."""
    torch.manual_seed(1)
    k, n, ranks, scales = 32, 12, [8, 4], [0.5, 2.0]
    w = torch.randn(n, k, dtype=torch.float64)
    sl = LoraSlice(0, n)
    for r, s in zip(ranks, scales):
        sl.a.append(torch.randn(r, k, dtype=torch.float64))
        sl.b.append(torch.randn(n, r, dtype=torch.float64))
        sl.scale.append(s)
    m = 0  # slot 0's adapter is merged
    merged = w + scales[m] * sl.b[m] @ sl.a[m]
    own = [0, 1, -1]  # tokens of m, of slot 1's adapter, of the base model
    x = torch.randn(len(own), k, dtype=torch.float64)
    out = x @ merged.t()
    token_slots = [-1 if s == m else s for s in own]
    minus_slots = [-1 if s == m else m for s in own]
    add_lora_torch(out, x, LoraProjection([sl]), LoraSegments.from_token_slots(token_slots, None, minus_slots))
    expected = x @ w.t()
    for t, s in enumerate(own):
        if s >= 0:
            expected[t] += scales[s] * (sl.b[s] @ sl.a[s] @ x[t])
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)
