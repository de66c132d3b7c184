"""Batching policies: per step, merged on one adapter or unmerged across many. Pure, no I/O."""

from __future__ import annotations

import enum

from dlora.services.worker.policy.base import (
    BatchLimits,
    Policy,
    QueuedRequest,
    StepDecision,
    StepRecord,
    fcfs_batch,
)


class PolicyName(str, enum.Enum):
    DLORA = "dlora"
    MERGED_ONLY = "merged-only"
    UNMERGED_ONLY = "unmerged-only"


def make_policy(name: PolicyName | str, limits: BatchLimits) -> Policy:
    """The policy called ``name``; ValueError naming the choices for an unknown one."""
    from dlora.services.worker.policy.dlora import DLoraPolicy
    from dlora.services.worker.policy.fcfs import MergedOnly, UnmergedOnly

    try:
        name = PolicyName(name)
    except ValueError:
        raise ValueError(f"policy {name!r}: expected one of {[p.value for p in PolicyName]}") from None
    return {PolicyName.DLORA: DLoraPolicy, PolicyName.MERGED_ONLY: MergedOnly, PolicyName.UNMERGED_ONLY: UnmergedOnly}[
        name
    ](limits)


__all__ = ["BatchLimits", "Policy", "PolicyName", "QueuedRequest", "StepDecision", "StepRecord", "fcfs_batch", "make_policy"]
