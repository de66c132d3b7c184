"""On a GPU the Triton kernels compile once per tile shape, never per batch size or context length
(issue 15): a step of a new size must not wait for a compile. The interpreter compiles nothing, so
these run on CUDA only (make gpu-check)."""

from __future__ import annotations

import random

import torch

from dlora.kernels import attention_triton, lora_triton
from dlora.kernels.lora_triton import LoraBatch, LoraBlocks
from tests.kernels import test_attention_kernels, test_lora_kernels
from tests.kernels.conftest import cuda_only


def compiled(kernel: object) -> int:
    """Variants Triton holds of ``kernel``, over every device (its per-device kernel caches)."""
    return sum(len(cache[0]) for cache in kernel.device_caches.values())  # type: ignore[attr-defined]


@cuda_only
def test_lora_kernels_compile_once_per_tile_shape() -> None:
    rng = random.Random(0)
    proj = test_lora_kernels.projection(256, [256, 64], test_lora_kernels.MIXED_RANKS, torch.bfloat16)
    kernels = (lora_triton._shrink_kernel, lora_triton._expand_kernel)
    before = [compiled(k) for k in kernels]
    shapes = set()
    for batch in (1, 2, 3, 5, 8, 13, 16, 17, 31, 33, 64, 100, 200, 257):
        slots = test_lora_kernels.popularity("uniform", batch, rng)
        meta = LoraBatch.from_token_slots(slots, torch.device("cuda"))
        assert meta is not None and proj.tables is not None
        shapes.add(LoraBlocks.choose(meta, proj.tables))
        test_lora_kernels.check(proj, slots, torch.bfloat16, 256)
    assert all(compiled(k) - b <= len(shapes) for k, b in zip(kernels, before))


@cuda_only
def test_attention_kernels_compile_once_whatever_the_batch_and_context() -> None:
    rng = random.Random(1)
    kernels = (attention_triton._decode_kernel, attention_triton._prefill_kernel)
    before = [compiled(k) for k in kernels]
    for batch in (1, 2, 5, 16, 33, 64):
        ctx = [rng.randint(1, 600) for _ in range(batch)]
        test_attention_kernels.check([1] * batch, ctx, 8, 2, 64, dtype=torch.bfloat16, seed=batch)
        q_lens = [rng.randint(2, 40) for _ in range(max(1, batch // 8))]
        ctx = [q + rng.randint(0, 300) for q in q_lens]
        test_attention_kernels.check(q_lens, ctx, 8, 2, 64, dtype=torch.bfloat16, seed=batch)
    assert all(compiled(k) - b <= 1 for k, b in zip(kernels, before))
