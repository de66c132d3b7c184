"""The worker's metric families from one view (pure: no engine, no HTTP)."""

import sys
import threading

import msgspec
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dlora.common.messages import AdapterResidency, RequestLoad, WorkerStats
from dlora.services.worker.engine.stats import EngineStats
from dlora.services.worker.metrics import WorkerMetrics, WorkerView, _copied, _Live


def _view(**over: object) -> WorkerView:
    stats = WorkerStats(
        worker="w0",
        running=2,
        waiting=1,
        preempted=1,
        free_blocks=25,
        total_blocks=100,
        block_size=16,
        max_loras=4,
        mode="mixed",
        adapters=[
            AdapterResidency(name="a", slot=0, merged=True, version="v1"),
            AdapterResidency(name="b", slot=None, merged=False, version="v1"),
        ],
        requests=[
            RequestLoad(request_id="1", adapter="a", context_tokens=9, remaining_tokens=5, running=True),
            RequestLoad(request_id="2", adapter=None, context_tokens=9, remaining_tokens=5, running=True),
            RequestLoad(request_id="3", adapter="b", context_tokens=9, remaining_tokens=5, running=False),
        ],
        adapter_read_seconds=2.5,
        adapter_read_bytes=24.0e6,
    )
    engine = EngineStats(
        steps=7, tokens_generated=40, prompt_tokens=30, merges=2, merge_seconds=0.5, preemptions=1, cuda_graphs=3
    )
    engine.steps_by_mode.update({"mixed": 5, "unmerged": 2})
    engine.last_mode = "mixed"
    engine.record_load("a@v1", evicted=False, seconds=0.25)
    engine.record_load("a@v1", evicted=True, seconds=0.25)
    fields: dict[str, object] = dict(
        worker="w0",
        model_name="llama",
        stats=stats,
        engine=engine,
        ranks={"a": 8, "b": 16},
        registered={"a": 8, "b": 16, "c": 4},
        credits={"a@v1": -1.0, "a@v2": -0.5, "": 1.5},  # two versions of a: one figure
        wait_bound_s=3.0,
        longest_wait_s=0.7,
        now=1000.0,
        cycles={8: (4, 0.2, 26), 32: (2, 0.3, 50)},
    )
    return WorkerView(**(fields | over))  # type: ignore[arg-type]


Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]


def _scrape(view: WorkerView) -> Samples:
    registry = CollectorRegistry()
    registry.register(_Live(lambda: view))
    return _samples(registry)


def _samples(registry: CollectorRegistry) -> Samples:
    """Sample name -> its labels (sorted pairs) -> value."""
    out: Samples = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def _one(samples: Samples, name: str, **labels: str) -> float:
    matching = [v for k, v in samples[name].items() if set(labels.items()) <= set(k)]
    assert len(matching) == 1, (name, labels, samples[name])
    return matching[0]


def test_every_family_with_the_view_s_values() -> None:
    s = _scrape(_view())
    assert _one(s, "vllm:num_requests_running", model_name="llama", worker="w0") == 2
    assert (
        _one(s, "dlora_num_requests_waiting", worker="w0") == _one(s, "dlora_num_requests_preempted", worker="w0") == 1
    )
    assert _one(s, "vllm:kv_cache_usage_perc") == _one(s, "dlora_kv_cache_usage_ratio") == 0.75
    assert _one(s, "vllm:generation_tokens_total") == 40 and _one(s, "vllm:prompt_tokens_total") == 30
    assert _one(s, "vllm:num_preemptions_total") == 1
    assert _one(s, "dlora_steps_total", mode="mixed") == 5 and _one(s, "dlora_steps_total", mode="merged") == 0
    assert _one(s, "dlora_adapter_switches_total", kind="merge") == 2
    assert _one(s, "dlora_step_cycle_seconds_count", batch="8") == 4
    assert _one(s, "dlora_step_cycle_seconds_sum", batch="32") == 0.3
    assert _one(s, "dlora_step_cycle_sequences_total", batch="8") == 26
    assert _one(s, "dlora_adapter_switch_seconds_total", kind="merge") == 0.5
    assert _one(s, "dlora_cuda_graphs_total") == 3 and _one(s, "dlora_cuda_graph_seconds_total") == 0
    assert _one(s, "dlora_worker_mode", mode="mixed") == 1 and _one(s, "dlora_worker_mode", mode="merged") == 0
    assert _one(s, "dlora_worker_mode", mode="idle") == 0
    assert s["dlora_merged_adapter"] == {(("adapter", "a"), ("worker", "w0")): 1}
    assert _one(s, "dlora_adapter_credit_seconds", adapter="a") == -1.5
    assert _one(s, "dlora_adapter_credit_seconds", adapter="llama") == 1.5
    assert _one(s, "dlora_wait_bound_seconds") == 3.0 and _one(s, "dlora_longest_wait_seconds") == 0.7
    assert _one(s, "dlora_adapter_requests", adapter="b", state="waiting") == 1
    assert _one(s, "dlora_adapter_requests", adapter="llama", state="running") == 1
    # where each adapter lives, with its rank: c is registered but not loaded here
    assert _one(s, "dlora_adapter_resident", adapter="a", tier="gpu", rank="8") == 1
    assert _one(s, "dlora_adapter_resident", adapter="b", tier="cpu", rank="16") == 1
    assert _one(s, "dlora_adapter_resident", adapter="c", tier="disk", rank="4") == 1
    assert _one(s, "dlora_adapter_loads_total", adapter="a") == 2
    assert _one(s, "dlora_adapter_load_seconds_total", adapter="a") == 0.5
    assert _one(s, "dlora_adapter_read_seconds") == 2.5 and _one(s, "dlora_adapter_read_bytes") == 24.0e6
    assert _one(s, "vllm:lora_adapter_loaded", adapter_name="a", level="gpu") == 1
    assert "c" not in {dict(k)["adapter_name"] for k in s["vllm:lora_adapter_loaded"]}
    assert _one(s, "vllm:num_gpu_loaded_lora_adapters") == 1 and _one(s, "vllm:num_cpu_loaded_lora_adapters") == 1
    assert _one(s, "vllm:max_gpu_lora_adapters") == 4
    info = dict(next(iter(s["vllm:lora_requests_info"])))
    assert (info["running_lora_adapters"], info["waiting_lora_adapters"], info["max_lora"]) == ("a", "b", "4")
    # the settings in effect, as labels (an operator's trial found none exposed but max_loras)
    assert "dlora_engine_config_info" not in s  # no settings known: the family, no sample
    settings = {"max_num_seqs": "12", "block_size": "32", "policy": "dlora"}
    config = dict(next(iter(_scrape(_view(settings=settings))["dlora_engine_config_info"])))
    assert config == {**settings, "worker": "w0"}


