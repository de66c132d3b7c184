"""The dispatcher's Prometheus metrics (docs/metrics.md): its decisions, refusals, the workers it
gave up on and the requests it recovered from them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, get_args

from prometheus_client import CollectorRegistry, Counter, Gauge

# Why a request was refused (``dlora_dispatch_refusals_total{reason}``).
Refusal = Literal[
    "too-long",
    "too-large",
    "no-worker",
    "duplicate-id",
    "not-found",
    "bad-reply-to",
    "gave-up",
    "client-gone",
    "adapter-changed",
    "state-unreachable",
    "other-model",
]
REFUSALS: tuple[Refusal, ...] = get_args(Refusal)


class DispatcherMetrics:
    """The registry a dispatcher serves on ``metrics_port``; every dispatcher counts what it did."""

    def __init__(self, live_workers: Callable[[], int]) -> None:
        self.registry = r = CollectorRegistry()
        self.decisions = Counter(
            "dlora_dispatch_decisions", "Requests sent to each worker, re-dispatches included", ["worker"], registry=r
        )
        self.refusals = Counter("dlora_dispatch_refusals", "Requests refused, by reason", ["reason"], registry=r)
        for reason in REFUSALS:
            self.refusals.labels(reason)
        self.losses = Counter("dlora_worker_losses", "Workers given up on: heartbeat lapsed", registry=r)
        self.recovered = Counter(
            "dlora_requests_recovered",
            "Requests re-dispatched after their worker was lost, stalled, restarted or stopped",
            registry=r,
        )
        Gauge("dlora_workers_live", "Workers with a live heartbeat, not draining", registry=r).set_function(
            live_workers
        )
