"""vllm-result.json's figures that vLLM's bench serve computes from its per-request lists, on
hand-made timelines."""

from __future__ import annotations

import numpy as np
import pytest

from dlora.loadgen.metrics import RequestResult, summarize
from dlora.loadgen.vllm_record import peaks, record
from dlora.services.cli import build_parser


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


def test_percentile_metrics_and_metric_percentiles_choose_what_the_record_writes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """vLLM users type ``--percentile-metrics ttft,e2el --metric-percentiles 50,99.9`` and read
    ``p99.9_ttft_ms``; dlora loadgen refused both options (unrecognized arguments) and wrote p50, p90
    and p99 of every metric whatever was asked. Names as vLLM's: an integral percentile without its
    ``.0``; the unchosen metrics not written; an unknown metric or a percentile past 100 refused."""
    runs = [done(0.0, [0.1 * k + 0.1, 0.1 * k + 0.3]) for k in range(10)]
    args = build_parser().parse_args(
        ["loadgen", "--percentile-metrics", "ttft,e2el", "--metric-percentiles", "50,99.9"]
    )
    config = {"percentile_metrics": args.percentile_metrics, "metric_percentiles": args.metric_percentiles}
    v = record(config, summarize(runs, 2.0), runs)
    ttft_ms = np.asarray([0.1 * k + 0.1 for k in range(10)]) * 1000
    assert v["p99.9_ttft_ms"] == pytest.approx(np.percentile(ttft_ms, 99.9)) and "p99.9_e2el_ms" in v
    assert v["p50_ttft_ms"] == v["median_ttft_ms"] and "p99_ttft_ms" not in v
    assert not any(("tpot" in key or "itl" in key) and key.endswith("_ms") for key in v)
    default = record({}, summarize(runs, 2.0), runs)
    assert {f"p{p}_{m}_ms" for p in (50, 90, 99) for m in ("ttft", "tpot", "itl", "e2el")} <= set(default)
    for argv in (["--percentile-metrics", "ttft,queue"], ["--metric-percentiles", "99,999"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["loadgen", *argv])
        assert argv[1].split(",")[1] in capsys.readouterr().err


def test_client_queue_metrics_are_written_when_named_under_a_concurrency_cap() -> None:
    """vLLM's --percentile-metrics also names ``client_queue_time`` and
    ``e2el_including_client_queue`` (the wait for a --max-concurrency slot, and the latency with it:
    what a user behind the cap sees); loadgen refused both names. Written as vLLM writes them: under
    a cap only, the second at a finite rate only."""
    runs = [done(0.0, [0.1, 0.2]), done(0.2, [0.3, 0.5]), done(0.5, [0.6, 0.9])]
    for r, waited in zip(runs, (0.0, 0.2, 0.5)):
        r.queued_s = waited
    args = build_parser().parse_args(
        ["loadgen", "--percentile-metrics", "client_queue_time,e2el_including_client_queue"]
    )
    config = {"percentile_metrics": args.percentile_metrics, "metric_percentiles": (50.0,)}
    v = record(config | {"max_concurrency": 1, "rate": 4.0}, summarize(runs, 1.0), runs)
    assert v["p50_client_queue_time_ms"] == pytest.approx(200.0)
    assert v["mean_e2el_including_client_queue_ms"] == pytest.approx((200 + 500 + 900) / 3)
    assert "mean_ttft_ms" not in v and "p50_e2el_ms" not in v
    at_once = record(config | {"max_concurrency": 1, "rate": "inf"}, summarize(runs, 1.0), runs)
    assert "mean_client_queue_time_ms" in at_once and "mean_e2el_including_client_queue_ms" not in at_once
    assert not any("queue_time_ms" in key for key in record(config, summarize(runs, 1.0), runs))


@pytest.mark.parametrize("given", ["0.5", "2", "1.5", "0.1", "3"])
def test_the_burstiness_given_is_the_burstiness_recorded(given: str) -> None:
    """``--burstiness 0.5`` was recorded as 0.5000000000000001 (and 2 as 2.0000000000000004): the
    shape went through the CV, 1/sqrt(B), and back as 1/CV². vLLM writes the number typed, and its
    users select runs by it (``jq 'select(.burstiness == 0.5)'``, a sweep's plot grouped by it)."""
    from dlora.loadgen.spec import WorkloadSpec

    spec = WorkloadSpec.from_args(build_parser().parse_args(["loadgen", "--burstiness", given]))
    assert record(spec.options(), summarize([], 1.0), [])["burstiness"] == float(given)


def test_a_failed_requests_ttft_and_itls_are_what_streamed_before_it_failed() -> None:
    """vLLM's request function sets ``ttft`` at the first chunk and appends each gap to ``itl`` as
    chunks come; a stream that breaks later keeps both (``success`` False), and its record's
    ``ttfts``/``itls`` hold them. dlora loadgen wrote 0.0 and [] for every request that did not
    complete, a stream that broke after three tokens read as one that never began."""
    broke = RequestResult(1.0, None, 8, sent=True, first_token_s=1.5, tokens=3, token_times=[1.5, 1.75, 2.25])
    broke.error = "ClientPayloadError: the stream broke"
    refused = RequestResult(2.0, None, 8, sent=True, error="HTTP 503: busy")
    runs = [done(0.0, [0.25, 0.5]), broke, refused]
    v = record({}, summarize(runs, 3.0), runs)
    assert v["ttfts"] == [0.25, 0.5, 0.0]
    assert v["itls"] == [[0.25], [0.25, 0.5], []]
    assert v["output_lens"] == [2, 0, 0] and v["latencies"] == [0.5, 0.0, 0.0]  # vLLM's for a failure
    assert v["mean_ttft_ms"] == pytest.approx(250.0)  # the figures stay the completed requests'


def test_a_failed_requests_generated_text_is_empty_as_vllms() -> None:
    """vLLM's request function sets ``generated_text`` only on a stream that ends whole: every failed
    request's is "" (its ``output_lens`` 0 beside it). dlora loadgen wrote the text streamed before the
    failure, so a script reading the record's texts (beside output_lens, or counting non-empty ones
    as answers) read a failure's fragment as an answer. The text is vLLM's ""; what streamed stays
    in ``ttfts`` and ``itls``, and why it failed in ``errors``."""
    broke = RequestResult(1.0, None, 8, sent=True, first_token_s=1.5, tokens=2, token_times=[1.5, 1.75])
    broke.pieces, broke.error = ["half an ", "answer"], "server error: engine died"
    whole = done(0.0, [0.25, 0.5])
    whole.pieces = ["an answer"]
    v = record({}, summarize([whole, broke], 3.0), [whole, broke])
    assert v["generated_texts"] == ["an answer", ""] and v["output_lens"] == [2, 0]
    assert v["errors"] == ["", "server error: engine died"] and v["itls"][1] == [0.25]
