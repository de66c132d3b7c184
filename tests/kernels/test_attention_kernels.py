"""Triton paged attention (decode over the block table, causal varlen prefill, cached prefixes)
equals the torch reference over batch sizes, GQA ratios, head sizes, block sizes and dtypes."""

from __future__ import annotations

import random

import pytest
import torch

from dlora.kernels import attention
from dlora.kernels.attention import build_attention_metadata, paged_attention_torch
from dlora.kernels.attention_triton import build_paged_metadata, paged_attention_triton
from tests.kernels.conftest import assert_close, cuda_only, device


def check(
    q_lens: list[int],
    ctx_lens: list[int],
    heads: int,
    kv_heads: int,
    head_dim: int,
    block_size: int = 16,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    block_n: int | None = None,
) -> None:
    """Sequences' blocks scattered over a shuffled pool; new tokens are the last q_len of ctx_len."""
    rng = random.Random(seed)
    needed = [-(-c // block_size) for c in ctx_lens]
    pool = list(range(sum(needed) + 3))
    rng.shuffle(pool)
    tables, slots = [], []
    for n, ctx, nb in zip(q_lens, ctx_lens, needed):
        table, pool = pool[:nb], pool[nb:]
        tables.append(table)
        slots += [table[p // block_size] * block_size + p % block_size for p in range(ctx - n, ctx)]
    num_slots = (max(max(t) for t in tables) + 1) * block_size
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(q_lens), heads, head_dim, generator=g).to(device(), dtype)
    k = torch.randn(num_slots, kv_heads, head_dim, generator=g).to(device(), dtype)
    v = torch.randn(num_slots, kv_heads, head_dim, generator=g).to(device(), dtype)
    scale = head_dim**-0.5
    want = paged_attention_torch(
        q, k, v, build_attention_metadata(q_lens, ctx_lens, tables, slots, block_size, device()), block_size, scale
    )
    meta = build_paged_metadata(q_lens, ctx_lens, tables, slots, block_size, device())
    assert meta.slots.tolist() == slots
    assert_close(paged_attention_triton(q, k, v, meta, block_size, scale, block_n=block_n), want)


def test_metadata_tiles_prefill_and_lists_decode() -> None:
    meta = build_paged_metadata(
        [1, 20, 1, 3],
        [9, 20, 40, 5],
        [[0], [1, 2], [3, 4, 5], [6]],
        list(range(25)),
        16,
        torch.device("cpu"),
        block_m=16,
    )
    assert meta.decode_seqs.tolist() == [0, 2]
    assert list(zip(meta.tile_seq.tolist(), meta.tile_q0.tolist())) == [(1, 0), (1, 16), (3, 0)]
    assert meta.q_start.tolist() == [0, 1, 21, 22]
    assert meta.block_tables.tolist() == [[0, 0, 0], [1, 2, 0], [3, 4, 5], [6, 0, 0]]


@pytest.mark.parametrize("batch", [1, 2, 7, 16, 64, 133])
def test_decode(batch: int) -> None:
    rng = random.Random(batch)
    ctx = [rng.randint(1, 150) for _ in range(batch)]
    check([1] * batch, ctx, heads=4, kv_heads=2, head_dim=16, seed=batch)


@pytest.mark.parametrize("num_seqs", [1, 2, 7])
def test_prefill_variable_lengths(num_seqs: int) -> None:
    rng = random.Random(num_seqs)
    lens = [rng.randint(2, 90) for _ in range(num_seqs)]
    check(lens, lens, heads=4, kv_heads=2, head_dim=16, seed=num_seqs)


def test_prefill_after_a_cached_prefix_and_decode_in_one_batch() -> None:
    """Resumed sequences prefill their tail over a cached prefix, next to decodes."""
    check([1, 30, 1, 5, 17], [33, 70, 2, 5, 17], heads=4, kv_heads=2, head_dim=16)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (6, 1), (12, 4)], ids=["mha", "gqa4", "mqa", "gqa3"])
@pytest.mark.parametrize("head_dim", [16, 24, 64])
def test_head_layouts(heads: int, kv_heads: int, head_dim: int) -> None:
    check([1, 1, 12, 1], [20, 45, 12, 3], heads, kv_heads, head_dim)


@pytest.mark.parametrize("block_size", [1, 4, 32])
def test_block_sizes(block_size: int) -> None:
    check([1, 9, 1], [40, 9, 7], heads=4, kv_heads=2, head_dim=16, block_size=block_size)


@pytest.mark.parametrize("block_n", [16, 64])
def test_gpu_key_tiles(block_n: int) -> None:
    """The key steps a GPU takes (the interpreter's default is bigger), over several steps."""
    check([1, 1, 40, 1], [150, 3, 70, 64], heads=8, kv_heads=1, head_dim=32, block_n=block_n)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision(dtype: torch.dtype) -> None:
    check([1, 1, 25, 1], [60, 7, 25, 130], heads=8, kv_heads=2, head_dim=32, dtype=dtype)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(32, 32, 128), (32, 8, 128), (64, 8, 128), (40, 8, 128)])
