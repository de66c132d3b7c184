"""The workers that handed each request back lately (``LostRequests`` of a request they did not
run: its adapter refused by their limits, its message never came, its prompt past their context).
Pure: the caller passes the clock.

A worker answers a request it handed back if it comes back within ``HANDED_BACK_MEMORY_S``, as the
sign that no other worker could take it. The dispatcher avoided only the last worker that handed
it back: in a fleet with two workers whose ``max_lora_rank`` refuses an adapter and one that loads
it, a request went from the first refusing worker to the second and back to the first, which
answered 400 though the third was idle (h7's brief). Every worker remembered here is avoided while
another live one can take the request, so it comes back to one of them only when none can.
"""

from __future__ import annotations

from dlora.common.messages import HANDED_BACK_MEMORY_S, MAX_HANDED_BACK
from dlora.common.recent import Recent


class HandBacks:
    """Request id -> the workers that handed it back, each with when (monotonic seconds)."""

    def __init__(self, most: int = MAX_HANDED_BACK) -> None:
        self._by: Recent[str, dict[str, float]] = Recent(HANDED_BACK_MEMORY_S, most)

    def add(self, request_id: str, worker: str, now: float) -> None:
        """``worker`` handed ``request_id`` back ``now`` (the request kept ``HANDED_BACK_MEMORY_S``
        from its last hand-back, at most ``most`` of them: ``recent.py``)."""
        self._by.put(request_id, {**(self._by.get(request_id, now) or {}), worker: now}, now)

    def of(self, request_id: str, now: float) -> frozenset[str]:
        """The workers that handed ``request_id`` back within ``HANDED_BACK_MEMORY_S`` of ``now``
        (the span in which each answers it if it comes back)."""
        workers = self._by.get(request_id, now) or {}
        return frozenset(w for w, at in workers.items() if now - at < HANDED_BACK_MEMORY_S)
