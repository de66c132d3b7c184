"""One interface over the two kernel paths, chosen once per engine: Triton on CUDA, torch on CPU.

The engine builds each step's metadata with the chosen path's builders and calls its attention
and LoRA functions per layer; nothing else in the engine knows which path runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from dlora.kernels.attention import build_attention_metadata, paged_attention_torch
from dlora.kernels.lora import LoraSegments, add_lora_torch
from dlora.kernels.merge import merge_rows
from dlora.kernels.norm import add_rms_norm, rms_norm, silu_and_mul
from dlora.kernels.rope import rope_and_cache

PATHS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class Kernels:
    name: str  # "torch" or "triton"
    # (q_lens, ctx_lens, block_tables, slots, block_size, device) -> metadata with ``.slots``
    attention_metadata: Callable[..., Any]
    # (q (T, heads, D), k_cache, v_cache, metadata, block_size, scale) -> (T, heads, D)
    paged_attention: Callable[..., torch.Tensor]
    # (slot per token, device, slot subtracted per token or None) -> metadata, or None when no
    # token uses LoRA; a mixed step subtracts the merged adapter's delta from the other tokens
    lora_metadata: Callable[[list[int], torch.device, list[int] | None], Any]
    # (out (T, N), x (T, K), LoraProjection, metadata): out += each LoRA token's delta, in place
    add_lora: Callable[..., None]
    lora_tables: bool  # whether LoraProjection tables must be kept up to date
    # (x (T, H), weight (H,), eps) -> RMSNorm (T, H)
    rms_norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] = rms_norm
    # (x, residual, weight, eps) -> (RMSNorm of residual + x, residual + x); the Triton path
    # writes the new residual into ``residual``
    add_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]] = add_rms_norm
    # gate_up (T, 2I) -> SiLU(gate) * up (T, I)
    silu_and_mul: Callable[[torch.Tensor], torch.Tensor] = silu_and_mul
    # (qkv, cos, sin, k_cache, v_cache, slots, heads, kv_heads) -> rotated q; k, v into the cache
    rope_and_cache: Callable[..., torch.Tensor] = rope_and_cache
    # (weight rows (N, K), saved (N, K), A (rank, K), B (N, rank), scale): saved = rows, then
    # rows = round(rows + scale·B·A) in fp32 (a merge; engine/merge.py)
    merge_rows: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], None] = merge_rows


TORCH = Kernels(
    "torch",
    build_attention_metadata,
    paged_attention_torch,
    LoraSegments.from_token_slots,
    add_lora_torch,
    lora_tables=False,
)


def triton_usable(device: torch.device) -> bool:
    """Triton kernels run on CUDA, or anywhere under TRITON_INTERPRET=1 (slowly: for tests)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    from dlora.kernels.triton_common import interpreting

    return device.type == "cuda" or interpreting()


def select_kernels(name: str, device: torch.device) -> Kernels:
    """``auto``: Triton on CUDA when it is installed, torch otherwise; ``torch`` / ``triton`` force one."""
    if name not in PATHS:
        raise ValueError(f"kernels {name!r}: expected one of {', '.join(PATHS)}")
    usable = triton_usable(device)
    if name == "torch" or (name == "auto" and not (device.type == "cuda" and usable)):
        return TORCH
    if not usable:
        raise ValueError(
            f"kernels 'triton' need a CUDA device or TRITON_INTERPRET=1 (device is {device}) and the triton package"
        )
    from dlora.kernels.attention_triton import build_paged_metadata, paged_attention_triton
    from dlora.kernels.lora_triton import LoraPasses, add_lora_passes
    from dlora.kernels.triton_common import interpreting

    kernels = Kernels(
        "triton",
        build_paged_metadata,
        paged_attention_triton,
        LoraPasses.from_token_slots,
        add_lora_passes,
        lora_tables=True,
    )
    if interpreting():
        # The interpreter runs each program in Python, and the elementwise kernels launch one per
        # row or head: an engine test on the Triton path would spend minutes in them. There they
        # are the torch references; tests/kernels checks each against its reference, and on a
        # GPU (make gpu-check) the engine runs them.
        return kernels
    from dlora.kernels.merge_triton import merge_rows_triton
    from dlora.kernels.norm_triton import add_rms_norm_triton, rms_norm_triton, silu_and_mul_triton
    from dlora.kernels.rope_triton import rope_and_cache_triton

    return replace(
        kernels,
        rms_norm=rms_norm_triton,
        add_rms_norm=add_rms_norm_triton,
        silu_and_mul=silu_and_mul_triton,
        rope_and_cache=rope_and_cache_triton,
        merge_rows=merge_rows_triton,
    )
