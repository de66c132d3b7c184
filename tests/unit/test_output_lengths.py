"""The remaining-length estimate: the bound until there is history, then the conditional mean."""

from __future__ import annotations

import random

from dlora.services.worker.lengths import OutputLengths


def test_the_bound_until_enough_history() -> None:
    lengths = OutputLengths(min_samples=3)
    assert lengths.expected_remaining(0, 4000) == 4000
    lengths.observe(10)
    lengths.observe(20)
    assert lengths.expected_remaining(5, 4000) == 3995
    lengths.observe(30)
    assert lengths.expected_remaining(0, 4000) == 20  # mean of 10, 20, 30


def test_conditional_mean_capped_by_the_request_bound() -> None:
    lengths = OutputLengths(min_samples=1)
    for n in (10, 20, 30, 100):
        lengths.observe(n)
    assert lengths.expected_remaining(15, 4000) == 35  # mean(20, 30, 100) = 50, minus 15
    assert lengths.expected_remaining(15, 40) == 15  # lengths capped at 40: mean(20, 30, 40) = 30, minus 15
    assert lengths.expected_remaining(38, 40) == 2  # never past the bound
    assert lengths.expected_remaining(150, 4000) == 150  # older than all seen: as long again
    assert lengths.expected_remaining(40, 40) == 0


def test_heavy_tails_make_old_requests_look_longer_and_the_window_forgets() -> None:
    rng = random.Random(0)
    lengths = OutputLengths(window=256)
    for _ in range(256):
        lengths.observe(int(rng.paretovariate(1.2) * 10))
    young, old = lengths.expected_remaining(5, 10_000), lengths.expected_remaining(200, 10_000)
    assert old > young
    for _ in range(256):  # the workload changes: only short answers now
        lengths.observe(3)
    assert len(lengths) == 256 and lengths.expected_remaining(0, 10_000) == 3
