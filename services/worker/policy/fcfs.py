"""The two fixed policies, for ablations: always unmerged, or always merged on the head of line."""

from __future__ import annotations

from dlora.services.worker.policy.base import Policy, QueuedRequest, StepDecision, fcfs_batch


class UnmergedOnly(Policy):
    """FCFS across adapters, at most the device's adapter slots per step."""

    def decide(self, queue: list[QueuedRequest], merged_now: str | None) -> StepDecision:
        return StepDecision(merged=None, request_ids=[r.request_id for r in fcfs_batch(queue, self.limits)])


class MergedOnly(Policy):
    """Merge the head-of-line request's adapter and run only its requests (base requests run
    on the plain base weights)."""

    def decide(self, queue: list[QueuedRequest], merged_now: str | None) -> StepDecision:
        if not queue:
            return StepDecision(merged=merged_now, request_ids=[])
        head = queue[0].adapter
        return StepDecision(merged=head, request_ids=[r.request_id for r in queue if r.adapter == head])
