"""The workers that handed a request back, as its in-flight record carries them (``hand_backs.py``)."""

from __future__ import annotations

from dlora.common.messages import HANDED_BACK_MEMORY_S
from dlora.services.dispatcher.hand_backs import added, avoided


def test_workers_are_avoided_for_as_long_as_they_remember_the_hand_back() -> None:
    """Each worker for HANDED_BACK_MEMORY_S from its own hand-back (within it, the worker answers
    the request if it comes back); at most ``most`` workers, the earliest forgotten first."""
    handed = added(added({}, "w-a", 0.0), "w-b", 10.0)
    assert avoided(handed, 10.0) == {"w-a", "w-b"} and avoided({}, 10.0) == frozenset()
    assert avoided(handed, HANDED_BACK_MEMORY_S + 1.0) == {"w-b"}  # w-a's is over; w-b's is not
    assert added(handed, "w-c", HANDED_BACK_MEMORY_S + 1.0) == {"w-b": 10.0, "w-c": HANDED_BACK_MEMORY_S + 1.0}
    assert added(handed, "w-a", 20.0) == {"w-b": 10.0, "w-a": 20.0}  # handed back again: its latest
    for most, kept in ((3, {"w-a", "w-b", "w-c"}), (2, {"w-b", "w-c"}), (1, {"w-c"})):
        assert set(added(handed, "w-c", 30.0, most=most)) == kept, most