@pytest.mark.parametrize("phase", ["decode", "prefill"])
def test_real_model_sizes(phase: str, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> None:
    rng = random.Random(heads)
    if phase == "decode":
        ctx = [rng.randint(1, 2048) for _ in range(64)]
        check([1] * 64, ctx, heads, kv_heads, head_dim, dtype=dtype)
    else:
        lens = [rng.randint(1, 1024) for _ in range(8)]
        check(lens, lens, heads, kv_heads, head_dim, dtype=dtype)


def _shuffled_tables(
    q_lens: list[int], ctx_lens: list[int], block_size: int, rng: random.Random, first: int = 0
) -> tuple[list[int], list[list[int]], list[int]]:
    """Each sequence's blocks (numbered from ``first``, shuffled), and the slots of its new
    tokens: (blocks needed per sequence, block tables, slots)."""
    needed = [-(-c // block_size) for c in ctx_lens]
    pool = list(range(first, first + sum(needed)))
    rng.shuffle(pool)
    tables = []
    for nb in needed:
        tables.append(pool[:nb])
        pool = pool[nb:]
    slots = [
        t[p // block_size] * block_size + p % block_size
        for n, c, t in zip(q_lens, ctx_lens, tables)
        for p in range(c - n, c)
    ]
    return needed, tables, slots


def _dense_reference(q, k, v, q_lens, ctx_lens, tables, block_size, scale) -> torch.Tensor:
    """Each sequence alone, its keys gathered token by token, causal softmax written out."""
    out, t = [], 0
    group = q.shape[1] // k.shape[1]
    for n, ctx, table in zip(q_lens, ctx_lens, tables):
        idx = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(ctx)])
        keys = k[idx].repeat_interleave(group, 1).float()  # (ctx, heads, D)
        values = v[idx].repeat_interleave(group, 1).float()
        scores = torch.einsum("qhd,khd->hqk", q[t : t + n].float(), keys) * scale
        pos = torch.arange(ctx - n, ctx)
        scores = scores.masked_fill(torch.arange(ctx)[None, None, :] > pos[None, :, None], float("-inf"))
        out.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), values).to(q.dtype))
        t += n
    return torch.cat(out)


