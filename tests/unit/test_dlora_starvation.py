"""The dLoRA policy's starvation threshold is seconds of steps that left an adapter waiting,
whatever a step takes (``policy/dlora.py``: a wait a client feels), not a count of steps."""

import pytest

from dlora.services.worker.policy import BatchLimits, QueuedRequest, StepDecision, StepRecord
from dlora.services.worker.policy.config import PolicyConfig
from dlora.services.worker.policy.dlora import DLoraPolicy

LIMITS = BatchLimits(max_num_seqs=8, max_adapters=4)


def _steps_until_served_first(step_s: float) -> int:
    """Merged steps of a busy adapter, ``step_s`` seconds each, that leave a rare adapter's prompt
    of F waiting until the policy puts it first."""
    queue = [QueuedRequest(f"a{i}", "hot", i, False, 1) for i in range(7)] + [QueuedRequest("b", "rare", 7, False, 1)]
    hot = [r.request_id for r in queue if r.adapter == "hot"]
    p = DLoraPolicy(LIMITS)
    for n in range(1000):
        d = p.decide(queue, "hot")
        if d.request_ids[0] == "b":
            return n
        merged = StepDecision("hot", hot, d.basis)
        p.observe(merged, StepRecord("hot", hot, ["hot"] * len(hot), num_tokens=len(hot), seconds=step_s))
    raise AssertionError("never served first")


@pytest.mark.parametrize("step_s", [0.015, 0.3])  # a GPU's decode step; this CPU's, small preset
def test_a_starving_adapter_is_served_first_after_the_same_seconds_whatever_a_step_takes(step_s: float) -> None:
    n = _steps_until_served_first(step_s)
    assert (n - 1) * step_s <= PolicyConfig().starvation_s < n * step_s
