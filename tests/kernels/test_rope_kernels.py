"""The Triton rotary embedding + KV cache write equals its torch reference (kernels/rope.py):
queries returned, keys and values at their slots, other slots untouched (small shapes under the
interpreter; a 7B model's heads on a GPU)."""

from __future__ import annotations

import pytest
import torch

from dlora.kernels.rope import rope_and_cache
from dlora.kernels.rope_triton import rope_and_cache_triton
from dlora.kernels.triton_common import interpreting
from tests.kernels.conftest import assert_close, cuda_only, device

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def check(tokens: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(tokens * 31 + head_dim)
    dev = device()
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g).to(dev, dtype)
    pos = torch.randint(0, 4096, (tokens,), generator=g).float()
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    emb = torch.cat((pos[:, None] * inv, pos[:, None] * inv), dim=-1)
    cos, sin = emb.cos().to(dev), emb.sin().to(dev)
    pool = 3 * tokens + 5
    slots = torch.randperm(pool, generator=g)[:tokens].to(dev)
    caches = [torch.full((pool, kv_heads, head_dim), 7.0, dtype=dtype, device=dev) for _ in range(4)]
    want_q = rope_and_cache(qkv, cos, sin, caches[0], caches[1], slots, heads, kv_heads)
    got_q = rope_and_cache_triton(qkv, cos, sin, caches[2], caches[3], slots, heads, kv_heads)
    assert_close(got_q, want_q)
    assert_close(caches[2], caches[0])
    assert torch.equal(caches[3], caches[1])  # values copied bit for bit, other slots untouched
    if dtype != torch.bfloat16 or not interpreting():  # the interpreter truncates to bf16
        assert torch.equal(got_q, want_q) and torch.equal(caches[2], caches[0])  # HF's rounding, exactly


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,heads,kv_heads,head_dim", [(1, 4, 2, 16), (9, 4, 4, 32), (5, 6, 2, 24)])
def test_rope_and_cache_equals_the_reference(tokens: int, heads: int, kv_heads: int, head_dim: int, dtype) -> None:
    check(tokens, heads, kv_heads, head_dim, dtype)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_seven_b_heads_on_the_gpu(dtype: torch.dtype) -> None:
    check(64, 32, 8, 128, dtype)
