"""Public reports about LoRA ranks, replayed against the LoRA kernels: any rank up to
``max_lora_rank`` is served by the same kernels as the reference computes it."""

from __future__ import annotations

import random

import pytest
import torch

from tests.kernels.test_lora_kernels import check, popularity, projection

# Ranks none of vLLM's kernels took: its max_lora_rank is one of 1, 8, 16, 32, 64, 128, 256, 320,
# 512 (rank 48 refused: vllm-project/vllm-omni PR #1397), and "Rank > 64 is not supported yet"
# (vllm-project/vllm #2847); odd ranks below a tile (1, 3, 5) and 512, the default bound, beside
# them in one batch (slot 5 empty).
ODD_RANKS = [1, 3, 48, 320, 512, 0, 5, 128]


@pytest.mark.parametrize("pattern", ["distinct", "skewed"])
def test_ranks_outside_vllms_fixed_set_match_the_reference(pattern: str) -> None:
    """vllm-project/vllm-omni PR #1397 and vllm-project/vllm #2847: fused q|k|v-shaped slices, a
    prefill-sized batch over every slot (distinct) and a decode batch skewed to one adapter."""
    slots = popularity(pattern, 7 if pattern == "distinct" else 16, random.Random(len(pattern)))
    check(projection(64, [64, 32, 32], ODD_RANKS, torch.float32), slots, torch.float32, 64)
