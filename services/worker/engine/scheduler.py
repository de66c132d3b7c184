"""Turn a policy's decision into this step's batch under memory, token and adapter-slot limits.

Pure bookkeeping over sequences and the block manager: no tensors. A running sequence that
needs a block when none is free takes one from the most recently arrived running sequence
outside the batch (or gives up its own), which is preempted by recompute: its blocks are freed
and it re-enters as a prefill of its prompt plus the tokens it already produced.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dlora.services.worker.engine.kv_cache import BlockManager
from dlora.services.worker.engine.sequence import Sequence, Status
from dlora.services.worker.policy import StepDecision, free_slots


@dataclass(frozen=True)
class Limits:
    max_num_seqs: int  # sequences per step
    max_num_batched_tokens: int  # new tokens per step (a longer prefill still runs alone)
    max_adapters: int  # distinct unmerged adapters per step (device slots), a mixed step's merged one included


@dataclass
class Schedule:
    seqs: list[Sequence] = field(default_factory=list)  # run this step, in decision order
    preempted: list[Sequence] = field(default_factory=list)  # lost their KV this step


def preempt(seq: Sequence, blocks: BlockManager) -> None:
    blocks.free(seq.request_id)
    seq.status = Status.WAITING
    seq.num_cached = 0
    seq.num_preemptions += 1


def schedule(decision: StepDecision, seqs: dict[str, Sequence], blocks: BlockManager, limits: Limits) -> Schedule:
    out = Schedule()
    chosen: set[str] = set()
    adapters: set[str] = set()
    tokens = 0
    merged = decision.merged
    slots = free_slots(limits.max_adapters, merged)
    for rid in decision.request_ids:
        seq = seqs.get(rid)
        if seq is None or seq.status is Status.FINISHED or rid in chosen:
            continue
        if len(out.seqs) == limits.max_num_seqs:
            break
        if merged is not None and seq.adapter != merged and not decision.mixed:
            continue  # a merged step runs only the merged adapter's requests
        if seq.adapter not in (None, merged) and seq.adapter not in adapters and len(adapters) >= slots:
            continue
        if out.seqs and tokens + seq.num_new > limits.max_num_batched_tokens:
            continue
        if seq.status is Status.RUNNING:
            out.preempted += _make_room(seq, seqs, blocks, exclude=chosen | {rid})
            if not blocks.can_grow(rid, seq.total_len):
                preempt(seq, blocks)
                out.preempted.append(seq)
                continue
        elif not blocks.can_grow(rid, seq.total_len):
            # A prefill waits for free blocks rather than evicting running work, unless the step
            # would otherwise be empty: then sequences the decision left out (paused while another
            # adapter is merged) give their blocks back.
            if out.seqs:
                continue
            out.preempted += _make_room(seq, seqs, blocks, exclude=set(decision.request_ids))
            if not blocks.can_grow(rid, seq.total_len):
                continue
        blocks.grow(rid, seq.total_len)
        out.seqs.append(seq)
        chosen.add(rid)
        tokens += seq.num_new
        if seq.adapter not in (None, merged):
            adapters.add(seq.adapter)
    return out


def _make_room(seq: Sequence, seqs: dict[str, Sequence], blocks: BlockManager, exclude: set[str]) -> list[Sequence]:
    """Preempt running sequences outside ``exclude``, latest arrival first, until ``seq`` fits."""
    victims = []
    while not blocks.can_grow(seq.request_id, seq.total_len):
        victim = _latest_running(seqs, exclude)
        if victim is None:
            break
        preempt(victim, blocks)
        victims.append(victim)
    return victims


def _latest_running(seqs: dict[str, Sequence], exclude: set[str]) -> Sequence | None:
    running = [s for s in seqs.values() if s.status is Status.RUNNING and s.request_id not in exclude]
    return max(running, key=lambda s: s.arrival, default=None)
