"""How many output tokens a new request will take, from the lengths that finished on the workers.
Pure: the workers' quantiles in (``WorkerStats.output_tokens_quantiles``), an expectation out.

A request's output length is unknown when it arrives; its ``max_tokens`` only bounds it, and a chat
client that sets none gets the whole context. Each worker's stats give quantiles of the output
tokens its recent requests took; pooled over the workers they price a request bounded by ``b`` at
E[min(L, b)], the mean over the pooled values of min(value, b). At a fixed ``expected_tokens`` (64)
a workload of 1-32-token answers with no useful bound was priced at four times its work, against
reads of a fixed price (simulated: issue 21, BENCHMARKS.md).
"""

from __future__ import annotations

import bisect
from itertools import accumulate


class PooledLengths:
    """The workers' latest quantiles, pooled; kept sorted as workers report, summed when asked."""

    def __init__(self) -> None:
        self._of: dict[str, list[int]] = {}  # worker -> its latest quantiles
        self._pooled: list[int] = []  # every worker's, sorted
        self._sums: list[int] | None = [0]  # prefix sums of ``_pooled`` (None: to make again)

    def heard(self, worker: str, quantiles: list[int]) -> None:
        """``worker``'s latest quantiles (empty: it has too few finished requests to say)."""
        old = self._of.get(worker, [])
        if old == quantiles:
            return
        for v in old:
            del self._pooled[bisect.bisect_left(self._pooled, v)]
        for v in quantiles:
            bisect.insort(self._pooled, v)
        self._of[worker] = list(quantiles)
        self._sums = None

    def forget(self, worker: str) -> None:
        self.heard(worker, [])
        self._of.pop(worker, None)

    def expected(self, bound: int = 0) -> float | None:
        """E[min(L, ``bound``)] over the pooled lengths (``bound`` 0: none); None when no worker said."""
        if not self._pooled:
            return None
        if self._sums is None:
            self._sums = [0, *accumulate(self._pooled)]
        n = len(self._pooled)
        below = bisect.bisect_right(self._pooled, bound) if bound > 0 else n
        return (self._sums[below] + (n - below) * bound) / n
