"""What a step ran and cost, taken in after it: the engine's stats and the policy's record of it
(``StepRecord``), once per run of the step (the simulator's fast-forward repeats one)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dlora.common.messages import FinishReason
from dlora.services.worker.engine.placement import PreparedStep
from dlora.services.worker.engine.sequence import Status
from dlora.services.worker.policy import StepDecision, StepRecord, lora_work

if TYPE_CHECKING:
    from dlora.services.worker.engine.engine import LLMEngine


def observe(
    engine: LLMEngine, decision: StepDecision, step: PreparedStep, generated: int, seconds: list[float]
) -> None:
    """Record the step (``generated`` tokens) in ``engine``'s stats and hand its policy the decision
    back with what the step ran and cost, once per entry of ``seconds`` (``observe_repeated``);
    what does not change between runs is worked out once."""
    batch, fed, merged = step.batch, step.num_tokens, step.merged
    ranks = {a: engine.adapters[a].rank for a in {a for a, _ in step.fed} | {merged} if a is not None}
    segments, rank_tokens = lora_work(step.fed, merged, ranks)
    request_ids, adapters = [s.request_id for s in batch], [s.adapter for s in batch]
    # A chunk short of its prompt's end made no token, nor did a sequence that failed.
    made = step.made or [s.status is Status.RUNNING or s.finish_reason not in (None, FinishReason.ERROR) for s in batch]
    shares = [(a or "", n, m) for (a, n), m in zip(step.fed, made)]
    record = StepRecord(
        merged=merged,
        request_ids=request_ids,
        adapters=adapters,
        num_tokens=fed,
        lora_segments=segments,
        lora_rank_tokens=rank_tokens,
        context_tokens=step.context_tokens,
        seconds=seconds[0],
        merge_seconds=step.merge_s,
        unmerge_seconds=step.unmerge_s,
    )
    mode = record.mode
    engine.stats.record_steps(seconds, generated, fed, step.num_prefill, mode, len(batch), (segments, rank_tokens))
    engine.stats.record_adapters(seconds, fed, shares)
    engine.policy.observe_repeated(decision, record, seconds)  # the stats and the policy read nothing of each other
