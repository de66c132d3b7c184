"""A sticky CUDA error in a step ends in ``DeviceLost`` (make gpu-check runs this on the GPU;
skipped elsewhere): a kernel that writes a terabyte past its tensor, as a faulty LoRA or attention
kernel would, while a request runs. In a child process: the error poisons the CUDA context for
good, which is the point."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from dlora.model.make_tiny import TinyOutput

CHILD = textwrap.dedent(
    """
    import sys

    import triton
    import triton.language as tl

    from dlora.common.messages import SamplingParams
    from dlora.services.worker.engine import EngineConfig, LLMEngine
    from dlora.services.worker.engine.faults import DeviceLost, device_lost

    @triton.jit
    def stray(ptr):
        tl.store(ptr + (1 << 40), 1.0)  # an illegal address: cudaErrorIllegalAddress, sticky

    config = EngineConfig(device="cuda", dtype="float32", kernels="torch", async_scheduling=sys.argv[2] == "1")
    engine = LLMEngine(sys.argv[1], config)
    engine.add_request("r", prompt_token_ids=[5, 40, 41], params=SamplingParams(max_tokens=4, ignore_eos=True))
    forward = engine.model.forward

    def faulty(inputs):
        hidden = forward(inputs)
        stray[(1,)](hidden)
        return hidden

    engine.model.forward = faulty
    try:
        for _ in range(3):
            engine.step()
    except DeviceLost as e:
        print("lost:", e, flush=True)  # flushed: the poisoned context may abort the exit
    except Exception as e:  # the worker's step turns it into DeviceLost (raise_if_lost)
        print("lost:" if device_lost(e) else "not lost:", repr(e), flush=True)
    else:
        print("no error", flush=True)
    """
)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a sticky CUDA error needs a GPU (make gpu-check)")
@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "async"])
def test_an_illegal_memory_access_in_a_step_is_a_lost_device(tiny_llama: TinyOutput, overlap: bool) -> None:
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(tiny_llama.model), "1" if overlap else "0"],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    last = child.stdout.strip().splitlines()[-1:] or [child.stderr[-2000:]]
    assert last[0].startswith("lost:") and "illegal memory access" in last[0], last[0]
