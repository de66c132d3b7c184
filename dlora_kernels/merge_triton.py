"""``merge.merge_rows`` as one Triton launch: each program takes a tile of the weight's rows, copies
it aside, adds its tile of s·B·A (a rank-deep fp32 product) and writes it back rounded once.

The torch version reads and writes the rows five times over (the copy aside, the fp32 up-cast, the
delta, the sum, the round); this reads the rows once and writes them twice, about 1.5 times the
bytes of one copy, which is what issue 15 asks a merge to cost (at most 2 copies' time).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dlora.kernels.triton_common import ELEM


@triton.jit
def _merge_kernel(
    w_ptr,  # (N, K) the weight's rows, updated in place; rows at stride_w
    saved_ptr,  # (N, K) contiguous: the rows before the merge
    a_ptr,  # (rank, K) contiguous
    b_ptr,  # (N, rank) contiguous
    scale,  # float: the adapter's LoRA scaling
    N,
    K,
    rank,
    stride_w,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,  # rank per loop step (tl.dot needs >= 16)
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    n_mask, k_mask = offs_n < N, offs_k < K
    mask = n_mask[:, None] & k_mask[None, :]
    w_off = offs_n[:, None].to(tl.int64) * stride_w + offs_k[None, :]
    w = tl.load(w_ptr + w_off, mask=mask, other=0.0)
    tl.store(saved_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :], w, mask=mask)
    delta = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        bt = tl.load(
            b_ptr + offs_n[:, None] * rank + offs_r[None, :], mask=n_mask[:, None] & r_mask[None, :], other=0.0
        )
        at = tl.load(a_ptr + offs_r[:, None] * K + offs_k[None, :], mask=r_mask[:, None] & k_mask[None, :], other=0.0)
        delta += tl.dot(bt.to(tl.float32), at.to(tl.float32), input_precision="ieee")
    out = w.to(tl.float32) + delta * scale
    tl.store(w_ptr + w_off, out.to(w_ptr.dtype.element_ty), mask=mask)


def merge_rows_triton(
    weight: torch.Tensor,
    saved: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    block_n: int = 64,
    block_k: int = 64,
) -> None:
    """As ``merge.merge_rows``; a and b must be contiguous, saved contiguous. RuntimeError when A
    (rank, K) and B (N, rank) do not fit the weight (N, K), as the torch path's matmul raises."""
    assert weight.dim() == 2 and weight.stride(1) == 1, "weight rows must be contiguous"
    assert saved.shape == weight.shape and saved.dtype == weight.dtype and saved.is_contiguous()
    assert a.is_contiguous() and b.is_contiguous()
    if a.shape[0] != b.shape[1] or a.shape[1] != weight.shape[1] or b.shape[0] != weight.shape[0]:
        # The adapter's shapes, not a caller's slip: the merger rolls back on it, whichever path ran.
        raise RuntimeError(f"A {tuple(a.shape)} and B {tuple(b.shape)} do not fit the weight {tuple(weight.shape)}")
    assert weight.dtype in ELEM and a.device == b.device == weight.device == saved.device
    n, k = weight.shape
    rank = a.shape[0]
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    _merge_kernel[grid](
        weight,
        saved,
        a,
        b,
        scale,
        n,
        k,
        rank,
        weight.stride(0),
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        BLOCK_R=max(16, min(64, triton.next_power_of_2(rank))),
        # The product is rounded before the sum, as torch computes delta * scale then adds.
        enable_fp_fusion=False,
    )
