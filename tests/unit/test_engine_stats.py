"""Per-adapter execution time: each step's time shared among its sequences by tokens fed."""

from __future__ import annotations

import pytest

from dlora.services.worker.engine.stats import EngineStats


def test_a_step_is_shared_by_tokens_fed_and_each_sequence_made_one_token() -> None:
    st = EngineStats()
    st.record_adapters([1.0], 10, [("a", 9, True), ("b", 1, True)])  # a's prompt and b's decode in one step
    st.record_adapters([0.2], 2, [("a", 1, True), ("", 1, True)])  # then a decodes beside a base-model request
    per_token = st.adapter_seconds_per_token()
    assert per_token["a"] == pytest.approx((0.9 + 0.1) / 2)
    assert per_token["b"] == pytest.approx(0.1)
    assert per_token[""] == pytest.approx(0.1)
    # The shares add up to the steps' time.
    assert sum(st.adapter_seconds.values()) == pytest.approx(1.2)


def test_a_prefill_chunk_that_made_no_token_is_paid_by_the_tokens_after_it() -> None:
    st = EngineStats()
    st.record_adapters([1.0], 10, [("a", 10, False)])  # the first chunk of a's prompt
    st.record_adapters([1.0], 10, [("a", 10, True)])  # the rest, and its first token
    assert st.adapter_seconds_per_token()["a"] == pytest.approx(2.0)


def test_a_forgotten_adapter_leaves_one_entry_per_name_and_its_counts() -> None:
    """Every version a worker ever served kept its entries (thousands over a worker's life)."""
    st = EngineStats()
    for version, loads in (("v1", 2), ("v2", 3)):
        key = f"a@{version}"
        st.loads_by_adapter[key], st.load_seconds_by_adapter[key] = loads, 0.5 * loads
        st.record_adapters([1.0], 1, [(key, 1, True)])
        st.forget_adapter(key)
    assert st.loads_by_adapter == {"a": 5} and st.load_seconds_by_adapter == {"a": 2.5}  # by name, monotonic
    assert st.adapter_seconds == {} and st.adapter_tokens == {}
    st.forget_adapter("never-held")  # nothing to forget: nothing happens


def test_runs_recorded_at_once_equal_one_call_a_run_to_the_last_bit() -> None:
    """The simulator's fast-forward records a step's repeats in one call; its reference runs must
    read the same as stepping (the sums in the same order, an adapter twice in a batch too)."""
    import random

    rng = random.Random(3)
    runs = [rng.uniform(0.01, 0.03) for _ in range(200)]
    shares = [("a", 3, True), ("b", 1, True), ("a", 2, False), ("", 7, True)]
    once, each = EngineStats(), EngineStats()
    for st in (once, each):
        st.record_steps([0.3], 5, 13, 9, "mixed", 4, (2, 40))  # what came before
        st.record_adapters([0.3], 13, shares)
    once.record_steps(runs, 4, 13, 3, "merged", 4, (0, 0))
    once.record_adapters(runs, 13, shares)
    for t in runs:
        each.record_steps([t], 4, 13, 3, "merged", 4, (0, 0))
        each.record_adapters([t], 13, shares)
    assert once == each
    assert once.steps == 201 and once.steps_by_mode == {"mixed": 1, "merged": 200}
