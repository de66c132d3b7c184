"""``rope.rope_and_cache`` in one Triton launch: one program per (token, head) of the fused qkv
row rotates a query or key head, or copies a value head, and writes it where it goes (the query
output, or the token's slot of the KV cache). At decode this replaces about twenty small launches
per layer (slices, the rotation's negate and concatenation, the casts, products and sums, two
cache scatters)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_and_cache_kernel(
    qkv_ptr,
    cos_ptr,
    sin_ptr,
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slots_ptr,
    stride_qkv,
    stride_cs,
    stride_q,
    stride_cache,  # per slot, in elements (kv_heads * head_dim for a contiguous pool)
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HALF: tl.constexpr,  # next power of two of HEAD_DIM // 2
):
    t = tl.program_id(0)
    head = tl.program_id(1)  # queries, then keys, then values
    offs = tl.arange(0, HALF)
    mask = offs < HEAD_DIM // 2
    src = qkv_ptr + t * stride_qkv + head * HEAD_DIM
    x1 = tl.load(src + offs, mask=mask, other=0.0)
    x2 = tl.load(src + HEAD_DIM // 2 + offs, mask=mask, other=0.0)
    dtype = x1.dtype
    slot = tl.load(slots_ptr + t)
    if head >= NUM_HEADS + NUM_KV_HEADS:  # a value head: copied into the cache as it is
        dst = v_cache_ptr + slot * stride_cache + (head - NUM_HEADS - NUM_KV_HEADS) * HEAD_DIM
        tl.store(dst + offs, x1, mask=mask)
        tl.store(dst + HEAD_DIM // 2 + offs, x2, mask=mask)
    else:
        # cos and sin cast to the dtype, each product rounded, then the sum (HF's order).
        c1 = tl.load(cos_ptr + t * stride_cs + offs, mask=mask, other=0.0).to(dtype).to(tl.float32)
        c2 = tl.load(cos_ptr + t * stride_cs + HEAD_DIM // 2 + offs, mask=mask, other=0.0).to(dtype).to(tl.float32)
        s1 = tl.load(sin_ptr + t * stride_cs + offs, mask=mask, other=0.0).to(dtype).to(tl.float32)
        s2 = tl.load(sin_ptr + t * stride_cs + HEAD_DIM // 2 + offs, mask=mask, other=0.0).to(dtype).to(tl.float32)
        f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
        out1 = ((f1 * c1).to(dtype).to(tl.float32) + (-f2 * s1).to(dtype).to(tl.float32)).to(dtype)
        out2 = ((f2 * c2).to(dtype).to(tl.float32) + (f1 * s2).to(dtype).to(tl.float32)).to(dtype)
        if head < NUM_HEADS:
            dst = q_ptr + t * stride_q + head * HEAD_DIM
        else:
            dst = k_cache_ptr + slot * stride_cache + (head - NUM_HEADS) * HEAD_DIM
        tl.store(dst + offs, out1, mask=mask)
        tl.store(dst + HEAD_DIM // 2 + offs, out2, mask=mask)


def rope_and_cache_triton(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
) -> torch.Tensor:
    """As ``rope.rope_and_cache``. qkv (T, ...) contiguous in its last dimension; the cache pools
    contiguous (slots, kv_heads, head_dim); cos, sin (T, head_dim)."""
    tokens = qkv.shape[0]
    head_dim = k_cache.shape[-1]
    q = torch.empty(tokens, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if tokens:
        _rope_and_cache_kernel[(tokens, num_heads + 2 * num_kv_heads)](
            qkv,
            cos.contiguous(),
            sin.contiguous(),
            q,
            k_cache,
            v_cache,
            slots,
            qkv.stride(0),
            head_dim,
            q.stride(0),
            k_cache.stride(0),
            NUM_HEADS=num_heads,
            NUM_KV_HEADS=num_kv_heads,
            HEAD_DIM=head_dim,
            HALF=triton.next_power_of_2(head_dim // 2),
            # Each product rounded before the sum, as torch computes it: no fused multiply-add.
            enable_fp_fusion=False,
        )
    return q
