"""Triton LoRA shrink/expand equal the torch reference over batch sizes, ranks, adapter popularity,
prefill and decode, dtypes and fused slices (small shapes under the interpreter; real model sizes
on a GPU)."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from dlora.kernels import lora_triton
from dlora.kernels.lora import LoraProjection, LoraSegments, LoraSlice, add_lora_torch
from dlora.kernels.lora_fused_triton import add_lora_fused
from dlora.kernels.lora_triton import (
    MIN_SHARE,
    LoraBatch,
    LoraBlocks,
    LoraPasses,
    add_lora_passes,
    add_lora_triton,
    lora_shrink,
)
from dlora.kernels.triton_common import interpreting
from tests.kernels.conftest import assert_close, cuda_only, device

NUM_SLOTS = 8
MIXED_RANKS = [8, 16, 32, 64, 8, 16, 32, 64]


def projection(
    k: int,
    sizes: list[int],
    ranks: list[int],
    dtype: torch.dtype,
    skip: set[tuple[int, int]] = frozenset(),
    seed: int = 0,
) -> LoraProjection:
    """A fused projection of ``sizes`` slices; slot s has rank ranks[s] (0: empty slot);
    (slice, slot) pairs in ``skip`` are not targeted by that slot's adapter."""
    g = torch.Generator().manual_seed(seed)
    slices, offset = [], 0
    for j, size in enumerate(sizes):
        sl = LoraSlice(offset, size, [None] * len(ranks), [None] * len(ranks), [0.0] * len(ranks))
        for s, r in enumerate(ranks):
            if r and (j, s) not in skip:
                sl.a[s] = (torch.randn(r, k, generator=g) / k**0.5).to(device(), dtype)
                sl.b[s] = (torch.randn(size, r, generator=g) / r**0.5).to(device(), dtype)
                sl.scale[s] = 0.5 + 0.25 * s
        slices.append(sl)
        offset += size
    proj = LoraProjection(slices)
    proj.refresh(device())
    return proj


def popularity(pattern: str, n: int, rng: random.Random) -> list[int]:
    """Adapter slot of each of n requests."""
    if pattern == "distinct":
        return [i % NUM_SLOTS for i in range(n)]
    if pattern == "uniform":
        return [rng.randrange(NUM_SLOTS) for _ in range(n)]
    if pattern == "zipf":
        return rng.choices(range(NUM_SLOTS), weights=[1 / (s + 1) ** 1.5 for s in range(NUM_SLOTS)], k=n)
    if pattern == "identical":
        return [3] * n
    if pattern == "skewed":  # one hot adapter, a few others, some base-model requests
        return [3 if rng.random() < 0.8 else rng.choice([-1, 0, 5]) for _ in range(n)]
    raise ValueError(pattern)


def check(
    proj: LoraProjection,
    token_slots: list[int],
    dtype: torch.dtype,
    k: int,
    minus_slots: list[int] | None = None,
    **kw,
) -> None:
    n_out = sum(sl.size for sl in proj.slices)
    g = torch.Generator().manual_seed(len(token_slots))
    x = torch.randn(len(token_slots), k, generator=g).to(device(), dtype)
    base = torch.randn(len(token_slots), n_out, generator=g).to(device(), dtype)
    want, got = base.clone(), base.clone()
    segments = LoraSegments.from_token_slots(token_slots, None, minus_slots)
    passes = LoraPasses.from_token_slots(token_slots, device(), minus_slots)
    assert (segments is None) == (passes is None)
    if segments is not None:
        add_lora_torch(want, x, proj, segments)
        add_lora_passes(got, x, proj, passes, **kw)
    assert_close(got, want)
    # Tokens without LoRA are untouched, bit for bit.
    minus = minus_slots or [-1] * len(token_slots)
    plain = torch.tensor([s < 0 and m < 0 for s, m in zip(token_slots, minus)], device=device())
    assert torch.equal(got[plain], base[plain])


def mixed(slots: list[int], merged: int) -> tuple[list[int], list[int]]:
    """A mixed step's (token_slots, minus_slots) for requests on ``slots`` with ``merged``'s adapter
    merged: its own tokens run no LoRA; every other token (the base model's too) subtracts its delta."""
    return [-1 if s == merged else s for s in slots], [-1 if s == merged else merged for s in slots]


