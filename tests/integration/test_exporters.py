"""Every exporter of a running stack (`dlora up`'s: the services as processes, real NATS and
Redis), scraped over HTTP during a short load (the workers) and after it: each serves every family
docs/metrics.md lists for it, each with a sample, with values that agree with the load, and every
metric the Grafana dashboard queries is one of them."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from dlora.model.make_tiny import TinyOutput
from dlora.services.launcher import LocalStack
from dlora.services.servers import free_port
from tests.grafana import dashboard_queries, documented_by_section, family, metric_names
from tests.integration.conftest import STACK_KV_ENV

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dlora.json"
# (adapter, max_tokens): the longest keeps a worker busy for a few of its stats snapshots (0.25 s
# apart), so a scrape during the load sees it.
REQUESTS = [("lora-1", 12), ("lora-2", 9), ("lora-1", 7), (None, 10), ("lora-2", 300), ("lora-1", 5)]
# Documented families a scrape may show without a sample: each has one only once its event happened.
EVENT_ONLY = {
    # an adapter loaded into a device slot: none where every adapter ran merged (checked below)
    "dlora_adapter_loads_total",
    "dlora_adapter_load_seconds_total",
    "dlora_bus_rejected_messages_total",  # a message that did not decode
    "dlora_migration_makespan_seconds",  # a plan solved by the leader
    "dlora_merged_adapter",  # an adapter merged now
}
# Worker families by adapter that a worker has a sample of only where an adapter is (loaded here, or
# with a request here): some worker has one.
SOME_WORKER = {
    "vllm:lora_adapter_loaded",
    "dlora_adapter_requests",  # while the load runs
    "dlora_step_cycle_seconds",  # a worker that ran two decode steps in a row
    "dlora_step_cycle_sequences_total",
}


class Scrape:
    """One exporter's text, parsed: families by name (counters without ``_total``) and samples."""

    def __init__(self, url: str) -> None:
        with urllib.request.urlopen(url, timeout=10) as r:
            text = r.read().decode()
        self.types = {f.name: f.type for f in text_string_to_metric_families(text)}
        self.samples = [s for f in text_string_to_metric_families(text) for s in f.samples]

    def names(self) -> set[str]:
        """Every series name this exporter can serve: its samples', and those of its families with
        no sample yet (a labelled counter before its first event)."""
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
        out = {s.name for s in self.samples} | set(self.types)
        out |= {name + suffix for name, kind in self.types.items() for suffix in suffixes.get(kind, ())}
        return out

    def sampled(self) -> set[str]:
        """The documented names of the families with at least one sample (a counter's with
        ``_total``, a histogram's bare)."""
        return {s.name for s in self.samples} | {family(s.name) for s in self.samples}

    def of(self, name: str, **labels: str) -> list[Sample]:
        return [s for s in self.samples if s.name == name and labels.items() <= s.labels.items()]

    def total(self, name: str, **labels: str) -> float:
        return sum(s.value for s in self.of(name, **labels))


@pytest.fixture(scope="module")
def running(tiny_llama: TinyOutput) -> Iterator[LocalStack]:
    loras = [f"{name}={tiny_llama.adapters[name]}" for name in ("lora-1", "lora-2")]
    worker_env = {"DLORA_WORKER_ENGINE__DEVICE": "cpu", "DLORA_WORKER_TORCH_THREADS": "1", **STACK_KV_ENV}
    stack = LocalStack(2, str(tiny_llama.model), loras, free_port(), None, worker_env=worker_env)
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


