"""Metrics on hand-made timelines, and popularity that shifts over time."""

import numpy as np
import pytest

from dlora.loadgen import workload
from dlora.loadgen.metrics import SLO, RequestResult, slowest, summarize, summarize_by_adapter
from dlora.loadgen.traces import LLMRequestRow


def done(arrival: float, first: float, finish: float, tokens: int, adapter: str = "a") -> RequestResult:
    times = list(np.linspace(first, finish, tokens))
    return RequestResult(
        arrival, adapter, tokens, sent=True, first_token_s=first, finish_s=finish, tokens=tokens, token_times=times
    )


def test_summary_of_a_hand_made_timeline() -> None:
    results = [
        done(0.0, 0.5, 2.5, 5),  # ttft 0.5, tpot 0.5, e2e 2.5, norm 0.5
        done(1.0, 1.1, 1.5, 5, "b"),  # ttft 0.1, tpot 0.1, e2e 0.5, norm 0.1
        RequestResult(2.0, "a", 4, sent=True, error="HTTP 400"),
        RequestResult(3.0, "b", 4, sent=True, cut=True),
        RequestResult(3.5, "b", 4, sent=True),  # never answered: lost
        RequestResult(9.0, "a", 4),  # never sent (cap)
    ]
    s = summarize(results, end_s=4.0, slo=SLO(ttft_s=0.2))
    assert (s["sent"], s["completed"], s["failed"], s["cut"], s["lost"]) == (5, 2, 1, 1, 1)
    assert s["duration_s"] == 4.0 and s["throughput_req_s"] == 0.5 and s["throughput_tok_s"] == 2.5
    assert s["ttft_s"]["mean"] == pytest.approx(0.3) and s["tpot_s"]["p50"] == pytest.approx(0.3)
    assert s["e2e_s"]["mean"] == pytest.approx(1.5)
    assert s["itl_s"]["mean"] == pytest.approx((0.5 * 4 + 0.1 * 4) / 8)
    # unfinished requests count with a lower bound: (end - arrival) / tokens asked
    assert s["normalized_latency_s"]["mean"] == pytest.approx((0.5 + 0.1 + 0.5 + 0.25 + 0.125) / 5)
    assert s["slo"]["attainment"] == pytest.approx(1 / 5) and s["slo"]["goodput_req_s"] == pytest.approx(0.25)
    assert s["errors"] == ["HTTP 400"]
    by = summarize_by_adapter([r for r in results if r.sent], 4.0)
    assert by["a"]["sent"] == 2 and by["b"]["lost"] == 1
    # each over the run's span (b's first arrival is at 1.0: over its own, b read faster than all)
    assert by["a"]["duration_s"] == by["b"]["duration_s"] == 4.0
    assert by["a"]["throughput_tok_s"] + by["b"]["throughput_tok_s"] == pytest.approx(s["throughput_tok_s"])


def test_empty_run_is_well_formed(tmp_path) -> None:
    """Its report too: a run stopped (Ctrl-C) before its first request was sent drew a legend with
    nothing to label, a warning (an error under the tests; CI failed on it once)."""
    from dlora.loadgen import report

    s = summarize([], end_s=1.0)
    assert s["sent"] == 0 and s["ttft_s"]["mean"] is None and s["slo"]["attainment"] is None
    unsent = [RequestResult(0.5, "a", 4)]
    report.plot(unsent, summarize_by_adapter(unsent, 1.0), 1.0, tmp_path / "report.png")
    assert (tmp_path / "report.png").stat().st_size > 0


def test_popularity_shifts_over_time() -> None:
    rows = [LLMRequestRow(0.0, 4, 4)]
    rng = np.random.default_rng(0)
    specs = workload.build([0.5, 1.5, 2.5, 3.5], [1.0, 0.0, 0.0], rows, rng, shift_every_s=1.0)
    assert [s.adapter for s in specs] == ["lora-0", "lora-1", "lora-2", "lora-0"]
    specs = workload.build([0.1, 0.2], [0.0, 1.0], rows, rng, names=["x", None])
    assert [s.adapter for s in specs] == [None, None]
    with pytest.raises(ValueError, match="names"):
        workload.build([0.1], [1.0], rows, rng, names=["x", "y"])