def test_a_worker_with_no_request_is_idle_whatever_its_last_step_was() -> None:
    stats = WorkerStats(
        worker="w0", running=0, waiting=0, free_blocks=100, total_blocks=100, block_size=16, max_loras=4, mode="mixed"
    )
    s = _scrape(_view(stats=stats))  # the engine's last step ran mixed
    assert {dict(k)["mode"]: v for k, v in s["dlora_worker_mode"].items()} == {
        "merged": 0,
        "unmerged": 0,
        "mixed": 0,
        "idle": 1,
    }
    assert _one(s, "dlora_steps_total", mode="mixed") == 5 and "idle" not in {
        dict(k)["mode"] for k in s["dlora_steps_total"]
    }


def test_a_policy_without_credits_or_a_bound_exports_neither() -> None:
    s = _scrape(_view(credits=None, wait_bound_s=None))
    assert "dlora_adapter_credit_seconds" not in s and "dlora_wait_bound_seconds" not in s
    assert "dlora_longest_wait_seconds" in s


def test_the_engine_s_counters_copy_while_a_step_adds_to_them() -> None:
    # A step runs in the engine's thread while a scrape copies its counters on the event loop: a
    # dict that grows mid-copy must not fail the copy (and with it every worker family).
    stats = EngineStats()
    stats.loads_by_adapter.update({f"a{i}@v1": i for i in range(200)})
    stop = threading.Event()

    def step() -> None:
        while not stop.is_set():
            stats.loads_by_adapter["new@v1"] = 1
            stop.is_set()  # the step's other work: the thread may be switched out with the dict grown
            del stats.loads_by_adapter["new@v1"]

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter lets us
    thread = threading.Thread(target=step)
    thread.start()
    try:
        copies = [_copied(stats) for _ in range(2000)]
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(interval)
    assert all(len(c.loads_by_adapter) in (200, 201) for c in copies)
    assert copies[0].loads_by_adapter is not stats.loads_by_adapter  # a copy, not the live dict


def test_moves_away_are_counted_by_trigger_and_method_with_the_bytes_shipped() -> None:
    m = WorkerMetrics("w0", _view)
    m.moved(1000, "queue-delay")  # its cache shipped
    m.moved(500, "queue-delay")
    m.moved(None, "kv-pressure")  # recomputed at the destination: no bytes
    m.moved(None)  # a plan that named no trigger
    s = _samples(m.registry)
    moved = {(dict(k)["trigger"], dict(k)["method"]): v for k, v in s["dlora_migrations_out_total"].items()}
    assert moved[("queue-delay", "kv")] == 2 and moved[("kv-pressure", "recompute")] == 1
    assert moved[("none", "recompute")] == 1 and moved[("request-count", "kv")] == 0  # every trigger's, from 0
    assert sum(moved.values()) == 4
    assert s["dlora_migration_kv_bytes_total"] == {(("worker", "w0"),): 1500}
    assert _one(s, "dlora_num_requests_running", worker="w0") == 2  # and the view's families beside them


