"""Rotary embedding of a step's queries and keys and the write of keys and values into the paged
KV cache, as one torch reference (``rope_and_cache``); ``rope_triton`` does it in one launch.

Rounding follows Hugging Face's ``apply_rotary_pos_emb`` (cos and sin cast to the dtype, then
x * cos and rotate_half(x) * sin each rounded, then their sum), so greedy output matches
transformers token for token.
"""

from __future__ import annotations

import torch


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (T, heads, head_dim) by cos/sin (T, head_dim), in the half-split layout HF uses."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    return x * cos + rotated * sin


def rope_and_cache(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
) -> torch.Tensor:
    """From one layer's fused projection qkv (T, (heads + 2 kv_heads) * head_dim): the rotated
    queries (T, heads, head_dim), returned, and the rotated keys and the values written into
    k_cache / v_cache (slots, kv_heads, head_dim) at flat ``slots`` (T,). cos, sin: (T, head_dim) fp32."""
    head_dim = k_cache.shape[-1]
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    q = qkv[:, :q_size].unflatten(1, (num_heads, head_dim))
    k = qkv[:, q_size : q_size + kv_size].unflatten(1, (num_kv_heads, head_dim))
    v = qkv[:, q_size + kv_size :].unflatten(1, (num_kv_heads, head_dim))
    k_cache[slots] = apply_rope(k, cos, sin)
    v_cache[slots] = v
    return apply_rope(q, cos, sin)
