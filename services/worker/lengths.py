"""How many tokens a running request still has to generate, when nobody knows its output length.

``max_tokens`` is only a bound: a chat request that sets none gets the whole context left, so
taking ``max_tokens - generated`` as the remaining work would make every such request look
thousands of tokens long to dispatch and to the migration planner. Instead the estimate is the
mean remaining length of recently finished requests that ran longer than this one has so far,
capped by its own bound. Under heavy-tailed lengths this grows with a request's age, which is
what makes old requests the ones worth moving.

A request stopped by its own bound (finish reason "length") only shows that its length was at
least that bound. Such a sample is used only for requests whose bound is no higher, for which
min(length, bound) is then known exactly; treating it as a finished length would make a mix of
short-bounded completions drag every long chat's estimate down. Pure: no I/O.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from collections import deque
from heapq import merge
from itertools import accumulate

# Quantiles of the recent lengths a worker's stats carry (``OutputLengths.quantiles``): what a
# dispatcher prices a new request's output at, whatever its bound.
QUANTILES = 16


class OutputLengths:
    def __init__(self, window: int = 512, min_samples: int = 8) -> None:
        if window < 1 or min_samples < 1:
            raise ValueError(f"window={window} and min_samples={min_samples} must be >= 1")
        self.min_samples = min_samples
        self._recent: deque[tuple[int, bool]] = deque(maxlen=window)  # (tokens, cut off), oldest first
        self._ended: list[int] = []  # sorted lengths of requests that ended by themselves
        self._prefix: list[int] = [0]  # prefix[i]: sum of the i shortest ended lengths
        self._cut: list[int] = []  # sorted bounds of requests their bound stopped

    def observe(self, tokens: int, cut_off: bool = False) -> None:
        """A request finished after ``tokens`` output tokens; ``cut_off``: its bound (max_tokens or
        the context) stopped it, so its length was at least that."""
        ended_changed = not cut_off
        if len(self._recent) == self._recent.maxlen:
            old, old_cut = self._recent[0]
            kept = self._cut if old_cut else self._ended
            kept.pop(bisect_left(kept, old))
            ended_changed |= not old_cut
        self._recent.append((tokens, cut_off))
        insort(self._cut if cut_off else self._ended, tokens)
        if ended_changed:
            self._prefix = [0, *accumulate(self._ended)]

    def __len__(self) -> int:
        return len(self._recent)

    def quantiles(self, n: int = QUANTILES) -> list[int]:
        """``n`` quantiles (the midpoints of ``n`` equal shares) of the recent requests' output
        tokens, one its bound stopped counted at that bound; empty with fewer than ``min_samples``."""
        if len(self._recent) < self.min_samples:
            return []
        lengths = list(merge(self._ended, self._cut))
        k = len(lengths)
        return [lengths[(2 * i + 1) * k // (2 * n)] for i in range(n)]

    def expected_remaining(self, generated: int, max_tokens: int) -> int:
        """E[min(L, max_tokens) | L > generated] - generated over the samples that tell it, at most
        ``max_tokens - generated``. With fewer than ``min_samples`` finished at all: the bound. With
        fewer than ``min_samples`` longer than ``generated``: at least as long again (heavy tails)."""
        bound = max(0, max_tokens - generated)
        if len(self._recent) < self.min_samples or bound == 0:
            return bound
        ended = self._ended
        above = bisect_right(ended, generated)  # ended lengths <= generated end before this one
        capped = bisect_right(ended, max_tokens)  # ended lengths past the bound count as the bound
        n_cut = len(self._cut) - bisect_left(self._cut, max_tokens)  # cut-offs at or past the bound
        count = len(ended) - above + n_cut
        total = self._prefix[capped] - self._prefix[above] + (len(ended) - capped + n_cut) * max_tokens
        estimate = round(total / count) - generated if count else 0
        if count < self.min_samples:
            estimate = max(estimate, generated)
        return min(bound, max(1, estimate))
