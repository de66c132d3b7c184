"""Running estimates of what a step costs, from the engine's measurements.

- Base step seconds per batch size (tokens in the step), from steps with no unmerged LoRA,
  bucketed by powers of two and interpolated between buckets.
- The unmerged overhead as a fraction of the base step: ``c0 + c1 * rank_sum`` where rank_sum
  sums the ranks of the distinct adapters in the batch (heterogeneous ranks: a rank-64 adapter
  costs more than a rank-8 one), fitted by least squares over decayed observations.
- Merge and unmerge seconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

_ALPHA = 0.2  # weight of the newest sample in the running averages
_DECAY = 0.98  # per observation, for the overhead fit
# Until the fit has seen different rank sums: a few percent for any LoRA and per 16 of rank.
PRIOR_C0, PRIOR_C1 = 0.05, 0.02 / 16


def _bucket(tokens: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(tokens, 1))))


def _ema(old: float | None, new: float) -> float:
    return new if old is None else (1 - _ALPHA) * old + _ALPHA * new


@dataclass
class CostModel:
    base: dict[int, float] = field(default_factory=dict)  # bucket -> seconds
    merge_seconds: float | None = None
    unmerge_seconds: float | None = None
    # Decayed sums for the fit y = c0 + c1 * x, with x = rank_sum and y = overhead fraction.
    _n: float = 0.0
    _sx: float = 0.0
    _sy: float = 0.0
    _sxx: float = 0.0
    _sxy: float = 0.0

    def observe_step(self, tokens: int, rank_sum: int, seconds: float) -> None:
        if rank_sum == 0:
            key = _bucket(tokens)
            self.base[key] = _ema(self.base.get(key), seconds)
            return
        base = self.base_seconds(tokens)
        if base is None:
            return
        y = seconds / base - 1.0
        d = _DECAY
        self._n, self._sx, self._sy = d * self._n + 1, d * self._sx + rank_sum, d * self._sy + y
        self._sxx, self._sxy = d * self._sxx + rank_sum * rank_sum, d * self._sxy + rank_sum * y

    def observe_switch(self, merge: float | None = None, unmerge: float | None = None) -> None:
        if merge is not None:
            self.merge_seconds = _ema(self.merge_seconds, merge)
        if unmerge is not None:
            self.unmerge_seconds = _ema(self.unmerge_seconds, unmerge)

    def overhead(self, rank_sum: int) -> float:
        """Unmerged step time over base step time, minus one, for adapters of this rank sum."""
        if rank_sum <= 0:
            return 0.0
        c0, c1 = self.coefficients()
        return max(0.0, c0 + c1 * rank_sum)

    def coefficients(self) -> tuple[float, float]:
        if self._n < 1:
            return PRIOR_C0, PRIOR_C1
        var = self._n * self._sxx - self._sx**2
        if var <= 1e-9 * max(1.0, self._n * self._sxx):  # one rank sum seen: keep the prior slope
            return self._sy / self._n - PRIOR_C1 * self._sx / self._n, PRIOR_C1
        c1 = (self._n * self._sxy - self._sx * self._sy) / var
        return (self._sy - c1 * self._sx) / self._n, max(c1, 0.0)

    def base_seconds(self, tokens: int) -> float | None:
        """Estimated seconds of a base step of ``tokens`` tokens; None before any measurement."""
        if not self.base:
            return None
        b = _bucket(tokens)
        if b in self.base:
            return self.base[b]
        keys = sorted(self.base)
        lower = [k for k in keys if k < b]
        upper = [k for k in keys if k > b]
        if lower and upper:  # interpolate on log2 of the bucket
            lo, hi = lower[-1], upper[0]
            w = (math.log2(b) - math.log2(lo)) / (math.log2(hi) - math.log2(lo))
            return self.base[lo] * (1 - w) + self.base[hi] * w
        # Outside the measured range: scale the nearest bucket linearly in tokens, a safe upper
        # bound above (steps grow at most linearly) and a fair guess below.
        k = lower[-1] if lower else upper[0]
        return self.base[k] * (b / k if lower else max(b / k, 0.5))

    def step_seconds(self, tokens: int, rank_sum: int) -> float | None:
        base = self.base_seconds(tokens)
        return None if base is None else base * (1.0 + self.overhead(rank_sum))

    def switch_seconds(self) -> float:
        return (self.merge_seconds or 0.0) + (self.unmerge_seconds or 0.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "base": {str(k): v for k, v in self.base.items()},
            "merge_seconds": self.merge_seconds,
            "unmerge_seconds": self.unmerge_seconds,
            "fit": [self._n, self._sx, self._sy, self._sxx, self._sxy],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CostModel:
        m = cls(
            base={int(k): float(v) for k, v in d.get("base", {}).items()},
            merge_seconds=d.get("merge_seconds"),
            unmerge_seconds=d.get("unmerge_seconds"),
        )
        m._n, m._sx, m._sy, m._sxx, m._sxy = d.get("fit", [0.0] * 5)
        return m
