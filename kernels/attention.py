"""Paged attention over the KV block pool, torch implementation (the CPU path and the reference).

Sequences of one step are split into groups (decode: one new token each; prefill: many) of at
most ``GROUP_KEYS`` keys together. For each group and layer, the keys and values of its blocks
are copied with one ``index_select`` each into a workspace reused by every group and layer of the
step, and attended by one SDPA call: a lone sequence over exactly its context (no mask, or SDPA's
own causal one when its whole prompt is new), several with queries and keys padded and a mask
that is causal inside the new tokens and hides keys past each context. Small groups keep the
copy in cache for SDPA's read and spare the allocation (page faults) per layer that made the
first version of this path 5-10x slower than SDPA over dense keys (BENCHMARKS.md, kernels).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from dlora.kernels.host import to_device

# Keys (padded) attended in one SDPA call: 1,024 keys of 8 KV heads x 128 fp32 are 4 MiB of keys
# and 4 of values, about what stays in this CPU's cache between the copy and SDPA's read
# (measured with dlora bench kernels; more or fewer per group was slower).
GROUP_KEYS = 1024
# A lone decode whose keys pass this many bytes is attended in chunks of about this size, each
# copy still in cache when it is read, the chunks' outputs merged by their log-sum-exp (as
# flash-decoding splits the keys): 2 MiB measured best for 32 heads x 128 fp32 (128 keys).
DECODE_CHUNK_BYTES = 2 << 20
# A decode with at least this many keys is grouped alone (so its keys can be chunked).
LONE_DECODE_KEYS = 256


@dataclass
class AttentionGroup:
    """Sequences attended in one call. B sequences, queries padded to Q, keys to L = blocks * block_size."""

    q_index: torch.Tensor  # (B, Q) int64: flat token index of each query (padding repeats a valid one)
    q_valid: torch.Tensor  # (B, Q) bool: which queries are real
    blocks: torch.Tensor  # (B * max_blocks,) int64: each sequence's physical blocks in order (padding: block 0)
    num_seqs: int
    keys: int  # L, or a lone sequence's exact context
    # (B, 1, Q, L) bool: True where a query may attend to a key; None: every query sees every key
    # (a lone decode), or ``causal``.
    mask: torch.Tensor | None
    causal: bool = False  # a lone sequence whose whole context is new: SDPA's causal mask


@dataclass
class AttentionMetadata:
    """Built once per step, shared by every layer."""

    slots: torch.Tensor  # (T,) int64: flat cache slot where each new token's K/V is written
    groups: list[AttentionGroup]
    # Copies of a group's keys and values, per (shape, dtype): allocated at the first layer, reused
    # by every group and layer after it.
    workspace: dict[tuple[tuple[int, ...], torch.dtype], tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict
    )


def build_attention_metadata(
    q_lens: list[int],
    ctx_lens: list[int],
    block_tables: list[list[int]],
    slots: list[int],
    block_size: int,
    device: torch.device,
) -> AttentionMetadata:
    """Metadata for sequences whose new tokens are laid out back to back in the flat batch.

    Sequence i contributes q_lens[i] new tokens, the last ones of its ctx_lens[i] context tokens.
    """
    starts, t = [], 0
    for n in q_lens:
        starts.append(t)
        t += n
    groups = []
    for decode in (True, False):
        members = [i for i, n in enumerate(q_lens) if (n == 1) == decode]
        batches: list[list[int]] = []
        for i in members:
            lone = decode and ctx_lens[i] >= LONE_DECODE_KEYS
            last = batches[-1] if batches else []
            width = max(len(block_tables[j]) for j in [*last, i])
            joins = last and not lone and ctx_lens[last[0]] < LONE_DECODE_KEYS if decode else bool(last)
            if joins and (len(last) + 1) * width * block_size <= GROUP_KEYS:
                last.append(i)
            else:
                batches.append([i])
        groups += [_group(b, starts, q_lens, ctx_lens, block_tables, block_size, device) for b in batches]
    return AttentionMetadata(slots=to_device(slots, torch.int64, device), groups=groups)


def _group(
    members: list[int],
    starts: list[int],
    q_lens: list[int],
    ctx_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
    device: torch.device,
) -> AttentionGroup:
    # Built with numpy over the whole group at once: tensor ops per row cost ~3 ms of host time a
    # step at batch 64, as much as the tiny model's forward.
    n = np.array([q_lens[i] for i in members])
    ctx = np.array([ctx_lens[i] for i in members])
    start = np.array([starts[i] for i in members])
    tables = [block_tables[i] for i in members]
    q_max, blocks_max = int(n.max()), max(map(len, tables))
    j = np.arange(q_max)[None, :]
    q_valid = j < n[:, None]
    q_index = start[:, None] + np.where(q_valid, j, 0)  # a padded query repeats the row's first
    blocks = np.zeros((len(members), blocks_max), dtype=np.int64)
    lens = np.fromiter(map(len, tables), dtype=np.int64, count=len(tables))
    row = np.repeat(np.arange(len(tables)), lens)
    blocks[row, np.arange(lens.sum()) - np.repeat(lens.cumsum() - lens, lens)] = list(itertools.chain(*tables))
    keys, mask, causal = blocks_max * block_size, None, False
    if len(members) == 1:
        new, keys = int(n[0]), int(ctx[0])
        causal = 1 < new == keys
        if 1 < new < keys:
            mask = _causal_mask(n, ctx, keys)
    elif (n > 1).any() or (ctx < keys).any():
        mask = _causal_mask(n, ctx, keys)
    return AttentionGroup(
        q_index=to_device(q_index, torch.int64, device),
        q_valid=to_device(q_valid, torch.bool, device),
        blocks=to_device(blocks.ravel(), torch.int64, device),
        num_seqs=len(members),
        keys=keys,
        mask=to_device(mask, torch.bool, device) if mask is not None else None,
        causal=causal,
    )


def _causal_mask(n: np.ndarray, ctx: np.ndarray, keys: int) -> np.ndarray:
    """(rows, 1, q_max, keys) bool for rows of n new tokens ending contexts of ctx: query j of a row
    sits at position ctx - n + j and sees keys up to and including itself; padded queries copy
    the row's first (no all-masked NaN rows)."""
    j = np.arange(int(n.max()))[None, :]
    q_pos = (ctx - n)[:, None] + np.where(j < n[:, None], j, 0)
    return (np.arange(keys)[None, None, :] <= q_pos[:, :, None])[:, None]


