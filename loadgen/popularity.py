"""Adapter popularity: the share of requests each adapter gets.

Every function returns weights (n,) summing to 1; adapter i is ``lora-<i>``.
"""

from __future__ import annotations


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
