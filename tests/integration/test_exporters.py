"""Every exporter of a running stack (`dlora up`'s: the services as processes, real NATS and
Redis), scraped over HTTP after a short load: each serves every family docs/metrics.md lists for
it, with values that agree with the load, and every metric the Grafana dashboard queries is one
of them."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from dlora.model.make_tiny import TinyOutput
from dlora.services.launcher import LocalStack
from dlora.services.servers import free_port
from tests.grafana import dashboard_queries, documented_by_section, metric_names

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dlora.json"
REQUESTS = [("lora-1", 12), ("lora-2", 9), ("lora-1", 7), (None, 10), ("lora-2", 16), ("lora-1", 5)]


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

    def of(self, name: str, **labels: str) -> list[Sample]:
        return [s for s in self.samples if s.name == name and labels.items() <= s.labels.items()]

    def total(self, name: str, **labels: str) -> float:
        return sum(s.value for s in self.of(name, **labels))


@pytest.fixture(scope="module")
def running(tiny_llama: TinyOutput) -> Iterator[LocalStack]:
    loras = [f"{name}={tiny_llama.adapters[name]}" for name in ("lora-1", "lora-2")]
    worker_env = {"DLORA_WORKER_ENGINE__DEVICE": "cpu", "DLORA_WORKER_TORCH_THREADS": "1"}
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


def test_every_exporter_serves_its_families_with_values_that_agree_with_the_load(
    running: LocalStack, tiny_llama: TinyOutput
) -> None:
    stack = running
    base = tiny_llama.model.name
    with ThreadPoolExecutor(len(REQUESTS)) as pool:
        done = list(pool.map(lambda r: _complete(stack.url, r[0] or base, r[1]), REQUESTS))
    generated = sum(d["usage"]["completion_tokens"] for d in done)
    assert generated == sum(n for _, n in REQUESTS)
    time.sleep(1.5)  # the workers' next stats reach the gateway and the dispatcher
    assert set(stack.metrics_urls) == {"gateway", "dispatcher", "migrator", "worker-0", "worker-1"}
    scrapes = {name: Scrape(url) for name, url in stack.metrics_urls.items()}
    docs = documented_by_section()
    workers = [scrapes["worker-0"], scrapes["worker-1"]]

    # Each serves every family documented for it (and the process-wide ones).
    sections = {"Gateway": ["gateway"], "Dispatcher": ["dispatcher"], "Migrator": ["migrator"]}
    sections["Worker"] = ["worker-0", "worker-1"]
    for section, names in sections.items():
        for name in names:
            missing = set(docs[section]) | set(docs["Every service"])
            missing -= scrapes[name].names()
            assert not missing, (name, sorted(missing))

    # The workers' figures agree with the load.
    assert sum(w.total("vllm:generation_tokens_total") for w in workers) == generated
    assert sum(w.total("dlora_generation_tokens_total") for w in workers) == generated
    assert sum(w.total("vllm:prompt_tokens_total") for w in workers) >= len(REQUESTS)
    assert sum(w.total("vllm:prefix_cache_queries_total") for w in workers) >= len(REQUESTS)
    assert sum(w.total("dlora_steps_total") for w in workers) > 0
    for w in workers:
        assert w.total("vllm:num_requests_running") == w.total("vllm:num_requests_waiting") == 0  # all done
        assert 0.0 <= w.total("vllm:kv_cache_usage_perc") <= 1.0
        assert sum(s.value for s in w.of("dlora_worker_mode")) <= 1  # one mode at most: the last step's
        assert w.total("vllm:max_gpu_lora_adapters") >= 1
        (info,) = w.of("vllm:lora_requests_info")
        assert abs(info.value - time.time()) < 60
        # every registered adapter lives on one tier here, with its rank
        tiers = {(s.labels["adapter"], s.labels["tier"]) for s in w.of("dlora_adapter_resident")}
        assert {a for a, _ in tiers} == {"lora-1", "lora-2"} and len(tiers) == 2
        assert {s.labels["rank"] for s in w.of("dlora_adapter_resident")} <= {"4", "8", "16", "32", "64"}
        assert w.of("dlora_adapter_credit_seconds") and w.total("dlora_wait_bound_seconds") > 0  # the dlora policy
    loaded = {s.labels["adapter"] for w in workers for s in w.of("dlora_adapter_loads_total") if s.value > 0}
    merges = sum(s.value for w in workers for s in w.of("dlora_adapter_switches_total") if s.labels["kind"] == "merge")
    # each went into some worker's device slot, but for one that ran merged only (no slot needed)
    assert loaded <= {"lora-1", "lora-2"} and len(loaded) + min(merges, 2) >= 2, (loaded, merges)
    # The dispatcher sent every request somewhere, to live workers; nothing was refused or lost.
    dispatcher = scrapes["dispatcher"]
    assert dispatcher.total("dlora_dispatch_decisions_total") == len(REQUESTS)
    assert dispatcher.total("dlora_workers_live") == 2
    assert dispatcher.total("dlora_dispatch_refusals_total") == dispatcher.total("dlora_worker_losses_total") == 0
    # The gateway saw them finish, by adapter.
    gateway = scrapes["gateway"]
    assert gateway.total("dlora_requests_total", adapter="lora-1", status="200") == 3
    assert gateway.total("dlora_time_to_first_token_seconds_count") == len(REQUESTS)
    # The migrator has planned or not; its solve histogram counts what it did.
    migrator = scrapes["migrator"]
    assert migrator.total("dlora_migration_plan_solve_seconds_count") == migrator.total("dlora_migration_plans_total")

    # Every metric the Grafana dashboard queries is served by some exporter.
    served = set().union(*(s.names() for s in scrapes.values())) | {"up"}
    queried = {n for q in dashboard_queries(DASHBOARD) for n in metric_names(q)}
    assert not queried - served, sorted(queried - served)
