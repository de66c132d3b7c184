"""Triton RMSNorm, residual add + RMSNorm and SiLU-and-multiply equal their torch references
(kernels/norm.py) over row counts, widths that are and are not powers of two, and dtypes (small
shapes under the interpreter; a 7B model's widths on a GPU)."""

from __future__ import annotations

import pytest
import torch

from dlora.kernels.norm import add_rms_norm, rms_norm, silu_and_mul
from dlora.kernels.norm_triton import add_rms_norm_triton, rms_norm_triton, silu_and_mul_triton
from dlora.kernels.triton_common import interpreting
from tests.kernels.conftest import assert_close, cuda_only, device

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def data(rows: int, cols: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x, res = (torch.randn(rows, cols, generator=g) for _ in range(2))
    weight = 1.0 + 0.1 * torch.randn(cols, generator=g)
    return tuple(t.to(device=device(), dtype=dtype) for t in (x, res, weight))


def check_norms(rows: int, cols: int, dtype: torch.dtype) -> None:
    x, res, weight = data(rows, cols, dtype)
    assert_close(rms_norm_triton(x, weight, 1e-6), rms_norm(x, weight, 1e-6))
    want, want_res = add_rms_norm(x, res, weight, 1e-5)
    residual = res.clone()
    got, got_res = add_rms_norm_triton(x, residual, weight, 1e-5)
    assert got_res is residual  # written in place
    if dtype == torch.bfloat16 and interpreting():
        # The interpreter truncates fp32 to bf16 where a GPU rounds to nearest: last-bit differences.
        assert_close(got_res, want_res)
    else:
        assert torch.equal(got_res, want_res)  # the sum rounds once, as torch's does
    assert_close(got, want)


def check_silu(rows: int, inter: int, dtype: torch.dtype) -> None:
    gate_up = torch.randn(rows, 2 * inter, generator=torch.Generator().manual_seed(1)).to(device(), dtype) * 3
    assert_close(silu_and_mul_triton(gate_up), silu_and_mul(gate_up))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cols", [(1, 64), (7, 96), (33, 128)])
def test_norms_equal_the_reference(rows: int, cols: int, dtype: torch.dtype) -> None:
    check_norms(rows, cols, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,inter", [(1, 176), (5, 64), (16, 1500)])
def test_silu_and_mul_equals_the_reference(rows: int, inter: int, dtype: torch.dtype) -> None:
    check_silu(rows, inter, dtype)


def test_fp32_norm_is_the_reference_to_rounding() -> None:
    """fp32: the same arithmetic in another summation order, so the engine's greedy tokens hold."""
    x, _, weight = data(4, 256, torch.float32)
    torch.testing.assert_close(rms_norm_triton(x, weight, 1e-6), rms_norm(x, weight, 1e-6), atol=1e-6, rtol=1e-6)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_seven_b_widths_on_the_gpu(dtype: torch.dtype) -> None:
    check_norms(64, 4096, dtype)
    check_silu(64, 11008, dtype)