def _complete(url: str, model: str, max_tokens: int) -> dict:  # type: ignore[type-arg]
    body = {"model": model, "prompt": "kalo remi", "max_tokens": max_tokens, "ignore_eos": True}
    req = urllib.request.Request(
        f"{url}/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.load(r)  # type: ignore[no-any-return]


def _busy(url: str) -> Scrape | None:
    """The worker's scrape at ``url`` if it shows a request running or waiting, else None."""
    scrape = Scrape(url)
    return scrape if scrape.total("vllm:num_requests_running") + scrape.total("vllm:num_requests_waiting") else None


def test_every_exporter_serves_its_families_with_values_that_agree_with_the_load(
    running: LocalStack, tiny_llama: TinyOutput
) -> None:
    stack = running
    base = tiny_llama.model.name
    worker_urls = [stack.metrics_urls["worker-0"], stack.metrics_urls["worker-1"]]
    busy: list[Scrape] = []  # the workers' scrapes that showed the load running
    with ThreadPoolExecutor(len(REQUESTS)) as pool:
        futures = [pool.submit(_complete, stack.url, adapter or base, n) for adapter, n in REQUESTS]
        while not busy and not all(f.done() for f in futures):  # the workers, scraped while the load runs
            busy += [scrape for url in worker_urls if (scrape := _busy(url)) is not None]
            wait(futures, timeout=0.05)
        done = [f.result() for f in futures]
    generated = sum(d["usage"]["completion_tokens"] for d in done)
    prompt = sum(d["usage"]["prompt_tokens"] for d in done)
    assert generated == sum(n for _, n in REQUESTS)
    time.sleep(1.5)  # the workers' next stats reach the gateway and the dispatcher
    assert set(stack.metrics_urls) == {"gateway", "dispatcher", "migrator", "worker-0", "worker-1"}
    scrapes = {name: Scrape(url) for name, url in stack.metrics_urls.items()}
    docs = documented_by_section()
    workers = [scrapes["worker-0"], scrapes["worker-1"]]

    # Each serves every family documented for it (and the process-wide ones), each with a sample
    # (a family's # TYPE line alone is not one served), but for those that wait for an event.
    sections = {"Gateway": ["gateway"], "Dispatcher": ["dispatcher"], "Migrator": ["migrator"]}
    sections["Worker"] = ["worker-0", "worker-1"]
    for section, names in sections.items():
        for name in names:
            missing = set(docs[section]) | set(docs["Every service"])
            missing -= scrapes[name].names()
            assert not missing, (name, sorted(missing))
            unsampled = set(docs[section]) | set(docs["Every service"])
            unsampled -= scrapes[name].sampled() | EVENT_ONLY | SOME_WORKER
            assert not unsampled, (name, "no sample", sorted(unsampled))
    sampled = set().union(*(w.sampled() for w in [*workers, *busy]))
    assert SOME_WORKER <= sampled, sorted(SOME_WORKER - sampled)

    # While the load ran, a worker said so: requests running or waiting, and the mode it ran in.
    assert busy, "no scrape of a worker showed the load running"
    for w in busy:
        (mode,) = [s.labels["mode"] for s in w.of("dlora_worker_mode") if s.value == 1]
        assert mode in ("merged", "unmerged", "mixed"), mode
        assert w.of("dlora_adapter_requests") and 0.0 <= w.total("vllm:kv_cache_usage_perc") <= 1.0
        assert w.total("vllm:kv_cache_usage_perc") > 0 or not w.total("vllm:num_requests_running")  # they hold KV

    # The workers' figures agree with the load.
    assert sum(w.total("vllm:generation_tokens_total") for w in workers) == generated
    assert sum(w.total("dlora_generation_tokens_total") for w in workers) == generated
    assert sum(w.total("vllm:prompt_tokens_total") for w in workers) == prompt
    assert sum(w.total("dlora_prompt_tokens_total") for w in workers) == prompt
    # vLLM's tokens per step: the steps' prompt tokens computed (not found in the cache) and generated
    hits = sum(w.total("vllm:prefix_cache_hits_total") for w in workers)
    assert sum(w.total("vllm:iteration_tokens_total_sum") for w in workers) == prompt - hits + generated
    for w in workers:  # the KV capacity a router reads, as dlora's own settings say it
        ((cache, config),) = [
            (c.labels, d.labels) for c in w.of("vllm:cache_config_info") for d in w.of("dlora_engine_config_info")
        ]
        assert (cache["num_gpu_blocks"], cache["block_size"]) == (config["num_blocks"], config["block_size"])
    # every request's prompt (one prompt, repeated) was looked up in the prefix cache
    queries = sum(w.total("vllm:prefix_cache_queries_total") for w in workers)
    assert queries >= prompt and sum(w.total("vllm:prefix_cache_hits_total") for w in workers) <= queries
    # each worker stepped at least once per token of its longest request: the longest's in all
    steps = [s for w in workers for s in w.of("dlora_steps_total")]
    assert {s.labels["mode"] for s in steps} == {"merged", "unmerged", "mixed"}
    assert sum(s.value for s in steps) >= max(n for _, n in REQUESTS)
    for w in workers:
        assert w.total("vllm:num_requests_running") == w.total("vllm:num_requests_waiting") == 0  # all done
        assert w.total("dlora_num_requests_preempted") == 0
        assert 0.0 <= w.total("vllm:kv_cache_usage_perc") <= 1.0
        # idle now, whatever its last step's mode
        assert [s.labels["mode"] for s in w.of("dlora_worker_mode") if s.value == 1] == ["idle"]
        assert w.total("vllm:max_gpu_lora_adapters") >= 1
        (info,) = w.of("vllm:lora_requests_info")
        assert abs(info.value - time.time()) < 60
        # every registered adapter lives on one tier here, with its rank
        tiers = {(s.labels["adapter"], s.labels["tier"]) for s in w.of("dlora_adapter_resident")}
        assert {a for a, _ in tiers} == {"lora-1", "lora-2"} and len(tiers) == 2
        assert {s.labels["rank"] for s in w.of("dlora_adapter_resident")} <= {"4", "8", "16", "32", "64"}
        assert w.of("dlora_adapter_credit_seconds") and w.total("dlora_wait_bound_seconds") > 0  # the dlora policy
        (config,) = w.of("dlora_engine_config_info")  # the settings in effect
        assert config.labels["policy"] == "dlora" and config.labels["device"] == "cpu", config.labels
    loaded = {s.labels["adapter"] for w in workers for s in w.of("dlora_adapter_loads_total") if s.value > 0}
    merges = sum(s.value for w in workers for s in w.of("dlora_adapter_switches_total") if s.labels["kind"] == "merge")
    # each went into some worker's device slot, but for one that ran merged only (no slot needed)
    assert loaded <= {"lora-1", "lora-2"} and len(loaded) + min(merges, 2) >= 2, (loaded, merges)
    seconds = {s.labels["adapter"] for w in workers for s in w.of("dlora_adapter_load_seconds_total")}
    assert seconds == {s.labels["adapter"] for w in workers for s in w.of("dlora_adapter_loads_total")}
    # The dispatcher sent every request somewhere, to live workers; nothing was refused or lost.
    dispatcher = scrapes["dispatcher"]
    assert dispatcher.total("dlora_dispatch_decisions_total") == len(REQUESTS)
    assert dispatcher.total("dlora_workers_live") == 2
    assert dispatcher.total("dlora_dispatch_refusals_total") == dispatcher.total("dlora_worker_losses_total") == 0
    # The gateway saw them finish, by adapter, and timed each: first token, the tokens after it
    # (every request made more than one), end to end, and its wait at the worker.
    gateway = scrapes["gateway"]
    assert gateway.total("dlora_requests_total", adapter="lora-1", status="200") == 3
    for histogram in (
        "dlora_time_to_first_token_seconds",
        "dlora_time_per_output_token_seconds",
        "dlora_e2e_request_latency_seconds",
        "dlora_request_queue_time_seconds",
    ):
        assert gateway.total(histogram + "_count") == len(REQUESTS), histogram
        assert gateway.total(histogram + "_count", adapter="lora-1") == 3, histogram
        assert gateway.total(histogram + "_sum") > 0, histogram
    # vLLM's per-request histograms: each request's lengths, its n and max_tokens, its phases
    assert gateway.total("vllm:request_generation_tokens_sum") == generated
    assert gateway.total("vllm:request_prompt_tokens_sum") == prompt
    assert gateway.total("vllm:request_params_max_tokens_sum") == sum(n for _, n in REQUESTS)
    assert gateway.total("vllm:request_params_n_sum") == gateway.total("vllm:request_params_n_count") == len(REQUESTS)
    assert gateway.total("vllm:inter_token_latency_seconds_count") <= generated - len(REQUESTS)
    for phase in ("prefill", "decode", "inference"):
        assert gateway.total(f"vllm:request_{phase}_time_seconds_count") == len(REQUESTS), phase
    # The migrator has planned or not; its solve histogram counts what it did.
    migrator = scrapes["migrator"]
    assert migrator.total("dlora_migration_plan_solve_seconds_count") == migrator.total("dlora_migration_plans_total")

    # Every metric the Grafana dashboard queries is served by some exporter.
    served = set().union(*(s.names() for s in scrapes.values())) | {"up"}
    queried = {n for q in dashboard_queries(DASHBOARD) for n in metric_names(q)}
    assert not queried - served, sorted(queried - served)
