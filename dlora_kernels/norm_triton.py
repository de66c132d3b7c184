"""RMSNorm, residual add + RMSNorm and SiLU-and-multiply as Triton kernels: one launch each where
the torch versions (``norm``, the references) take five to eight. At decode a layer's elementwise
work is many tiny launches, and on a GPU their count, not their bytes, sets the step time.

Each row of the flat batch is one program (the hidden size fits one block), so no reduction
crosses programs; the rounding points are those of the references.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,  # the residual stream, read and written back with x added (ADD only)
    w_ptr,
    out_ptr,
    n_cols,
    stride_x,
    stride_res,
    stride_out,
    eps,
    ADD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if ADD:
        r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
        # The exact fp32 sum, rounded once to the dtype as torch's add is (and the interpreter
        # does no arithmetic on bf16 storage).
        h = (r.to(tl.float32) + x.to(tl.float32)).to(x.dtype)
        tl.store(res_ptr + row * stride_res + cols, h, mask=mask)
    else:
        h = x
    hf = h.to(tl.float32)
    var = tl.sum(hf * hf, axis=0) / n_cols
    normed = (hf * (1.0 / tl.sqrt(var + eps))).to(x.dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_out + cols, (w.to(tl.float32) * normed.to(tl.float32)).to(x.dtype), mask=mask)


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    rows, cols = x.shape
    out = torch.empty_like(x)
    res = residual if residual is not None else x
    block = triton.next_power_of_2(cols)
    _rms_norm_kernel[(rows,)](
        x,
        res,
        weight,
        out,
        cols,
        x.stride(0),
        res.stride(0),
        out.stride(0),
        eps,
        ADD=residual is not None,
        BLOCK=block,
        num_warps=min(16, max(1, block // 256)),
    )
    return out


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """As ``norm.rms_norm``: x (T, H) contiguous in its last dimension, weight (H,) -> (T, H)."""
    return _launch(x, None, weight, eps)


def add_rms_norm_triton(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """As ``norm.add_rms_norm``, but the new residual is written into ``residual`` (in place, one
    pass over both): returns (normed, residual)."""
    return _launch(x, residual, weight, eps), residual


@triton.jit
def _silu_and_mul_kernel(gu_ptr, out_ptr, n_cols, stride_gu, stride_out, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(gu_ptr + row * stride_gu + cols, mask=mask, other=0.0)
    up = tl.load(gu_ptr + row * stride_gu + n_cols + cols, mask=mask, other=0.0)
    gf = gate.to(tl.float32)
    silu = (gf / (1.0 + tl.exp(-gf))).to(gate.dtype)  # rounded, as F.silu's result is
    tl.store(out_ptr + row * stride_out + cols, (silu.to(tl.float32) * up.to(tl.float32)).to(gate.dtype), mask=mask)


def silu_and_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    """As ``norm.silu_and_mul``: gate_up (T, 2I), contiguous in its last dimension -> (T, I)."""
    rows, width = gate_up.shape
    cols = width // 2
    out = torch.empty(rows, cols, dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, triton.next_power_of_2(cols))
    _silu_and_mul_kernel[(rows, triton.cdiv(cols, block))](
        gate_up, out, cols, gate_up.stride(0), out.stride(0), BLOCK=block
    )
    return out
