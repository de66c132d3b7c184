"""The fixed policies, for ablations: always unmerged, always merged on the head of line, or always
mixed on the busiest adapter."""

from __future__ import annotations

from collections import Counter

from dlora.services.worker.policy.base import KvRoom, Policy, QueuedRequest, StepDecision, fcfs_refilled


class UnmergedOnly(Policy):
    """FCFS across adapters, at most the device's adapter slots per step (``fcfs_refilled``: a
    slot the step cannot use goes to the next adapter in line)."""

    def decide(self, queue: list[QueuedRequest], merged_now: str | None, kv: KvRoom | None = None) -> StepDecision:
        batch = fcfs_refilled(queue, self.limits, None, merged_now, kv)
        return StepDecision(merged=None, request_ids=[r.request_id for r in batch])


class MergedOnly(Policy):
    """Merge the head-of-line request's adapter and run only its requests (base requests run
    on the plain base weights; an ``unmergeable`` adapter's, unmerged on them)."""

    def decide(self, queue: list[QueuedRequest], merged_now: str | None, kv: KvRoom | None = None) -> StepDecision:
        if not queue:
            return StepDecision(merged=merged_now, request_ids=[])
        head = queue[0].adapter
        ids = [r.request_id for r in queue if r.adapter == head]
        return StepDecision(merged=None if head in self.unmergeable else head, request_ids=ids)


class MixedOnly(Policy):
    """Mixed steps on the busiest adapter (most queued requests): it runs merged, at base cost, and
    every other request runs beside it unmerged, FCFS within the remaining slots (``fcfs_refilled``:
    a slot the step cannot use goes to the next adapter in line), so nobody waits for a merge.
    The merged adapter stays until another has strictly more requests queued (or, with no
    adapter's request queued, until one comes). With one device slot (``max_adapters`` 1) the
    correction holds it and only the busiest adapter's and base requests run: the others
    wait until theirs is the busiest, without a bound (an ablation, not for serving). An
    ``unmergeable`` adapter counts too: when it is the busiest the step runs unmerged, FCFS
    (left out of the count, its requests never ran under one slot, and the engine stepped on
    empty batches for ever: a helper's finding)."""

    def decide(self, queue: list[QueuedRequest], merged_now: str | None, kv: KvRoom | None = None) -> StepDecision:
        counts = Counter(r.adapter for r in queue if r.adapter is not None)
        busiest = max(counts, key=lambda a: (counts[a], a == merged_now), default=merged_now)
        if busiest in self.unmergeable:
            busiest = None
        batch = fcfs_refilled(queue, self.limits, busiest, merged_now, kv)
        return StepDecision(merged=busiest, request_ids=[r.request_id for r in batch], mixed=busiest is not None)
