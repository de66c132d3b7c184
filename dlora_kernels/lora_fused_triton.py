"""LoRA shrink and expand fused into one Triton launch, for ranks that fit on chip (issue 15 asks
whether this pays: ``dlora bench kernels`` times it beside the two-launch pair on a GPU).

Each program takes a tile of one group's tokens and one column tile of one slice: it computes the
tokens' x·Aᵀ over the whole input width (the whole rank in registers), then multiplies by its
tile of Bᵀ and adds the scaled result into the output. Nothing goes through memory between the
two products, and one launch replaces two; the price is that every column tile recomputes the
shrink (A is read from L2 once per column tile rather than once per row tile). The products are
rounded where the two-launch pair rounds them, so with the same ``BLOCK_K`` and no split the
result is bit-identical to ``lora_triton.add_lora_triton``'s.

Not used by the engine: the measurement decides.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dlora.kernels.lora import LoraProjection
from dlora.kernels.lora_triton import LoraPasses, column_tile
from dlora.kernels.triton_common import ELEM, f32_dot, interpreting

MAX_RANK = 64  # the largest rank this kernel holds on chip


@triton.jit(do_not_specialize=["m_tiles"])
def _fused_kernel(
    x_ptr,  # (T, K) input, rows at stride_x
    out_ptr,  # (T, N) output, updated in place, rows at stride_out
    a_ptrs,  # (n_slices, num_slots) int64 addresses of A (rank, K)
    b_ptrs,  # (n_slices, num_slots) int64 addresses of B (size, rank)
    ranks_ptr,  # (n_slices, num_slots) int32
    scales_ptr,  # (n_slices, num_slots) float32
    offsets_ptr,  # (n_slices,) int32
    sizes_ptr,  # (n_slices,) int32
    token_index_ptr,
    group_slot_ptr,
    group_start_ptr,
    group_len_ptr,  # the step's groups, as lora_triton.LoraBatch holds them
    sign,
    K,
    stride_x,
    stride_out,
    num_slots,
    m_tiles,
    n_tiles,
    ELEM: tl.constexpr,
    F32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,  # at least every rank
):
    g, m0, j, n0, n, slot, rank, size = column_tile(
        group_len_ptr, group_slot_ptr, ranks_ptr, sizes_ptr, num_slots, m_tiles, n_tiles, BLOCK_M, BLOCK_N
    )
    if m0 >= n or n0 >= size or rank == 0:
        return
    a_ptr = tl.load(a_ptrs + j * num_slots + slot).to(tl.pointer_type(ELEM))
    b_ptr = tl.load(b_ptrs + j * num_slots + slot).to(tl.pointer_type(ELEM))
    scale = tl.load(scales_ptr + j * num_slots + slot) * sign
    start = tl.load(group_start_ptr + g)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_mask = offs_m < n
    tokens = tl.load(token_index_ptr + start + offs_m, mask=m_mask, other=0).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    y = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        xt = tl.load(
            x_ptr + tokens[:, None] * stride_x + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0
        )
        at = tl.load(a_ptr + offs_r[None, :] * K + offs_k[:, None], mask=r_mask[None, :] & k_mask[:, None], other=0.0)
        if F32_DOT:
            y += tl.dot(xt.to(tl.float32), at.to(tl.float32), input_precision="ieee")
        else:
            y += tl.dot(xt, at)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_mask = offs_n < size
    bt = tl.load(b_ptr + offs_n[None, :] * rank + offs_r[:, None], mask=r_mask[:, None] & n_mask[None, :], other=0.0)
    if F32_DOT:
        acc = tl.dot(y, bt.to(tl.float32), input_precision="ieee")
    else:
        acc = tl.dot(y.to(ELEM), bt)  # as the pair: the shrunk activations in the weights' type
    o = out_ptr + tokens[:, None] * stride_out + tl.load(offsets_ptr + j) + offs_n[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    prev = tl.load(o, mask=mask, other=0.0)
    tl.store(o, (prev.to(tl.float32) + acc * scale).to(ELEM), mask=mask)


def add_lora_fused(
    out: torch.Tensor, x: torch.Tensor, proj: LoraProjection, passes: LoraPasses, block_k: int = 64
) -> None:
    """As ``lora_triton.add_lora_passes``, one launch a pass; ranks up to MAX_RANK. out (T, N) and
    x (T, K) with contiguous rows, in the weights' dtype."""
    tables = proj.tables
    assert tables is not None and tables.max_rank <= MAX_RANK, f"ranks up to {MAX_RANK}"
    if tables.max_rank == 0:
        return
    assert x.stride(1) == 1 and out.stride(1) == 1 and x.dtype == out.dtype == tables.dtype
    n_slices, num_slots = tables.ranks.shape
    block_r = max(16, triton.next_power_of_2(tables.max_rank))
    block_n = max(16, min(512, triton.next_power_of_2(tables.max_size))) if interpreting() else 64
    for batch in passes.passes:
        block_m = 16 if batch.max_group_len <= 16 else 32
        m_tiles = triton.cdiv(batch.max_group_len, block_m)
        n_tiles = triton.cdiv(tables.max_size, block_n)
        _fused_kernel[(batch.num_groups * m_tiles, n_slices * n_tiles)](
            x,
            out,
            tables.a_ptrs,
            tables.b_ptrs,
            tables.ranks,
            tables.scales,
            tables.offsets,
            tables.sizes,
            batch.token_index,
            batch.group_slot,
            batch.group_start,
            batch.group_len,
            batch.sign,
            x.shape[1],
            x.stride(0),
            out.stride(0),
            num_slots,
            m_tiles,
            n_tiles,
            ELEM=ELEM[x.dtype],
            F32_DOT=f32_dot(x.dtype),
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            BLOCK_R=block_r,
        )
