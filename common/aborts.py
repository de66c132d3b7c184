"""The aborts a worker or a dispatcher heard lately (``subjects.ABORT``, ``subjects.aborts_of(user)``):
an abort can overtake its request, outlive a record, or come while its request's worker is dead
(a dispatcher's recovery then ends the request instead of re-dispatching it). Pure."""

from __future__ import annotations

from dlora.common.recent import Recent

# An abort is remembered this long: it can overtake its request, or its record.
ABORT_MEMORY_S = 60.0
# Aborts remembered at once, a sender: an application may send any number, and one application's
# must not push out a gateway's or another's.
MAX_ABORTS = 100_000


class Aborts:
    """Request ids aborted lately, by sender (None: a gateway's; else the application's NATS user,
    which stops only its own requests), each with when (monotonic seconds)."""

    def __init__(self) -> None:
        self._by: dict[str | None, Recent[str, bool]] = {}

    def add(self, request_id: str, sender: str | None, now: float) -> None:
        """``request_id`` aborted by ``sender`` ``now``, kept in the sender's own memory
        (``ABORT_MEMORY_S``, ``MAX_ABORTS``: O(1) an abort, ``recent.py``)."""
        self._by.setdefault(sender, Recent(ABORT_MEMORY_S, MAX_ABORTS)).put(request_id, True, now)

    def lately(self, request_id: str, sender: str | None, now: float) -> bool:
        """Whether ``sender`` aborted ``request_id`` within ``ABORT_MEMORY_S`` of ``now``."""
        heard = self._by.get(sender)
        return heard is not None and heard.get(request_id, now) is not None
