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


# A cycle longer than this many times its own engine step is a stall (a flush waiting out a NATS
# blip, a Redis outage), not the shell's steady cost: one would move a bucket's mean by itself.
STALL_FACTOR = 5.0


@dataclass
class StepCycles:
    """Per batch bucket, the decode steps timed and their cycles' seconds in all. A cycle runs from
    one step's start to the next's while the loop stays busy. Not timed: a step that fed prompt
    tokens or merged, unmerged or loaded an adapter (the simulator prices those apart), one the
    loop went idle after, and a stall (``STALL_FACTOR``)."""

    counts: dict[int, int] = field(default_factory=dict)
    seconds: dict[int, float] = field(default_factory=dict)
    sequences: dict[int, int] = field(default_factory=dict)  # the timed steps' sequences, summed
    _open: tuple[float, int, float] | None = None  # (start, sequences, engine seconds) of the last decode step

    def stepped(self, started: float, batch: int, prefill: int, engine_s: float, switched: bool = False) -> None:
        """A step began at ``started`` (monotonic seconds), ran ``batch`` sequences, ``prefill`` of
        its tokens prompt, for ``engine_s`` seconds of the engine's own time; ``switched``: it
        merged, unmerged or loaded an adapter. The cycle open since the last step closes here."""
        if self._open is not None:
            began, n, step_s = self._open
            if started - began <= STALL_FACTOR * step_s:
                bucket = batch_bucket(n)
                self.counts[bucket] = self.counts.get(bucket, 0) + 1
                self.seconds[bucket] = self.seconds.get(bucket, 0.0) + (started - began)
                self.sequences[bucket] = self.sequences.get(bucket, 0) + n
        self._open = (started, batch, engine_s) if batch and not prefill and not switched else None

    def idle(self) -> None:
        """The loop waited for work: the open cycle's end is not a step's start."""
        self._open = None
