"""The sampler's Exp(1) draws as one Triton launch for every row of a step (reference:
``exponential.exponentials_torch``, which this equals): program (row, block) draws ``BLOCK`` tokens'
worth from the row's key with ``tl.rand``. The block is fixed and the row count and vocabulary are
runtime values, so no batch size or vocabulary compiles it again.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _exponential_kernel(keys_ptr, out_ptr, n_cols, stride_out, LOG: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    key = tl.load(keys_ptr + row)
    u = tl.rand(key, cols)
    if LOG:
        u = -tl.log(tl.maximum(u, 2.3283064365386963e-10))  # exponential.U_MIN, 2**-32: u = 0 gives inf
    tl.store(out_ptr + row.to(tl.int64) * stride_out + cols, u, mask=cols < n_cols)


def _launch(keys: torch.Tensor, n: int, log: bool) -> torch.Tensor:
    keys = keys.to(torch.int64).contiguous()
    out = torch.empty(len(keys), n, dtype=torch.float32, device=keys.device)
    if out.numel():
        _exponential_kernel[(len(keys), triton.cdiv(n, BLOCK))](keys, out, n, out.stride(0), LOG=log, BLOCK=BLOCK)
    return out


def exponentials_triton(keys: torch.Tensor, n: int) -> torch.Tensor:
    """Exp(1) draws (len(keys), n) float32 on ``keys``' device, row i from key ``keys[i]`` (int64):
    ``exponentials_torch``'s values."""
    return _launch(keys, n, log=True)


def philox_uniform_triton(keys: torch.Tensor, n: int) -> torch.Tensor:
    """The uniforms the draws are made of: ``philox_uniform``'s, bit for bit."""
    return _launch(keys, n, log=False)
