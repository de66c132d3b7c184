"""vllm-result.json's figures that vLLM's bench serve computes from its per-request lists, on
hand-made timelines."""

from __future__ import annotations

from dlora.loadgen.metrics import RequestResult
from dlora.loadgen.vllm_record import peaks


def done(sent: float, events: list[float]) -> RequestResult:
    return RequestResult(
        sent, None, len(events), sent=True, first_token_s=events[0], finish_s=events[-1], tokens=len(events),
        token_times=events,
    )  # fmt: skip


def test_peak_tokens_a_second_and_requests_in_flight_are_vllms() -> None:
    """vLLM's ``max_output_tokens_per_s`` (the most events in one whole second from the first send)
    and ``max_concurrent_requests`` (the most in flight over [sent, finished), one ending as another
    is sent not both) were missing from vllm-result.json."""
    runs = [
        done(0.0, [0.2, 0.4, 0.6, 1.1]),  # in flight [0, 1.1)
        done(0.5, [0.7, 0.8, 0.9, 1.5]),  # [0.5, 1.5)
        done(1.5, [1.6, 1.7]),  # sent as the second ended: two in flight at most
        done(3.0, [3.5, 4.2]),
    ]
    # second 0: 3 + 3 events, second 1: 1 + 1 + 2, second 3: 1, second 4: 1
    assert peaks(runs) == (6.0, 2)
    assert peaks([]) == (0.0, 0)
    assert peaks(runs[:1] + [done(0.1, [0.3, 2.0])]) == (4.0, 2)
