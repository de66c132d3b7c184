"""The workers that handed a request back lately (``LostRequests`` of a request they did not run:
its adapter refused by their limits, its message never came, its prompt past their context), as
its in-flight record carries them (``Inflight.handed_back``). Pure: the caller passes the clock.

A worker answers a request it handed back if it comes back within ``HANDED_BACK_MEMORY_S``, as the
sign that no other worker could take it. The dispatcher avoided only the last worker that handed
it back: in a fleet with two workers whose ``max_lora_rank`` refuses an adapter and one that loads
it, a request went from the first refusing worker to the second and back to the first, which
answered 400 though the third was idle (h7's brief). Every worker remembered is avoided while
another live one can take the request, so it comes back to one of them only when none can. They
are kept in the record, not by the dispatcher a hand-back reached: ``LostRequests`` go to any
dispatcher of the queue group, and one that heard only the second hand-back sent the request back
to the first worker.
"""

from __future__ import annotations

from collections.abc import Mapping

from dlora.common.messages import HANDED_BACK_MEMORY_S, MAX_HANDED_BACK_BY


def added(handed: Mapping[str, float], worker: str, now: float, most: int = MAX_HANDED_BACK_BY) -> dict[str, float]:
    """``handed`` (worker -> when it handed the request back, Unix seconds: dispatchers on other
    hosts read it, and their clocks' skew, seconds at most, moves a 60 s span by as much) with
    ``worker`` handing it back ``now``: those past ``HANDED_BACK_MEMORY_S`` dropped, and past
    ``most`` the earliest."""
    kept = sorted((at, w) for w, at in handed.items() if w != worker and now - at < HANDED_BACK_MEMORY_S)
    return {w: at for at, w in kept[max(0, len(kept) - most + 1) :]} | {worker: now}


def avoided(handed: Mapping[str, float], now: float) -> frozenset[str]:
    """The workers of ``handed`` that handed the request back within ``HANDED_BACK_MEMORY_S`` of
    ``now`` (Unix seconds: the span in which each answers it if it comes back)."""
    return frozenset(w for w, at in handed.items() if now - at < HANDED_BACK_MEMORY_S)
