"""``fcfs_refilled``: a device slot held in the FCFS batch only by a request the step cannot feed
goes to the next adapter in line, as the scheduler would give it (tokenspeed #268's review), under
every policy that runs more than one adapter a step: unmerged-only, mixed-only and dlora (whose
FCFS batch, the one its credits are measured against, is the refilled one)."""

import pytest

from dlora.services.worker.policy import BatchLimits, QueuedRequest, StepRecord
from dlora.services.worker.policy.base import fcfs_refilled, within_budget
from dlora.services.worker.policy.dlora import DLoraPolicy
from dlora.services.worker.policy.fcfs import MixedOnly, UnmergedOnly

# One slot, prompts run whole (chunked prefill off), 64 tokens a step.
WHOLE = BatchLimits(max_num_seqs=8, max_adapters=1, max_num_batched_tokens=64, chunked_prefill=False)


def q(rid: str, adapter: str | None, arrival: int, num_new: int) -> QueuedRequest:
    return QueuedRequest(rid, adapter, arrival, running=False, num_new=num_new)


def ids(batch: list[QueuedRequest]) -> list[str]:
    return [r.request_id for r in batch]


def test_a_slot_held_only_by_a_prompt_the_budget_passes_over_goes_to_the_next_adapter_after_it() -> None:
    # base 50 tokens first; lora-1's 20 do not fit the 14 left; lora-2's 5 do, and its slot is free
    queue = [q("big", None, 0, 50), q("x", "lora-1", 1, 20), q("y", "lora-2", 2, 5), q("z", "lora-3", 3, 5)]
    assert ids(fcfs_refilled(queue, WHOLE)) == ["big", "x", "y"]  # x kept first: the scheduler decides
    assert UnmergedOnly(WHOLE).decide(queue, None).request_ids == ["big", "x", "y"]


def test_nothing_is_added_where_every_slot_holder_is_fed() -> None:
    queue = [q("x", "lora-1", 0, 20), q("y", "lora-2", 1, 5), q("b", None, 2, 5)]
    assert ids(fcfs_refilled(queue, WHOLE)) == ["x", "b"]
    roomy = BatchLimits(max_num_seqs=8, max_adapters=1)  # no budget: the scheduler feeds all of F
    assert ids(fcfs_refilled(queue, roomy)) == ["x", "b"]


def test_a_request_the_freed_slot_could_not_feed_either_is_not_added() -> None:
    # lora-2's 30 tokens do not fit the 14 left either: in F it would be owed for a step that
    # plain FCFS would not have run it in
    queue = [q("big", None, 0, 50), q("x", "lora-1", 1, 20), q("y", "lora-2", 2, 30)]
    assert ids(fcfs_refilled(queue, WHOLE)) == ["big", "x"]


def test_mixed_only_gives_the_slot_the_step_cannot_use_to_the_next_adapter_in_line() -> None:
    # two slots, one held by lora-a's correction: lora-1's 50 tokens do not fit the 44 left beside
    # lora-a's two prompts, lora-2's 5 do, in the slot lora-1 could not use
    two = BatchLimits(max_num_seqs=8, max_adapters=2, max_num_batched_tokens=64, chunked_prefill=False)
    queue = [q("a0", "lora-a", 0, 10), q("a1", "lora-a", 1, 10), q("x", "lora-1", 2, 50), q("y", "lora-2", 3, 5)]
    d = MixedOnly(two).decide(queue, None)
    assert (d.merged, d.mixed, d.request_ids) == ("lora-a", True, ["a0", "a1", "x", "y"])


def test_the_dlora_policy_makes_no_switch_for_a_mixed_step_that_feeds_none_of_the_adapters_requests() -> None:
    # Before LoRA is measured dLoRA's count rule would mix lora-1 in (its one prompt, merged, is R
    # of what F feeds), but in a mixed step its 20 tokens come after the base prompt's 50 and do
    # not fit: the merge would buy nothing, and its correction would hold the only slot
    queue = [q("big", None, 0, 50), q("x", "lora-1", 1, 20), q("y", "lora-2", 2, 5)]
    d = DLoraPolicy(WHOLE).decide(queue, None)
    assert (d.merged, d.mixed) == (None, False)


def test_the_dlora_policy_gives_the_slot_to_the_next_adapter_in_its_fcfs_batch_which_drives_credits() -> None:
    # F is what FCFS runs: lora-2's prompt in the slot lora-1's could not use jumps no one, so the
    # step that runs it moves no credit; a step that leaves it waiting owes lora-2 as it owes base
    queue = [q("big", None, 0, 50), q("x", "lora-1", 1, 20), q("y", "lora-2", 2, 5)]
    p = DLoraPolicy(WHOLE)
    d = p.decide(queue, None)
    assert (d.merged, d.request_ids) == (None, ["big", "x", "y"])
    p.observe(d, StepRecord(None, ["big", "y"], [None, "lora-2"], num_tokens=55, seconds=0.1))
    assert not p.credits.balances
    p.observe(d, StepRecord("lora-1", ["x"], ["lora-1"], num_tokens=20, seconds=0.1))
    assert dict(p.credits.balances) == pytest.approx({"": 0.1, "lora-2": 0.1, "lora-1": -0.2})


