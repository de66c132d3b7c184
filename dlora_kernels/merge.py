"""Folding a LoRA delta into a weight's rows, keeping their originals (the torch reference).

W' = round(W + s·B·A): the delta computed in fp32 and the sum rounded once to W's dtype, with W's
rows copied aside first so that an unmerge puts back exactly the original bits
(``services/worker/engine/merge.py``). ``merge_triton`` does the same in one pass over the rows;
this is what it is tested against and what the CPU path runs.
"""

from __future__ import annotations

import torch


def merge_rows(weight: torch.Tensor, saved: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
    """In place: ``saved`` = ``weight``, then ``weight`` = round(weight + scale·(b·a)) in fp32.

    weight: (N, K) rows of a weight (a view with contiguous rows is fine); saved: (N, K), its
    dtype, on its device; a: (rank, K) and b: (N, rank), any float dtype, on the same device.
    """
    saved.copy_(weight)
    delta = b.float() @ a.float()
    weight.copy_((weight.float() + delta * scale).to(weight.dtype))
