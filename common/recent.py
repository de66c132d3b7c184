"""What was heard lately, by key: a map whose entries are forgotten ``span_s`` after they were
last put, and oldest first past ``most``, O(1) a put. The aborts a worker or a dispatcher heard
(``aborts.py``) and the requests a worker handed back are kept so: a map made again at each put
stalled every worker at 30,000 aborts of no request (a helper's finding), and one with no bound
grew with every id a client sent. Pure: the caller passes the clock (monotonic seconds)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Recent(Generic[K, V]):
    """Key -> the value last put for it, while that put is under ``span_s`` old; at most ``most``
    keys, the least lately put forgotten first."""

    def __init__(self, span_s: float, most: int) -> None:
        self.span_s = span_s
        self.most = most
        self._at: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def put(self, key: K, value: V, now: float) -> None:
        """``key`` heard ``now``, with ``value``; what was last put ``span_s`` or more before
        ``now``, and the oldest past ``most``, forgotten."""
        self._at[key] = (now, value)
        self._at.move_to_end(key)
        while self._at and (len(self._at) > self.most or now - next(iter(self._at.values()))[0] >= self.span_s):
            self._at.popitem(last=False)

    def get(self, key: K, now: float) -> V | None:
        """The value last put for ``key`` under ``span_s`` before ``now``; None otherwise (on a
        quiet process nothing else forgets an old one: an id reused an hour later was refused)."""
        entry = self._at.get(key)
        return entry[1] if entry is not None and now - entry[0] < self.span_s else None