@pytest.mark.parametrize(
    "q_lens,ctx_lens",
    [
        ([1] * 40, [random.Random(i).randint(1, 200) for i in range(40)]),  # many decodes, several groups
        ([1, 1], [1500, 7]),  # a decode longer than a group alone, and a lone short one
        ([1, 1, 1, 4, 1], [300, 1000, 257, 40, 611]),  # long decodes of ragged lengths, chunked together
        ([30, 5, 1, 12], [30, 70, 900, 1200]),  # prompts, cached prefixes and chunks, padded and alone
        ([1100], [1100]),  # a whole prompt alone: SDPA's causal mask
    ],
)
@pytest.mark.parametrize("chunk_bytes", [2 << 20, 4096])
def test_the_torch_path_equals_attention_written_out(
    q_lens: list[int], ctx_lens: list[int], chunk_bytes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CPU path's groups, workspace, masks and (with small chunks) long decodes attended chunk
    by chunk against the definition, sequence by sequence."""
    monkeypatch.setattr(attention, "DECODE_CHUNK_BYTES", chunk_bytes)
    block_size, heads, kv_heads, head_dim = 16, 4, 2, 16
    needed, tables, slots = _shuffled_tables(q_lens, ctx_lens, block_size, random.Random(len(q_lens)))
    g = torch.Generator().manual_seed(0)
    q = torch.randn(sum(q_lens), heads, head_dim, generator=g)
    k = torch.randn(sum(needed) * block_size, kv_heads, head_dim, generator=g)
    v = torch.randn(sum(needed) * block_size, kv_heads, head_dim, generator=g)
    meta = build_attention_metadata(q_lens, ctx_lens, tables, slots, block_size, torch.device("cpu"))
    got = paged_attention_torch(q, k, v, meta, block_size, head_dim**-0.5)
    torch.testing.assert_close(got, _dense_reference(q, k, v, q_lens, ctx_lens, tables, block_size, head_dim**-0.5))
    assert len(meta.groups) + (meta.long_decodes is not None) > 1 or len(q_lens) == 1


# (q_lens, ctx_lens): decodes padded to the widest table; long decodes, their last chunk padded;
# prompts and chunks, padded and alone; a prefill beside a chunk.
PAST_CONTEXT = [
    ([1] * 6, [3, 17, 40, 5, 16, 33]),
    ([1, 1, 1, 4, 1], [300, 1000, 257, 40, 611]),
    ([30, 5, 1, 12], [30, 70, 900, 1200]),
    ([9, 3], [9, 20]),
]


def _past_context(q_lens: list[int], ctx_lens: list[int]) -> tuple:
    """Sequences over blocks 1.. (block 0 pads tables only, as the engine keeps it), random K/V, and
    which slots lie inside some context: (q, k, v, owned, build metadata for a kernel path)."""
    block_size, heads, kv_heads, head_dim = 16, 4, 2, 16
    needed, tables, slots = _shuffled_tables(q_lens, ctx_lens, block_size, random.Random(3), first=1)
    owned = torch.zeros((sum(needed) + 1) * block_size, dtype=torch.bool)
    for c, t in zip(ctx_lens, tables):
        owned[[t[p // block_size] * block_size + p % block_size for p in range(c)]] = True
    g = torch.Generator().manual_seed(0)
    q = torch.randn(sum(q_lens), heads, head_dim, generator=g)
    k = torch.randn(len(owned), kv_heads, head_dim, generator=g)
    v = torch.randn(len(owned), kv_heads, head_dim, generator=g)
    return q, k, v, owned, lambda build: build(q_lens, ctx_lens, tables, slots, block_size, torch.device("cpu"))


@pytest.mark.parametrize("q_lens,ctx_lens", PAST_CONTEXT)
@pytest.mark.parametrize("chunk_bytes", [2 << 20, 4096])
def test_the_torch_path_gives_the_same_bits_whatever_finite_lies_past_a_context(
    q_lens: list[int], ctx_lens: list[int], chunk_bytes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The torch path reads whole blocks and pads tables with block 0, masking keys past each
    context. The engine keeps those slots finite (block 0 is nobody's and zero, a block given to
    a sequence is zeroed: ``BlockManager.take_fresh``), and under that promise what lies there,
    zeros or a finished request's stale K/V however large, changes no bit. NaN there would
    (0 · NaN): that is the promise's reason (vllm-project/vllm#50283)."""
    monkeypatch.setattr(attention, "DECODE_CHUNK_BYTES", chunk_bytes)
    q, k, v, owned, meta = _past_context(q_lens, ctx_lens)
    past = ~owned[:, None, None]

    def attend(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return paged_attention_torch(q, keys, values, meta(build_attention_metadata), 16, 0.25)

    zeroed = attend(k.masked_fill(past, 0), v.masked_fill(past, 0))
    for scale in (1.0, 6e4):  # another request's K/V, however large
        assert torch.equal(attend(torch.where(past, scale * k, k), torch.where(past, scale * v, v)), zeroed)
    assert attend(k.masked_fill(past, float("nan")), v).isnan().any()


@pytest.mark.parametrize("q_lens,ctx_lens", PAST_CONTEXT)
def test_the_triton_kernel_reads_nothing_past_a_context(q_lens: list[int], ctx_lens: list[int]) -> None:
    """The Triton kernel loads only keys inside each context: NaN or infinity anywhere past them,
    block 0 too, changes no bit (it needs no zeroed blocks; the engine zeroes them all the same,
    so both paths hold one promise)."""
    q, k, v, owned, meta = _past_context(q_lens, ctx_lens)
    clean = paged_attention_triton(q, k, v, meta(build_paged_metadata), 16, 0.25)
    for stale in (float("nan"), float("inf")):
        k_dirty, v_dirty = k.masked_fill(~owned[:, None, None], stale), v.masked_fill(~owned[:, None, None], stale)
        assert torch.equal(paged_attention_triton(q, k_dirty, v_dirty, meta(build_paged_metadata), 16, 0.25), clean)
