"""The remaining-length estimate: the bound until there is history, then the conditional mean."""

from __future__ import annotations

import random

import pytest

from dlora.services.worker.lengths import OutputLengths


def brute_force(samples: list[tuple[int, bool]], generated: int, max_tokens: int, min_samples: int) -> int:
    bound = max(0, max_tokens - generated)
    if len(samples) < min_samples or bound == 0:
        return bound
    told = [min(n, max_tokens) for n, cut in samples if (n > generated and not cut) or (cut and n >= max_tokens)]
    estimate = round(sum(told) / len(told)) - generated if told else 0
    if len(told) < min_samples:
        estimate = max(estimate, generated)
    return min(bound, max(1, estimate))


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


def test_few_longer_samples_do_not_make_the_estimate_jump() -> None:
    lengths = OutputLengths(min_samples=8)
    for n in [10] * 20 + [100]:
        lengths.observe(n)
    near = [lengths.expected_remaining(g, 10_000) for g in (98, 99, 100, 101)]
    assert near == [98, 99, 100, 101]  # one sample left above: as long again, no drop to 1


def test_cut_off_samples_only_speak_for_bounds_up_to_theirs() -> None:
    """Completions stopped at max_tokens=16 next to chats that end by themselves near 300."""
    lengths = OutputLengths(min_samples=4)
    for i in range(40):
        if i % 4:
            lengths.observe(16, cut_off=True)
        else:
            lengths.observe(290 + i)
    chat = lengths.expected_remaining(0, 4000)
    assert 290 <= chat <= 330  # the cut-off completions say nothing about a 4000-token bound
    assert lengths.expected_remaining(0, 16) == 16  # for a 16-token bound, every sample says 16


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


def test_matches_a_brute_force_over_random_histories() -> None:
    rng = random.Random(1)
    lengths, window = OutputLengths(window=50, min_samples=5), []
    for _ in range(400):
        sample = (rng.randint(1, 300), rng.random() < 0.3)
        lengths.observe(*sample)
        window = (window + [sample])[-50:]
        g, cap = rng.randint(0, 200), rng.randint(1, 400)
        assert lengths.expected_remaining(g, cap) == brute_force(window, g, cap, 5), (g, cap)


def test_window_must_hold_something() -> None:
    with pytest.raises(ValueError, match="window=0"):
        OutputLengths(window=0)


def test_quantiles_of_recent_lengths_cut_offs_at_their_bound_none_before_enough() -> None:
    lengths = OutputLengths(min_samples=8)
    for n in range(1, 8):
        lengths.observe(n)
    assert lengths.quantiles() == []  # 7 finished: too few to say
    lengths.observe(100, cut_off=True)  # stopped by its bound: counted at it
    assert lengths.quantiles(4) == [2, 4, 6, 100]  # the midpoints of four equal shares of 8
    assert len(lengths.quantiles()) == 16


def test_pooled_lengths_price_a_request_at_what_requests_of_its_bound_took() -> None:
    """E[min(L, bound)] over the workers' quantiles pooled; a worker's newer quantiles replace its
    older ones, and a worker forgotten takes its own out."""
    from dlora.services.dispatcher.lengths import PooledLengths

    pool = PooledLengths()
    assert pool.expected() is None
    pool.heard("x", [10, 20, 30, 40])
    pool.heard("y", [100, 200, 300, 400])
    assert pool.expected() == 1100 / 8
    assert pool.expected(25) == (10 + 20 + 6 * 25) / 8  # each length past the bound counts at it
    pool.heard("y", [1, 2, 3, 4])
    assert pool.expected() == 110 / 8
    pool.forget("x")
    assert pool.expected() == 10 / 4 and pool.expected(2) == (1 + 2 + 2 * 2) / 4
    pool.forget("y")
    assert pool.expected(16) is None
