"""vLLM's --ramp-up-strategy, --ramp-up-start-rps and --ramp-up-end-rps: a load that rises over
the run's requests, drawn and recorded as vLLM's bench does (vllm/benchmarks/serve.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import math

import numpy as np
import pytest

from dlora.loadgen import arrivals
from dlora.loadgen.metrics import RequestResult, summarize
from dlora.loadgen.runner import Clock, replay
from dlora.loadgen.spec import WorkloadSpec
from dlora.loadgen.vllm_record import record, rps_change_events
from dlora.loadgen.workload import RequestSpec, build_specs
from dlora.services.cli import build_parser

RAMP = ["--ramp-up-strategy", "linear", "--ramp-up-start-rps", "1", "--ramp-up-end-rps", "9"]


def test_each_requests_rate_is_vllms() -> None:
    """Request i's rate is start + (end - start) i / (n - 1), or start (end / start)^(i / (n - 1))."""
    assert arrivals.ramp_up_rates("linear", 1, 9, 5) == [1, 3, 5, 7, 9]
    assert arrivals.ramp_up_rates("exponential", 1, 16, 5) == pytest.approx([1, 2, 4, 8, 16])
    assert arrivals.ramp_up_rates("linear", 2, 8, 1) == [2]
    with pytest.raises(ValueError, match="0 < start <= end"):  # vLLM's bench asserted at its first request
        arrivals.ramp_up_rates("linear", 0, 9, 5)


def test_a_ramp_from_the_command_line_draws_gaps_at_each_requests_rate() -> None:
    """The options were refused; a ramp is the gaps of each request's own rate, not rescaled to n /
    rate (vLLM rescales a fixed rate's only), and the rate the record gives is vLLM's inf."""
    args = build_parser().parse_args(["loadgen", *RAMP, "--requests", "5", "--burstiness", "inf"])
    assert WorkloadSpec.unused_option(args) is None
    spec = WorkloadSpec.from_args(args)
    assert (spec.ramp_up_strategy, spec.ramp_up_start_rps, spec.ramp_up_end_rps) == ("linear", 1.0, 9.0)
    assert math.isinf(spec.rate) and spec.options()["rate"] == "inf"
    times = [r.arrival_s for r in build_specs(spec)]
    assert np.diff([0.0, *times]) == pytest.approx([1, 1 / 3, 1 / 5, 1 / 7, 1 / 9])
    poisson = WorkloadSpec.from_args(build_parser().parse_args(["loadgen", *RAMP, "--requests", "400"]))
    gaps = np.diff([0.0, *(r.arrival_s for r in build_specs(poisson))])
    assert gaps[:100].mean() > 3 * gaps[-100:].mean()  # (rates ~2 against ~8.5)


def test_the_record_names_the_ramp_as_vllms_does() -> None:
    """vLLM's record under a ramp: its request_rate inf, the ramp's options, and each whole rate
    the ramp reached with when (here: when its first request was due, from the run's start)."""
    spec = WorkloadSpec.from_args(build_parser().parse_args(["loadgen", *RAMP, "--requests", "5"]))
    config = spec.options() | {"target": "http://127.0.0.1:8000", "started_at": "2026-01-02T03:04:05"}
    results = [RequestResult(float(i), None, 1, sent=i < 4) for i in range(5)]  # rates 1, 3, 5, 7; 9 not sent
    out = record(config, summarize(results, 5.0), results)
    assert (out["request_rate"], out["ramp_up_strategy"]) == ("inf", "linear")
    # vLLM's options are ints, and so its record's values: 1, not 1.0
    assert [type(out[k]) for k in ("ramp_up_start_rps", "ramp_up_end_rps")] == [int, int]
    assert (out["ramp_up_start_rps"], out["ramp_up_end_rps"]) == (1, 9)
    at = [f"2026-01-02T03:04:0{s}" for s in (5, 6, 6, 7, 7, 8, 8)]
    assert out["rps_change_events"] == [{"rps": v, "timestamp": t} for v, t in zip(range(1, 8), at)]
    plain = record(WorkloadSpec().options(), summarize([], 1.0), [])
    assert "ramp_up_strategy" not in plain  # vLLM's record has them under a ramp only


def test_a_rates_event_is_when_its_request_was_due_not_when_a_slot_freed() -> None:
    """Under --max-concurrency a request is sent when a slot frees (``arrival_s``), after waiting
    ``queued_s``; vLLM stamps the rate's event as its ``get_request`` yields the request, before
    the slot: the due time. The send time dated the ramp's rates late by the queue's wait."""
    spec = WorkloadSpec.from_args(build_parser().parse_args(["loadgen", *RAMP, "--requests", "5"]))
    config = spec.options() | {"target": "http://127.0.0.1:8000", "started_at": "2026-01-02T03:04:05"}
    results = [RequestResult(float(i) + 3, None, 1, sent=True, queued_s=3.0) for i in range(5)]  # rates 1 .. 9
    events = record(config, summarize(results, 9.0), results)["rps_change_events"]
    assert [e["timestamp"] for e in events if e["rps"] in (2, 9)] == ["2026-01-02T03:04:06", "2026-01-02T03:04:09"]


def test_a_request_due_before_the_duration_ended_reaches_its_rate_though_no_slot_freed() -> None:
    """Under --max-concurrency 1 the first request holds the slot past --duration; the second came
    due meanwhile and was never sent. vLLM's bench yields it (and makes its rate's event) before it
    waits for a slot: the ramp reached 9 req/s, where the record said it stopped at 1."""
    spec = WorkloadSpec.from_args(build_parser().parse_args(["loadgen", *RAMP, "--requests", "2"]))
    specs = [RequestSpec(arrival_s=t, adapter=None, prompt_len=1, output_len=1) for t in (0.0, 0.01)]

    class Held:  # the first request never ends; the second never gets the slot
        async def send(self, index: int, spec: RequestSpec, r: RequestResult) -> None:
            r.arrival_s = 0.0
            await asyncio.Event().wait()

    class Stopped(Clock):  # not the wall clock: on it a loaded machine's 40 ms pause put the second past the end
        def __call__(self) -> float:
            return 0.0

    async def run() -> list[RequestResult]:
        results, _ = await replay(specs, Held(), Stopped(), 0.05, asyncio.Event(), grace_s=0.0, max_concurrency=1)
        return results

    results = asyncio.run(run())
    assert ([r.sent for r in results], [r.due for r in results]) == ([True, False], [True, True])
    config = spec.options() | {"started_at": "2026-01-02T03:04:05"}
    assert [e["rps"] for e in rps_change_events(config, results)] == list(range(1, 10))
    late = [results[0], dataclasses.replace(results[1], due=False)]  # arrived after sending ended: none
    assert [e["rps"] for e in rps_change_events(config, late)] == [1]


@pytest.mark.parametrize(
    "argv, refusal",
    [
        ([*RAMP, "--rate", "4"], "give it or --rate"),
        (["--ramp-up-strategy", "linear", "--ramp-up-start-rps", "1"], "needs both"),
        (["--ramp-up-strategy", "exponential", "--ramp-up-start-rps", "9", "--ramp-up-end-rps", "1"], "start <= end"),
        (["--ramp-up-start-rps", "1", "--ramp-up-end-rps", "9"], "apply to --ramp-up-strategy only"),
        ([*RAMP, "--arrivals", "trace"], "not with --arrivals trace"),
    ],
)
def test_a_ramp_vllm_refuses_is_a_usage_error(argv: list[str], refusal: str) -> None:
    with pytest.raises(ValueError, match=refusal):
        WorkloadSpec.from_args(build_parser().parse_args(["loadgen", *argv]))
