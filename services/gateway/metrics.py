"""Prometheus metrics of the gateway, with the names vLLM users know, and worker gauges fed from
the workers' stats messages."""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from dlora.common.messages import WorkerStats

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "dlora_requests", "Requests finished, by adapter and status", ["adapter", "status"], registry=r
        )
        self.ttft = Histogram(
            "dlora_time_to_first_token_seconds", "Time to first token", ["adapter"], buckets=_LATENCY, registry=r
        )
        self.tpot = Histogram(
            "dlora_time_per_output_token_seconds",
            "Time per output token after the first",
            ["adapter"],
            buckets=_LATENCY,
            registry=r,
        )
        self.e2e = Histogram(
            "dlora_e2e_request_latency_seconds", "End-to-end request latency", ["adapter"], buckets=_LATENCY, registry=r
        )
        self.queue = Histogram(
            "dlora_request_queue_time_seconds",
            "Time waiting at the worker before the first step",
            ["adapter"],
            buckets=_LATENCY,
            registry=r,
        )
        self.running = Gauge("dlora_num_requests_running", "Requests running on a worker", ["worker"], registry=r)
        self.waiting = Gauge("dlora_num_requests_waiting", "Requests waiting on a worker", ["worker"], registry=r)
        self.resident = Gauge(
            "dlora_adapter_resident",
            "1 if the adapter is in a device slot of the worker",
            ["worker", "adapter"],
            registry=r,
        )
        self.merged = Gauge(
            "dlora_adapter_merged", "1 if the adapter is merged on the worker", ["worker", "adapter"], registry=r
        )
        self.loads = Gauge("dlora_adapter_loads_total", "Adapter loads into device slots", ["worker"], registry=r)
        self.evictions = Gauge(
            "dlora_adapter_evictions_total", "Adapters evicted from device slots", ["worker"], registry=r
        )
        self.load_seconds = Gauge(
            "dlora_adapter_load_seconds_total", "Seconds spent loading adapters", ["worker"], registry=r
        )

        self.worker_counters = _WorkerCounters()
        r.register(self.worker_counters)

    def observe_worker(self, st: WorkerStats) -> None:
        w = st.worker
        self.worker_counters.latest[w] = st
        self.running.labels(w).set(st.running)
        self.waiting.labels(w).set(st.waiting)
        self.loads.labels(w).set(st.adapter_loads)
        self.evictions.labels(w).set(st.adapter_evictions)
        self.load_seconds.labels(w).set(st.adapter_load_seconds)
        for a in st.adapters:
            self.resident.labels(w, a.name).set(1 if a.slot is not None else 0)
            self.merged.labels(w, a.name).set(1 if a.merged else 0)

    def render(self) -> bytes:
        """The gateway's metrics, then the process-wide ones (bus rejects, the process itself)."""
        return generate_latest(self.registry) + generate_latest(REGISTRY)


class _WorkerCounters(Collector):
    """Totals each worker keeps since it started, exported as counters from its latest stats; the
    names and meanings are vLLM's, so its dashboards and alerts read them unchanged."""

    COUNTERS = (
        ("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache", "prefix_cache_queries"),
        ("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache", "prefix_cache_hits"),
    )

    def __init__(self) -> None:
        self.latest: dict[str, WorkerStats] = {}

    def collect(self) -> Iterator[CounterMetricFamily]:
        for name, doc, field in self.COUNTERS:
            family = CounterMetricFamily(name, doc, labels=["worker"])
            for worker, st in sorted(self.latest.items()):
                family.add_metric([worker], getattr(st, field))
            yield family


class RequestTimer:
    """One request's latency metrics, under its adapter's label: time to first token and the
    worker's queue time at its first chunk; the 200, end-to-end latency and time per output token
    when it is done. Started when the request is published."""

    def __init__(self, metrics: Metrics, label: str) -> None:
        self.metrics, self.label = metrics, label
        self.start = time.monotonic()
        self.first_at: float | None = None  # monotonic seconds of the first chunk

    def chunk(self, queue_seconds: float | None) -> None:
        """A chunk came (any choice's, none a duplicate); only the first is timed."""
        if self.first_at is not None:
            return
        self.first_at = time.monotonic()
        self.metrics.ttft.labels(self.label).observe(self.first_at - self.start)
        if queue_seconds is not None:
            self.metrics.queue.labels(self.label).observe(queue_seconds)

    def done(self, n_tokens: int) -> None:
        """Every choice is over; ``n_tokens``: the longest choice's, which bound the time per token."""
        end = time.monotonic()
        self.metrics.requests.labels(self.label, "200").inc()
        self.metrics.e2e.labels(self.label).observe(end - self.start)
        if self.first_at is not None and n_tokens > 1:
            self.metrics.tpot.labels(self.label).observe((end - self.first_at) / (n_tokens - 1))

    def aborted(self) -> None:
        """The client went away before the end."""
        self.metrics.requests.labels(self.label, "aborted").inc()
