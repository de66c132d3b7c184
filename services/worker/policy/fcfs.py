"""What runs each step: the policy's decision (merged adapter or unmerged, and which requests).

The engine asks a policy for a ``StepDecision`` before every step; the dLoRA batching policy
plugs in here. This module holds the decision types and the two fixed FCFS policies.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class QueuedRequest:
    """What a policy sees of one unfinished request."""

    request_id: str
    adapter: str | None  # None: the base model
    arrival: int  # FCFS order
    running: bool  # its KV is cached (decode) rather than waiting for a prefill
    num_new: int  # tokens it would feed this step


@dataclass(frozen=True)
class StepDecision:
    # Adapter to have merged into the weights for this step. None: base weights, and any mix of
    # base requests and unmerged adapters may run.
    merged: str | None
    # Requests that may join the step, in priority order; the scheduler admits as many as memory,
    # the token budget and the adapter slots allow.
    request_ids: list[str]


class Policy(Protocol):
    def decide(self, queue: list[QueuedRequest], merged_now: str | None) -> StepDecision: ...


class Mode(str, enum.Enum):
    MERGED = "merged"
    UNMERGED = "unmerged"


class FcfsUnmerged:
    """Arrival order across adapters, at most ``max_adapters`` distinct adapters per step."""

    def __init__(self, max_adapters: int) -> None:
        self.max_adapters = max_adapters

    def decide(self, queue: list[QueuedRequest], merged_now: str | None) -> StepDecision:
        adapters: set[str] = set()
        ids = []
        for r in sorted(queue, key=lambda r: r.arrival):
            if r.adapter is not None and r.adapter not in adapters:
                if len(adapters) == self.max_adapters:
                    continue
                adapters.add(r.adapter)
            ids.append(r.request_id)
        return StepDecision(merged=None, request_ids=ids)


class FcfsMerged:
    """Merge the head-of-line request's adapter and run only its requests (base ones: unmerged)."""

    def decide(self, queue: list[QueuedRequest], merged_now: str | None) -> StepDecision:
        ordered = sorted(queue, key=lambda r: r.arrival)
        if not ordered:
            return StepDecision(merged=merged_now, request_ids=[])
        head = ordered[0].adapter
        return StepDecision(merged=head, request_ids=[r.request_id for r in ordered if r.adapter == head])


def make_policy(mode: Mode | str, max_adapters: int) -> Policy:
    mode = Mode(mode)
    if mode is Mode.MERGED:
        return FcfsMerged()
    return FcfsUnmerged(max_adapters)
