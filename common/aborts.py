"""The aborts a worker or a dispatcher heard lately (``subjects.ABORT``, ``subjects.aborts_of(user)``):
an abort can overtake its request, outlive a record, or come while its request's worker is dead
(a dispatcher's recovery then ends the request instead of re-dispatching it). Pure."""

from __future__ import annotations

from collections import OrderedDict

# An abort is remembered this long: it can overtake its request, or its record.
ABORT_MEMORY_S = 60.0
# Aborts remembered at once, a sender: an application may send any number, and one application's
# must not push out a gateway's or another's.
MAX_ABORTS = 100_000


class Aborts:
    """Request ids aborted lately, by sender (None: a gateway's; else the application's NATS user,
    which stops only its own requests), each with when (monotonic seconds)."""

    def __init__(self) -> None:
        self._by: dict[str | None, OrderedDict[str, float]] = {}

    def add(self, request_id: str, sender: str | None, now: float) -> None:
        """``request_id`` aborted by ``sender`` ``now``; the sender's older than ``ABORT_MEMORY_S``,
        and its oldest past ``MAX_ABORTS``, forgotten: O(1) an abort (the map made again at each,
        30,000 aborts of no request stalled every worker until each was declared lost: a
        helper's finding; as ``common/clients.py`` keeps its announcements)."""
        heard = self._by.setdefault(sender, OrderedDict())
        heard[request_id] = now
        heard.move_to_end(request_id)
        while heard and (len(heard) > MAX_ABORTS or now - next(iter(heard.values())) >= ABORT_MEMORY_S):
            heard.popitem(last=False)

    def lately(self, request_id: str, sender: str | None, now: float) -> bool:
        """Whether ``sender`` aborted ``request_id`` within ``ABORT_MEMORY_S`` of ``now`` (on a
        quiet worker nothing else forgets an old one: an id reused an hour later was refused)."""
        heard = self._by.get(sender)
        when = heard.get(request_id) if heard is not None else None
        return when is not None and now - when < ABORT_MEMORY_S
