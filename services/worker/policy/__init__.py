"""Batching policies: per step, unmerged across many adapters, merged on one, or mixed (one merged,
the others unmerged beside it). Pure, no I/O."""

from __future__ import annotations

from dlora.services.worker.policy.base import (
    BatchLimits,
    KvNeed,
    KvRoom,
    Mode,
    Policy,
    QueuedRequest,
    StepDecision,
    StepRecord,
    SwitchedFeeds,
    fcfs_batch,
    free_slots,
    lora_work,
)
from dlora.services.worker.policy.config import PolicyConfig, PolicyName


def make_policy(config: PolicyConfig, limits: BatchLimits) -> Policy:
    """The policy ``config.name`` names; ValueError naming the choices for an unknown one."""
    from dlora.services.worker.policy.dlora import DLoraPolicy
    from dlora.services.worker.policy.fcfs import MergedOnly, MixedOnly, UnmergedOnly

    try:
        name = PolicyName(config.name)
    except ValueError:
        raise ValueError(f"policy {config.name!r}: expected one of {[p.value for p in PolicyName]}") from None
    if name is PolicyName.DLORA:
        return DLoraPolicy(limits, config)
    fixed = {
        PolicyName.MERGED_ONLY: MergedOnly,
        PolicyName.MIXED_ONLY: MixedOnly,
        PolicyName.UNMERGED_ONLY: UnmergedOnly,
    }
    return fixed[name](limits)


__all__ = [
    "BatchLimits",
    "KvNeed",
    "KvRoom",
    "Mode",
    "Policy",
    "PolicyConfig",
    "PolicyName",
    "QueuedRequest",
    "StepDecision",
    "StepRecord",
    "SwitchedFeeds",
    "fcfs_batch",
    "free_slots",
    "lora_work",
    "make_policy",
]
