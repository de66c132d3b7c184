"""A step's small host-side values (lists, numpy arrays) onto the device it runs on."""

from __future__ import annotations

from typing import Any

import torch


def to_device(values: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``values`` (a list or a numpy array) as a tensor of ``dtype`` on ``device``. On a GPU through
    pinned memory, copied asynchronously: a copy from pageable memory makes the host wait for
    every kernel queued before it (``cudaStreamSynchronize``), so building a step's inputs would
    wait for the work already queued. PyTorch's caching host allocator holds the pinned block until
    its copy is done. On a CPU a numpy array's memory is shared, not copied."""
    t = torch.as_tensor(values, dtype=dtype)
    if device.type == "cpu":
        return t
    if not t.numel():  # nothing to copy (and nothing to pin)
        return torch.empty(t.shape, dtype=dtype, device=device)
    return t.pin_memory().to(device, non_blocking=True)
