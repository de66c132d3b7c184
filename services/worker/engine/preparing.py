"""A step's preparation: the switch its decision asks for, the schedule, and the batch's adapters
placed in device slots (``LLMEngine._prepare``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dlora.services.worker.engine.placement import PreparedStep, place_adapters
from dlora.services.worker.engine.scheduler import schedule
from dlora.services.worker.engine.sequence import Sequence, Status, requeue
from dlora.services.worker.policy import StepDecision, free_slots

if TYPE_CHECKING:
    from dlora.services.worker.engine.engine import LLMEngine


def prepare(e: LLMEngine, decision: StepDecision) -> PreparedStep | None:
    """Switch to the decision's merged adapter, schedule, and place the batch's unmerged
    adapters; None when nothing can run (every candidate waits for memory)."""
    if decision.merged is not None and decision.merged not in e.adapters:
        raise ValueError(f"decision merges unknown adapter {decision.merged!r}")
    merge_s, unmerge_s = e.switch(decision.merged)
    plan = schedule(decision, e.seqs, e.blocks, e.limits, e._cache_key)
    if not plan.seqs and decision.request_ids:
        # Its requests all wait for blocks held by earlier ones it left out: the policy, seeing
        # no step, would decide the same for ever (a helper's fuzzing hung on it); the head of
        # line, which may evict everything after it, runs instead.
        merged, earlier, line = e.merger.merged, plan.preempted, e.queue()
        if line and line[0].adapter not in (None, merged) and not free_slots(e.limits.max_adapters, merged):
            # Beside the merged adapter its correction holds the only slot (max_loras 1): the
            # head, on another adapter, could never run there, and nothing ran for ever.
            merge_more, unmerge_more = e.switch(merged := None)
            merge_s, unmerge_s = merge_s + merge_more, unmerge_s + unmerge_more
        head = StepDecision(merged, [q.request_id for q in line], mixed=merged is not None)
        floor = min((s.priority for s in earlier), default=float("inf"))  # (schedule's floor)
        plan = schedule(head, e.seqs, e.blocks, e.limits, e._cache_key, floor)
        plan.preempted[:0] = earlier
    preempted(e, plan.preempted)
    if not plan.seqs:
        return None
    started = e.clock()  # the step's time counts adapter loads, not the switch
    for seq in (s for s in plan.seqs if s.scheduled_at is None):
        seq.scheduled_at = started
    batch, slots = place_adapters(plan.seqs, e.merger.merged, e.slots, e._load_slot)
    fed = [(s.adapter, s.num_scheduled) for s in batch]
    prefill = sum(s.num_scheduled for s in batch if s.status is Status.WAITING)
    context = sum(s.num_cached + s.num_scheduled for s in batch)
    return PreparedStep(batch, slots, merge_s, unmerge_s, started, fed, prefill, e.merger.merged, context)


def preempted(e: LLMEngine, seqs: list[Sequence]) -> None:
    """Take in ``seqs``, preempted this step (by the schedule, or ``async_scheduling.recompute``
    after it): counted (``vllm:num_preemptions``), and those that were generating keyed again just
    ahead of the waiting requests, behind the running ones (``requeue``), whichever path preempted
    them."""
    e._arrivals = requeue(seqs, e.seqs.values(), e.blocks.holds, e._arrivals)
    e.stats.preemptions += len(seqs)