def test_batch_groups_tokens_by_slot() -> None:
    b = LoraBatch.from_token_slots([3, 0, 3, -1, 0], torch.device("cpu"))
    assert b.token_index.tolist() == [0, 2, 1, 4]
    assert (b.group_slot.tolist(), b.group_start.tolist(), b.group_len.tolist()) == ([3, 0], [0, 2], [2, 2])
    assert (b.num_groups, b.max_group_len) == (2, 2)
    assert LoraBatch.from_token_slots([-1, -1], torch.device("cpu")) is None
    passes = LoraPasses.from_token_slots([-1, 0, -1], torch.device("cpu"), [-1, 3, 3])
    assert [(p.sign, p.token_index.tolist()) for p in passes.passes] == [(1.0, [1]), (-1.0, [1, 2])]
    assert LoraPasses.from_token_slots([-1, -1], torch.device("cpu"), [-1, -1]) is None


@pytest.mark.parametrize("pattern", ["skewed", "uniform", "identical"])
@pytest.mark.parametrize("batch", [1, 16, 133])
def test_mixed_step_matches_reference(batch: int, pattern: str) -> None:
    """A mixed step: slot 3's adapter merged, every other token (base-model ones too) carries a
    second, subtracted delta, decode-shaped."""
    token_slots, minus_slots = mixed(popularity(pattern, batch, random.Random(batch)), 3)
    check(projection(64, [64, 32, 32], MIXED_RANKS, torch.float32), token_slots, torch.float32, 64, minus_slots)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_mixed_prefill_matches_reference(dtype: torch.dtype) -> None:
    """Prompts of several adapters, the merged one's among them, in contiguous runs."""
    rng = random.Random(5)
    slots = [s for s in [3, 0, -1, 3, 5] for _ in range(rng.randint(5, 40))]
    token_slots, minus_slots = mixed(slots, 3)
    check(projection(64, [96, 96], MIXED_RANKS, dtype), token_slots, dtype, 64, minus_slots)


@pytest.mark.parametrize("pattern", ["distinct", "uniform", "zipf", "identical", "skewed"])
@pytest.mark.parametrize("batch", [1, 2, 7, 16, 64, 133])
def test_decode_matches_reference(batch: int, pattern: str) -> None:
    """One token per request, adapters interleaved in arrival order, mixed ranks, fused q|k|v."""
    proj = projection(64, [64, 32, 32], MIXED_RANKS, torch.float32)
    check(proj, popularity(pattern, batch, random.Random(batch)), torch.float32, 64)


@pytest.mark.parametrize(
    "ranks",
    [[8] * NUM_SLOTS, [16] * NUM_SLOTS, [32] * NUM_SLOTS, [64] * NUM_SLOTS, [4, 128, 8, 16, 32, 64, 12, 100]],
    ids=["8", "16", "32", "64", "mixed-4-128"],
)
def test_ranks(ranks: list[int]) -> None:
    proj = projection(64, [64, 32, 32], ranks, torch.float32)
    check(proj, popularity("uniform", 16, random.Random(0)), torch.float32, 64)


