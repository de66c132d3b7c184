"""What a worker remembers of aborts (``Aborts``): each one O(1), however many come, and one
sender's never pushing out another's."""

from __future__ import annotations

from dlora.common.aborts import ABORT_MEMORY_S, MAX_ABORTS, Aborts


def test_aborts_are_forgotten_oldest_first_past_their_time_and_past_the_cap_a_sender() -> None:
    """A helper's finding: each abort made the map again, so 30,000 aborts of no request (1.4 MB,
    sent in 0.2 s) stalled every worker until each was declared lost; the map had no bound. A
    review's: with one bound for all, an application's 100,000 pushed out a gateway's abort; and
    on a quiet worker an abort an hour old still refused a reused id."""
    aborts = Aborts()
    aborts.add("gateway's", None, 1.0)
    for i in range(MAX_ABORTS + 10):
        aborts.add(f"r{i}", "app", 1.0)
    assert aborts.lately("gateway's", None, 2.0) and not aborts.lately("gateway's", "app", 2.0)
    assert not aborts.lately("r9", "app", 2.0) and aborts.lately("r10", "app", 2.0)  # the oldest went
    aborts.add("r10", "app", 30.0)  # aborted again: now the newest
    aborts.add("late", "app", 1.0 + ABORT_MEMORY_S)
    assert aborts.lately("r10", "app", 1.0 + ABORT_MEMORY_S) and not aborts.lately("r11", "app", 1.0 + ABORT_MEMORY_S)
    assert not aborts.lately("gateway's", None, 1.0 + ABORT_MEMORY_S)  # its time is up, none came since
