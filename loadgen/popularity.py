"""Adapter popularity: the share of requests each adapter gets.

Every function returns weights (n,) summing to 1 (``tenants`` can return a ``Schedule`` of such
weights over time); adapter i is ``lora-<i>``.
"""

from __future__ import annotations

from dataclasses import dataclass

from dlora.loadgen.traces import TenantSeries


def _normalise(w: list[float]) -> list[float]:
    total = sum(w)
    if total <= 0:
        raise ValueError("popularity weights sum to zero")
    return [x / total for x in w]


def uniform(n: int) -> list[float]:
    return [1.0 / n] * n


def power(n: int, alpha: float) -> list[float]:
    """S-LoRA's power law: P(id <= k) = ((k+1)/n)^alpha; alpha < 1 favours low ids, 1 is uniform."""
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    return _normalise([((k + 1) / n) ** alpha - (k / n) ** alpha for k in range(n)])


def zipf(n: int, s: float) -> list[float]:
    """Zipf: weight of the k-th most popular adapter proportional to 1 / k^s."""
    return _normalise([1.0 / (k + 1) ** s for k in range(n)])


def stride(function_counts: list[int], n: int, stride: int, cap_rank: int | None = None) -> list[float]:
    """dLoRA's mapping: functions sorted by invocations (most first), function k -> adapter
    (k // stride) % n. Stride 1 deals the popular functions round robin (near uniform); stride
    ``n`` puts the n most popular functions on one adapter (highly skewed).

    ``cap_rank`` clips every count to the cap_rank-th largest first: in the 500-function sample
    one timer function carries 63 % of all invocations, which would make even stride 1 skewed.
    """
    if stride < 1 or n < 1:
        raise ValueError(f"stride and n must be >= 1, got {stride}, {n}")
    counts = sorted(function_counts, reverse=True)
    if cap_rank is not None and 0 < cap_rank <= len(counts):
        counts = [min(c, counts[cap_rank - 1]) for c in counts]
    weights = [0.0] * n
    for k, count in enumerate(counts):
        weights[(k // stride) % n] += count
    return _normalise(weights)


@dataclass(frozen=True)
class Schedule:
    """Adapter weights that change over time: during run seconds [j·window_s, (j+1)·window_s) the
    weights are ``weights[j % len(weights)]`` (the trace's windows replayed in a loop)."""

    weights: list[list[float]]  # (windows, adapters), each row sums to 1
    window_s: float

    def at(self, t: float) -> list[float]:
        return self.weights[int(t // self.window_s) % len(self.weights)]


def tenants(series: TenantSeries, n: int, stride_: int = 1, cap_rank: int | None = None,
            window_s: float | None = None) -> list[float] | Schedule:
    """A popularity source's tenants (ServeGen clients, Azure functions) mapped onto ``n`` adapters
    by dLoRA's stride mapping (``stride``), ranked by their totals over the whole trace so each
    adapter keeps its tenants.

    With ``window_s`` the trace's windows are replayed over time, each lasting ``window_s``
    seconds of the run: a ``Schedule`` of each window's shares (a window in which every tenant is
    idle keeps the whole trace's shares). Without it: the whole trace's shares.
    """
    totals = series.totals()
    overall = stride(totals, n, stride_, cap_rank)
    if window_s is None:
        return overall
    if window_s <= 0:
        raise ValueError(f"window length must be > 0 s, got {window_s}")
    order = sorted(range(len(totals)), key=lambda k: -totals[k])
    adapter_of = {k: (rank // stride_) % n for rank, k in enumerate(order)}
    cap = sorted(totals, reverse=True)[cap_rank - 1] if cap_rank and 0 < cap_rank <= len(totals) else None
    # the same clipping as the overall mapping, each tenant's windows scaled alike
    scale = [1.0 if cap is None else min(1.0, cap / t) if t > 0 else 0.0 for t in totals]
    rows = []
    for j in range(len(series.counts[0])):
        w = [0.0] * n
        for k, counts in enumerate(series.counts):
            w[adapter_of[k]] += counts[j] * scale[k]
        rows.append(_normalise(w) if sum(w) > 0 else overall)
    return Schedule(rows, window_s)
