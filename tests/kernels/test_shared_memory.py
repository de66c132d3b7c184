"""The LoRA expand fits a Hopper SM's shared memory at the largest tiles its rule or the tuning can
choose. Triton raises OutOfResources at a kernel's first launch when it does not fit, which the
interpreter never shows; so the kernel is compiled here for sm_90 (H100/H200), on any machine,
and its shared memory read from the compiled kernel's metadata.

A review found the expand over 232 KB at tiles its rule picks (64 tokens x rank 64, its K shares
summed in an unrolled loop whose every load was buffered ``num_stages`` times)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# The most shared memory one block may use on sm_90: 227 KB (CUDA C++ Programming Guide, "Compute
# Capabilities", technical specifications: maximum shared memory per block, opt-in, 9.0).
SM90_SHARED = 232448

# Run without the interpreter the suite sets (TRITON_INTERPRET=1), whose kernels cannot be compiled.
_COMPILE = """
import json, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dlora.kernels import lora_triton

dtype = sys.argv[1]
signature = dict(
    y_ptr="*fp32", out_ptr=f"*{dtype}", b_ptrs="*i64", ranks_ptr="*i32", scales_ptr="*fp32", offsets_ptr="*i32",
    sizes_ptr="*i32", token_index_ptr="*i32", group_slot_ptr="*i32", group_start_ptr="*i32",
    group_len_ptr="*i32", sign="fp32", stride_out="i32", num_slots="i32", n_slices="i32", R="i32",
    stride_split="i32", m_tiles="i32", n_tiles="i32",
)
# 64 tokens (the rule's largest), 128 columns (the tuning's), rank 64 a step (the rule's bound),
# 64 K shares (a wide input with few programs: a 70B model's down projection).
constants = dict(
    ELEM={"bf16": tl.bfloat16, "fp32": tl.float32}[dtype], F32_DOT=dtype == "fp32",
    BLOCK_M=64, BLOCK_N=128, BLOCK_R=64, SPLIT_K=64,
)
kernel = lora_triton._expand_kernel
full = {name: "constexpr" if name in constants else signature[name] for name in kernel.arg_names}
options = {"num_warps": 4, "enable_fp_fusion": True}  # as launched (Triton's defaults)
compiled = triton.compile(ASTSource(kernel, full, constants), target=GPUTarget("cuda", 90, 32), options=options)
print(json.dumps(compiled.metadata.shared))
"""


def test_the_expand_fits_at_its_largest_tiles_and_split() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[2]
    # bf16, the dtype served in (fp32 read 32 KB at the same tiles when this was written, the old
    # unrolled loop 2.1 MB in both)
    for dtype in ("bf16",):
        run = subprocess.run(
            [sys.executable, "-c", _COMPILE, dtype], env=env, cwd=root, capture_output=True, text=True, check=False
        )
        assert run.returncode == 0, run.stderr[-2000:]
        assert json.loads(run.stdout) <= SM90_SHARED, dtype
