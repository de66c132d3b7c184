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
    """Zipf: weight of the k-th most popular adapter proportional to 1 / k^s (s >= 0; 0 is uniform).
    ValueError for s < 0, which would make the least popular the most (a user's trial: accepted)."""
    if s < 0:
        raise ValueError(f"alpha must be >= 0, got {s}")
    return _normalise([1.0 / (k + 1) ** s for k in range(n)])


def _stride_map(totals: list[float], n: int, stride: int, cap_rank: int | None) -> tuple[list[int], list[float]]:
    """Each tenant's adapter under dLoRA's mapping (ranked by total, most first, rank k ->
    (k // stride) % n) and the factor clipping its counts to the cap_rank-th largest total."""
    if stride < 1 or n < 1:
        raise ValueError(f"stride and n must be >= 1, got {stride}, {n}")
    order = sorted(range(len(totals)), key=lambda k: -totals[k])
    adapter_of = [0] * len(totals)
    for rank, k in enumerate(order):
        adapter_of[k] = (rank // stride) % n
    # past the number of tenants, the smallest: with more adapters than tenants the cap was
    # dropped, and one tenant took 63 % of the requests (the Azure sample's timer function)
    cap = totals[order[min(cap_rank, len(totals)) - 1]] if cap_rank is not None and cap_rank > 0 and totals else None
    scale = [1.0 if cap is None or t <= cap else cap / t for t in totals]
    return adapter_of, scale


def _mapped(counts: list[float], adapter_of: list[int], scale: list[float], n: int) -> list[float]:
    w = [0.0] * n
    for k, c in enumerate(counts):
        w[adapter_of[k]] += c * scale[k]
    return w


def stride(function_counts: list[float], n: int, stride: int, cap_rank: int | None = None) -> list[float]:
    """dLoRA's mapping: functions sorted by invocations (most first), function k -> adapter
    (k // stride) % n. Stride 1 deals the popular functions round robin (near uniform); stride
    ``n`` puts the n most popular functions on one adapter (highly skewed).

    ``cap_rank`` clips every count to the cap_rank-th largest first: in the 500-function sample
    one timer function carries 63 % of all invocations, which would make even stride 1 skewed.
    """
    adapter_of, scale = _stride_map(function_counts, n, stride, cap_rank)
    return _normalise(_mapped(function_counts, adapter_of, scale, n))


@dataclass(frozen=True)
class Schedule:
    """Adapter weights that change over time: during run seconds [j·window_s, (j+1)·window_s) the
    weights are ``weights[j % len(weights)]`` (the trace's windows replayed in a loop)."""

    weights: list[list[float]]  # (windows, adapters), each row sums to 1
    window_s: float

    def at(self, t: float) -> list[float]:
        return self.weights[int(t // self.window_s) % len(self.weights)]


def tenants(
    series: TenantSeries, n: int, stride_: int = 1, cap_rank: int | None = None, window_s: float | None = None
) -> list[float] | Schedule:
    """A popularity source's tenants (ServeGen clients, Azure functions) mapped onto ``n`` adapters
    by dLoRA's stride mapping (``stride``), ranked by their totals over the whole trace so each
    adapter keeps its tenants.

    With ``window_s`` the trace's windows are replayed over time, each lasting ``window_s``
    seconds of the run: a ``Schedule`` of each window's shares (a window in which every tenant is
    idle keeps the whole trace's shares). Without it: the whole trace's shares.
    """
    totals = series.totals()
    adapter_of, scale = _stride_map(totals, n, stride_, cap_rank)
    overall = _normalise(_mapped(totals, adapter_of, scale, n))
    if window_s is None:
        return overall
    if window_s <= 0:
        raise ValueError(f"window length must be > 0 s, got {window_s}")
    rows = []
    for j in range(len(series.counts[0])):
        w = _mapped([c[j] for c in series.counts], adapter_of, scale, n)
        rows.append(_normalise(w) if sum(w) > 0 else overall)
    return Schedule(rows, window_s)
