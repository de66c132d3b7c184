"""Where a step's adapters run: each unmerged adapter in a device slot, and in a mixed step the
merged adapter's slot too, for the correction every other token subtracts. Pure bookkeeping
over the slot table; copying an adapter's weights into its slot is the caller's (``load``).
``PreparedStep``: a step scheduled and placed, ready to run."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from dlora.services.worker.engine.sequence import Sequence
from dlora.services.worker.engine.slots import SlotChange, SlotTable


@dataclass(frozen=True)
class StepSlots:
    """A step's adapters on the device.

    A token of adapter a adds the delta of slot ``own[a]`` (-1: none: the base model, or the
    merged adapter, whose delta is in the weights) and, in a mixed step, subtracts the merged
    adapter's (slot ``minus``) unless it is that adapter's own: y = x·W' + s_a·(x·A_a)·B_a −
    s_m·(x·A_m)·B_m with W' = W + s_m·B_m·A_m.
    """

    own: dict[str | None, int]  # adapter (None: the base model) -> its slot, -1 for none
    merged: str | None = None  # the adapter merged into the weights
    minus: int = -1  # a mixed step: the merged adapter's slot; -1: no correction

    def slots_of(self, adapter: str | None) -> tuple[int, int]:
        """(slot added, slot subtracted) for a token of ``adapter``; -1 for none."""
        return self.own[adapter], (self.minus if adapter != self.merged else -1)


def place_adapters(
    seqs: list[Sequence], merged: str | None, slots: SlotTable, load: Callable[[SlotChange], None]
) -> tuple[list[Sequence], StepSlots]:
    """Give each adapter that runs unmerged a device slot (``load(change)`` when it has to be
    copied there), the merged adapter too when other requests run beside its own (a mixed step),
    and group the batch: the merged adapter's requests first, then by slot (stable, so FCFS order
    holds inside a group); each adapter's tokens then form one contiguous segment, and a mixed
    step's corrected tokens another. NoFreeSlot when the batch needs more slots than there are."""
    own: dict[str | None, int] = {None: -1}
    needed = {s.adapter for s in seqs if s.adapter is not None and s.adapter != merged}
    mixed = merged is not None and any(s.adapter != merged for s in seqs)
    pinned = needed | {merged} if mixed and merged is not None else needed
    for name in sorted(pinned):
        slot, change = slots.acquire(name, pinned=pinned)
        if change is not None:
            load(change)
        own[name] = slot
    minus = own.pop(merged) if mixed and merged is not None else -1
    if merged is not None:
        own[merged] = -1
    batch = sorted(seqs, key=lambda s: (s.adapter != merged, own[s.adapter]))
    return batch, StepSlots(own, merged, minus)


@dataclass
class PreparedStep:
    """A step ready to run: its batch grouped by adapter slot, where its adapters run, the switch
    paid before it (seconds), when its own time began (the clock), and the tokens it feeds,
    counted before the step advances its sequences."""

    batch: list[Sequence]
    slots: StepSlots
    merge_s: float
    unmerge_s: float
    started: float
    fed: list[tuple[str | None, int]]  # (adapter, tokens fed) per sequence, in batch order
    num_prefill: int  # of those, prompt (and recompute) tokens: all but the decodes' one each
    merged: str | None  # the adapter merged while it runs
    context_tokens: int  # KV entries its sequences attend, summed: cached and fed
    # Which of ``batch`` made a token, when known before ``_observe`` reads the sequences (async
    # scheduling: by then the next step may have preempted some); None: read from their state.
    made: list[bool] | None = None

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.fed)
