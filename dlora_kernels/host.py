"""A step's small host-side values (lists, numpy arrays) onto the device it runs on, and its
results back (``HostCopy``)."""

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


class HostCopy:
    """``values`` (a device tensor) on their way to the host: on a GPU copied at once into pinned
    memory, ``non_blocking``, an event recorded after the copy, so ``wait()`` waits for the work
    queued before the copy and nothing queued after it (async scheduling launches the next step
    meanwhile; ``.tolist()`` would wait for that too). On a CPU, the tensor itself."""

    def __init__(self, values: torch.Tensor) -> None:
        self._ready: torch.cuda.Event | None = None
        if values.device.type != "cuda":
            self._host = values
            return
        self._host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
        self._host.copy_(values, non_blocking=True)
        self._ready = torch.cuda.Event()
        self._ready.record(torch.cuda.current_stream(values.device))

    def wait(self) -> torch.Tensor:
        if self._ready is not None:
            self._ready.synchronize()
        return self._host
