"""Arrival times (seconds from 0) for open-loop load: Poisson, Gamma with a CV, or trace replay."""

from __future__ import annotations

import math

import numpy as np

from dlora.loadgen.spec import RampUp


def poisson(rate: float, n: int, rng: np.random.Generator) -> list[float]:
    return gamma(rate, 1.0, n, rng)


def gamma(rate: float, cv: float, n: int, rng: np.random.Generator) -> list[float]:
    """Gamma inter-arrivals with mean 1/rate and coefficient of variation ``cv`` (1 = Poisson;
    larger = burstier; 0 = every gap 1/rate, the gamma's limit as its shape grows, vLLM's
    ``--burstiness inf``); an infinite ``rate`` puts every arrival at 0 (vLLM's ``--request-rate inf``).

    The gaps are rescaled so that the ``n``-th arrival is at exactly ``n / rate`` seconds, as
    vLLM's ``get_request`` (vllm/benchmarks/serve.py) rescales its cumulative delays: a sum of
    drawn gaps misses it (200 requests: by 5 % at the median seed at CV 1, 16 % at CV 4), and runs
    of one workload under two seeds offered different loads.

    Raises:
        ValueError: ``rate`` not above 0 or ``cv`` below 0."""
    if rate <= 0 or cv < 0:
        raise ValueError(f"rate must be > 0 and cv >= 0, got {rate}, {cv}")
    if math.isinf(rate):
        return [0.0] * n
    if cv == 0:
        return [(i + 1) / rate for i in range(n)]
    shape = 1.0 / cv**2
    times = np.cumsum(rng.gamma(shape, 1.0 / (rate * shape), size=n))
    if n and times[-1] > 0:
        times *= n / rate / times[-1]
    return [float(t) for t in times]


def ramp_up_rates(strategy: RampUp, start: float, end: float, n: int) -> list[float]:
    """vLLM's ``--ramp-up-strategy``: request i's rate (req/s), from ``start`` at the first to
    ``end`` at the last, linearly or geometrically in i / (n - 1) (vllm/benchmarks/serve.py's
    ``_get_current_request_rate``).

    Raises:
        ValueError: ``start`` not above 0 (vLLM's bench stops at its first request then) or above ``end``."""
    if not 0 < start <= end:
        raise ValueError(f"ramp-up rates must be 0 < start <= end, got {start}, {end}")
    progress = [i / max(n - 1, 1) for i in range(n)]
    if strategy == "linear":
        return [start + (end - start) * p for p in progress]
    return [start * (end / start) ** p for p in progress]


def ramp_up(strategy: RampUp, start: float, end: float, cv: float, n: int, rng: np.random.Generator) -> list[float]:
    """Arrival times whose rate ramps from ``start`` to ``end`` req/s (``ramp_up_rates``), each
    gap drawn as ``gamma``'s at its request's rate (CV 0: 1/rate), as vLLM's ``get_request`` draws
    them, and not rescaled (vLLM rescales a fixed rate's only: the ramp sets the run's length).

    Raises:
        ValueError: as ``ramp_up_rates``; ``cv`` below 0."""
    if cv < 0:
        raise ValueError(f"cv must be >= 0, got {cv}")
    rates = np.array(ramp_up_rates(strategy, start, end, n))
    if cv == 0:
        gaps = 1.0 / rates
    else:
        shape = 1.0 / cv**2
        gaps = rng.gamma(shape, 1.0 / (rates * shape))
    return [float(t) for t in np.cumsum(gaps)]


def replay(timestamps: list[float], rate: float | None = None) -> list[float]:
    """A trace's own arrival times from 0, optionally rescaled to a mean ``rate`` (req/s; infinite:
    all at 0)."""
    t0 = timestamps[0]
    times = [t - t0 for t in timestamps]
    if rate is not None and math.isinf(rate):
        return [0.0] * len(times)
    if rate is not None and len(times) > 1 and times[-1] > 0:
        factor = (len(times) - 1) / rate / times[-1]
        times = [t * factor for t in times]
    return times
