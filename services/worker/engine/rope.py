"""Rotary position embeddings with the scaling variants Llama-family configs carry.

Each variant matches ``transformers.modeling_rope_utils`` (the unit tests compare them):
``default``, ``linear``, ``dynamic`` (NTK), ``llama3`` and ``yarn``. ``dynamic`` depends on the
sequence's current length, so its frequencies are chosen per token from that length.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from dlora.model.config import ModelConfig, ModelConfigError

SERVED_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


def inv_freq_and_scale(cfg: ModelConfig, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (head_dim/2,) in fp32 and the attention factor applied to cos/sin."""
    p: dict[str, Any] = cfg.rope
    kind = p["rope_type"]
    dim = cfg.head_dim
    base = float(p["rope_theta"])

    def plain(b: float) -> torch.Tensor:
        return 1.0 / (b ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))

    if kind == "default":
        return plain(base), 1.0
    if kind == "linear":
        return plain(base) / float(p["factor"]), 1.0
    if kind == "dynamic":
        factor = float(p["factor"])
        max_pos = cfg.max_position_embeddings
        n = max(seq_len or max_pos, max_pos)
        return plain(base * ((factor * n / max_pos) - (factor - 1)) ** (dim / (dim - 2))), 1.0
    if kind == "llama3":
        return _llama3(plain(base), p), 1.0
    if kind == "yarn":
        return _yarn(cfg, p, base)
    raise ModelConfigError(f"rope_type {kind!r} is not served; expected one of {SERVED_TYPES}")


def _llama3(inv_freq: torch.Tensor, p: dict[str, Any]) -> torch.Tensor:
    factor = float(p["factor"])
    low, high = float(p["low_freq_factor"]), float(p["high_freq_factor"])
    old_ctx = float(p["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are interpolated by `factor`, short ones kept; the band between is blended.
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, blended, scaled)


def _yarn(cfg: ModelConfig, p: dict[str, Any], base: float) -> tuple[torch.Tensor, float]:
    dim = cfg.head_dim
    old_ctx = p["original_max_position_embeddings"]
    factor = p.get("factor") or cfg.max_position_embeddings / old_ctx

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        if p.get("mscale") and p.get("mscale_all_dim"):
            attention_factor = mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(old_ctx / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


class Rope:
    """cos/sin for a flat batch of tokens, computed per step from the positions (no table, so a
    131k-context model costs nothing up front)."""

    def __init__(self, cfg: ModelConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.dynamic = cfg.rope["rope_type"] == "dynamic"
        self.device = device
        inv_freq, self.scale = inv_freq_and_scale(cfg)
        self.inv_freq = inv_freq.to(device)

    def cos_sin(
        self, positions: torch.Tensor, seq_lens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape (T, head_dim) in fp32.

        ``seq_lens`` (T,) is each token's sequence length at this step; only dynamic NTK uses it,
        with frequencies rescaled for sequences longer than ``max_position_embeddings``.
        """
        inv_freq = self.inv_freq[None, :].expand(len(positions), -1)
        if self.dynamic and seq_lens is not None and int(seq_lens.max()) > self.cfg.max_position_embeddings:
            inv_freq = inv_freq.clone()
            for n in seq_lens.unique().tolist():
                inv_freq[seq_lens == n] = inv_freq_and_scale(self.cfg, seq_len=int(n))[0].to(self.device)
        freqs = positions.float()[:, None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.scale, emb.sin() * self.scale
