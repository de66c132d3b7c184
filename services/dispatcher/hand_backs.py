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

from collections import OrderedDict

from dlora.common.messages import HANDED_BACK_MEMORY_S

# Requests remembered at once (each with the few workers that handed it back): a worker refusing
# every request of a busy adapter hands back thousands a minute, and the map must stay bounded.
MAX_REQUESTS = 100_000


class HandBacks:
    """Request id -> the workers that handed it back, each with when (monotonic seconds)."""

    def __init__(self) -> None:
        self._by: OrderedDict[str, dict[str, float]] = OrderedDict()

    def add(self, request_id: str, worker: str, now: float) -> None:
        """``worker`` handed ``request_id`` back ``now``; requests last handed back over
        ``HANDED_BACK_MEMORY_S`` ago, and the oldest past ``MAX_REQUESTS``, forgotten (O(1) a
        hand-back: ``common/aborts.py`` keeps its aborts so)."""
        workers = self._by.setdefault(request_id, {})
        workers[worker] = now
        self._by.move_to_end(request_id)
        while self._by and (
            len(self._by) > MAX_REQUESTS or now - max(next(iter(self._by.values())).values()) >= HANDED_BACK_MEMORY_S
        ):
            self._by.popitem(last=False)

    def of(self, request_id: str, now: float) -> frozenset[str]:
        """The workers that handed ``request_id`` back within ``HANDED_BACK_MEMORY_S`` of ``now``
        (the span in which each answers it if it comes back)."""
        workers = self._by.get(request_id, {})
        return frozenset(w for w, at in workers.items() if now - at < HANDED_BACK_MEMORY_S)
