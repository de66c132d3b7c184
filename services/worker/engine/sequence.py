"""One request's state inside the engine."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from dlora.common.messages import FinishReason, SamplingParams
from dlora.services.worker.engine.detokenizer import IncrementalDetokenizer


class Status(enum.Enum):
    # Needs a prefill (new, or preempted); holds blocks once a chunk of it or a cached prefix is in
    WAITING = "waiting"
    RUNNING = "running"  # KV cached up to all tokens but the last: decoding
    FINISHED = "finished"


@dataclass
class Sequence:
    request_id: str
    adapter: str | None  # None: the base model
    prompt_ids: list[int]
    params: SamplingParams
    arrival: int  # FCFS order (LLMEngine._arrival: resumed requests go ahead of those waiting)
    detok: IncrementalDetokenizer
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    # Tokens whose K/V are in the cache. RUNNING keeps this at len(all_ids) - 1: the last sampled
    # token is fed at the next step, so prefill and decode are one code path.
    num_cached: int = 0
    # Tokens fed at the step being run (set by the scheduler): num_new, or a chunk of a prefill.
    num_scheduled: int = 0
    text: str = ""  # output text so far (stop string cut off)
    emitted: int = 0  # characters of text already returned to the caller
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    matcher: Any = None  # llguidance matcher of its JSON Schema (structured output), or None

    def scheduled_ids(self) -> list[int]:
        """This step's input: the ``num_scheduled`` tokens after the cached ones (sliced, not built
        whole: a chunk of a long prompt is a small part of it)."""
        start, end, n = self.num_cached, self.num_cached + self.num_scheduled, len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        if start >= n:
            return self.output_ids[start - n : end - n]
        return self.prompt_ids[start:] + self.output_ids[: end - n]

    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def total_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_new(self) -> int:
        """Tokens to feed at the next step: the whole context after a preemption, else one."""
        return self.total_len - self.num_cached
