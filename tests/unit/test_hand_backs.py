"""The dispatcher's memory of the workers that handed each request back (``hand_backs.py``)."""

from __future__ import annotations

from dlora.common.messages import HANDED_BACK_MEMORY_S
from dlora.services.dispatcher.hand_backs import HandBacks


def test_workers_are_remembered_for_as_long_as_they_remember_the_hand_back() -> None:
    """Each worker for HANDED_BACK_MEMORY_S from its own hand-back (within it, the worker answers
    the request if it comes back); at most ``most`` requests, the oldest forgotten first."""
    memory = HandBacks()
    memory.add("r", "w-a", 0.0)
    memory.add("r", "w-b", 10.0)
    assert memory.of("r", 10.0) == {"w-a", "w-b"} and memory.of("other", 10.0) == frozenset()
    assert memory.of("r", HANDED_BACK_MEMORY_S + 1.0) == {"w-b"}  # w-a's is over; w-b's is not
    memory.add("s", "w-a", 10.0 + HANDED_BACK_MEMORY_S)  # r's last hand-back is over: r goes
    assert memory.of("r", 0.0) == frozenset() and memory.of("s", 10.0 + HANDED_BACK_MEMORY_S) == {"w-a"}
    memory = HandBacks(most=2)
    for i, rid in enumerate(("x", "y", "z")):
        memory.add(rid, "w-a", 100.0 + i)
    assert [memory.of(rid, 103.0) for rid in ("x", "y", "z")] == [frozenset(), {"w-a"}, {"w-a"}]