def paged_attention_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """Attention of q (T, heads, head_dim) over one layer's cache (slots, kv_heads, head_dim).

    The new tokens' K/V must already be written to the cache. Grouped-query attention: heads is a
    multiple of kv_heads. Returns (T, heads, head_dim) in q's dtype.
    """
    out = torch.empty_like(q)
    _, kv_heads, head_dim = k_cache.shape
    k_blocks = k_cache.view(-1, block_size * kv_heads * head_dim)  # one row per block
    v_blocks = v_cache.view(-1, block_size * kv_heads * head_dim)
    chunk = max(1, DECODE_CHUNK_BYTES // k_blocks[0].nbytes)  # blocks per chunk of a long decode
    for g in meta.groups:
        # aten's flash attention that returns the log-sum-exp runs on CPUs only (on CUDA the
        # Triton path attends; this one is its reference there).
        if q.device.type == "cpu" and g.num_seqs == 1 and g.mask is None and not g.causal and g.blocks.numel() > chunk:
            t = g.q_index[0, 0]
            out[t] = _chunked_decode(q[t], k_blocks, v_blocks, meta, g, chunk, block_size, scale)
            continue
        k_rows, v_rows = _workspace(meta, (g.blocks.numel(), k_blocks.shape[1]), k_blocks)
        torch.index_select(k_blocks, 0, g.blocks, out=k_rows)
        torch.index_select(v_blocks, 0, g.blocks, out=v_rows)
        # (B, kv_heads, keys, D) views of the copies: SDPA reads them strided, no transpose copy.
        k = k_rows.view(g.num_seqs, -1, kv_heads, head_dim)[:, : g.keys].transpose(1, 2)
        v = v_rows.view(g.num_seqs, -1, kv_heads, head_dim)[:, : g.keys].transpose(1, 2)
        qg = q[g.q_index].transpose(1, 2)  # (B, heads, Q, D)
        o = F.scaled_dot_product_attention(
            qg, k, v, attn_mask=g.mask, is_causal=g.causal, scale=scale, enable_gqa=q.shape[1] != kv_heads
        )
        o = o.transpose(1, 2)  # (B, Q, heads, D)
        out[g.q_index[g.q_valid]] = o[g.q_valid]
    return out


def _chunked_decode(
    q: torch.Tensor,
    k_blocks: torch.Tensor,
    v_blocks: torch.Tensor,
    meta: AttentionMetadata,
    g: AttentionGroup,
    chunk: int,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """One decode query q (heads, D) over a long context, ``chunk`` blocks at a time. Each chunk
    runs aten's CPU flash attention, which also returns the log-sum-exp of its scores; the
    chunks' outputs weighted by softmax over those are the attention over all keys. The query
    heads of one KV head are that call's query rows (GQA without repeating keys)."""
    heads, head_dim = q.shape
    kv_heads = k_blocks.shape[1] // (block_size * head_dim)
    qg = q.view(1, kv_heads, heads // kv_heads, head_dim)
    outs, lses = [], []
    for start in range(0, g.blocks.numel(), chunk):
        blocks = g.blocks[start : start + chunk]
        keys = min(g.keys - start * block_size, blocks.numel() * block_size)
        k_rows, v_rows = _workspace(meta, (blocks.numel(), k_blocks.shape[1]), k_blocks)
        torch.index_select(k_blocks, 0, blocks, out=k_rows)
        torch.index_select(v_blocks, 0, blocks, out=v_rows)
        k = k_rows.view(1, -1, kv_heads, head_dim)[:, :keys].transpose(1, 2)
        v = v_rows.view(1, -1, kv_heads, head_dim)[:, :keys].transpose(1, 2)
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qg, k, v, scale=scale)
        outs.append(o)
        lses.append(lse)
    weights = torch.softmax(torch.stack(lses), dim=0).unsqueeze(-1)  # (chunks, 1, kv_heads, group, 1)
    merged = (weights * torch.stack(outs).float()).sum(0)
    return merged.to(q.dtype).view(heads, head_dim)


def _workspace(
    meta: AttentionMetadata, shape: tuple[int, int], like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Buffers of ``shape`` for a group's keys and values, shared by the step's groups and layers
    (the largest group's size is allocated once; smaller ones use its front)."""
    key = (tuple(like.shape[1:]), like.dtype)
    k, v = meta.workspace.get(key, (None, None))
    if k is None or v is None or k.numel() < shape[0] * shape[1]:
        k = torch.empty(shape[0] * shape[1], dtype=like.dtype, device=like.device)
        v = torch.empty_like(k)
        meta.workspace[key] = (k, v)
    n = shape[0] * shape[1]
    return k[:n].view(shape), v[:n].view(shape)
