"""Per-adapter execution time: each step's time shared among its sequences by tokens fed."""

from __future__ import annotations

import pytest

from dlora.services.worker.engine.stats import EngineStats


def test_a_step_is_shared_by_tokens_fed_and_each_sequence_made_one_token() -> None:
    st = EngineStats()
    st.record_adapters(1.0, 10, [("a", 9, True), ("b", 1, True)])  # a's prompt and b's decode in one step
    st.record_adapters(0.2, 2, [("a", 1, True), ("", 1, True)])  # then a decodes beside a base-model request
    per_token = st.adapter_seconds_per_token()
    assert per_token["a"] == pytest.approx((0.9 + 0.1) / 2)
    assert per_token["b"] == pytest.approx(0.1)
    assert per_token[""] == pytest.approx(0.1)
    # The shares add up to the steps' time.
    assert sum(st.adapter_seconds.values()) == pytest.approx(1.2)


def test_a_prefill_chunk_that_made_no_token_is_paid_by_the_tokens_after_it() -> None:
    st = EngineStats()
    st.record_adapters(1.0, 10, [("a", 10, False)])  # the first chunk of a's prompt
    st.record_adapters(1.0, 10, [("a", 10, True)])  # the rest, and its first token
    assert st.adapter_seconds_per_token()["a"] == pytest.approx(2.0)
