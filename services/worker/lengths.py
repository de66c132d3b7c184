"""How many tokens a running request still has to generate, when nobody knows its output length.

``max_tokens`` is only a bound: a chat request that sets none gets the whole context left, so
taking ``max_tokens - generated`` as the remaining work would make every such request look
thousands of tokens long to dispatch and to the migration planner. Instead the estimate is
the mean remaining length of recently finished requests that ran at least as long, capped by
the request's own bound. Under heavy-tailed lengths this grows with a request's age, which is
what makes old requests the ones worth moving. Pure: no I/O.
"""

from __future__ import annotations

from bisect import bisect_right, insort
from collections import deque
from itertools import accumulate


class OutputLengths:
    def __init__(self, window: int = 512, min_samples: int = 8) -> None:
        self.min_samples = min_samples
        self._recent: deque[int] = deque(maxlen=window)  # arrival order, to forget the oldest
        self._sorted: list[int] = []
        self._prefix: list[int] = [0]  # prefix[i]: sum of the i shortest

    def observe(self, tokens: int) -> None:
        """A request finished by itself (stop or length) after ``tokens`` output tokens."""
        if len(self._recent) == self._recent.maxlen:
            self._sorted.pop(bisect_right(self._sorted, self._recent[0]) - 1)
        self._recent.append(tokens)
        insort(self._sorted, tokens)
        self._prefix = [0, *accumulate(self._sorted)]

    def __len__(self) -> int:
        return len(self._sorted)

    def expected_remaining(self, generated: int, max_tokens: int) -> int:
        """E[min(L, max_tokens) | L > generated] - generated over the window, at most
        ``max_tokens - generated``. With fewer than ``min_samples`` lengths seen, the bound itself.
        A request older than every one seen is expected to run as long again (heavy tails)."""
        bound = max(0, max_tokens - generated)
        n = len(self._sorted)
        if n < self.min_samples or bound == 0:
            return bound
        above = bisect_right(self._sorted, generated)  # lengths <= generated end before this one
        if above == n:
            return min(bound, max(1, generated))
        capped = bisect_right(self._sorted, max_tokens)  # lengths past the bound count as the bound
        total = self._prefix[capped] - self._prefix[above] + (n - capped) * max_tokens
        return min(bound, max(1, round(total / (n - above)) - generated))
