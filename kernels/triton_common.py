"""What the Triton kernels share: element types and when to multiply in exact fp32."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ELEM = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def f32_dot(dtype: torch.dtype) -> bool:
    """Multiply in exact fp32: for fp32 data (not TF32), and for bf16 under the interpreter, whose
    dot multiplies bf16's raw 16-bit storage as integers (Triton 3.9's ``create_dot``)."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and triton.knobs.runtime.interpret)
