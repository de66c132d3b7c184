"""Kernel tests run the Triton kernels natively on a GPU, and under the interpreter elsewhere
(TRITON_INTERPRET=1 is set by the top-level conftest before Triton is imported)."""

from __future__ import annotations

import pytest
import torch

# Per-dtype tolerances of kernel vs reference, relative to the largest magnitude in the result:
# the two compute the same sums in different orders (and round intermediates differently).
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="real-model sizes: cuda only")


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    scale = want.float().abs().max().item() or 1.0
    err = (got.float() - want.float()).abs().max().item()
    assert err <= TOLERANCE[want.dtype] * scale, f"max error {err:.3g} > {TOLERANCE[want.dtype]} x {scale:.3g}"
