"""A worker's Prometheus metrics (docs/metrics.md): read at scrape time from its latest stats
snapshot, its engine's counters and its policy, never kept up to date between scrapes.

``families`` is the pure core (a ``WorkerView`` in, metric families out); ``WorkerMetrics`` is the
registry the service serves, with the counters of moves it bumps itself. Where a metric means what
vLLM's does it is also exported under vLLM's name, labelled with ``model_name`` as vLLM's are, so
vLLM dashboards, alerts and inference routers read a dlora worker unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from dlora.common import log
from dlora.common.messages import PlanTrigger, WorkerStats
from dlora.common.versions import name_of
from dlora.model.config import served_name
from dlora.services.worker.engine.stats import ITERATION_BUCKETS, EngineStats

if TYPE_CHECKING:
    from dlora.services.worker.main import WorkerService

logger = log.get("worker")

MODES = ("merged", "unmerged", "mixed")  # policy.Mode's values: how a step runs
IDLE = "idle"  # dlora_worker_mode's with no request held: the last step's mode no longer says anything


@dataclass(frozen=True)
class WorkerView:
    """What one scrape reads of a worker."""

    worker: str
    model_name: str
    stats: WorkerStats  # the latest snapshot (its requests, residency and KV blocks)
    engine: EngineStats  # counters since start
    ranks: dict[str, int]  # adapter name -> LoRA rank, of those in host memory here
    registered: dict[str, int]  # adapter name -> rank, of every adapter in the registry
    credits: dict[str, float] | None  # the policy's credit per adapter ("" the base model); None: it keeps none
    wait_bound_s: float | None  # the policy's bound on a request's wait; None: it has none
    longest_wait_s: float  # the oldest request still without its first token: how long it has waited
    now: float  # Unix seconds
    # The loop's decode steps timed (``StepCycles``): batch bucket -> (steps, seconds, sequences).
    cycles: dict[int, tuple[int, float, int]] = dataclasses.field(default_factory=dict)
    settings: dict[str, str] = dataclasses.field(default_factory=dict)  # ``snapshot.settings_in_effect``


# Label values (in the family's label order) -> the sample's value.
Labelled = dict[tuple[str, ...], float]


def _family(
    kind: type[GaugeMetricFamily | CounterMetricFamily],
    name: str,
    doc: str,
    labels: list[str],
    values: Labelled,
    unit: str = "",  # OpenMetrics's: the name's own suffix (seconds, bytes, ratio), never one added to it
) -> Metric:
    family = kind(name, doc, labels=labels, unit=unit)
    for key, value in values.items():
        family.add_metric(list(key), value)
    return family


_gauge = functools.partial(_family, GaugeMetricFamily)
_counter = functools.partial(_family, CounterMetricFamily)


def _both(
    make: Callable[..., Metric], dlora: str, vllm: str, doc: str, v: WorkerView, value: float, unit: str = ""
) -> Iterator[Metric]:
    """One figure under dlora's name (labelled by worker, with ``unit``) and vLLM's (by model_name
    and worker; vLLM's names carry no unit suffix)."""
    yield make(dlora, doc, ["worker"], {(v.worker,): value}, unit)
    yield make(vllm, doc, ["model_name", "worker"], {(v.model_name, v.worker): value})


def families(v: WorkerView) -> Iterator[Metric]:
    """Every worker metric family of docs/metrics.md, from one view."""
    st, e, w = v.stats, v.engine, v.worker
    yield from _both(
        _gauge,
        "dlora_num_requests_running",
        "vllm:num_requests_running",
        "Requests in the running batch",
        v,
        st.running,
    )
    yield from _both(
        _gauge, "dlora_num_requests_waiting", "vllm:num_requests_waiting", "Requests waiting to run", v, st.waiting
    )
    yield _gauge(
        "dlora_num_requests_preempted",
        "Waiting requests preempted (KV freed) and not yet back in the running batch",
        ["worker"],
        {(w,): st.preempted},
    )
    yield from _both(
        _gauge,
        "dlora_kv_cache_usage_ratio",
        "vllm:kv_cache_usage_perc",
        "KV cache usage, 0 to 1",
        v,
        st.kv_cache_usage,
        "ratio",
    )
    yield _gauge("dlora_kv_cache_blocks", "KV cache blocks in all", ["worker"], {(w,): st.total_blocks})
    labels = ["model_name", "worker"]
    key = (v.model_name, w)
    yield _counter(
        "vllm:prefix_cache_queries",
        "Prompt tokens looked up in the prefix cache",
        labels,
        {key: e.prefix_cache_queries},
    )
    yield _counter(
        "vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache", labels, {key: e.prefix_cache_hits}
    )
    yield from _both(
        _counter, "dlora_prompt_tokens", "vllm:prompt_tokens", "Prompt tokens of requests prefilled", v, e.prompt_tokens
    )
    yield from _both(
        _counter, "dlora_generation_tokens", "vllm:generation_tokens", "Tokens generated", v, e.tokens_generated
    )
    yield from _both(
        _counter, "dlora_num_preemptions", "vllm:num_preemptions", "Running requests preempted", v, e.preemptions
    )
    yield _iteration_tokens(v)
    yield _counter(
        "dlora_steps", "Engine steps by mode", ["worker", "mode"], {(w, m): e.steps_by_mode.get(m, 0) for m in MODES}
    )
    cycles = SummaryMetricFamily(
        "dlora_step_cycle_seconds",
        "The worker loop's time per decode step, the shell's work included, by the step's sequences "
        "(a power of two at or above)",
        labels=["worker", "batch"],
        unit="seconds",
    )
    for bucket, (n, seconds, _) in sorted(v.cycles.items()):
        cycles.add_metric([w, str(bucket)], count_value=n, sum_value=seconds)
    yield cycles
    yield _counter(
        "dlora_step_cycle_sequences",
        "Sequences of the decode steps dlora_step_cycle_seconds timed, by the same buckets",
        ["worker", "batch"],
        {(w, str(b)): n for b, (_, _, n) in sorted(v.cycles.items())},
    )
    kinds = {"merge": (e.merges, e.merge_seconds), "unmerge": (e.unmerges, e.unmerge_seconds)}
    yield _counter(
        "dlora_adapter_switches",
        "Merges and unmerges of an adapter",
        ["worker", "kind"],
        {(w, k): n for k, (n, _) in kinds.items()},
    )
    yield _counter(
        "dlora_adapter_switch_seconds",
        "Seconds merges and unmerges took",
        ["worker", "kind"],
        {(w, k): s for k, (_, s) in kinds.items()},
        "seconds",
    )
    yield _counter(
        "dlora_cuda_graphs",
        "Decode-step CUDA graphs recorded (a failed recording counted too: its steps run eagerly)",
        ["worker"],
        {(w,): e.cuda_graphs},
    )
    yield _counter(
        "dlora_cuda_graph_seconds",
        "Seconds recording CUDA graphs took, left out of the step times",
        ["worker"],
        {(w,): e.cuda_graph_seconds},
        "seconds",
    )
    mode = e.last_mode if st.running or st.waiting else IDLE
    yield _gauge(
        "dlora_worker_mode",
        "1 for the mode the worker runs in: its last step's, or idle with no request",
        ["worker", "mode"],
        {(w, m): float(m == mode) for m in (*MODES, IDLE)},
    )
    merged = st.merged_adapter
    yield _gauge(
        "dlora_merged_adapter",
        "1 for the adapter merged into the weights now",
        ["worker", "adapter"],
        {(w, merged): 1} if merged is not None else {},
    )
    if v.credits is not None:
        # Square adapters leave the ledger: 0 for the base model and every adapter held here. A
        # deleted adapter's balance leaves it once its last version here is unloaded; its series
        # goes once it is gone here, as its load series do.
        known = {v.model_name, *v.ranks, *v.registered}
        owed = {a: c for a, c in _by_name(v.credits, v.model_name).items() if a in known}
        credits = dict.fromkeys([v.model_name, *v.ranks], 0.0) | owed
        yield _gauge(
            "dlora_adapter_credit_seconds",
            "Seconds of service the adapter is owed (+) or owes (-)",
            ["worker", "adapter"],
            {(w, a): c for a, c in credits.items()},
            "seconds",
        )
    yield _gauge(
        "dlora_longest_wait_seconds",
        "How long the oldest request without a first token has waited",
        ["worker"],
        {(w,): v.longest_wait_s},
        "seconds",
    )
    if v.wait_bound_s is not None:
        yield _gauge(
            "dlora_wait_bound_seconds",
            "The policy's bound on a request's wait",
            ["worker"],
            {(w,): v.wait_bound_s},
            "seconds",
        )
    yield from _requests(v)
    yield from _residency(v)
    names = sorted(v.settings)  # vLLM's cache_config_info alike: the engine settings in effect, as labels
    yield _gauge(
        "dlora_engine_config_info",
        "The engine settings this worker runs with",
        ["worker", *names],
        {(w, *(v.settings[n] for n in names)): 1.0} if v.settings else {},
    )
    yield _cache_config(v)


def _cache_config(v: WorkerView) -> Metric:
    """vLLM's ``cache_config_info`` (1, the KV cache's settings as labels, as vLLM writes them:
    ``True``/``False``): routers and load monitors take the KV capacity from it (``num_gpu_blocks`` x
    ``block_size``; the worker's device blocks, CPU ones on a CPU worker)."""
    labels = ["block_size", "num_gpu_blocks", "enable_prefix_caching", "worker"]
    s = v.settings
    known = {"block_size", "num_blocks", "enable_prefix_caching"} <= s.keys()
    value = (s.get("block_size", ""), s.get("num_blocks", ""), str(s.get("enable_prefix_caching") == "true"), v.worker)
    return _gauge("vllm:cache_config_info", "The KV cache's settings", labels, {value: 1.0} if known else {})


def _iteration_tokens(v: WorkerView) -> Metric:
    """vLLM's tokens per engine step: the prompt tokens computed, counted in it, plus the tokens
    generated (as vLLM observes it since its #43346: a prefix cache hit is no token of the step)."""
    family = HistogramMetricFamily(
        "vllm:iteration_tokens_total", "Tokens per engine step", labels=["model_name", "worker"]
    )
    steps, buckets = v.engine.iteration_steps, []
    below = 0
    for i, bound in enumerate(ITERATION_BUCKETS):
        below += steps.get(i, 0)
        buckets.append((str(float(bound)), below))
    buckets.append(("+Inf", below + steps.get(len(ITERATION_BUCKETS), 0)))
    family.add_metric([v.model_name, v.worker], buckets, v.engine.iteration_tokens)
    return family


def _by_name(by_key: Mapping[str, float], base: str = "") -> dict[str, float]:
    """Figures by engine key (``name@version``; "" the base model, as ``base``) summed by adapter
    name: two versions of one adapter during a rollover count as one."""
    out: dict[str, float] = {}
    for key, value in by_key.items():
        name = name_of(key) if key else base
        out[name] = out.get(name, 0.0) + value
    return out


def _requests(v: WorkerView) -> Iterator[Metric]:
    counts: Labelled = {}
    running: set[str] = set()
    waiting: set[str] = set()
    for adapter, n in v.stats.requests_by_adapter().items():  # (every request, listed or not)
        for state, count, named in (("running", n[0], running), ("waiting", n[1], waiting)):
            if count:
                counts[(v.worker, adapter or v.model_name, state)] = count
                if adapter:
                    named.add(adapter)
    yield _gauge("dlora_adapter_requests", "Unfinished requests per adapter", ["worker", "adapter", "state"], counts)
    # vLLM's: the value is the time, the labels carry the adapters (comma-separated).
    info = (str(v.stats.max_loras), ",".join(sorted(running)), ",".join(sorted(waiting)), v.model_name, v.worker)
    yield _gauge(
        "vllm:lora_requests_info",
        "Running stats on LoRA requests",
        ["max_lora", "running_lora_adapters", "waiting_lora_adapters", "model_name", "worker"],
        {info: v.now},
    )


def _residency(v: WorkerView) -> Iterator[Metric]:
    w = v.worker
    tier = {a.name: a.tier for a in v.stats.adapters}
    ranks = v.registered | v.ranks
    resident: Labelled = {(w, a, t, str(ranks.get(a, 0))): 1.0 for a, t in tier.items()}
    resident |= {(w, a, "disk", str(r)): 1.0 for a, r in v.registered.items() if a not in tier}
    yield _gauge(
        "dlora_adapter_resident",
        "1 where the adapter lives: gpu slot, cpu memory or disk",
        ["worker", "adapter", "tier", "rank"],
        resident,
    )
    # Of adapters registered or still held here: a deleted one's series go once it is gone (they
    # stayed until the restart, one pair per adapter name ever loaded, with adapter churn).
    known = tier.keys() | v.registered.keys()
    loads = {a: n for a, n in _by_name(v.engine.loads_by_adapter).items() if a in known}
    seconds = {a: n for a, n in _by_name(v.engine.load_seconds_by_adapter).items() if a in known}
    yield _counter(
        "dlora_adapter_loads",
        "Loads of the adapter into a device slot",
        ["worker", "adapter"],
        {(w, a): n for a, n in loads.items()},
    )
    yield _counter(
        "dlora_adapter_load_seconds",
        "Seconds those loads took",
        ["worker", "adapter"],
        {(w, a): s for a, s in seconds.items()},
        "seconds",
    )
    yield _gauge(
        "dlora_adapter_read_seconds",
        "Seconds an adapter's read into host memory takes here, recent reads decayed (dispatch prices loads so)",
        ["worker"],
        {(w,): v.stats.adapter_read_seconds},
        "seconds",
    )
    yield _gauge(
        "dlora_adapter_read_bytes",
        "The mean bytes of those reads' files (a read of another size is priced on the line fitted to them)",
        ["worker"],
        {(w,): v.stats.adapter_read_bytes},
        "bytes",
    )
    vllm: Labelled = {(v.model_name, w, a, t, "false", str(ranks.get(a, 0))): 1.0 for a, t in tier.items()}
    yield _gauge(
        "vllm:lora_adapter_loaded",
        "1 per LoRA adapter loaded, by cache level",
        ["model_name", "worker", "adapter_name", "level", "pinned", "rank"],
        vllm,
    )
    gpu = sum(t == "gpu" for t in tier.values())
    counts = {
        "vllm:num_gpu_loaded_lora_adapters": ("LoRA adapters in device slots", gpu),
        "vllm:num_cpu_loaded_lora_adapters": ("LoRA adapters in host memory only", len(tier) - gpu),
        "vllm:max_gpu_lora_adapters": ("LoRA adapter device slots", v.stats.max_loras),
    }
    for name, (doc, n) in counts.items():
        yield _gauge(name, doc, ["model_name", "worker"], {(v.model_name, w): n})


def _copied(stats: EngineStats) -> EngineStats:
    """A copy of ``stats`` that a step updating them in another thread cannot break: each dict is
    copied by ``dict()``, one C call under the GIL, where a deep copy iterates it in Python and a key
    added meanwhile raises "dictionary changed size during iteration" (losing the scrape)."""
    dicts: dict[str, Any] = {}
    for f in dataclasses.fields(stats):
        if isinstance(value := getattr(stats, f.name), dict):
            dicts[f.name] = dict(value)
    return dataclasses.replace(stats, **dicts)


def worker_view(svc: WorkerService) -> WorkerView:
    """What a scrape reads of ``svc``, on its event loop: the engine's counters and policy are read,
    not walked (a step may be running in its thread); requests come from the latest snapshot."""
    engine, now = svc.engine, time.monotonic()
    policy = engine.policy
    credits = getattr(policy, "credits", None)
    bound = getattr(policy, "wait_bound_s", None)
    return WorkerView(
        worker=svc.s.worker_id,
        model_name=served_name(svc.s.model, svc.s.served_model_name),
        stats=svc.stats,
        engine=_copied(engine.stats),
        ranks={name_of(k): a.rank for k, a in list(engine.adapters.items())},
        registered=svc.registered,
        credits=dict(credits.balances) if credits is not None else None,
        wait_bound_s=bound(engine.stats.max_step_seconds) if bound is not None else None,
        longest_wait_s=max(
            [now - s.arrived for s in svc.streams.values() if not s.first_sent]
            + [now - p.arrived for p in list(svc.preparing.values())],  # (arrival.py)
            default=0.0,
        ),
        now=time.time(),
        cycles={b: (n, svc.cycles.seconds[b], svc.cycles.sequences[b]) for b, n in list(svc.cycles.counts.items())},
        settings=svc.settings,
    )


class _Live(Collector):
    def __init__(self, view: Callable[[], WorkerView]) -> None:
        self.view = view
        self.taken: WorkerView | None = None  # the view ``WorkerMetrics.take`` took on the loop

    def collect(self) -> Iterator[Metric]:
        # A fault here must not take the scrape down with it (the process families still go out).
        try:
            return iter(list(families(self.taken or self.view())))
        except Exception:
            logger.exception("worker metrics failed")
            return iter(())


class WorkerMetrics:
    """The registry a worker serves on ``metrics_port``: ``families`` of ``view()`` at each scrape,
    and the moves away from it, counted as they happen."""

    def __init__(self, worker: str, view: Callable[[], WorkerView]) -> None:
        self.registry = CollectorRegistry()
        self.worker = worker
        self._moves = Counter(
            "dlora_migrations_out",
            "Requests moved away from this worker, by the plan's trigger and method: kv (cache shipped) or recompute",
            ["worker", "trigger", "method"],
            registry=self.registry,
        )
        self._kv_bytes = Counter(
            "dlora_migration_kv_bytes",
            "Bytes of KV cache shipped by moves",
            ["worker"],
            unit="bytes",
            registry=self.registry,
        )
        for trigger in PlanTrigger:
            for method in ("kv", "recompute"):
                self._moves.labels(worker, trigger.value, method)
        self._kv_bytes.labels(worker)
        self._live = _Live(view)
        self.registry.register(self._live)

    def take(self) -> None:
        """The view, read now (on the worker's loop: it reads the loop's state), for the scrape
        that renders the page next, on another thread (``exporter.metrics_endpoint``'s ``prepare``):
        the view is frozen, and its families (one series per registered adapter) cost ~14 µs an
        adapter to render, which on the loop stalled every stream at each scrape (a helper's measure)."""
        try:
            self._live.taken = self._live.view()
        except Exception:
            logger.exception("worker metrics failed")
            self._live.taken = None

    def moved(self, kv_bytes: int | None, trigger: str = "none") -> None:
        """A request moved away by a plan that ``trigger`` set off (``PlanTrigger``'s value): with its
        cache (``kv_bytes``) or to be recomputed (None)."""
        self._moves.labels(self.worker, trigger, "recompute" if kv_bytes is None else "kv").inc()
        self._kv_bytes.labels(self.worker).inc(kv_bytes or 0)
