"""How long a worker's loop takes per decode step, by the step's batch: the engine's step and the
shell's work around it (chunks out, the flush, in-flight records, commands), measured where the
worker runs, beside whatever else its host runs.

A step curve measured on an engine alone misses both: the cluster simulator priced by one read
30-40 % faster than the real stack (issue 21's validation). ``dlora bench cluster`` reads these
(``dlora_step_cycle_seconds`` on the worker's metrics) into the profile it calibrates.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def batch_bucket(n: int) -> int:
    """The power of two at or above ``n`` (>= 1): the label a step of ``n`` sequences counts under."""
    return 1 << max(0, n - 1).bit_length()


@dataclass
class StepCycles:
    """Per batch bucket, the decode steps timed and their cycles' seconds in all. A cycle runs from
    one step's start to the next's while the loop stays busy; a step that fed prompt tokens, or
    that the loop went idle after, is not counted (its cycle is not a decode step's)."""

    counts: dict[int, int] = field(default_factory=dict)
    seconds: dict[int, float] = field(default_factory=dict)
    sequences: dict[int, int] = field(default_factory=dict)  # the timed steps' sequences, summed
    _open: tuple[float, int] | None = None  # (start, sequences) of the last decode step

    def stepped(self, started: float, batch: int, prefill: int) -> None:
        """A step began at ``started`` (monotonic seconds) and ran ``batch`` sequences, ``prefill``
        of its tokens prompt: the cycle open since the last step closes here."""
        if self._open is not None:
            began, n = self._open
            bucket = batch_bucket(n)
            self.counts[bucket] = self.counts.get(bucket, 0) + 1
            self.seconds[bucket] = self.seconds.get(bucket, 0.0) + (started - began)
            self.sequences[bucket] = self.sequences.get(bucket, 0) + n
        self._open = (started, batch) if batch and not prefill else None

    def idle(self) -> None:
        """The loop waited for work: the open cycle's end is not a step's start."""
        self._open = None
