"""Measured costs the batching policy and the metrics read: step times, switches, adapter loads."""

from __future__ import annotations

from dataclasses import dataclass, field

# Weight of the newest sample in the running estimates.
_ALPHA = 0.2


def _ema(old: float | None, new: float) -> float:
    return new if old is None else (1 - _ALPHA) * old + _ALPHA * new


@dataclass
class EngineStats:
    # Running estimate of one step's seconds, per (merged?, batch size).
    step_seconds: dict[tuple[bool, int], float] = field(default_factory=dict)
    merge_seconds: float | None = None  # running estimate of one merge
    unmerge_seconds: float | None = None
    steps: int = 0
    merges: int = 0
    unmerges: int = 0
    preemptions: int = 0
    adapter_loads: int = 0
    adapter_evictions: int = 0
    adapter_load_seconds: float = 0.0  # total

    def record_step(self, merged: bool, batch_size: int, seconds: float) -> None:
        key = (merged, batch_size)
        self.step_seconds[key] = _ema(self.step_seconds.get(key), seconds)
        self.steps += 1

    def record_merge(self, seconds: float) -> None:
        self.merge_seconds = _ema(self.merge_seconds, seconds)
        self.merges += 1

    def record_unmerge(self, seconds: float) -> None:
        self.unmerge_seconds = _ema(self.unmerge_seconds, seconds)
        self.unmerges += 1

    def record_load(self, evicted: bool, seconds: float) -> None:
        self.adapter_loads += 1
        self.adapter_evictions += evicted
        self.adapter_load_seconds += seconds
