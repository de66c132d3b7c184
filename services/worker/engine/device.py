"""Where an engine runs: the torch device and dtype its settings name, ``auto`` resolved."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """The torch device and dtype an engine runs on: ``auto`` device is the first GPU when torch
    sees one, else the CPU; ``auto`` dtype is bfloat16 on a GPU and float32 on a CPU. ValueError
    for an unknown dtype or a device torch cannot name."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():  # else an assertion deep in torch
        raise ValueError(f"device {device!r}: torch sees no CUDA device here")
    if dev.type == "cuda" and (dev.index or 0) >= (count := torch.cuda.device_count()):
        raise ValueError(f"device {device!r}: torch sees {count} CUDA device(s) here (cuda:0 to cuda:{count - 1})")
    if dtype == "auto":
        dtype = "bfloat16" if dev.type == "cuda" else "float32"
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected auto or one of {sorted(DTYPES)}")
    return dev, DTYPES[dtype]
