"""The run's record in vLLM's benchmark's shape (``vllm bench serve --save-result``,
``benchmark_serving.py``): its flat field names and units (milliseconds for the latency figures,
seconds in the per-request lists), so that dashboards and scripts reading vLLM's records read dlora
loadgen's as they are. Written beside result.json as ``vllm-result.json``; result.json keeps dlora's
own figures (seconds, nested, per adapter, cut and lost apart)."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from dlora.loadgen.arrivals import ramp_up_rates
from dlora.loadgen.metrics import RequestResult, samples, summarize

if TYPE_CHECKING:
    import argparse

# result.json's, vllm-result.json's unless --metric-percentiles names others (vLLM's default: 99 only)
PERCENTILES = (50.0, 90.0, 99.0)
# vLLM's metric names for ours: its e2el is our e2e
METRICS = {"ttft": "ttft", "tpot": "tpot", "itl": "itl", "e2e": "e2el"}


@dataclass(frozen=True)
class RecordOptions:
    """What the record writes besides the run's figures: vLLM's options of these names, built once
    from the command line (``from_args``) and passed through ``main.run`` to ``record``.
    ``percentile_metrics`` and ``metric_percentiles`` (None: every metric, at ``PERCENTILES``) pick
    its latency figures; ``label`` and ``metadata`` (key, value pairs) are keys of it;
    ``result_filename`` is its file's name in the run's folder (None: ``report.VLLM_RECORD``);
    ``append_result`` adds it to that file's end.
    (--result-dir is the run's folder, --goodput its SLOs, --save-result and --save-detailed what
    loadgen always does.)"""

    percentile_metrics: tuple[str, ...] | None = None
    metric_percentiles: tuple[float, ...] | None = None
    label: str | None = None
    metadata: tuple[tuple[str, str], ...] | None = None
    result_filename: str | None = None
    append_result: bool = False
    """vLLM's --append-result: the record is added to the file's end, one line of JSON a run (JSON
    Lines, as vLLM's appended records are), where it was written over, indented."""

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RecordOptions:
        """The options ``dlora loadgen``'s command line gives (``options.add_arguments``)."""
        return cls(
            percentile_metrics=args.percentile_metrics,
            metric_percentiles=args.metric_percentiles,
            label=args.label,
            metadata=None if args.metadata is None else tuple(args.metadata),
            result_filename=args.result_filename,
            append_result=args.append_result,
        )


def _burstiness(config: dict) -> float | str | None:
    """vLLM's --burstiness is the gamma shape, 1 / CV²: 1.0 for Poisson; a trace's has none; even
    gaps (CV 0) "inf", as the record writes an infinite request_rate (vLLM's json.dump writes
    Infinity, which is no JSON). To 12 significant digits: --burstiness B comes here through its CV,
    1/sqrt(B), and 1/CV² read 0.5 as 0.5000000000000001, which a reader comparing with the B it typed
    did not find."""
    arrivals, cv = config.get("arrivals", ""), config.get("cv", 1.0)
    if arrivals == "gamma" and cv == 0:
        return "inf"
    shape = {"poisson": 1.0, "gamma": 1.0 / cv**2}.get(arrivals)
    return None if shape is None else float(f"{shape:.12g}")


def rps_change_events(config: dict, results: list[RequestResult]) -> list[dict[str, object]]:
    """vLLM's ``rps_change_events`` under a ramp: the start's whole rate at the run's start, then
    each whole rate the ramp reaches (``arrivals.ramp_up_rates`` of request i of ``results``, the
    run's requests in order) at the time the first request at it was due, as local ISO times
    (vLLM's: ``datetime.now()`` as its ``get_request`` yields it, before a --max-concurrency
    slot: here its send less the wait for one). A request due before ``--duration`` ended reaches its
    rate though no slot freed for it (vLLM's bench had yielded it); one arriving later reaches none."""
    start, end = config["ramp_up_start_rps"], config["ramp_up_end_rps"]
    rates = ramp_up_rates(config["ramp_up_strategy"], start, end, len(results))
    started = datetime.datetime.fromisoformat(config.get("started_at") or datetime.datetime.now().isoformat())
    last = int(start)
    events: list[dict[str, object]] = [{"rps": last, "timestamp": started.isoformat()}]
    for r, rate in zip(results, rates):
        if (r.sent or r.due) and int(rate) > last:
            at = (started + datetime.timedelta(seconds=r.arrival_s - r.queued_s)).isoformat()
            events += [{"rps": v, "timestamp": at} for v in range(last + 1, int(rate) + 1)]
            last = int(rate)
    return events


def peaks(done: list[RequestResult]) -> tuple[float, int]:
    """vLLM's ``max_output_tokens_per_s`` and ``max_concurrent_requests`` over the completed
    requests: the most streamed events (its tokens: one an event, as its ITLs) in one whole second
    counted from the first send, and the most requests in flight at once, each over [sent, finished)
    (one ending as another is sent: not both)."""
    if not done:
        return 0.0, 0
    start = min(r.arrival_s for r in done)
    seconds = np.bincount([int(t - start) for r in done for t in r.token_times if t >= start] or [0])
    edges = sorted([(r.arrival_s, 1) for r in done] + [(r.finish_s or r.arrival_s, -1) for r in done])
    in_flight = np.cumsum([step for _, step in edges])
    has_events = any(r.token_times for r in done)
    return float(seconds.max()) if has_events else 0.0, int(in_flight.max())


def taken(config: dict) -> set[str]:
    """The keys the record of a run so configured writes of its own (a --metadata key must be none)."""
    return set(record(config | {"metadata": None}, summarize([], 1.0), []))


def record(config: dict, summary: dict, results: list[RequestResult]) -> dict:
    """vLLM's record of the run described by ``config`` and ``summary`` (main.run's) over
    ``results``. Where a metric has no sample (no completed request, only one-token outputs for
    TPOT) vLLM writes 0, and so does this: its readers expect numbers. ``failed`` is vLLM's: every
    request sent that did not complete (ours apart as failed, cut and lost in result.json)."""
    sent = [r for r in results if r.sent]
    done = [r for r in sent if r.completed]
    slo_given = any(config.get(f"slo_{name}") is not None for name in ("ttft", "tpot", "e2e"))
    target = str(config.get("target", ""))
    backend = "dlora-nats" if target.startswith(("nats://", "tls://")) else config.get("backend", "openai")
    most_tokens_per_s, most_in_flight = peaks(done)
    out: dict = {
        "date": datetime.datetime.now().strftime("%Y%m%d-%H%M%S"),
        "endpoint_type": backend,  # vLLM writes both, the older name for older readers
        "backend": backend,
        "label": config.get("label"),
        "model_id": config.get("base_model"),
        # None where no tokenizer counts outputs (completions send the prompts as ids): no --tokenizer,
        # and --model/--base-model no folder holding one
        "tokenizer_id": config.get("tokenizer"),
        # the requests its lists hold (vLLM's: completed + failed): a duration or Ctrl-C that ended
        # sending leaves the workload's later ones unsent, counted in result.json's "planned"
        "num_prompts": len(sent),
        "request_rate": config.get("rate"),
        "burstiness": _burstiness(config),
        "max_concurrency": config.get("max_concurrency"),
    }
    if config.get("ramp_up_strategy") is not None:  # vLLM's record has them only under a ramp
        out["ramp_up_strategy"] = config["ramp_up_strategy"]
        # vLLM's are ints (its options' type): 2, not 2.0, for a whole rate; a fractional one as given
        for key in ("ramp_up_start_rps", "ramp_up_end_rps"):
            out[key] = int(config[key]) if float(config[key]).is_integer() else config[key]
        out["rps_change_events"] = rps_change_events(config, results)
    out |= {
        "duration": summary["duration_s"],
        "completed": summary["completed"],
        "failed": summary["sent"] - summary["completed"],
        "total_input_tokens": summary["total_input_tokens"],
        "total_output_tokens": summary["total_output_tokens"],
        "request_throughput": summary["throughput_req_s"],
        "request_goodput": summary["slo"]["goodput_req_s"] if slo_given else None,
        "output_throughput": summary["throughput_tok_s"],
        "total_token_throughput": summary["throughput_total_tok_s"],
        "input_lens": [r.prompt_len for r in sent],
        "output_lens": [r.tokens if r.completed else 0 for r in sent],
        # vLLM's RequestFuncOutput keeps the ttft and itl of what streamed before a failure (0.0 and []
        # only where nothing did): written 0 and [] here, a stream that broke late read as one never begun
        "ttfts": [r.first_token_s - r.arrival_s if r.first_token_s is not None else 0.0 for r in sent],
        "itls": [[b - a for a, b in zip(r.token_times, r.token_times[1:])] for r in sent],
        # vLLM's per-request end-to-end seconds and send times (its perf_counter's; here the run's
        # clock's, from its start): 0.0 where the request did not complete, as its other lists
        "latencies": [r.finish_s - r.arrival_s if r.completed and r.finish_s is not None else 0.0 for r in sent],
        "start_times": [r.arrival_s for r in sent],
        # seconds each waited for a --max-concurrency slot before its send (vLLM's client queue time)
        "queue_times": [r.queued_s for r in sent],
        # what each streamed (its content; over NATS the worker's text); a failed one's "", as vLLM's
        # request function sets it only on a whole stream (its output_lens 0 beside it)
        "generated_texts": [r.text if r.completed else "" for r in sent],
        "errors": [
            "" if r.completed else r.error or ("cut off at the run's end" if r.cut else "no answer") for r in sent
        ],
        "max_output_tokens_per_s": most_tokens_per_s,
        "max_concurrent_requests": most_in_flight,
        "rtfx": 0.0,  # vLLM's speech-recognition figure (seconds of audio in a second): no audio here
    }
    # vLLM's --metadata: the user's keys beside the record's (one of these refused before the run)
    out |= dict(config.get("metadata") or ())
    # vLLM writes the figures of the metrics --percentile-metrics names only, at --metric-percentiles
    chosen = config.get("percentile_metrics") or METRICS.values()
    percentiles = config.get("metric_percentiles") or PERCENTILES
    seconds = {theirs: samples(done)[ours] for ours, theirs in METRICS.items()}
    if config.get("max_concurrency") is not None:  # vLLM's client-side queueing, under a cap only
        seconds["client_queue_time"] = [r.queued_s for r in done]
        if config.get("rate") != "inf":  # (vLLM's: at inf every request is queued from 0 by design)
            e2el = [r.finish_s - r.arrival_s + r.queued_s for r in done if r.finish_s is not None]
            seconds["e2el_including_client_queue"] = e2el
    for theirs, values in seconds.items():
        if theirs not in chosen:
            continue
        ms = np.asarray(values or [0.0]) * 1000
        out[f"mean_{theirs}_ms"] = float(ms.mean())
        out[f"median_{theirs}_ms"] = float(np.median(ms))
        out[f"std_{theirs}_ms"] = float(ms.std())
        for p in percentiles:
            out[f"p{int(p) if p == int(p) else p}_{theirs}_ms"] = float(
                np.percentile(ms, p)
            )  # vLLM's names: p99, p99.9
    return out
