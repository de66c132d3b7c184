"""dLoRA's count rule, which the dLoRA policy follows until LoRA's overhead is measured: a mixed
step on an adapter where dLoRA would merge it, counting the adapter's requests that step feeds."""

import pytest

from dlora.services.worker.policy import BatchLimits, QueuedRequest
from dlora.services.worker.policy.config import PolicyConfig
from dlora.services.worker.policy.dlora import DLoraPolicy

# Two slots, 64 tokens a step, prompts run whole (chunked prefill off).
LIMITS = BatchLimits(max_num_seqs=8, max_adapters=2, max_num_batched_tokens=64, chunked_prefill=False)


@pytest.mark.parametrize(
    "base_prompt,merged_now,expected",
    [
        (50, None, None),  # the mixed step feeds one of a's 6 prompts, F two requests: 1/2 < R
        (30, None, "a"),  # it feeds 3 of them, F 4: R reached
        (50, "a", None),  # merged: 1/2 < L, it leaves (a merged step would serve all 6)
        (60, "a", None),  # and it feeds none of them: it leaves, rather than pay a correction for nothing
        (30, "a", "a"),  # 3/4: it stays
    ],
)
def test_the_count_rule_counts_what_the_mixed_step_feeds_of_the_adapter(
    base_prompt: int, merged_now: str | None, expected: str | None
) -> None:
    # a base prompt first, then six 10-token prompts of a: a merged step on a feeds all six, a mixed
    # one only those the budget leaves room for behind the base prompt (R 0.6, L 0.54)
    queue = [QueuedRequest("big", None, 0, False, base_prompt)]
    queue += [QueuedRequest(f"a{i}", "a", 1 + i, False, 10) for i in range(6)]
    d = DLoraPolicy(LIMITS, PolicyConfig(r_initial=0.6, band_ratio=0.9)).decide(queue, merged_now)
    assert (d.merged, d.mixed) == (expected, expected is not None)
