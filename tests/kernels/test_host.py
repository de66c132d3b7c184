"""kernels/host.py: a step's small host values on its device."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dlora.kernels.host import to_device

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.mark.parametrize("device", DEVICES)
def test_lists_arrays_and_empty_ones_arrive_with_their_values(device: str) -> None:
    dev = torch.device(device)
    assert to_device([3, 1, 2], torch.int32, dev).tolist() == [3, 1, 2]
    assert to_device(np.array([[True, False]]), torch.bool, dev).tolist() == [[True, False]]
    empty = to_device([], torch.int64, dev)
    assert empty.shape == (0,) and empty.dtype == torch.int64 and empty.device.type == device
    floats = to_device([0.5, float("inf")], torch.float32, dev)
    assert floats.dtype == torch.float32 and floats.tolist() == [0.5, float("inf")]
