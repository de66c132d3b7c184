"""LoRA shrink and expand as Triton kernels, over one batch that mixes adapters and ranks.

One pair of kernels serves prefill and decode. The batch's LoRA tokens are grouped by adapter
slot through a permutation built once per step (``LoraBatch``); each program takes a tile of
one group. A prefill segment is one long group (SGMV-style); at decode an adapter's tokens form a
short group, so its weights are read once per tile rather than once per token as per-token
BGMV would. Slot weights are reached through per-(slice, slot) addresses (``LoraTables``), so
each adapter stays at its own rank in memory, and a program whose rank tile lies past its slot's
rank exits at once. A token with slot -1 is in no group and costs nothing. The slices of a fused
projection (q|k|v, gate|up) are one more grid axis: one launch serves them all.

The torch reference is ``lora.add_lora_torch``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace

import torch
import triton
import triton.language as tl

from dlora.kernels.host import to_device
from dlora.kernels.lora import LoraProjection, LoraTables
from dlora.kernels.lora_tuning import Shape, bucket, tuned_tiles
from dlora.kernels.triton_common import ELEM, f32_dot, interpreting


@dataclass
class LoraBatch:
    """Per-step metadata for the Triton path, built once and shared by every layer.

    Example: slots per token [3, 0, 3, -1, 0] give token_index [0, 2, 1, 4] (slot 3's tokens,
    then slot 0's), group_slot [3, 0], group_start [0, 2], group_len [2, 2]; token 3 is in no group.
    """

    token_index: torch.Tensor  # (P,) int32: the token at each grouped position
    group_slot: torch.Tensor  # (G,) int32: slot of each group
    group_start: torch.Tensor  # (G,) int32: its first position in token_index
    group_len: torch.Tensor  # (G,) int32: its number of tokens
    num_groups: int
    max_group_len: int
    sign: float = 1.0  # -1.0: the deltas are subtracted (a mixed step's correction, see LoraPasses)
    # Ranks the launches are sized for whatever the slots hold (a CUDA graph's, so a slot change
    # needs no new graph; the kernels launch even where no slot targets the projection); 0: the
    # tables' largest.
    rank_bound: int = 0
    # LoraBlocks.choose's answers for this step, by projection shape: every layer asks again.
    tiles: dict[tuple[int, ...], LoraBlocks] = field(default_factory=dict, repr=False)

    @classmethod
    def from_token_slots(cls, token_slots: list[int], device: torch.device, sign: float = 1.0) -> LoraBatch | None:
        """Group the tokens by slot, groups in order of first appearance; None when no token uses LoRA."""
        index, slots, starts, lens = group_by_slot(token_slots)
        if not slots:
            return None

        def i32(values: list[int]) -> torch.Tensor:
            return to_device(values, torch.int32, device)

        return cls(i32(index), i32(slots), i32(starts), i32(lens), len(slots), max(lens), sign)


def group_by_slot(token_slots: list[int]) -> tuple[list[int], list[int], list[int], list[int]]:
    """``LoraBatch``'s fields as lists: (token_index, group_slot, group_start, group_len); tokens
    with slot -1 are in no group."""
    members: dict[int, list[int]] = {}
    for t, slot in enumerate(token_slots):
        if slot >= 0:
            members.setdefault(slot, []).append(t)
    index, starts, lens = [], [], []
    for tokens in members.values():
        starts.append(len(index))
        lens.append(len(tokens))
        index += tokens
    return index, list(members), starts, lens


@dataclass
class LoraPasses:
    """One step's LoRA work on the Triton path: the deltas added (each token's own adapter) and,
    in a mixed step, the merged adapter's delta subtracted from every token that is not its own
    (``lora.LoraSegments`` is the torch path's twin). Two launch pairs rather than one where a
    token sits in two groups: the expand's read-add-write of an output row is not atomic, so two
    programs adding to one row at once would race; atomics would make the sum's order, and so
    its last bits, vary between runs."""

    passes: list[LoraBatch]

    @classmethod
    def from_token_slots(
        cls, token_slots: list[int], device: torch.device, minus_slots: list[int] | None = None
    ) -> LoraPasses | None:
        """``token_slots``: each token's own slot; ``minus_slots``: the slot whose delta it
        subtracts (-1: none). None when no token uses LoRA."""
        added = LoraBatch.from_token_slots(token_slots, device)
        subtracted = LoraBatch.from_token_slots(minus_slots or [], device, sign=-1.0)
        passes = [b for b in (added, subtracted) if b is not None]
        return cls(passes) if passes else None


# Tiles per group follow the batch: not specialized on (Triton would compile a variant for 1 tile
# and another for multiples of 16), so a new batch size never waits for a compile.
@triton.jit(do_not_specialize=["m_tiles", "stride_split"])
def _shrink_kernel(
    x_ptr,  # (T, K) the projection's input; rows at stride_x, columns contiguous
    y_ptr,  # (SPLIT_K, P, n_slices, R) float32 out: per K share, x·Aᵀ for each grouped position and slice
    a_ptrs,  # (n_slices, num_slots) int64: address of each slot's A (rank, K), contiguous
    ranks_ptr,  # (n_slices, num_slots) int32: each slot's rank for the slice, 0 where it has none
    token_index_ptr,  # (P,) int32: the token at each grouped position
    group_slot_ptr,  # (G,) int32: slot of each group
    group_start_ptr,  # (G,) int32: first grouped position of each group
    group_len_ptr,  # (G,) int32: tokens in each group
    K,  # input features
    stride_x,  # elements between rows of x
    num_slots,  # columns of the tables
    n_slices,  # slices of the fused projection
    R,  # y's last dimension (at least every rank in the tables)
    stride_split,  # elements between y's K shares (P * n_slices * R)
    m_tiles,  # BLOCK_M tiles per group: enough for the longest group
    r_tiles,  # BLOCK_R tiles per slice: enough for the largest rank
    ELEM: tl.constexpr,  # element type of A (and x)
    F32_DOT: tl.constexpr,  # multiply in exact fp32 (see ``triton_common.f32_dot``)
    BLOCK_M: tl.constexpr,  # tokens per program
    BLOCK_R: tl.constexpr,  # rank columns per program
    BLOCK_K: tl.constexpr,  # input features per loop step
    SPLIT_K: tl.constexpr,  # programs sharing one K range, each writing its own share of y
):
    pid_gm = tl.program_id(0)
    pid_jr = tl.program_id(1)
    pid_k = tl.program_id(2)
    g = pid_gm // m_tiles
    m0 = (pid_gm % m_tiles) * BLOCK_M
    j = pid_jr // r_tiles
    r0 = (pid_jr % r_tiles) * BLOCK_R
    n = tl.load(group_len_ptr + g)
    slot = tl.load(group_slot_ptr + g)
    rank = tl.load(ranks_ptr + j * num_slots + slot)
    if m0 >= n or r0 >= rank:
        return
    a_ptr = tl.load(a_ptrs + j * num_slots + slot).to(tl.pointer_type(ELEM))
    start = tl.load(group_start_ptr + g)

    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_mask = offs_m < n
    tokens = tl.load(token_index_ptr + start + offs_m, mask=m_mask, other=0).to(tl.int64)
    offs_r = r0 + tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        xt = tl.load(
            x_ptr + tokens[:, None] * stride_x + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0
        )  # (BLOCK_M, BLOCK_K)
        at = tl.load(
            a_ptr + offs_r[None, :] * K + offs_k[:, None], mask=r_mask[None, :] & k_mask[:, None], other=0.0
        )  # (BLOCK_K, BLOCK_R) = Aᵀ tile
        if F32_DOT:
            acc += tl.dot(xt.to(tl.float32), at.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(xt, at)
    y = y_ptr + pid_k * stride_split + ((start + offs_m)[:, None] * n_slices + j) * R + offs_r[None, :]
    tl.store(y, acc, mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def column_tile(
    group_len_ptr,
    group_slot_ptr,
    ranks_ptr,
    sizes_ptr,
    num_slots,
    m_tiles,
    n_tiles,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """This program's place in a grid of (groups x token tiles, slices x column tiles), as the
    expand (and the fused kernel) lay it out: group g, its first token m0, slice j, its first column
    n0; with the group's length, its slot, that slot's rank for the slice and the slice's width."""
    pid_gm = tl.program_id(0)
    pid_jn = tl.program_id(1)
    g = pid_gm // m_tiles
    m0 = (pid_gm % m_tiles) * BLOCK_M
    j = pid_jn // n_tiles
    n0 = (pid_jn % n_tiles) * BLOCK_N
    n = tl.load(group_len_ptr + g)
    slot = tl.load(group_slot_ptr + g)
    rank = tl.load(ranks_ptr + j * num_slots + slot)
    size = tl.load(sizes_ptr + j)
    return g, m0, j, n0, n, slot, rank, size


@triton.jit(do_not_specialize=["m_tiles", "stride_split"])  # as _shrink_kernel
def _expand_kernel(
    y_ptr,  # (SPLIT_K, P, n_slices, R) float32: the shrink's output, its K shares summed here
    out_ptr,  # (T, N) the fused projection's output, updated in place; rows at stride_out
    b_ptrs,  # (n_slices, num_slots) int64: address of each slot's B (size, rank), contiguous
    ranks_ptr,  # (n_slices, num_slots) int32: each slot's rank for the slice, 0 where it has none
    scales_ptr,  # (n_slices, num_slots) float32: each slot's LoRA scaling for the slice
    offsets_ptr,  # (n_slices,) int32: first output column of each slice
    sizes_ptr,  # (n_slices,) int32: output columns of each slice
    token_index_ptr,  # (P,) int32: the token at each grouped position
    group_slot_ptr,  # (G,) int32: slot of each group
    group_start_ptr,  # (G,) int32: first grouped position of each group
    group_len_ptr,  # (G,) int32: tokens in each group
    sign,  # float: 1.0 adds the deltas, -1.0 subtracts them
    stride_out,  # elements between rows of out
    num_slots,  # columns of the tables
    n_slices,  # slices of the fused projection
    R,  # y's last dimension
    stride_split,  # elements between y's K shares
    m_tiles,  # BLOCK_M tiles per group
    n_tiles,  # BLOCK_N tiles per slice: enough for the widest
    ELEM: tl.constexpr,  # element type of B (and out)
    F32_DOT: tl.constexpr,  # multiply in exact fp32 (see ``triton_common.f32_dot``)
    BLOCK_M: tl.constexpr,  # tokens per program
    BLOCK_N: tl.constexpr,  # output columns per program
    BLOCK_R: tl.constexpr,  # rank per loop step
    SPLIT_K: tl.constexpr,  # K shares in y
):
    g, m0, j, n0, n, slot, rank, size = column_tile(
        group_len_ptr, group_slot_ptr, ranks_ptr, sizes_ptr, num_slots, m_tiles, n_tiles, BLOCK_M, BLOCK_N
    )
    if m0 >= n or n0 >= size or rank == 0:  # past the group or slice; or the slot does not target it
        return
    b_ptr = tl.load(b_ptrs + j * num_slots + slot).to(tl.pointer_type(ELEM))
    scale = tl.load(scales_ptr + j * num_slots + slot) * sign
    start = tl.load(group_start_ptr + g)

    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_mask = offs_m < n
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_mask = offs_n < size
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank
        y_off = ((start + offs_m)[:, None] * n_slices + j) * R + offs_r[None, :]
        y_mask = m_mask[:, None] & r_mask[None, :]
        yt = tl.load(y_ptr + y_off, mask=y_mask, other=0.0)  # (BLOCK_M, BLOCK_R)
        # The shrink's K shares, summed in one fixed order: the same bits on every run (float
        # atomics in the shrink would add them in whatever order the programs finish). A loop, not
        # unrolled: unrolled, the pipeliner buffers every share's load (2 MB of shared memory at
        # 64 shares, where an SM has 227 KB; tests/kernels/test_shared_memory.py).
        for share in range(1, SPLIT_K):
            yt += tl.load(y_ptr + share * stride_split + y_off, mask=y_mask, other=0.0)
        bt = tl.load(
            b_ptr + offs_n[None, :] * rank + offs_r[:, None], mask=r_mask[:, None] & n_mask[None, :], other=0.0
        )  # (BLOCK_R, BLOCK_N) = Bᵀ tile
        if F32_DOT:
            acc += tl.dot(yt, bt.to(tl.float32), input_precision="ieee")
        else:
            # As the torch path does: the shrunk activations in the weights' type, fp32 sums.
            acc += tl.dot(yt.to(ELEM), bt)
    tokens = tl.load(token_index_ptr + start + offs_m, mask=m_mask, other=0).to(tl.int64)
    o = out_ptr + tokens[:, None] * stride_out + tl.load(offsets_ptr + j) + offs_n[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    prev = tl.load(o, mask=mask, other=0.0)
    tl.store(o, (prev.to(tl.float32) + acc * scale).to(ELEM), mask=mask)


@dataclass(frozen=True)
class LoraBlocks:
    """Tile sizes. A GPU wants small tiles and many programs; the interpreter runs programs one
    after another in Python, so there few large tiles are fastest."""

    m: int  # tokens per program (tl.dot needs >= 16)
    r: int  # shrink: rank columns per program
    k: int  # shrink: input features per loop step
    n: int  # expand: output columns per program
    expand_r: int  # expand: rank per loop step
    split_k: int = 1  # shrink: programs sharing one K range, each writing its share (summed by the expand)

    @classmethod
    def rule(cls, batch: LoraBatch, tables: LoraTables, in_features: int = 0) -> LoraBlocks:
        """The tiles by rule, without the tuned table. ``in_features``: the input's width (0: the
        loaded adapters'; a CUDA graph may launch for a projection none of them targets yet, and
        its tiles stay for the adapters that come later)."""
        in_features = in_features or tables.in_features
        max_rank = batch.rank_bound or tables.max_rank
        rank = max(16, triton.next_power_of_2(max_rank))
        if interpreting():
            return cls(
                m=max(16, min(128, triton.next_power_of_2(batch.max_group_len))),
                r=rank,
                k=max(16, min(512, triton.next_power_of_2(in_features))),
                n=max(16, min(512, triton.next_power_of_2(tables.max_size))),
                expand_r=rank,
            )
        m = 16 if batch.max_group_len <= 16 else 32 if batch.max_group_len <= 256 else 64
        # A decode batch of one adapter gives the shrink a handful of programs, each looping over
        # all of K (issue 15 measured it at 1.0 ms a step at 7B widths on an H200). Split K until
        # the programs fill every SM twice, keeping each share at least MIN_SHARE features wide.
        programs = batch.num_groups * triton.cdiv(batch.max_group_len, m)
        programs *= tables.ranks.shape[0] * triton.cdiv(max_rank, 16)
        split, fill = 1, 2 * _sm_count(tables.a_ptrs.device)
        while programs * split * 2 <= fill and in_features >= split * 2 * MIN_SHARE:
            split *= 2
        return cls(m=m, r=16, k=64, n=64, expand_r=min(64, rank), split_k=split)

    @classmethod
    def choose(cls, batch: LoraBatch, tables: LoraTables, in_features: int = 0) -> LoraBlocks:
        """``rule``'s tiles, with those measured on this GPU for this projection and a batch near
        this one where the tuned table (``lora_tuning``) has some; kept in ``batch`` for the other
        layers' projections of the same shape."""
        key = (in_features or tables.in_features, tables.ranks.shape[0], tables.max_size, tables.max_rank)
        if (blocks := batch.tiles.get(key)) is None:
            blocks = batch.tiles[key] = cls._choose(batch, tables, in_features)
        return blocks

    @classmethod
    def _choose(cls, batch: LoraBatch, tables: LoraTables, in_features: int) -> LoraBlocks:
        blocks = cls.rule(batch, tables, in_features)
        if interpreting() or tables.a_ptrs.device.type != "cuda":
            return blocks
        rank = max(16, triton.next_power_of_2(batch.rank_bound or tables.max_rank))
        groups = bucket(batch.num_groups)
        shape = Shape(
            in_features or tables.in_features,
            tables.ranks.shape[0],
            tables.max_size,
            rank,
            bucket(batch.max_group_len),
            groups,
        )
        tuned = tuned_tiles(tables.a_ptrs.device, shape)
        return replace(blocks, **tuned) if tuned else blocks


MIN_SHARE = 256  # input features per shrink program at least: 4 loop steps of BLOCK_K = 64


@functools.cache
def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 132 elsewhere (an H100/H200 SXM, NVIDIA's H100
    architecture whitepaper), so a choice made off a GPU is the one an H100 would get."""
    if device.type != "cuda":
        return 132
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


def lora_shrink(
    x: torch.Tensor, tables: LoraTables, batch: LoraBatch, blocks: LoraBlocks | None = None
) -> torch.Tensor:
    """y[s, p, j, :rank] = the s-th K share of x[token_index[p]] · A[j, slot(p)]ᵀ for every grouped
    position p and slice j; the shares sum (in ``lora_expand``) to the whole product.

    x: (T, K), contiguous rows. Returns y (split_k, P, n_slices, R) float32 with R >= every rank;
    entries past a slot's rank are unspecified. ``blocks`` None: ``LoraBlocks.choose``, whose
    ``split_k`` spreads K over more programs where the batch alone gives too few to fill the GPU.
    """
    assert x.dim() == 2 and x.stride(1) == 1, "x must be (T, K) with contiguous rows"
    max_rank = batch.rank_bound or tables.max_rank
    assert max_rank > 0, "no adapter is loaded"
    assert x.dtype in ELEM and tables.dtype in (None, x.dtype), f"x is {x.dtype}, the weights {tables.dtype}"
    assert tables.in_features in (0, x.shape[1]), f"x has {x.shape[1]} features, A takes {tables.in_features}"
    assert x.device == tables.a_ptrs.device == batch.token_index.device, "x, tables and batch on one device"
    n_slices, num_slots = tables.ranks.shape
    num_pos, k = batch.token_index.numel(), x.shape[1]
    b = blocks or LoraBlocks.choose(batch, tables, x.shape[1])
    r_tiles = triton.cdiv(max_rank, b.r)
    m_tiles = triton.cdiv(batch.max_group_len, b.m)
    y = torch.empty(b.split_k, num_pos, n_slices, r_tiles * b.r, dtype=torch.float32, device=x.device)
    grid = (batch.num_groups * m_tiles, n_slices * r_tiles, b.split_k)
    _shrink_kernel[grid](
        x,
        y,
        tables.a_ptrs,
        tables.ranks,
        batch.token_index,
        batch.group_slot,
        batch.group_start,
        batch.group_len,
        k,
        x.stride(0),
        num_slots,
        n_slices,
        y.shape[3],
        y.stride(0),
        m_tiles,
        r_tiles,
        ELEM=ELEM[x.dtype],
        F32_DOT=f32_dot(x.dtype),
        BLOCK_M=b.m,
        BLOCK_R=b.r,
        BLOCK_K=b.k,
        SPLIT_K=b.split_k,
    )
    return y


def lora_expand(
    out: torch.Tensor, y: torch.Tensor, tables: LoraTables, batch: LoraBatch, blocks: LoraBlocks | None = None
) -> None:
    """In place: out[token_index[p], slice j] += sign · scale[j, slot] · (Σ_s y[s, p, j, :rank]) · B[j, slot]ᵀ.

    out: (T, N) with contiguous rows, in the weights' dtype; y from ``lora_shrink``, its K shares
    summed in order s = 0, 1, ... (the same bits every run).
    """
    assert out.dim() == 2 and out.stride(1) == 1, "out must be (T, N) with contiguous rows"
    assert y.dtype == torch.float32 and y.shape[1:3] == (batch.token_index.numel(), tables.ranks.shape[0])
    assert tables.dtype in (None, out.dtype), f"out is {out.dtype}, the weights {tables.dtype}"
    assert out.shape[1] >= tables.out_features, f"out has {out.shape[1]} columns, slices reach {tables.out_features}"
    assert out.device == y.device == tables.b_ptrs.device, "out, y and tables on one device"
    n_slices, num_slots = tables.ranks.shape
    b = blocks or LoraBlocks.choose(batch, tables)
    m_tiles = triton.cdiv(batch.max_group_len, b.m)
    n_tiles = triton.cdiv(tables.max_size, b.n)
    grid = (batch.num_groups * m_tiles, n_slices * n_tiles)
    _expand_kernel[grid](
        y,
        out,
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
        out.stride(0),
        num_slots,
        n_slices,
        y.shape[3],
        y.stride(0),
        m_tiles,
        n_tiles,
        ELEM=ELEM[out.dtype],
        F32_DOT=f32_dot(out.dtype),
        BLOCK_M=b.m,
        BLOCK_N=b.n,
        BLOCK_R=b.expand_r,
        SPLIT_K=y.shape[0],
    )


def add_lora_triton(
    out: torch.Tensor, x: torch.Tensor, proj: LoraProjection, batch: LoraBatch, blocks: LoraBlocks | None = None
) -> None:
    """The Triton twin of ``add_lora_torch``: out (T, N) += each LoRA token's delta, in place."""
    tables = proj.tables
    assert tables is not None, "LoraProjection.refresh() was not called after loading slots"
    if tables.max_rank == 0 and not batch.rank_bound:
        return
    blocks = blocks or LoraBlocks.choose(batch, tables, x.shape[1])
    lora_expand(out, lora_shrink(x, tables, batch, blocks), tables, batch, blocks)


def add_lora_passes(
    out: torch.Tensor, x: torch.Tensor, proj: LoraProjection, passes: LoraPasses, blocks: LoraBlocks | None = None
) -> None:
    """``add_lora_triton`` for each pass in turn: out (T, N) += each token's own delta, -= the
    merged adapter's where a mixed step subtracts it."""
    for batch in passes.passes:
        add_lora_triton(out, x, proj, batch, blocks)
