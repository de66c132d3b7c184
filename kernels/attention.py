"""Paged attention over the KV block pool, torch implementation (the CPU path and the reference).

Sequences of one step are split into groups of similar query length (decode: one token each;
prefill: many); each group is padded to its longest query and run as one batched SDPA call,
with a mask that is causal inside the new tokens and hides cache slots past each context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionGroup:
    """Sequences attended in one batched call. B sequences, queries padded to Q, keys to L."""

    q_index: torch.Tensor  # (B, Q) int64: flat token index of each query (padding repeats a valid one)
    q_valid: torch.Tensor  # (B, Q) bool: which queries are real
    block_tables: torch.Tensor  # (B, max_blocks) int64: physical blocks (padding points at block 0)
    mask: torch.Tensor  # (B, 1, Q, L) bool: True where query may attend to key; L = max_blocks * block_size


@dataclass
class AttentionMetadata:
    """Built once per step, shared by every layer."""

    slots: torch.Tensor  # (T,) int64: flat cache slot where each new token's K/V is written
    groups: list[AttentionGroup]


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
    decode = [i for i, n in enumerate(q_lens) if n == 1]
    prefill = [i for i, n in enumerate(q_lens) if n > 1]
    for members in (decode, prefill):
        if members:
            groups.append(_group(members, starts, q_lens, ctx_lens, block_tables, block_size, device))
    return AttentionMetadata(slots=torch.tensor(slots, dtype=torch.int64, device=device), groups=groups)


def _group(
    members: list[int],
    starts: list[int],
    q_lens: list[int],
    ctx_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
    device: torch.device,
) -> AttentionGroup:
    q_max = max(q_lens[i] for i in members)
    blocks_max = max(len(block_tables[i]) for i in members)
    key_pos = torch.arange(blocks_max * block_size)
    q_index = torch.empty(len(members), q_max, dtype=torch.int64)
    q_valid = torch.zeros(len(members), q_max, dtype=torch.bool)
    tables = torch.zeros(len(members), blocks_max, dtype=torch.int64)
    mask = torch.zeros(len(members), 1, q_max, blocks_max * block_size, dtype=torch.bool)
    for row, i in enumerate(members):
        n, ctx = q_lens[i], ctx_lens[i]
        q_index[row, :n] = torch.arange(starts[i], starts[i] + n)
        q_index[row, n:] = starts[i]
        q_valid[row, :n] = True
        tables[row, : len(block_tables[i])] = torch.tensor(block_tables[i], dtype=torch.int64)
        # Query j sits at position ctx - n + j and sees keys up to and including itself.
        q_pos = torch.arange(ctx - n, ctx)
        mask[row, 0, :n] = key_pos[None, :] <= q_pos[:, None]
        mask[row, 0, n:] = mask[row, 0, 0]  # padded queries copy a real row: no all-masked NaN rows
    return AttentionGroup(
        q_index=q_index.to(device),
        q_valid=q_valid.to(device),
        block_tables=tables.to(device),
        mask=mask.to(device),
    )


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
    k_blocks = k_cache.unflatten(0, (-1, block_size))
    v_blocks = v_cache.unflatten(0, (-1, block_size))
    for g in meta.groups:
        k = k_blocks[g.block_tables].flatten(1, 2).transpose(1, 2)  # (B, kv_heads, L, D)
        v = v_blocks[g.block_tables].flatten(1, 2).transpose(1, 2)
        qg = q[g.q_index].transpose(1, 2)  # (B, heads, Q, D)
        o = F.scaled_dot_product_attention(qg, k, v, attn_mask=g.mask, scale=scale, enable_gqa=True)
        o = o.transpose(1, 2)  # (B, Q, heads, D)
        out[g.q_index[g.q_valid]] = o[g.q_valid]
    return out
