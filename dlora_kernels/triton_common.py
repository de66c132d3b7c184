"""What the Triton kernels share: element types, and whether they run under the interpreter."""

from __future__ import annotations

import os

import torch
import triton.language as tl

ELEM = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def interpreting() -> bool:
    """Kernels run under TRITON_INTERPRET=1 (on CPU tensors, one program after another). Triton's
    own switch: read where it is read, since ``triton.knobs`` exists only in recent releases."""
    try:
        from triton import knobs
    except ImportError:
        return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return bool(knobs.runtime.interpret)


def f32_dot(dtype: torch.dtype) -> bool:
    """Multiply in exact fp32: for fp32 data (not TF32), and for bf16 under the interpreter, whose
    dot multiplies bf16's raw 16-bit storage as integers (Triton 3.9's ``create_dot``)."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreting())
