"""What a batching policy sees and returns, and the arithmetic every policy shares.

Pure: no torch, no I/O. The engine builds a ``QueuedRequest`` per unfinished request before each
step, asks ``decide`` for a ``StepDecision``, runs it, and hands the decision back with what ran
and what it cost (a ``StepRecord``) to ``observe``: a policy keeps no hidden state between the two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class QueuedRequest:
    """What a policy sees of one unfinished request."""

    request_id: str
    adapter: str | None  # None: the base model
    arrival: int  # FCFS order
    running: bool  # its KV is cached (decode) rather than waiting for a prefill
    num_new: int  # tokens it would feed this step
    rank: int = 0  # LoRA rank of its adapter (0 for the base model)


@dataclass(frozen=True)
class StepDecision:
    # Adapter to have merged into the weights for this step. None: base weights, and any mix of
    # base requests and unmerged adapters may run.
    merged: str | None
    # Requests that may join the step, in priority order; the scheduler admits as many as memory,
    # the token budget and the adapter slots allow.
    request_ids: list[str]
    # What the deciding policy saw (opaque to the engine), handed back to it with the step's
    # record in ``observe``; None for a decision made outside the policy (``step(decision=...)``).
    basis: object | None = None


@dataclass(frozen=True)
class StepRecord:
    """What one step actually ran and cost, measured by the engine."""

    merged: str | None  # adapter merged during the step
    request_ids: list[str]  # requests that ran
    adapters: list[str | None]  # their adapters, in the same order
    num_tokens: int  # tokens fed (prefill + decode)
    lora_rank_sum: int  # sum of ranks of the distinct unmerged adapters in the batch
    seconds: float  # model step time (inputs, forward and sampling; switches not)
    merge_seconds: float = 0.0  # merge paid before the step (0 if none)
    unmerge_seconds: float = 0.0  # unmerge paid before the step (0 if none)

    @property
    def switch_seconds(self) -> float:
        return self.merge_seconds + self.unmerge_seconds


@dataclass(frozen=True)
class BatchLimits:
    max_num_seqs: int  # requests per step
    max_adapters: int  # distinct unmerged adapters per step (device slots)


def fcfs_batch(queue: list[QueuedRequest], limits: BatchLimits) -> list[QueuedRequest]:
    """The batch plain FCFS would run: arrival order, at most ``max_adapters`` distinct adapters
    (base requests need no slot) and ``max_num_seqs`` requests. ``queue`` is in arrival order."""
    adapters: set[str] = set()
    out: list[QueuedRequest] = []
    for r in queue:
        if len(out) == limits.max_num_seqs:
            break
        if r.adapter is not None and r.adapter not in adapters:
            if len(adapters) == limits.max_adapters:
                continue
            adapters.add(r.adapter)
        out.append(r)
    return out


class Policy:
    """Base class: ``decide`` is the policy; ``observe`` and the checkpoint are no-ops by default."""

    def __init__(self, limits: BatchLimits) -> None:
        self.limits = limits

    def decide(self, queue: list[QueuedRequest], merged_now: str | None) -> StepDecision:
        """The next step, from every unfinished request (``queue``, in arrival order) and the
        adapter merged now (None: base weights)."""
        raise NotImplementedError

    def observe(self, decision: StepDecision, record: StepRecord) -> None:
        """Learn from a step: the ``decision`` it ran (this policy's own, or one made outside it)
        and what it ran and cost (``record``)."""

    def checkpoint(self) -> dict[str, Any]:
        """State worth keeping across a restart (credits, thresholds), JSON-serialisable."""
        return {}

    def restore(self, state: dict[str, Any]) -> None:
        """Resume from ``checkpoint()``'s output."""