def test_a_deleted_adapters_load_series_go_once_it_is_gone_here() -> None:
    """They stayed until the worker restarted: with adapters churning, a pair of series per name
    ever loaded (a helper's deploy)."""
    stats = msgspec.structs.replace(_view().stats, adapters=[], requests=[])
    gone = _scrape(_view(stats=stats, registered={"b": 16, "c": 4}))  # "a" deleted and evicted
    assert not gone.get("dlora_adapter_loads_total") and not gone.get("dlora_adapter_load_seconds_total")
    held = _scrape(_view(registered={"b": 16}))  # deleted, still held here: kept until evicted
    assert _one(held, "dlora_adapter_loads_total", adapter="a") == 2


def test_a_removed_adapters_folded_load_counts_go_with_it() -> None:
    """Two entries per adapter name ever removed stayed in the worker (a helper's churn)."""
    stats = EngineStats()
    stats.record_load("a@v1", evicted=False, seconds=0.25)
    stats.forget_adapter("a@v1")  # evicted: folded into its name
    assert stats.loads_by_adapter == {"a": 1}
    stats.forget_name("a")  # removed from the registry
    assert not stats.loads_by_adapter and not stats.load_seconds_by_adapter


def test_a_deleted_adapters_credit_series_goes_once_it_is_gone_here() -> None:
    """The policy's ledger keeps an adapter's debt (a version's key) after the adapter is deleted,
    until a settlement clears it (proportional repayment rarely takes a debt to zero): each such
    name kept a ``dlora_adapter_credit_seconds`` series on every worker where it ever paid, one
    more per adapter with adapter churn. Exported, as the load series are, for the adapters
    registered or still held here (a helper's finding, replaying cardinality reports)."""
    stats = msgspec.structs.replace(_view().stats, adapters=[], requests=[])
    credits = {"a@v1": -1.0, "gone@v3": -0.25, "": 1.25}
    scrape = _scrape(_view(stats=stats, ranks={"a": 8}, registered={"a": 8, "b": 16}, credits=credits))
    adapters = {dict(labels)["adapter"] for labels in scrape["dlora_adapter_credit_seconds"]}
    assert adapters == {"llama", "a"}, adapters


def test_tokens_per_step_are_vllms_iteration_tokens_histogram() -> None:
    """vllm:iteration_tokens_total (vLLM's tokens per engine step: the prompt tokens computed and
    counted in the step, at a request's first token, plus the tokens it generated; vLLM's buckets)
    was missing, so a vLLM dashboard's batch-size panel read nothing from a dlora worker. A prefix
    cache hit is no token of the step (vLLM #43346): its _sum is the generation counter plus the
    prompt counter less the hits."""
    engine = EngineStats()
    engine.count_prompt(36, 0)  # (a request's first token taken: its prompt counted, then the step recorded)
    engine.record_steps([0.1], tokens=1, fed=36, prefill=36)  # 37
    engine.record_steps([0.1, 0.1, 0.1], tokens=3, fed=3, prefill=0)  # the simulator's repeats: 3 steps of 3
    engine.record_steps([0.1], tokens=0, fed=512, prefill=512)  # a prefill chunk short of its prompt's end: 0
    engine.count_prompt(20_990, 1_000)  # 1,000 of them found in the prefix cache
    engine.record_steps([0.1], tokens=10, fed=20_000, prefill=19_990)  # past the last bound
    engine.count_prompt(0, 0)  # a resumed request's: counted where it began
    s = _scrape(_view(engine=engine))
    buckets = {dict(k)["le"]: v for k, v in s["vllm:iteration_tokens_total_bucket"].items()}
    assert (buckets["1.0"], buckets["8.0"], buckets["64.0"], buckets["16384.0"], buckets["+Inf"]) == (1, 4, 5, 5, 6)
    assert _one(s, "vllm:iteration_tokens_total_count", model_name="llama", worker="w0") == 6
    total = _one(s, "vllm:prompt_tokens_total") - 1_000 + _one(s, "vllm:generation_tokens_total")
    assert _one(s, "vllm:iteration_tokens_total_sum") == total == 37 + 9 + 0 + 20_000


def test_the_kv_cache_s_settings_as_vllms_cache_config_info() -> None:
    """Routers and load monitors take a vLLM server's KV capacity from vllm:cache_config_info's
    labels (num_gpu_blocks x block_size): a dlora worker had its settings under its own name only,
    and they read no capacity. vLLM's labels, its spelling of a flag (True/False)."""
    settings = {"block_size": "16", "num_blocks": "2048", "enable_prefix_caching": "true", "policy": "dlora"}
    s = _scrape(_view(settings=settings))
    assert s["vllm:cache_config_info"] == {
        (("block_size", "16"), ("enable_prefix_caching", "True"), ("num_gpu_blocks", "2048"), ("worker", "w0")): 1.0
    }
    assert "vllm:cache_config_info" not in _scrape(_view())  # none known: the family, no sample
