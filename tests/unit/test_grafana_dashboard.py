"""The shipped Grafana dashboard and Prometheus config: well formed, and naming only the metrics
docs/metrics.md documents, so a renamed metric cannot leave a panel silently empty."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.grafana import dashboard_queries, documented_by_section, family, metric_names, panels

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dlora.json"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"


def documented() -> dict[str, str]:
    """Metric name -> type, every section of docs/metrics.md together."""
    return {name: kind for names in documented_by_section().values() for name, kind in names.items()}


def is_documented(name: str, docs: dict[str, str]) -> bool:
    """``name`` is a documented metric, a documented histogram's ``_bucket``, ``_sum`` or ``_count``, or ``up``."""
    return name == "up" or name in docs or (family(name) != name and docs.get(family(name)) == "histogram")


def load_dashboard() -> dict[str, Any]:
    board: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return board


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        (
            "histogram_quantile(0.9, sum by (le, adapter) "
            '(rate(dlora_time_to_first_token_seconds_bucket{adapter=~"$adapter"}[$__rate_interval])))',
            {"dlora_time_to_first_token_seconds_bucket"},
        ),
        (
            "vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total",
            {"vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"},
        ),
        ("dlora_worker_mode == 1", {"dlora_worker_mode"}),
        ('sum(rate(x_total{job="a}b", le="0.5"}[5m:1m] offset 1h30m)) > bool 1e3', {"x_total"}),
        ('sum(a) by (le) / ignoring(le) group_left(worker) b{worker=~"${worker}"}', {"a", "b"}),
        ('label_replace(up, "dst", "$1", "src", "(.*)") and on (job) c unless d or e', {"up", "c", "d", "e"}),
        ("max without (mode) (m[$__interval]) # ratio of foo_total\n * Inf", {"m"}),
        ('{__name__="by_name", job="j"} @ start()', {"by_name"}),
        ("count(vllm:num_gpu_loaded_lora_adapters) - 0x1f + NaN", {"vllm:num_gpu_loaded_lora_adapters"}),
    ],
)
def test_metric_names_of_tricky_expressions(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_family_strips_only_histogram_suffixes() -> None:
    assert family("x_bucket") == family("x_sum") == family("x_count") == "x"
    assert family("dlora_requests_total") == "dlora_requests_total"
    assert family("x_bucket_total") == "x_bucket_total"


def test_queries_come_from_nested_panels_and_variables(tmp_path: Path) -> None:
    board = {
        "panels": [
            {"type": "timeseries", "targets": [{"expr": "a"}, {"expr": "b"}]},
            {"type": "row", "collapsed": True, "panels": [{"type": "stat", "targets": [{"expr": "c"}]}]},
        ],
        "templating": {
            "list": [
                {"type": "datasource", "query": "prometheus"},
                {"type": "query", "query": 'label_values(d{job="x", env=~"a,b"}, worker)'},
                {"type": "query", "query": {"query": "label_values(e, adapter)", "refId": "V"}},
                {"type": "query", "query": "label_values(job)"},
                {"type": "query", "query": "query_result(topk(3, f))"},
                {"type": "custom", "query": "x,y"},
            ]
        },
    }
    path = tmp_path / "board.json"
    path.write_text(json.dumps(board))
    assert dashboard_queries(path) == ["a", "b", "c", 'd{job="x", env=~"a,b"}', "e", "topk(3, f)"]


def test_metrics_doc_lists_both_names_of_a_cell() -> None:
    docs = documented()
    assert docs["dlora_num_requests_running"] == docs["vllm:num_requests_running"] == "gauge"
    assert docs["dlora_time_to_first_token_seconds"] == "histogram"
    assert is_documented("dlora_time_to_first_token_seconds_bucket", docs)
    assert not is_documented("dlora_requests_bucket", docs) and not is_documented("no_such_metric", docs)


def test_dashboard_is_well_formed() -> None:
    board = load_dashboard()
    assert (board["uid"], board["title"]) == ("dlora", "dlora")
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert {"worker", "adapter"} <= variables.keys()
    every = list(panels(board))
    ids = [p["id"] for p in every]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in every:
        if panel["type"] == "row":
            continue
        title = panel.get("title")
        assert panel.get("description"), title
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, title
        targets = panel.get("targets", [])
        assert targets and all(t.get("expr") for t in targets), title
        assert len({t["refId"] for t in targets}) == len(targets), title


def test_dashboard_names_only_documented_metrics() -> None:
    docs = documented()
    queried = {name for expr in dashboard_queries(DASHBOARD) for name in metric_names(expr)}
    assert queried, "the dashboard has no queries"
    assert sorted(n for n in queried if not is_documented(n, docs)) == []


def test_dashboard_reads_counters_only_through_a_range() -> None:
    # a raw counter is its total since the process started: a panel wants its rate or increase
    # (template variables may select a counter: they only read its labels)
    docs = documented()
    for expr in (t["expr"] for p in panels(load_dashboard()) for t in p.get("targets", [])):
        for name in metric_names(expr):
            if docs.get(name) == "counter" or (family(name) != name and docs.get(family(name)) == "histogram"):
                uses = re.finditer(re.escape(name) + r"(?![\w:])(\{[^}]*\})?(\s*\[)?", expr)
                assert all(m.group(2) for m in uses), f"{name} without a range in {expr}"


def test_prometheus_config_scrapes_every_service() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    assert config["global"]["scrape_interval"] == "5s"
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs.keys() == {"dlora-gateway", "dlora-dispatcher", "dlora-migrator", "dlora-worker"}

    def ports(job: str) -> set[int]:
        return {int(t.rsplit(":", 1)[1]) for c in jobs[job]["static_configs"] for t in c["targets"]}

    assert jobs["dlora-gateway"]["metrics_path"] == "/metrics" and ports("dlora-gateway") == {8000}
    assert ports("dlora-dispatcher") == {9101} and ports("dlora-migrator") == {9102}
    assert ports("dlora-worker") == set(range(9200, 9208))
    # the dashboard's `up` panel selects jobs by this prefix
    assert all(name.startswith("dlora-") for name in jobs)