def test_slowest_names_the_longest_waits_for_a_first_token_and_why() -> None:
    fast = RequestResult(arrival_s=0.0, adapter="a", output_len=4, sent=True, first_token_s=0.1, finish_s=0.2)
    retried = RequestResult(
        arrival_s=1.0,
        adapter=None,
        output_len=4,
        sent=True,
        first_token_s=8.0,
        finish_s=8.1,
        retry_reasons=["3.000 s: HTTP 503: no dispatcher"],
    )
    unanswered = RequestResult(arrival_s=2.0, adapter="b", output_len=4, sent=True, error="HTTP 400: bad")
    never_sent = RequestResult(arrival_s=3.0, adapter="c", output_len=4)
    top = slowest([fast, retried, unanswered, never_sent], n=2)
    assert [(t["arrival_s"], t["ttft_s"]) for t in top] == [(2.0, None), (1.0, 7.0)]
    assert top[0]["error"] == "HTTP 400: bad" and top[1]["retried"] == ["3.000 s: HTTP 503: no dispatcher"]


def test_a_request_that_failed_fast_is_no_fast_answer() -> None:
    """A refused request answered in 10 ms counted as 2.5 ms a token: a run whose every request
    failed at once read as the fastest. It counts as unfinished: a lower bound at the run's end."""
    failed = RequestResult(1.0, "a", 4, sent=True, error="HTTP 503", finish_s=1.01)
    assert failed.normalized_latency(end_s=5.0) == pytest.approx((5.0 - 1.0) / 4)


def test_the_terminal_report_says_why_requests_failed(tmp_path) -> None:
    """The table counted failures and the reasons were only in result.json."""
    from rich.console import Console

    from dlora.loadgen import report

    results = [
        RequestResult(0.0, "a", 4, sent=True, finish_s=0.1, error="HTTP 404: model 'a' does not exist"),
        RequestResult(0.1, "a", 4, sent=True, finish_s=0.2, error="HTTP 404: model 'a' does not exist"),
        RequestResult(0.2, None, 4, sent=True, finish_s=0.3, error="ClientConnectorError: refused"),
    ]
    console = Console(record=True, width=200)
    report.write(tmp_path, {}, summarize(results, 1.0), summarize_by_adapter(results, 1.0), results, 1.0, console)
    text = console.export_text()
    assert "failed (2): HTTP 404: model 'a' does not exist" in text and "failed (1): ClientConnectorError" in text


def test_output_throughput_counts_completed_requests_and_an_adapter_named_base_keeps_its_row() -> None:
    """vLLM's output throughput sums successful requests' tokens (a run where every request failed
    read 48 tok/s); an adapter named "(base)" merged into the base model's row."""
    failed = RequestResult(0.0, None, 5, sent=True, error="HTTP 500", tokens=3, first_token_s=0.1)
    s = summarize([done(0.0, 0.5, 2.5, 5, adapter=None), failed], end_s=5.0)
    assert s["throughput_tok_s"] == pytest.approx(5 / 5.0)
    named = [done(0.0, 0.5, 2.5, 5, adapter=a) for a in (None, "(base)", "all")]
    by = summarize_by_adapter(named, 5.0)
    assert {name: row["completed"] for name, row in by.items()} == {"(base)": 1, '"(base)"': 1, '"all"': 1}


def test_result_json_keeps_the_most_common_failure_reasons() -> None:
    """result.json kept the first ten reasons in alphabetical order: eleven 400s that each named
    their prompt's length pushed out the 503 that failed most of the run."""
    results = [RequestResult(0.0, "a", 4, sent=True, error=f"HTTP 400: prompt of {600 + i} tokens") for i in range(11)]
    results += [RequestResult(0.0, "a", 4, sent=True, error="HTTP 503: no worker answered in time")] * 50
    errors = summarize(results, 1.0)["errors"]
    assert len(errors) == 10 and errors[0] == "HTTP 503: no worker answered in time"


