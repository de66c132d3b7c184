"""The dLoRA policy's starvation threshold is seconds of steps that left an adapter waiting,
whatever a step takes (``policy/dlora.py``: a wait a client feels), not a count of steps; and
the step that serves a starving adapter feeds it."""

import pytest

from dlora.services.worker.policy import BatchLimits, QueuedRequest, StepDecision, StepRecord, SwitchedFeeds
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


def test_a_starving_adapter_runs_beside_the_merged_one_only_where_that_step_feeds_it() -> None:
    # lora-hot merged; lora-rare starves with two prompts. Under the base weights' key the cache
    # holds all but 10 of the first one's 60 tokens (it ran unmerged before), so an unmerged step
    # feeds both in the 64 tokens; beside lora-hot the first feeds all 60 and the second waits
    # again, though it is in the mixed batch (whole prompts: chunked prefill off)
    limits = BatchLimits(max_num_seqs=8, max_adapters=3, max_num_batched_tokens=64, chunked_prefill=False)
    first = QueuedRequest("s1", "rare", 0, False, 60, switched=SwitchedFeeds(unmerged=10, own=60, other=60))
    queue = [first, QueuedRequest("s2", "rare", 1, False, 20), QueuedRequest("h", "hot", 2, False, 5)]
    p = DLoraPolicy(limits)
    p.credits.balances.update({"rare": 2.0, "hot": -0.5})
    d = p.decide(queue, "hot")
    assert (d.merged, d.request_ids[:2]) == (None, ["s1", "s2"])
    # where the mixed step feeds them too, no switch
    queue[0] = QueuedRequest("s1", "rare", 0, False, 10)
    d = p.decide(queue, "hot")
    assert (d.merged, d.mixed, d.request_ids[:2]) == ("hot", True, ["s1", "s2"])


def test_a_starving_prompt_no_step_can_feed_costs_no_switch() -> None:
    # lora-hot merged; rare and rare2 starve. In 64 tokens (whole prompts) an unmerged step feeds
    # s1 and leaves t1 waiting; beside lora-hot the correction holds the second slot, so t1 is not
    # even in the batch: it waits either way, and the mixed step feeds s1 without an unmerge
    limits = BatchLimits(max_num_seqs=8, max_adapters=2, max_num_batched_tokens=64, chunked_prefill=False)
    queue = [QueuedRequest("s1", "rare", 0, False, 40), QueuedRequest("t1", "rare2", 1, False, 40)]
    queue.append(QueuedRequest("h", "hot", 2, False, 5))
    p = DLoraPolicy(limits)
    p.credits.balances.update({"rare": 2.0, "rare2": 2.0, "hot": -0.5})
    d = p.decide(queue, "hot")
    assert (d.merged, d.mixed, d.request_ids[0]) == ("hot", True, "s1")


def test_a_merged_adapter_in_debt_pays_nothing_for_what_the_starving_adapter_puts_off() -> None:
    # lora-hot merged, in debt past the floor; rare starves. In 64 tokens (whole prompts) F's own
    # step feeds c1 and h, the step with rare first s1 and h, and so does the mixed step beside
    # lora-hot: c1 waits for rare's sake, as it would unmerged, where nobody pays for it; lora-hot
    # paid (it could not displace anyone, and its debt grew past the wait bound's floor)
    limits = BatchLimits(max_num_seqs=8, max_adapters=4, max_num_batched_tokens=64, chunked_prefill=False)
    queue = [QueuedRequest("c1", "c", 0, False, 40), QueuedRequest("s1", "rare", 1, False, 40)]
    queue.append(QueuedRequest("h", "hot", 2, True, 1))
    p = DLoraPolicy(limits)
    p.credits.balances.update({"rare": 1.5, "hot": -1.5})
    d = p.decide(queue, "hot")
    assert (d.merged, d.mixed, d.request_ids[0]) == ("hot", True, "s1")
    p.observe(d, StepRecord("hot", ["s1", "h"], ["rare", "hot"], num_tokens=41, seconds=0.02))
    assert p.credits["c"] == 0.0 and p.credits["hot"] == 0.0  # rare, served, settled against it
