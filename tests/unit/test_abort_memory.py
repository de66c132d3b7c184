"""What a worker remembers of aborts (``admit.remember``): each one O(1), however many come."""

from __future__ import annotations

from collections import OrderedDict

from dlora.services.worker.admit import ABORT_MEMORY_S, MAX_ABORTS, remember


def test_aborts_are_forgotten_oldest_first_past_their_time_and_past_the_cap() -> None:
    """A helper's finding: each abort made the map again, so 30,000 aborts of no request (1.4 MB,
    sent in 0.2 s) stalled every worker until each was declared lost; the map had no bound."""
    aborted: OrderedDict[tuple[str, str | None], float] = OrderedDict()
    for i in range(MAX_ABORTS + 10):
        remember(aborted, (f"r{i}", "app"), 1.0)
    assert len(aborted) == MAX_ABORTS and ("r9", "app") not in aborted and ("r10", "app") in aborted
    remember(aborted, ("r10", "app"), 2.0)  # aborted again: now the newest
    assert next(reversed(aborted)) == ("r10", "app")
    remember(aborted, ("late", None), 1.0 + ABORT_MEMORY_S)
    assert list(aborted) == [("r10", "app"), ("late", None)]  # the others' time is up
