"""A device that failed for good, told apart from a request's own fault. Pure: no torch.

The engine fails a request whose step raises by itself and serves on (``engine._forward``). After a
*sticky* CUDA error the process's context is lost: every later call on the device raises the same
error, so failing requests one by one would fail every request this worker is ever given. The
engine raises ``DeviceLost`` instead, and the worker hands its requests back and exits (a restart
gets a new context), as vLLM's engine dies on such an error.
"""

from __future__ import annotations

# cudaGetErrorString of CUDA's sticky errors (CUDA Runtime API, cudaError_t: "the process is left
# in an inconsistent state and any further CUDA work will return the same error"); torch and
# Triton put the string in their exceptions ("CUDA error: ...", "Triton Error [CUDA]: ...").
STICKY_CUDA_ERRORS = (
    "an illegal memory access was encountered",  # cudaErrorIllegalAddress (700)
    "device-side assert triggered",  # cudaErrorAssert (710)
    "hardware stack error",  # cudaErrorHardwareStackError (714)
    "an illegal instruction was encountered",  # cudaErrorIllegalInstruction (715)
    "misaligned address",  # cudaErrorMisalignedAddress (716)
    "operation not supported on global/shared address space",  # cudaErrorInvalidAddressSpace (717)
    "invalid program counter",  # cudaErrorInvalidPc (718)
    "unspecified launch failure",  # cudaErrorLaunchFailure (719)
    "the launch timed out and was terminated",  # cudaErrorLaunchTimeout (702)
    "uncorrectable ECC error encountered",  # cudaErrorECCUncorrectable (214)
)


class DeviceLost(RuntimeError):
    """The accelerator failed for good (a sticky CUDA error): nothing more can run on it in this
    process. The message is the original error's."""


def device_lost(e: BaseException) -> bool:
    """Whether ``e``, or an exception it was raised from, is a sticky device error (its message
    names CUDA and one of ``STICKY_CUDA_ERRORS``)."""
    seen: BaseException | None = e
    while seen is not None:
        text = str(seen)
        if isinstance(seen, DeviceLost) or "CUDA" in text and any(m in text for m in STICKY_CUDA_ERRORS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def raise_if_lost(e: BaseException) -> None:
    """Raise ``DeviceLost`` from ``e`` where it is a sticky device error; else return (the caller
    fails the one request ``e`` belongs to)."""
    if isinstance(e, DeviceLost):
        raise e
    if device_lost(e):
        raise DeviceLost(describe(e)) from e


def describe(e: BaseException) -> str:
    """``e`` in one line for a log or a request's error: its type, and its message if it has one."""
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