@pytest.mark.parametrize("num_seqs", [1, 3, 7])
def test_prefill_segments(num_seqs: int) -> None:
    """Contiguous runs of each sequence's prompt tokens (SGMV-style), some longer than a tile."""
    rng = random.Random(num_seqs)
    slots = popularity("zipf", num_seqs, rng)
    token_slots = [s for s in slots for _ in range(rng.randint(1, 70))]
    check(projection(64, [96, 96], MIXED_RANKS, torch.float32), token_slots, torch.float32, 64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("phase", ["decode", "prefill"])
def test_half_precision(dtype: torch.dtype, phase: str) -> None:
    rng = random.Random(1)
    if phase == "decode":
        token_slots = popularity("skewed", 16, rng)
    else:
        token_slots = [s for s in popularity("uniform", 3, rng) for _ in range(rng.randint(5, 40))]
    check(projection(64, [64, 32, 32], MIXED_RANKS, dtype), token_slots, dtype, 64)


def test_no_lora_and_untargeted_slices() -> None:
    """A batch with no LoRA token builds no metadata; a slot whose adapter skips a slice (or an
    empty slot's table entry) leaves those columns alone."""
    skip = {(1, 2), (2, 2), (0, 5)}
    proj = projection(64, [64, 32, 32], MIXED_RANKS[:6] + [0, 0], torch.float32, skip=skip)
    assert proj.tables.ranks[1, 2].item() == 0 and proj.tables.ranks[0, 6].item() == 0
    check(proj, [-1, -1, -1], torch.float32, 64)
    check(proj, [2, 5, 2, -1, 0], torch.float32, 64)


@pytest.mark.parametrize("split_k", [1, 3])
def test_gpu_tiles_and_split_k(split_k: int) -> None:
    """The tile sizes a GPU uses (several rank tiles, a rank loop in expand, several column
    tiles), and K split across programs, on the interpreter too: the shares sum to the whole
    product; on a GPU the expand's sum of them gives the same bits on every run."""
    blocks = LoraBlocks(m=16, r=16, k=16, n=16, expand_r=16, split_k=split_k)
    proj = projection(72, [40, 24], [4, 128, 8, 16, 32, 64, 12, 100], torch.float32)
    slots = popularity("uniform", 20, random.Random(2))
    check(proj, slots, torch.float32, 72, blocks=blocks)
    batch = LoraBatch.from_token_slots([1, 7, 1], device())
    x = torch.randn(3, 72, device=device())
    one, split = (lora_shrink(x, proj.tables, batch, replace(blocks, split_k=s)) for s in (1, split_k))
    assert split.shape[0] == split_k
    for p, slot in enumerate([1, 1, 7]):  # grouped order: slot 1's tokens, then slot 7's
        for j, sl in enumerate(proj.slices):
            r = sl.a[slot].shape[0]
            torch.testing.assert_close(split[:, p, j, :r].sum(0), one[0, p, j, :r], atol=1e-5, rtol=1e-5)
    if not interpreting():  # the interpreter runs programs in order: the same bits prove nothing there
        passes = LoraPasses.from_token_slots(slots, device())
        x, base = torch.randn(20, 72, device=device()), torch.randn(20, 64, device=device())
        runs = [base.clone() for _ in range(2)]
        for out in runs:
            add_lora_passes(out, x, proj, passes, blocks=blocks)
        assert torch.equal(runs[0], runs[1])


def test_split_k_fills_the_gpu_only_where_the_batch_does_not(monkeypatch: pytest.MonkeyPatch) -> None:
    """One adapter at decode (a few programs unsplit at 7B widths): K split, each share at least
    MIN_SHARE wide; eight adapters split less. The GPU's rule, asked without a launch (off a GPU it
    counts an H100's 132 SMs), so it is checked here too."""
    monkeypatch.setattr(lora_triton, "interpreting", lambda: False)
    proj = projection(4096, [4096, 1024, 1024], [16] * NUM_SLOTS, torch.bfloat16)
    one = LoraBlocks.rule(LoraBatch.from_token_slots([0] * 32, device()), proj.tables)  # not a tuned table's
    many = LoraBlocks.rule(LoraBatch.from_token_slots(list(range(NUM_SLOTS)) * 8, device()), proj.tables)
    assert one.split_k > 1 and 4096 // one.split_k >= MIN_SHARE and many.split_k < one.split_k


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("hidden,kv", [(2048, 256), (4096, 4096), (5120, 1024), (8192, 1024)])
@pytest.mark.parametrize("batch,pattern", [(1, "identical"), (64, "uniform"), (133, "zipf"), (256, "distinct")])
def test_real_model_sizes(hidden: int, kv: int, batch: int, pattern: str, dtype: torch.dtype) -> None:
    proj = projection(hidden, [hidden, kv, kv], MIXED_RANKS, dtype)
    check(proj, popularity(pattern, batch, random.Random(batch)), dtype, hidden)
    token_slots, minus_slots = mixed(popularity(pattern, batch, random.Random(batch)), 3)
    check(proj, token_slots, dtype, hidden, minus_slots)


@pytest.mark.parametrize("pattern", ["distinct", "skewed", "identical"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_shrink_expand_equals_the_reference_and_the_pair(pattern: str, dtype: torch.dtype) -> None:
    """One launch a pass (kernels/lora_fused_triton.py): the torch reference's result, and with the
    pair's K step and no split, the pair's exact bits (under the interpreter); a mixed step's
    subtracted pass too."""
    proj = projection(72, [40, 24], [4, 16, 8, 16, 32, 64, 12, 0], dtype)
    for token_slots, minus_slots in (
        (popularity(pattern, 20, random.Random(3)), None),
        mixed(popularity(pattern, 20, random.Random(3)), 0),
    ):
        passes = LoraPasses.from_token_slots(token_slots, device(), minus_slots)
        g = torch.Generator().manual_seed(5)
        x = torch.randn(20, 72, generator=g).to(device(), dtype)
        base = torch.randn(20, 64, generator=g).to(device(), dtype)
        want, pair, fused = base.clone(), base.clone(), base.clone()
        add_lora_torch(want, x, proj, LoraSegments.from_token_slots(token_slots, None, minus_slots))
        k = LoraBlocks.rule(passes.passes[0], proj.tables).k
        add_lora_fused(fused, x, proj, passes, block_k=k)
        assert_close(fused, want)
        for batch in passes.passes:
            blocks = replace(LoraBlocks.rule(batch, proj.tables), split_k=1)
            add_lora_triton(pair, x, proj, batch, blocks)
        if interpreting():  # a GPU's MMA may order a tile's sums by its shape: close there
            assert torch.equal(fused, pair)
        assert_close(fused, pair)
