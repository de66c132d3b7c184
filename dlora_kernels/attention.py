"""Paged attention over the KV block pool, torch implementation (the CPU path and the reference).

Sequences of one step are split into groups (decode: one new token each; prefill: many) of at
most ``GROUP_KEYS`` keys together. For each group and layer, the keys and values of its blocks
are copied with one ``index_select`` each into a workspace reused by every group and layer of the
step, and attended by one SDPA call: a lone sequence over exactly its context (no mask, or SDPA's
own causal one when its whole prompt is new), several with queries and keys padded and a mask
that is causal inside the new tokens and hides keys past each context. Small groups keep the
copy in cache for SDPA's read and spare the allocation (page faults) per layer that made the
first version of this path 5-10x slower than SDPA over dense keys (BENCHMARKS.md, kernels).
On a CPU, decodes of ``LONE_DECODE_KEYS`` keys or more are attended together instead, chunk by
chunk of their keys (``LongDecodes``), the chunks merged by their log-sum-exp.
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
# Long decodes are attended together in chunks of their keys of about this many bytes (keys and
# values of every sequence in the chunk), each copy still in cache when it is read, the chunks'
# outputs merged by their log-sum-exp (as flash-decoding splits the keys). One call per chunk for
# all of them, not one per sequence and chunk: at 8 sequences of 512 keys, 32/8 heads x 128 fp32,
# 1.1-1.25x dense SDPA against 1.45-1.9x chunked per sequence (2 MiB each), interleaved on a
# 2-core EPYC VM; 4 MiB measured best of 2-16 (BENCHMARKS.md, kernels).
DECODE_CHUNK_BYTES = 4 << 20
# Keys of one sequence in a chunk at least (fewer cost more per key in the flash call).
DECODE_CHUNK_KEYS = 128
# A decode with at least this many keys is attended with the other long ones, in chunks (on a
# CPU); shorter ones are grouped as prefills are.
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
class LongDecodes:
    """The step's decodes of at least ``LONE_DECODE_KEYS`` keys, longest first, attended together
    chunk by chunk (CPU only: aten's flash attention that returns the log-sum-exp is the CPU's)."""

    q_index: torch.Tensor  # (M,) int64: flat index of each one's query token
    tables: torch.Tensor  # (M, max_blocks) int64: block tables, padded with block 0
    ctx: list[int]  # keys of each, descending
    # Per block size in bytes: the runs (``split``), made at the first layer, reused by the others.
    runs: dict[int, list[Run]] = field(default_factory=dict)

    def split(self, block_size: int, block_bytes: int) -> list[Run]:
        """The long decodes in runs of consecutive sequences (longest first), each run's keys in
        chunks of their blocks, a chunk's keys and values within ``DECODE_CHUNK_BYTES``; at least
        ``DECODE_CHUNK_KEYS`` keys of each sequence a chunk (fewer per sequence, more sequences,
        cost more per key in the flash call: one long decode of 32 KV heads takes a chunk alone).
        A run is as deep as its own longest: one very long decode beside short ones merges its
        chunks in a run of its own size, not the whole batch's."""
        if block_bytes not in self.runs:
            blocks = self.tables.shape[1]
            width = max(1, DECODE_CHUNK_BYTES // (2 * len(self.ctx) * block_bytes), DECODE_CHUNK_KEYS // block_size)
            width = min(width, blocks)  # no wider than the longest's table: the rest is padding
            rows = max(1, DECODE_CHUNK_BYTES // (2 * width * block_bytes))  # sequences a chunk
            runs = []
            for lo in range(0, len(self.ctx), rows):
                ctx = self.ctx[lo : lo + rows]
                chunks = []
                for start in range(0, blocks, width):
                    if (m := sum(c > start * block_size for c in ctx)) == 0:
                        break  # the run's longest ends before this chunk: so does every other
                    chunks.append(self._chunk(lo, m, start, width, block_size))
                runs.append(Run(lo, len(ctx), chunks))
            self.runs[block_bytes] = runs
        return self.runs[block_bytes]

    def _chunk(self, lo: int, m: int, start: int, width: int, block_size: int) -> Chunk:
        ids = self.tables[lo : lo + m, start : start + width]
        if ids.shape[1] < width:  # the last chunk of the longest: padded with block 0, masked
            ids = torch.nn.functional.pad(ids, (0, width - ids.shape[1]))
        keys = width * block_size
        valid = [min(c - start * block_size, keys) for c in self.ctx[lo : lo + m]]
        mask = None
        if min(valid) < keys:
            past = torch.arange(keys) >= torch.tensor(valid)[:, None]
            mask = torch.zeros(m, 1, 1, keys).masked_fill_(past.view(m, 1, 1, keys), float("-inf"))
            mask = mask.to(self.tables.device)
        return Chunk(m, ids.reshape(-1).contiguous(), mask)


@dataclass(frozen=True)
class Chunk:
    """Keys of long decodes attended in one call: its run's first m sequences (each with at least
    one key in it)."""

    m: int
    blocks: torch.Tensor  # (m * width,) int64: each sequence's blocks of the chunk, padded with block 0
    mask: torch.Tensor | None  # (m, 1, 1, width * block_size) fp32: -inf past a context, else 0; None: none past


@dataclass(frozen=True)
class Run:
    """Long decodes lo .. lo + rows - 1 and their chunks, in order of their keys."""

    lo: int
    rows: int
    chunks: list[Chunk]


@dataclass
class AttentionMetadata:
    """Built once per step, shared by every layer."""

    slots: torch.Tensor  # (T,) int64: flat cache slot where each new token's K/V is written
    groups: list[AttentionGroup]
    long_decodes: LongDecodes | None = None
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
    long = [i for i, n in enumerate(q_lens) if n == 1 and ctx_lens[i] >= LONE_DECODE_KEYS]
    if device.type != "cpu":  # attended one by one, each alone in its group
        long = []
    groups = []
    for decode in (True, False):
        members = [i for i, n in enumerate(q_lens) if (n == 1) == decode and i not in long]
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
    return AttentionMetadata(
        slots=to_device(slots, torch.int64, device),
        groups=groups,
        long_decodes=_long_decodes(long, starts, ctx_lens, block_tables, device) if long else None,
    )


def _long_decodes(
    members: list[int], starts: list[int], ctx_lens: list[int], block_tables: list[list[int]], device: torch.device
) -> LongDecodes:
    members = sorted(members, key=lambda i: -ctx_lens[i])
    width = max(len(block_tables[i]) for i in members)
    tables = np.zeros((len(members), width), dtype=np.int64)
    for row, i in enumerate(members):
        tables[row, : len(block_tables[i])] = block_tables[i]
    return LongDecodes(
        q_index=to_device([starts[i] for i in members], torch.int64, device),
        tables=to_device(tables, torch.int64, device),
        ctx=[ctx_lens[i] for i in members],
    )


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

    Whole blocks are read, and block 0 pads short tables: keys past a context are masked, and a
    masked key weighs 0, but 0 · NaN is NaN. The cache's slots past every context must be finite:
    the engine never gives block 0 out and zeroes each block it gives (``BlockManager.take_fresh``),
    which costs a block's write once where zeroing the copies cost every step and layer.
    """
    out = torch.empty_like(q)
    _, kv_heads, head_dim = k_cache.shape
    k_blocks = k_cache.view(-1, block_size * kv_heads * head_dim)  # one row per block
    v_blocks = v_cache.view(-1, block_size * kv_heads * head_dim)
    if meta.long_decodes is not None:
        long = meta.long_decodes
        out[long.q_index] = _long_decodes_attended(q[long.q_index], k_blocks, v_blocks, meta, block_size, scale)
    for g in meta.groups:
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


def _long_decodes_attended(
    q: torch.Tensor,
    k_blocks: torch.Tensor,
    v_blocks: torch.Tensor,
    meta: AttentionMetadata,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """The long decodes' queries q (M, heads, D) over their contexts, chunk by chunk of every one's
    keys at once (``LongDecodes.split``). Each chunk runs aten's CPU flash attention, which also
    returns the log-sum-exp of its scores; the chunks' outputs weighted by softmax over those are
    the attention over all keys (a sequence without keys in a chunk weighs nothing there). The
    query heads of one KV head are that call's query rows (GQA without repeating keys)."""
    long = meta.long_decodes
    assert long is not None
    members, heads, head_dim = q.shape
    kv_heads = k_blocks.shape[1] // (block_size * head_dim)
    group = heads // kv_heads
    qg = q.view(members, kv_heads, group, head_dim)
    out = torch.empty_like(q)
    for run in long.split(block_size, k_blocks[0].nbytes):
        depth, rows = len(run.chunks), run.rows
        lses = q.new_full((depth, rows, kv_heads, group), float("-inf"), dtype=torch.float32)
        outs = q.new_zeros((depth, rows, kv_heads, group, head_dim), dtype=torch.float32)
        for j, c in enumerate(run.chunks):
            k_rows, v_rows = _workspace(meta, (c.blocks.numel(), k_blocks.shape[1]), k_blocks)
            torch.index_select(k_blocks, 0, c.blocks, out=k_rows)
            torch.index_select(v_blocks, 0, c.blocks, out=v_rows)
            k = k_rows.view(c.m, -1, kv_heads, head_dim).transpose(1, 2)
            v = v_rows.view(c.m, -1, kv_heads, head_dim).transpose(1, 2)
            mask = c.mask if c.mask is None else c.mask.to(q.dtype)
            o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                qg[run.lo : run.lo + c.m], k, v, attn_mask=mask, scale=scale
            )
            outs[j, : c.m], lses[j, : c.m] = o, lse
        weights = torch.softmax(lses, dim=0).unsqueeze(-1)  # (chunks, rows, kv_heads, group, 1)
        merged = (weights * outs).sum(0).to(q.dtype)
        out[run.lo : run.lo + rows] = merged.view(rows, heads, head_dim)
    return out


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
