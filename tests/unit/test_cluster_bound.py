"""The balancing bound's simulator on workloads whose answers are known."""

from __future__ import annotations

import pytest

from dlora.loadgen.cluster_bound import interpolate, simulate
from dlora.loadgen.workload import RequestSpec


def spec(arrival: float, output: int) -> RequestSpec:
    return RequestSpec(arrival_s=arrival, adapter=None, prompt_len=4, output_len=output)


def test_interpolates_between_measurements_and_extends_the_last_slope() -> None:
    f = interpolate({1: 0.1, 4: 0.4, 8: 0.6})
    assert f(1) == pytest.approx(0.1) and f(2) == pytest.approx(0.2) and f(6) == pytest.approx(0.5)
    assert f(16) == pytest.approx(1.0)


def test_a_lone_request_takes_its_prompt_then_a_step_per_token() -> None:
    f = interpolate({1: 0.1, 4: 0.4})  # its first step feeds the 4-token prompt: 0.4 s
    for balanced in (False, True):
        assert simulate([spec(1.0, 3)], f, 2, balanced) == pytest.approx([(0.4 + 0.1 + 0.1) / 3])


def test_batched_requests_share_steps() -> None:
    # Two at once on one worker: their prompts in one step (8 tokens, 0.3 s), then steps of two.
    lat = simulate([spec(0.0, 4), spec(0.0, 4)], interpolate({1: 0.1, 2: 0.15, 8: 0.3}), 1, balanced=False)
    assert lat == pytest.approx([(0.3 + 3 * 0.15) / 4] * 2)


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_even_load_gains_nothing_from_balancing(workers: int) -> None:
    specs = [spec(0.0, 10) for _ in range(workers * 4)]
    f = interpolate({1: 0.05, 64: 1.0})
    assert simulate(specs, f, workers, balanced=True) == pytest.approx(simulate(specs, f, workers, balanced=False))


def test_balancing_helps_when_round_robin_lands_the_long_requests_on_one_worker() -> None:
    # Round-robin gives worker 0 every long request: worker 1 idles while worker 0's batch is big.
    specs = [spec(0.01 * i, 200 if i % 2 == 0 else 5) for i in range(16)]
    f = interpolate({1: 0.02, 64: 0.64})  # linear: a token costs the same in any batch
    rr = simulate(specs, f, 2, balanced=False)
    best = simulate(specs, f, 2, balanced=True)
    assert sum(best) < 0.9 * sum(rr)
    assert all(x > 0 for x in best + rr)


def test_workers_ending_a_step_together_all_release_before_either_starts() -> None:
    # Both workers end their prompt step at once; two one-token requests finish there. The four
    # left must split two and two (the first worker to restart used to see only its own leftover
    # free, take one, and leave a request waiting), so they all finish together.
    specs = [spec(0.0, 1), spec(0.0, 1), spec(0.0, 3), spec(0.0, 3), spec(0.0, 3), spec(0.0, 3)]
    lat = simulate(specs, interpolate({1: 0.1, 64: 6.4}), 2, balanced=True)
    finish = [lat[i] * 3 for i in range(2, 6)]
    assert finish == pytest.approx([finish[0]] * 4)


def test_a_request_generating_nothing_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one token"):
        simulate([spec(0.0, 0)], lambda b: 0.1, 1, balanced=True)


def test_a_profile_that_prices_prompt_tokens_apart_adds_them_to_the_step() -> None:
    """The simulator's profiles price a step's requests and its prompts apart (``prompt_seconds``,
    of the prompts' lengths): a 10-token prompt at 0.1 s a token beside a 1 s step is a 2 s first
    step, then 1 s for the second token: 3 s over 2 tokens."""
    one = [RequestSpec(0.0, None, 10, 2)]
    assert simulate(one, lambda b: 1.0, 1, True, prompt_seconds=lambda p: 0.1 * sum(p)) == [1.5]
    assert simulate(one, lambda fed: 1.0 + 0.1 * (fed - 1), 1, True) == [pytest.approx((1.9 + 1.0) / 2)]
