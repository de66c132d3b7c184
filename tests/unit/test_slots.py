import pytest

from dlora.services.worker.engine.slots import NoFreeSlot, SlotTable


def test_fills_free_slots_then_evicts_least_recently_used() -> None:
    t = SlotTable(2)
    assert t.acquire("a")[1].evicted is None
    assert t.acquire("b")[1].evicted is None
    t.acquire("a")  # a is now most recent
    slot_b = t.slot_of("b")
    slot, change = t.acquire("c")
    assert change.evicted == "b" and slot == slot_b
    assert set(t.resident) == {"a", "c"}


def test_resident_adapter_is_a_hit() -> None:
    t = SlotTable(2)
    slot, _ = t.acquire("a")
    assert t.acquire("a") == (slot, None)


def test_pinned_adapters_are_not_evicted() -> None:
    t = SlotTable(2)
    t.acquire("a")
    t.acquire("b")
    _, change = t.acquire("c", pinned={"a", "c"})
    assert change.evicted == "b"
    with pytest.raises(NoFreeSlot):
        t.acquire("d", pinned={"a", "c", "d"})


def test_drop_frees_the_slot() -> None:
    t = SlotTable(1)
    slot, _ = t.acquire("a")
    assert t.drop("a") == slot
    assert t.acquire("b")[1].evicted is None
