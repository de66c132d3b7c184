"""Per-request outcomes and the summary metrics of a run (the paper's and vLLM's).

All times are seconds from the run's start. A request is *completed* when its last chunk
arrived, *failed* when it got an error, *cut* when the run ended while it was running, and
*lost* otherwise (sent, never answered): sent - completed - failed - cut = lost, and a healthy
run reports 0.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np


@dataclass
class RequestResult:
    arrival_s: float
    adapter: str | None
    output_len: int  # tokens asked for
    sent: bool = False
    first_token_s: float | None = None
    finish_s: float | None = None
    tokens: int = 0  # tokens received
    token_times: list[float] = field(default_factory=list)  # arrival of each chunk with tokens
    error: str | None = None
    cut: bool = False  # still running when the run ended (duration cap or Ctrl-C)
    retry_reasons: list[str] = field(default_factory=list)  # why each earlier try was retried (--max-retries)
    prompt_len: int = 0  # prompt tokens sent (exact: the prompt goes as token ids)
    queued_s: float = 0.0  # waited for a slot under --max-concurrency before it was sent (vLLM's queue time)
    # Its arrival came before sending ended, sent or not: one still waiting for a --max-concurrency
    # slot then was due all the same (vLLM's get_request had yielded it, its rate's event made)
    due: bool = False
    # The answer's content as streamed, piece by piece: joined once, for the record (joined at each
    # event, an output of n pieces copied some n²/2 of them, in the event loop that times the stream)
    pieces: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        """The answer's content (vLLM's generated_text)."""
        return "".join(self.pieces)

    @property
    def completed(self) -> bool:
        return self.finish_s is not None and self.error is None

    def normalized_latency(self, end_s: float) -> float:
        """End-to-end seconds per output token; for an unfinished or failed request, a lower bound
        taken at ``end_s`` over the tokens it asked for (a failure is no fast answer: counted by
        its own time, a run whose requests all failed at once read as the fastest)."""
        if self.completed:
            return (self.finish_s - self.arrival_s) / max(1, self.tokens)
        return (end_s - self.arrival_s) / max(1, self.output_len)

    def tpot(self) -> float | None:
        """Seconds per output token after the first."""
        if self.finish_s is None or self.first_token_s is None or self.tokens < 2:
            return None
        return (self.finish_s - self.first_token_s) / (self.tokens - 1)


@dataclass(frozen=True)
class SLO:
    """Bounds a completed request must meet to count in goodput (vLLM's ``--goodput`` keys
    ``ttft``, ``tpot``, ``e2el``); None: no bound."""

    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None

    def met(self, r: RequestResult) -> bool:
        if not r.completed:
            return False
        if self.ttft_s is not None and (r.first_token_s is None or r.first_token_s - r.arrival_s > self.ttft_s):
            return False
        if self.e2e_s is not None and r.finish_s is not None and r.finish_s - r.arrival_s > self.e2e_s:
            return False
        tpot = r.tpot()
        return self.tpot_s is None or tpot is None or tpot <= self.tpot_s


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    a = np.asarray(values, dtype=float)
    return {
        "mean": float(a.mean()),
        "p50": float(np.percentile(a, 50)),
        "p90": float(np.percentile(a, 90)),
        "p99": float(np.percentile(a, 99)),
    }


def samples(done: list[RequestResult]) -> dict[str, list[float]]:
    """The latency samples of completed requests, seconds: TTFT and E2E from each request's arrival,
    TPOT per request of two tokens or more, ITL per event (vLLM's definitions, one place for both
    records: result.json's and vllm-result.json's)."""
    return {
        "ttft": [r.first_token_s - r.arrival_s for r in done if r.first_token_s is not None],
        "tpot": [t for r in done if (t := r.tpot()) is not None],
        "itl": [b - a for r in done for a, b in zip(r.token_times, r.token_times[1:])],
        "e2e": [r.finish_s - r.arrival_s for r in done if r.finish_s is not None],
    }


def summarize(results: list[RequestResult], end_s: float, slo: SLO = SLO(), start_s: float | None = None) -> dict:
    """The run's figures over ``results``; rates over ``start_s`` (default: the first arrival
    among them) to ``end_s``."""
    sent = [r for r in results if r.sent]
    done = [r for r in sent if r.completed]
    failed = [r for r in sent if r.error is not None]
    cut = [r for r in sent if r.cut]
    start = min((r.arrival_s for r in sent), default=0.0) if start_s is None else start_s
    span = max(end_s - start, 1e-9)
    latencies = samples(done)
    met = [r for r in done if slo.met(r)]
    return {
        "sent": len(sent),
        "completed": len(done),
        "failed": len(failed),
        "cut": len(cut),
        "lost": len(sent) - len(done) - len(failed) - len(cut),
        "retried": sum(1 for r in sent if r.retry_reasons),
        # completed with fewer tokens than asked for, though every request ignores EOS: a gap
        "short": sum(1 for r in done if r.tokens < r.output_len),
        "duration_s": span,
        "throughput_req_s": len(done) / span,
        "throughput_tok_s": sum(r.tokens for r in done) / span,  # completed ones' (vLLM's output throughput)
        # vLLM's "Total input tokens", "Total generated tokens" and "Total Token throughput" (prompt and
        # output tokens of the completed requests over the span): its headline figures, which were missing
        "total_input_tokens": sum(r.prompt_len for r in done),
        "total_output_tokens": sum(r.tokens for r in done),
        "throughput_total_tok_s": sum(r.prompt_len + r.tokens for r in done) / span,
        "ttft_s": _stats(latencies["ttft"]),
        "tpot_s": _stats(latencies["tpot"]),
        "itl_s": _stats(latencies["itl"]),
        "e2e_s": _stats(latencies["e2e"]),
        "normalized_latency_s": _stats([r.normalized_latency(end_s) for r in sent]),
        "slo": {
            "ttft_s": slo.ttft_s,
            "tpot_s": slo.tpot_s,
            "e2e_s": slo.e2e_s,
            "attainment": len(met) / len(sent) if sent else None,
            "goodput_req_s": len(met) / span,
        },
        # The ten most common, most common first (the first ten in alphabetical order let distinct
        # messages, a 400 naming each prompt's length, push out the reason most requests failed)
        "errors": [e for e, _ in Counter(r.error for r in failed if r.error).most_common(10)],
    }


def slowest(results: list[RequestResult], n: int = 5) -> list[dict]:
    """The ``n`` sent requests that waited longest for their first token (an unanswered one
    counts as waiting for ever): when each came, what it waited, and why it was retried or
    failed; times in seconds from the run's start. What to look at when a tail is long."""
    sent = [r for r in results if r.sent]
    wait = {id(r): (r.first_token_s - r.arrival_s if r.first_token_s is not None else float("inf")) for r in sent}
    return [
        {
            "arrival_s": round(r.arrival_s, 3),
            "ttft_s": None if r.first_token_s is None else round(wait[id(r)], 3),
            "adapter": r.adapter,
            "tokens": r.tokens,
            "retried": r.retry_reasons,
            "error": r.error,
        }
        for r in sorted(sent, key=lambda r: wait[id(r)], reverse=True)[:n]
    ]


def summarize_by_adapter(results: list[RequestResult], end_s: float, slo: SLO = SLO()) -> dict[str, dict]:
    """``summarize`` per adapter, each over the whole run's span (from its first arrival): over
    its own, an adapter with one request read as the fastest, and the rows summed past "all"."""
    names = sorted({r.adapter or "" for r in results})
    start = min((r.arrival_s for r in results if r.sent), default=0.0)
    # The base model's row is "(base)", the whole run's "all": an adapter named so keeps its own
    # row, quoted (it merged with the base's, or read as the run's)
    label = {n: f'"{n}"' if n in ("(base)", "all") else n or "(base)" for n in names}
    return {
        label[n]: summarize([r for r in results if (r.adapter or "") == n], end_s, slo, start_s=start) for n in names
    }
