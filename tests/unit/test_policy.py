import pytest

from dlora.services.worker.policy import BatchLimits, PolicyConfig, QueuedRequest, fcfs_batch, make_policy
from dlora.services.worker.policy.base import within_budget
from dlora.services.worker.policy.fcfs import MergedOnly, MixedOnly, UnmergedOnly

LIMITS = BatchLimits(max_num_seqs=8, max_adapters=2)


def q(rid: str, adapter: str | None, arrival: int) -> QueuedRequest:
    return QueuedRequest(rid, adapter, arrival, running=False, num_new=4)


QUEUE = [q("r0", "a", 0), q("r1", None, 1), q("r2", "b", 2), q("r3", "a", 3), q("r4", "c", 4), q("r5", "b", 5)]


def test_fcfs_batch_respects_slots_and_size() -> None:
    assert [r.request_id for r in fcfs_batch(QUEUE, LIMITS)] == ["r0", "r1", "r2", "r3", "r5"]
    assert [r.request_id for r in fcfs_batch(QUEUE, BatchLimits(3, 8))] == ["r0", "r1", "r2"]


def test_within_budget_stops_at_the_token_budget_and_cuts_the_last_prompt_as_the_scheduler_chunks_it() -> None:
    budget = BatchLimits(max_num_seqs=8, max_adapters=8, max_num_batched_tokens=10)
    batch = within_budget(fcfs_batch(QUEUE, budget), budget)  # 4 tokens each
    assert [(r.request_id, r.num_new) for r in batch] == [("r0", 4), ("r1", 4), ("r2", 2)]
    assert QUEUE[2].num_new == 4  # the queue itself is not changed
    exact = BatchLimits(max_num_seqs=8, max_adapters=8, max_num_batched_tokens=8)
    assert [r.request_id for r in within_budget(QUEUE, exact)] == ["r0", "r1"]
    assert within_budget(QUEUE, LIMITS) == QUEUE  # no budget
    # Without chunked prefill a prompt that does not fit what is left waits; later ones may fit
    whole = BatchLimits(max_num_seqs=8, max_adapters=8, max_num_batched_tokens=10, chunked_prefill=False)
    short = QueuedRequest("r9", "d", 9, running=False, num_new=1)
    assert [r.request_id for r in within_budget([*QUEUE[:3], short], whole)] == ["r0", "r1", "r9"]
    big = QueuedRequest("r8", "d", 8, running=False, num_new=30)
    assert [r.request_id for r in within_budget([big, *QUEUE], whole)] == ["r8"]  # the first runs whole
    # F itself is not cut: the scheduler applies the budget, knowing each prompt's cached prefix
    assert len(fcfs_batch(QUEUE, budget)) == 6


def test_within_budget_leaves_the_decodes_after_a_prompt_their_room_as_the_scheduler_does() -> None:
    """A review: the scheduler holds back room for the decodes after a prompt decided first (a
    higher priority's); priced as the whole budget to the prompt, dLoRA's band and prices saw one
    request run where three do."""
    budget = BatchLimits(max_num_seqs=8, max_adapters=8, max_num_batched_tokens=16)
    urgent = QueuedRequest("p", "a", 0, running=False, num_new=40)
    decodes = [QueuedRequest(f"d{i}", "a", i + 1, running=True, num_new=1) for i in range(2)]
    assert [(r.request_id, r.num_new) for r in within_budget([urgent, *decodes], budget)] == [
        ("p", 14),
        ("d0", 1),
        ("d1", 1),
    ]
    # no more room held than the step has sequences left for
    two = BatchLimits(max_num_seqs=2, max_adapters=8, max_num_batched_tokens=16)
    assert [(r.request_id, r.num_new) for r in within_budget([urgent, *decodes], two)][0] == ("p", 15)


def test_a_mixed_batch_gives_the_merged_adapter_no_slot_and_its_correction_one() -> None:
    # a merged: its requests and base ones need no slot; one of the two slots holds a's correction
    assert [r.request_id for r in fcfs_batch(QUEUE, LIMITS, merged="a")] == ["r0", "r1", "r2", "r3", "r5"]
    assert [r.request_id for r in fcfs_batch(QUEUE, LIMITS, merged="c")] == ["r0", "r1", "r3", "r4"]
    one_slot = BatchLimits(max_num_seqs=8, max_adapters=1)
    assert [r.request_id for r in fcfs_batch(QUEUE, one_slot, merged="a")] == ["r0", "r1", "r3"]


def test_mixed_only_merges_the_busiest_and_runs_everyone_beside_it() -> None:
    d = MixedOnly(LIMITS).decide(QUEUE, merged_now=None)
    assert (d.merged, d.mixed, d.request_ids) == ("a", True, ["r0", "r1", "r2", "r3", "r5"])
    # b ties a: the merged adapter stays (no switch for an equal count)
    assert MixedOnly(LIMITS).decide(QUEUE, merged_now="b").merged == "b"
    assert MixedOnly(LIMITS).decide(QUEUE + [q("r6", "b", 6)], merged_now="a").merged == "b"
    # only base requests: the merged adapter stays and they run beside it; none merged: unmerged
    assert MixedOnly(LIMITS).decide([q("x", None, 0)], merged_now="a").merged == "a"
    d = MixedOnly(LIMITS).decide([q("x", None, 0)], merged_now=None)
    assert (d.merged, d.mixed, d.request_ids) == (None, False, ["x"])
    # an adapter that cannot be merged counts too: the busiest, its step runs unmerged, FCFS
    p = MixedOnly(LIMITS)
    p.unmergeable = {"a"}
    d = p.decide([*QUEUE, q("r6", "a", 6)], merged_now="b")
    assert (d.merged, d.mixed, d.request_ids) == (None, False, ["r0", "r1", "r2", "r3", "r5", "r6"])


