"""The Triton merge equals its torch reference (kernels/merge.py): the rows saved bit for bit, the
merged rows within rounding (the rank-deep sum's order may differ), over shapes that do and do not
fill a tile, ranks across the rank loop, a row slice of a fused weight, and dtypes."""

from __future__ import annotations

import pytest
import torch

from dlora.kernels.merge import merge_rows
from dlora.kernels.merge_triton import merge_rows_triton
from tests.kernels.conftest import assert_close, cuda_only, device

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def check(rows: slice, k: int, rank: int, dtype: torch.dtype, total: int | None = None) -> None:
    g = torch.Generator().manual_seed(rank)
    n = rows.stop - rows.start
    fused = torch.randn(total or rows.stop, k, generator=g).to(device(), dtype)
    a = (torch.randn(rank, k, generator=g) / k**0.5).to(device(), dtype)
    b = (torch.randn(n, rank, generator=g) / rank**0.5).to(device(), dtype)
    want_w, got_w = fused.clone(), fused.clone()
    want_saved, got_saved = (torch.empty(n, k, dtype=dtype, device=device()) for _ in range(2))
    merge_rows(want_w[rows], want_saved, a, b, 1.75)
    merge_rows_triton(got_w[rows], got_saved, a, b, 1.75)
    assert torch.equal(got_saved, fused[rows])  # the originals, exactly
    assert_close(got_w[rows], want_w[rows])
    outside = torch.ones(fused.shape[0], dtype=torch.bool, device=device())
    outside[rows] = False
    assert torch.equal(got_w[outside], fused[outside])  # rows of other projections untouched


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,k,rank", [(64, 64, 16), (40, 72, 8), (130, 96, 100)])
def test_merge_equals_the_reference(n: int, k: int, rank: int, dtype: torch.dtype) -> None:
    check(slice(0, n), k, rank, dtype)


def test_merge_into_the_middle_rows_of_a_fused_weight() -> None:
    check(slice(48, 80), 64, 16, torch.float32, total=112)  # k of a fused qkv: rows 48-80 of 112


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n,k,rank", [(4096, 4096, 16), (11008, 4096, 64), (4096, 11008, 8)])
def test_real_model_sizes(n: int, k: int, rank: int, dtype: torch.dtype) -> None:
    check(slice(0, n), k, rank, dtype)


def test_an_adapter_that_does_not_fit_the_weight_raises_what_the_reference_raises() -> None:
    """The merger rolls a merge back on the error either path raises (a RuntimeError: torch's
    matmul's on the reference path), so the kernel raises the same, never an assertion."""
    w = torch.zeros(8, 16, device=device())
    saved = torch.empty_like(w)
    for a, b in ((torch.zeros(4, 3), torch.zeros(8, 4)), (torch.zeros(4, 16), torch.zeros(8, 5))):
        for merge in (merge_rows, merge_rows_triton):
            with pytest.raises(RuntimeError):
                merge(w, saved, a.to(device()), b.to(device()), 1.0)
