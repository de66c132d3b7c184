"""Batching policies: per step, merged on one adapter or unmerged across many. Pure, no I/O."""

from __future__ import annotations

from dlora.services.worker.policy.base import (
    BatchLimits,
    Policy,
    QueuedRequest,
    StepDecision,
    StepRecord,
    fcfs_batch,
)
from dlora.services.worker.policy.config import PolicyConfig, PolicyName


def make_policy(config: PolicyConfig, limits: BatchLimits) -> Policy:
    """The policy ``config.name`` names; ValueError naming the choices for an unknown one."""
    from dlora.services.worker.policy.dlora import DLoraPolicy
    from dlora.services.worker.policy.fcfs import MergedOnly, UnmergedOnly

    try:
        name = PolicyName(config.name)
    except ValueError:
        raise ValueError(f"policy {config.name!r}: expected one of {[p.value for p in PolicyName]}") from None
    if name is PolicyName.DLORA:
        return DLoraPolicy(limits, config)
    return MergedOnly(limits) if name is PolicyName.MERGED_ONLY else UnmergedOnly(limits)


__all__ = [
    "BatchLimits",
    "Policy",
    "PolicyConfig",
    "PolicyName",
    "QueuedRequest",
    "StepDecision",
    "StepRecord",
    "fcfs_batch",
    "make_policy",
]
