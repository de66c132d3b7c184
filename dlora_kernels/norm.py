"""The elementwise work between a layer's matmuls, as torch references: RMSNorm, the residual add
fused with the next RMSNorm, and SiLU-and-multiply. The Triton versions (``norm_triton``) do each
in one launch; these are what they are tested against and what the CPU path runs.

Rounding follows Hugging Face's Llama (``LlamaRMSNorm``, ``LlamaMLP``), so greedy output matches
transformers token for token: the residual sum is rounded to the model's dtype, the norm is
computed in fp32 and cast back before the weight scales it, and SiLU's result is rounded before
the multiply.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x / sqrt(mean(x^2) + eps)) over the last dimension. x (T, H), weight (H,) -> (T, H)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual stream after adding ``x`` (residual + x, (T, H)), and its RMSNorm: the pair
    (normed, new residual). Inputs are not modified."""
    h = residual + x
    return rms_norm(h, weight, eps), h


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up for gate_up (T, 2I) holding gate then up -> (T, I)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
