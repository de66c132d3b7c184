"""Paged attention as Triton kernels: decode over the block table, and prefill of variable-length
causal queries in one batch, both with grouped-query attention and fp32 accumulation.

The step's new tokens are laid out back to back (sequence i's q_len[i] tokens are the last of its
ctx_len[i] context tokens), their K/V already written to the cache. Decode sequences (one new
token) get one program per (sequence, KV head) that serves every query head of the group, so the
group's keys are read once. Prefill sequences are cut into tiles of BLOCK_M queries, one program
per (tile, head), with an online softmax over key chunks gathered through the block table; a
resumed sequence (ctx_len > q_len) attends to its cached prefix the same way.

The torch reference is ``attention.paged_attention_torch``.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch
import triton
import triton.language as tl

from dlora.kernels.host import to_device
from dlora.kernels.triton_common import f32_dot, interpreting


@dataclass
class PagedMetadata:
    """Per-step metadata for the Triton path, built once and shared by every layer."""

    slots: torch.Tensor  # (T,) int64: flat cache slot where each new token's K/V is written
    q_start: torch.Tensor  # (B,) int32: flat index of each sequence's first new token
    q_len: torch.Tensor  # (B,) int32: its new tokens
    ctx_len: torch.Tensor  # (B,) int32: its context after this step (cached + new)
    block_tables: torch.Tensor  # (B, max_blocks) int32: physical blocks (padding: 0)
    decode_seqs: torch.Tensor  # (D,) int32: sequences with one new token
    tile_seq: torch.Tensor  # (N,) int32: the prefill sequence of each query tile
    tile_q0: torch.Tensor  # (N,) int32: the tile's first query, within the sequence's new tokens
    block_m: int  # queries per prefill tile


def build_paged_metadata(
    q_lens: list[int],
    ctx_lens: list[int],
    block_tables: list[list[int]],
    slots: list[int],
    block_size: int,
    device: torch.device,
    block_m: int = 16,
) -> PagedMetadata:
    """The same inputs as ``attention.build_attention_metadata``; ``block_size`` is implied by the tables."""
    starts = list(accumulate(q_lens, initial=0))[:-1]
    width = max((len(b) for b in block_tables), default=1)
    tables = [b + [0] * (width - len(b)) for b in block_tables]
    decode = [i for i, n in enumerate(q_lens) if n == 1]
    tiles = [(i, q0) for i, n in enumerate(q_lens) if n > 1 for q0 in range(0, n, block_m)]

    def i32(values: list) -> torch.Tensor:
        return to_device(values, torch.int32, device)

    return PagedMetadata(
        slots=to_device(slots, torch.int64, device),
        q_start=i32(starts),
        q_len=i32(q_lens),
        ctx_len=i32(ctx_lens),
        block_tables=i32(tables).reshape(len(q_lens), width),
        decode_seqs=i32(decode),
        tile_seq=i32([i for i, _ in tiles]),
        tile_q0=i32([q0 for _, q0 in tiles]),
        block_m=block_m,
    )


@triton.jit
def _attend(
    q,  # (ROWS, BLOCK_D) query rows, zero past HEAD_DIM
    q_pos,  # (ROWS,) int32: each row's position in its sequence (it sees keys up to there)
    last,  # keys [0, last) are read
    seq,
    kvh,  # the sequence (its block table row) and the KV head
    k_ptr,
    v_ptr,
    tables_ptr,
    max_blocks,
    stride_kt,
    stride_kh,
    scale,  # as in the kernels
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    F32_DOT: tl.constexpr,
):
    """Softmax(q·Kᵀ·scale)·V over one sequence's keys, gathered BLOCK_N at a time through its block
    table with an online softmax (fp32 running max, sum and output). Returns (ROWS, BLOCK_D) fp32.
    Every row sees key 0, so no row's sum is zero."""
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    m_i = tl.full((ROWS,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((ROWS,), dtype=tl.float32)
    acc = tl.zeros((ROWS, BLOCK_D), dtype=tl.float32)
    for k0 in range(0, last, BLOCK_N):
        k_pos = k0 + tl.arange(0, BLOCK_N)
        n_mask = k_pos < last
        phys = tl.load(tables_ptr + seq * max_blocks + k_pos // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        kv_off = (phys * BLOCK_SIZE + k_pos % BLOCK_SIZE)[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :]
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
        v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0)
        if F32_DOT:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where((k_pos[None, :] <= q_pos[:, None]) & n_mask[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if F32_DOT:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    return acc / l_i[:, None]


# The block table's width changes with the batch's longest context: not specialized on (Triton
# would compile a variant for a width of 1 and another for multiples of 16).
@triton.jit(do_not_specialize=["max_blocks"])
def _decode_kernel(
    q_ptr,  # (T, H, D) queries
    k_ptr,  # (num_blocks * BLOCK_SIZE, KVH, D) one layer's key cache
    v_ptr,  # (num_blocks * BLOCK_SIZE, KVH, D) one layer's value cache
    o_ptr,  # (T, H, D) output
    seqs_ptr,  # (D,) int32: the decode sequence of each program row
    q_start_ptr,  # (B,) int32: flat index of each sequence's new token
    ctx_len_ptr,  # (B,) int32: keys each sequence attends to
    tables_ptr,  # (B, max_blocks) int32: block table
    max_blocks,  # columns of the block table
    stride_qt,
    stride_qh,  # q strides (token, head); head_dim contiguous
    stride_kt,
    stride_kh,  # k/v cache strides (slot, KV head)
    stride_ot,
    stride_oh,  # output strides
    scale,  # softmax scale (1/sqrt(head_dim) for Llama)
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # D rounded up to a power of two (at least 16, for tl.dot)
    GROUP: tl.constexpr,  # query heads per KV head
    BLOCK_G: tl.constexpr,  # GROUP rounded up to a power of two, at least 16 (tl.dot's least M)
    BLOCK_SIZE: tl.constexpr,  # tokens per KV block
    BLOCK_N: tl.constexpr,  # keys per loop step
    F32_DOT: tl.constexpr,  # multiply in exact fp32
):
    row = tl.program_id(0)
    kvh = tl.program_id(1)
    seq = tl.load(seqs_ptr + row)
    t = tl.load(q_start_ptr + seq).to(tl.int64)
    ctx = tl.load(ctx_len_ptr + seq)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = kvh * GROUP + offs_g
    # The group's query heads are the rows of one matrix, so its keys are read once for all.
    q = tl.load(
        q_ptr + t * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    )  # (BLOCK_G, BLOCK_D)
    # The one new token sits at position ctx - 1: it sees every key.
    q_pos = tl.zeros((BLOCK_G,), dtype=tl.int32) + ctx - 1
    out = _attend(
        q,
        q_pos,
        ctx,
        seq,
        kvh,
        k_ptr,
        v_ptr,
        tables_ptr,
        max_blocks,
        stride_kt,
        stride_kh,
        scale,
        BLOCK_G,
        BLOCK_D,
        HEAD_DIM,
        BLOCK_SIZE,
        BLOCK_N,
        F32_DOT,
    )
    tl.store(
        o_ptr + t * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
        out.to(o_ptr.dtype.element_ty),
        mask=g_mask[:, None] & d_mask[None, :],
    )


@triton.jit(do_not_specialize=["max_blocks"])  # as _decode_kernel
def _prefill_kernel(
    q_ptr,  # (T, H, D) queries
    k_ptr,  # (num_blocks * BLOCK_SIZE, KVH, D) one layer's key cache
    v_ptr,  # (num_blocks * BLOCK_SIZE, KVH, D) one layer's value cache
    o_ptr,  # (T, H, D) output
    tile_seq_ptr,  # (N,) int32: the sequence of each query tile
    tile_q0_ptr,  # (N,) int32: the tile's first query within the sequence's new tokens
    q_start_ptr,  # (B,) int32: flat index of each sequence's first new token
    q_len_ptr,  # (B,) int32: its new tokens
    ctx_len_ptr,  # (B,) int32: its context after this step
    tables_ptr,  # (B, max_blocks) int32: block table
    max_blocks,  # columns of the block table
    stride_qt,
    stride_qh,  # q strides (token, head); head_dim contiguous
    stride_kt,
    stride_kh,  # k/v cache strides (slot, KV head)
    stride_ot,
    stride_oh,  # output strides
    scale,  # softmax scale
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # D rounded up to a power of two (at least 16, for tl.dot)
    GROUP: tl.constexpr,  # query heads per KV head
    BLOCK_SIZE: tl.constexpr,  # tokens per KV block
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per loop step
    F32_DOT: tl.constexpr,  # multiply in exact fp32
):
    tile = tl.program_id(0)
    head = tl.program_id(1)
    kvh = head // GROUP
    seq = tl.load(tile_seq_ptr + tile)
    q0 = tl.load(tile_q0_ptr + tile)
    n = tl.load(q_len_ptr + seq)
    ctx = tl.load(ctx_len_ptr + seq)
    t0 = tl.load(q_start_ptr + seq).to(tl.int64)
    offs_m = q0 + tl.arange(0, BLOCK_M)
    m_mask = offs_m < n
    q_pos = ctx - n + offs_m  # position of each query in its sequence
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q = tl.load(
        q_ptr + (t0 + offs_m)[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
        mask=m_mask[:, None] & d_mask[None, :],
        other=0.0,
    )  # (BLOCK_M, BLOCK_D)
    # Causal: the tile's last query sees keys up to its own position. Padded rows (past n) sit
    # beyond it and are not stored.
    last = tl.minimum(ctx - n + q0 + BLOCK_M, ctx)
    out = _attend(
        q,
        q_pos,
        last,
        seq,
        kvh,
        k_ptr,
        v_ptr,
        tables_ptr,
        max_blocks,
        stride_kt,
        stride_kh,
        scale,
        BLOCK_M,
        BLOCK_D,
        HEAD_DIM,
        BLOCK_SIZE,
        BLOCK_N,
        F32_DOT,
    )
    tl.store(
        o_ptr + (t0 + offs_m)[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
        out.to(o_ptr.dtype.element_ty),
        mask=m_mask[:, None] & d_mask[None, :],
    )


def paged_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: PagedMetadata,
    block_size: int,
    scale: float,
    block_n: int | None = None,
) -> torch.Tensor:
    """The Triton twin of ``paged_attention_torch``: q (T, heads, head_dim) over one layer's cache
    (slots, kv_heads, head_dim), the new tokens' K/V already written. Returns (T, heads, head_dim).
    ``block_n``: keys per loop step (a power of two >= 16); None: 64, or 128 under the interpreter,
    which runs programs one after another and so takes bigger steps."""
    assert q.dim() == 3 and k_cache.dim() == 3 and k_cache.shape == v_cache.shape
    assert q.stride(2) == 1 and k_cache.stride(2) == 1 and v_cache.stride() == k_cache.stride()
    assert q.dtype == k_cache.dtype == v_cache.dtype, "q and the cache must share a dtype"
    heads, head_dim = q.shape[1], q.shape[2]
    kv_heads = k_cache.shape[1]
    assert heads % kv_heads == 0 and k_cache.shape[2] == head_dim
    assert k_cache.shape[0] % block_size == 0 and block_size & (block_size - 1) == 0, "block_size: a power of two"
    group = heads // kv_heads
    out = torch.empty_like(q)
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_n = block_n or (128 if interpreting() else 64)
    assert block_n >= 16 and block_n & (block_n - 1) == 0, "block_n: a power of two >= 16"
    strides = (q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), out.stride(0), out.stride(1))
    if meta.decode_seqs.numel():
        _decode_kernel[(meta.decode_seqs.numel(), kv_heads)](
            q,
            k_cache,
            v_cache,
            out,
            meta.decode_seqs,
            meta.q_start,
            meta.ctx_len,
            meta.block_tables,
            meta.block_tables.shape[1],
            *strides,
            scale,
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            GROUP=group,
            BLOCK_G=max(16, triton.next_power_of_2(group)),
            BLOCK_SIZE=block_size,
            BLOCK_N=block_n,
            F32_DOT=f32_dot(q.dtype),
        )
    if meta.tile_seq.numel():
        _prefill_kernel[(meta.tile_seq.numel(), heads)](
            q,
            k_cache,
            v_cache,
            out,
            meta.tile_seq,
            meta.tile_q0,
            meta.q_start,
            meta.q_len,
            meta.ctx_len,
            meta.block_tables,
            meta.block_tables.shape[1],
            *strides,
            scale,
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            GROUP=group,
            BLOCK_SIZE=block_size,
            BLOCK_M=meta.block_m,
            BLOCK_N=block_n,
            F32_DOT=f32_dot(q.dtype),
        )
    return out
