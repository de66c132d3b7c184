"""Where a step's adapters run: slots for the unmerged ones, the merged one's slot in a mixed step
only, the batch grouped so each slot's tokens (and the corrected ones) are contiguous."""

from __future__ import annotations

from dlora.services.worker.engine.placement import StepSlots, place_adapters
from dlora.services.worker.engine.sequence import Sequence
from dlora.services.worker.engine.slots import SlotChange, SlotTable
from dlora.services.worker.policy import lora_work


def seqs(*adapters: str | None) -> list[Sequence]:
    return [Sequence(f"r{i}", a, [1, 2], None, i, None) for i, a in enumerate(adapters)]  # type: ignore[arg-type]


def place(batch: list[Sequence], merged: str | None, slots: SlotTable) -> tuple[list[str], StepSlots, list[str]]:
    loaded: list[SlotChange] = []
    ordered, where = place_adapters(batch, merged, slots, loaded.append)
    return [s.request_id for s in ordered], where, [c.loaded for c in loaded]


def test_unmerged_steps_give_each_adapter_a_slot_and_group_by_it() -> None:
    order, where, loaded = place(seqs("b", None, "a", "b"), None, SlotTable(4))
    assert loaded == ["a", "b"] and where.own == {None: -1, "a": 0, "b": 1} and where.minus == -1
    assert order == ["r1", "r2", "r0", "r3"]  # base, then a's slot, then b's (FCFS inside)
    assert [where.slots_of(a) for a in (None, "a", "b")] == [(-1, -1), (0, -1), (1, -1)]


def test_a_merged_step_takes_no_slot() -> None:
    slots = SlotTable(1)
    order, where, loaded = place(seqs("a", "a"), "a", slots)
    assert (loaded, where.minus, where.slots_of("a"), slots.resident) == ([], -1, (-1, -1), [])


def test_a_mixed_step_puts_the_merged_adapter_in_a_slot_for_the_others_correction() -> None:
    order, where, loaded = place(seqs("b", "a", None, "a"), "a", SlotTable(2))
    assert sorted(loaded) == ["a", "b"]
    # a's tokens: no LoRA; the others add their own (base: none) and subtract a's
    assert where.slots_of("a") == (-1, -1)
    assert where.slots_of(None) == (-1, where.minus) and where.slots_of("b") == (where.own["b"], where.minus)
    assert order == ["r1", "r3", "r2", "r0"]  # a's first, then the corrected ones, base before b
    # segments count a's correction; rank-tokens: b's token carries two ranks
    fed = [("a", 1), ("a", 1), (None, 1), ("b", 1)]
    assert lora_work(fed, "a", {"a": 8, "b": 16}) == (2, 8 + 16 + 8)
    assert lora_work(fed[:2], "a", {"a": 8}) == (0, 0)  # a merged step: no LoRA
    assert lora_work(fed, None, {"a": 8, "b": 16}) == (2, 8 + 8 + 16)  # unmerged: own deltas only