def test_a_starving_adapter_served_beside_the_merged_one_leaves_no_slot_unused() -> None:
    # lora-hot merged, its correction holding one of three slots; lora-rare's prompt, starving,
    # goes first, then lora-hot's 40 tokens: lora-1's 20 do not fit the 14 left, lora-2's 5 do, in
    # the slot lora-1's could not use
    three = BatchLimits(max_num_seqs=8, max_adapters=3, max_num_batched_tokens=64, chunked_prefill=False)
    queue = [q("b", "lora-rare", 0, 10), q("h", "lora-hot", 1, 40), q("x", "lora-1", 2, 20), q("y", "lora-2", 3, 5)]
    p = DLoraPolicy(three)
    p.credits.balances.update({"lora-rare": 2.0, "lora-hot": -0.5})
    d = p.decide(queue, "lora-hot")
    assert (d.merged, d.mixed, d.request_ids) == ("lora-hot", True, ["b", "h", "x", "y"])


def test_the_request_in_the_freed_slot_keeps_its_place_in_line() -> None:
    # lora-2's 5 tokens came before the base prompt's 10: FCFS (vLLM's, counting only the adapters
    # it schedules) feeds lora-2's in the 14 left, and the later base prompt waits, not the other
    # way round
    queue = [q("big", None, 0, 50), q("x", "lora-1", 1, 20), q("y", "lora-2", 2, 5), q("z", None, 3, 10)]
    assert ids(fcfs_refilled(queue, WHOLE)) == ["big", "x", "y", "z"]
    assert UnmergedOnly(WHOLE).decide(queue, None).request_ids == ["big", "x", "y", "z"]
    # mixed-only alike, in the slot its correction leaves: lora-2's before the base prompt's 40
    two = BatchLimits(max_num_seqs=8, max_adapters=2, max_num_batched_tokens=64, chunked_prefill=False)
    queue = [q("a0", "lora-a", 0, 10), q("a1", "lora-a", 1, 10), q("x", "lora-1", 2, 50), q("y", "lora-2", 3, 5)]
    d = MixedOnly(two).decide([*queue, q("z", None, 4, 40)], None)
    assert d.request_ids == ["a0", "a1", "x", "y", "z"]


def test_a_slot_the_next_adapter_cannot_use_either_goes_to_the_one_after_it() -> None:
    # lora-2's 30 tokens do not fit the 14 left either; lora-3's 5 do: FCFS runs them in the slot
    queue = [q("big", None, 0, 50), q("x", "lora-1", 1, 20), q("y", "lora-2", 2, 30), q("z", "lora-3", 3, 5)]
    assert ids(fcfs_refilled(queue, WHOLE)) == ["big", "x", "z"]
    assert UnmergedOnly(WHOLE).decide(queue, None).request_ids == ["big", "x", "z"]


def test_a_request_of_f_whose_adapter_loses_its_slot_to_an_earlier_one_is_counted_out() -> None:
    # two slots: lora-a's 60 tokens do not fit beside lora-d's and the base prompt; lora-b's 10,
    # before lora-a's next prompt, take the slot, and that prompt waits as FCFS leaves it waiting
    # (counted as run, a third adapter ran in two slots: the scheduler passes it over; it stays
    # in the decision, for the scheduler may admit lora-a's first after all, knowing its cache)
    two = BatchLimits(max_num_seqs=8, max_adapters=2, max_num_batched_tokens=64, chunked_prefill=False)
    queue = [q("d0", "lora-d", 0, 20), q("b0", None, 1, 10), q("a0", "lora-a", 2, 60), q("b1", "lora-b", 3, 10)]
    queue.append(q("a1", "lora-a", 4, 5))
    batch = fcfs_refilled(queue, two)
    assert (ids(batch), ids(within_budget(batch, two))) == (["d0", "b0", "a0", "b1", "a1"], ["d0", "b0", "b1"])
    # nor one passed over that fits once the refill moved others: lora-d's 10 tokens fit, but
    # lora-b and lora-c, before it, hold both slots
    queue = [q("b0", "lora-b", 0, 30), q("big", None, 1, 60), q("d0", "lora-d", 2, 60), q("c0", "lora-c", 3, 10)]
    queue += [q("b1", "lora-b", 4, 30), q("d1", "lora-d", 5, 10), q("c1", "lora-c", 6, 5)]
    assert ids(within_budget(fcfs_refilled(queue, two), two)) == ["b0", "c0", "c1"]
