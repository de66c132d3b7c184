"""Where an engine runs by default, and how `dlora up` spreads workers over a host's GPUs."""

from __future__ import annotations

import pytest
import torch

from dlora.services.gpus import gpu_of_worker, visible_gpus
from dlora.services.up import given_key
from dlora.services.worker.engine.device import resolve_device


def test_auto_is_the_gpu_in_bfloat16_where_there_is_one_else_the_cpu_in_float32() -> None:
    expected = (
        (torch.device("cuda"), torch.bfloat16) if torch.cuda.is_available() else (torch.device("cpu"), torch.float32)
    )
    assert resolve_device("auto", "auto") == expected
    assert resolve_device("cpu", "auto") == (torch.device("cpu"), torch.float32)
    assert resolve_device("cpu", "float16") == (torch.device("cpu"), torch.float16)


@pytest.mark.parametrize("device,dtype,fragment", [("gpu", "auto", "device 'gpu'"), ("cpu", "fp8", "dtype 'fp8'")])
def test_bad_devices_and_dtypes_are_refused_by_name(device: str, dtype: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        resolve_device(device, dtype)


def test_workers_get_a_gpu_each_round_robin() -> None:
    gpus = visible_gpus({"CUDA_VISIBLE_DEVICES": "2, 3"})
    assert gpus == ["2", "3"]
    assert [gpu_of_worker(i, gpus) for i in range(3)] == [
        {"CUDA_VISIBLE_DEVICES": "2"},
        {"CUDA_VISIBLE_DEVICES": "3"},
        {"CUDA_VISIBLE_DEVICES": "2"},
    ]
    assert gpu_of_worker(0, []) == {}  # no GPU: nothing set, the worker's auto device is the CPU
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []  # GPUs hidden on purpose


def test_dlora_up_names_where_a_given_admin_key_comes_from_never_the_key() -> None:
    """It named dlora.toml for a key given in DLORA_ADMIN_KEY: a user looked for a file."""
    assert given_key({"DLORA_ADMIN_KEY": "k"}) == "$DLORA_ADMIN_KEY"
    assert given_key({"DLORA_ADMIN_KEY": "k", "DLORA_GATEWAY_ADMIN_KEY": "g"}) == "$DLORA_GATEWAY_ADMIN_KEY"
    assert given_key({}) == "<admin_key of dlora.toml>"
    assert given_key({"DLORA_CONFIG": "/etc/dlora/dlora.toml"}) == "<admin_key of /etc/dlora/dlora.toml>"
    assert given_key({}, "mine.toml") == "<admin_key of mine.toml>"