def test_unmerged_only_is_fcfs_within_the_adapter_slots() -> None:
    d = UnmergedOnly(LIMITS).decide(QUEUE, merged_now=None)
    assert d.merged is None and d.request_ids == ["r0", "r1", "r2", "r3", "r5"]


def test_merged_only_runs_the_head_of_line_adapter() -> None:
    d = MergedOnly(LIMITS).decide(QUEUE, merged_now=None)
    assert d.merged == "a" and d.request_ids == ["r0", "r3"]


def test_merged_only_with_base_request_first_runs_base_unmerged() -> None:
    d = MergedOnly(LIMITS).decide([q("x", None, 0), q("y", "a", 1)], merged_now="a")
    assert d.merged is None and d.request_ids == ["x"]


def test_merged_only_keeps_the_current_adapter_when_idle() -> None:
    assert MergedOnly(LIMITS).decide([], merged_now="a").merged == "a"


@pytest.mark.parametrize("name", ["dlora", "merged-only", "unmerged-only", "mixed-only"])
def test_policies_by_name(name: str) -> None:
    assert make_policy(PolicyConfig(name=name), LIMITS).decide([], None).request_ids == []


def test_unknown_policy_is_refused_naming_the_choices() -> None:
    with pytest.raises(ValueError, match="dlora"):
        make_policy(PolicyConfig(name="sometimes"), LIMITS)  # type: ignore[arg-type]


def test_within_budget_starts_no_prompt_keyed_after_a_recompute_that_does_not_fit_as_the_scheduler() -> None:
    """Without chunked prefill a recompute (a request that was generating) too long for the budget
    left stops the prompts keyed after it, in the scheduler (vLLM's waiting loop stops there: past
    it small prompts kept the room it waited for). ``within_budget`` went on past it and priced the
    step on a prompt that would not run (the last session's "misprices with chunked prefill off")."""
    from dlora.services.worker.engine.block_manager import BlockManager
    from dlora.services.worker.engine.queue_view import queued
    from dlora.services.worker.engine.scheduler import Limits, schedule
    from dlora.services.worker.policy import StepDecision
    from tests.unit.test_scheduler import running, seq

    bm = BlockManager(num_blocks=64, block_size=4)
    seqs = {s.request_id: s for s in (running(seq("d", 0, 3, outputs=1), bm), seq("r", 1, 6, outputs=4))}
    seqs |= {"p": seq("p", 2, 3), "e": running(seq("e", 3, 3, outputs=1), bm)}
    limits = Limits(max_num_seqs=8, max_num_batched_tokens=8, max_adapters=2, chunked_prefill=False)
    batch = list(queued(seqs.values(), {}, limits, {}, bm).values())
    whole = BatchLimits(8, 2, 8, chunked_prefill=False)
    plan = schedule(StepDecision(None, [r.request_id for r in batch]), seqs, bm, limits)
    assert [s.request_id for s in plan.seqs] == ["d", "e"]  # r (10 tokens) waits, and p behind it
    assert [r.request_id for r in within_budget(batch, whole)] == ["d", "e"]  # (["d", "p", "e"] before)


def test_within_budget_goes_on_past_a_recompute_that_does_not_fit_to_a_prompt_holding_blocks() -> None:
    """The scheduler's line stops only fresh prompts: one whose chunks are under way (holding
    blocks, vLLM's running list) goes on past a recompute that waits. ``within_budget`` stopped it
    too, and priced the step without it (found by a differential check against ``schedule``)."""
    from dlora.services.worker.engine.block_manager import BlockManager
    from dlora.services.worker.engine.queue_view import queued
    from dlora.services.worker.engine.scheduler import schedule
    from dlora.services.worker.policy import StepDecision
    from tests.unit.test_scheduler import CHUNKED, running, seq

    bm = BlockManager(num_blocks=4, block_size=4)
    d = running(seq("d", 0, 3, outputs=1), bm)
    h = seq("h", 3, 8)
    h.num_cached = 4
    bm.grow("h", 4)  # its first chunk in: the second takes 1 block
    seqs = {s.request_id: s for s in [d, seq("r", 1, 8, outputs=5), h, seq("p", 4, 4)]}  # r: 4 blocks, 2 free
    batch = list(queued(seqs.values(), {}, CHUNKED, {}, bm).values())
    limits = BatchLimits(CHUNKED.max_num_seqs, CHUNKED.max_adapters, CHUNKED.max_num_batched_tokens)
    plan = schedule(StepDecision(None, [r.request_id for r in batch]), seqs, bm, CHUNKED)
    assert [s.request_id for s in plan.seqs] == ["d", "h"]
    assert [r.request_id for r in within_budget(batch, limits)] == ["d", "h"]  # (["d"] before)
