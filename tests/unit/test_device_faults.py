"""Which errors leave the device unusable for good (sticky CUDA errors) and which fail one request."""

from __future__ import annotations

import pytest

from dlora.services.worker.engine.faults import DeviceLost, device_lost, raise_if_lost


@pytest.mark.parametrize(
    "message",
    [
        "CUDA error: an illegal memory access was encountered",
        "Triton Error [CUDA]: unspecified launch failure",
        "CUDA error: device-side assert triggered\nCompile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.",
        "CUDA error: misaligned address",
        "CUDA error: uncorrectable ECC error encountered",
    ],
)
def test_sticky_cuda_errors_are_a_lost_device(message: str) -> None:
    assert device_lost(RuntimeError(message))
    with pytest.raises(DeviceLost, match=message.split(": ", 1)[1].split("\n")[0]):
        raise_if_lost(RuntimeError(message))


@pytest.mark.parametrize(
    "message",
    [
        "CUDA out of memory. Tried to allocate 2.00 GiB",  # a smaller step can run
        "CUDA error: invalid argument",  # the call's fault, the context is fine
        "expected scalar type Float but found BFloat16",
        "injected fault",
    ],
)
def test_other_errors_fail_their_request_alone(message: str) -> None:
    assert not device_lost(RuntimeError(message))
    raise_if_lost(RuntimeError(message))  # returns: the caller fails the one request


def test_a_lost_device_is_seen_through_the_exceptions_raised_from_it() -> None:
    try:
        try:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        except RuntimeError as e:
            raise ValueError("could not take the sampled token") from e
    except ValueError as wrapped:
        assert device_lost(wrapped)