def test_total_tokens_and_total_token_throughput_are_vllms() -> None:
    """vLLM's benchmark prints "Total input tokens", "Total generated tokens" and "Total Token
    throughput" (prompt and output tokens of the successful requests over the run): the summary had
    only the output throughput, and the requests did not keep their prompts' lengths."""
    import asyncio

    from dlora.loadgen.runner import Clock, replay
    from dlora.loadgen.workload import RequestSpec

    class Instant:  # answers every request at once with the tokens it asked for; the third fails
        async def send(self, index: int, spec: RequestSpec, r: RequestResult) -> None:
            if index == 2:
                r.error = "HTTP 500"
                return
            r.first_token_s = r.finish_s = r.arrival_s
            r.tokens = spec.output_len

    specs = [
        RequestSpec(arrival_s=0.0, adapter=None, prompt_len=p, output_len=o) for p, o in ((10, 3), (20, 5), (40, 7))
    ]
    clock = Clock()
    results, _ = asyncio.run(replay(specs, Instant(), clock, 10.0, asyncio.Event()))
    s = summarize(results, end_s=2.0, start_s=0.0)
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (30, 8)  # the failed one's not counted
    assert s["throughput_total_tok_s"] == pytest.approx(38 / 2.0) and s["throughput_tok_s"] == pytest.approx(8 / 2.0)


def test_an_end_to_end_slo_counts_in_goodput_as_vllms_e2el() -> None:
    """vLLM's --goodput takes ttft, tpot and e2el bounds; loadgen had no end-to-end one, so a vLLM
    user's goodput under an e2el SLO could not be asked for."""
    from dlora.services.cli import build_parser

    fast, slow = done(0.0, 0.1, 0.9, 4), done(1.0, 1.1, 3.5, 4)  # 0.9 s and 2.5 s end to end
    s = summarize([fast, slow], end_s=4.0, slo=SLO(e2e_s=1.0))
    assert s["slo"]["attainment"] == 0.5 and s["slo"]["goodput_req_s"] == pytest.approx(1 / 4.0)
    assert s["slo"]["e2e_s"] == 1.0
    assert build_parser().parse_args(["loadgen", "--slo-e2e", "2.5"]).slo_e2e == 2.5


def test_the_progress_hears_each_ended_request_alone() -> None:
    """The run's progress line was handed every request's result at each request's end, and summed
    them all three times: n requests read 3n² results, in the event loop that times the requests
    (8,000 requests: some 190 million reads). It is handed the one that ended, once."""
    import asyncio

    from dlora.loadgen.runner import Clock, replay
    from dlora.loadgen.workload import RequestSpec

    class Instant:
        async def send(self, index: int, spec: RequestSpec, r: RequestResult) -> None:
            r.first_token_s = r.finish_s = r.arrival_s
            r.tokens = spec.output_len

    heard: list[object] = []
    specs = [RequestSpec(arrival_s=0.0, adapter=None, prompt_len=2, output_len=1) for _ in range(50)]
    results, _ = asyncio.run(replay(specs, Instant(), Clock(), 10.0, asyncio.Event(), on_update=heard.append))
    assert len(heard) == 50 and all(isinstance(r, RequestResult) for r in heard)
    assert {id(r) for r in heard} == {id(r) for r in results}


def test_the_tables_base_row_is_named_by_the_model_its_requests_named(tmp_path) -> None:
    """``vllm bench serve --model lora-0`` (no adapters named) sends every request to lora-0, and
    the terminal's table labelled their row "(base)", the adapter's name nowhere. The table and
    report.html name it by the model the requests named; result.json keeps its "(base)" key (its
    readers look rows up by it) beside ``config.base_model``."""
    import json

    from rich.console import Console

    from dlora.loadgen import report

    results = [done(0.0, 0.1, 0.3, 3, adapter=None), done(0.5, 0.6, 0.8, 3, adapter=None)]
    console = Console(record=True, width=200)
    by = summarize_by_adapter(results, 1.0)
    report.write(tmp_path, {"base_model": "lora-0"}, summarize(results, 1.0), by, results, 1.0, console)
    rows = [line.split("│")[1].strip() for line in console.export_text().splitlines() if line.count("│") > 2]
    assert "lora-0" in rows and "(base)" not in rows
    assert "<td>lora-0</td>" in (tmp_path / "report.html").read_text()
    assert list(json.loads((tmp_path / "result.json").read_text())["by_adapter"]) == ["(base)"]
    both = {"(base)": by["(base)"], "lora-0": by["(base)"]}  # an adapter of that name has its own row
    assert list(report.named(both, "lora-0")) == ["(base)", "lora-0"]
