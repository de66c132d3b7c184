"""Per-request outcomes and the paper's summary metrics over a run."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class RequestResult:
    arrival_s: float
    adapter: str | None
    output_len: int  # tokens asked for
    first_token_s: float | None = None
    finish_s: float | None = None
    tokens: int = 0  # tokens received

    def normalized_latency(self, end_s: float) -> float:
        """End-to-end seconds per output token; for an unfinished request, a lower bound taken at
        ``end_s`` over the tokens it asked for."""
        if self.finish_s is not None:
            return (self.finish_s - self.arrival_s) / max(1, self.tokens)
        return (end_s - self.arrival_s) / max(1, self.output_len)


def summarize(results: list[RequestResult], end_s: float) -> dict[str, float]:
    finished = [r for r in results if r.finish_s is not None]
    start = min(r.arrival_s for r in results)
    span = max(end_s - start, 1e-9)
    norm = np.array([r.normalized_latency(end_s) for r in results])
    ttft = np.array([r.first_token_s - r.arrival_s for r in results if r.first_token_s is not None])
    return {
        "requests": len(results),
        "finished": len(finished),
        "throughput_req_s": len(finished) / span,
        "throughput_tok_s": sum(r.tokens for r in results) / span,
        "norm_latency_mean_s": float(norm.mean()),
        "norm_latency_p90_s": float(np.percentile(norm, 90)),
        "ttft_mean_s": float(ttft.mean()) if len(ttft) else float("nan"),
    }
