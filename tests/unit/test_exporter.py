"""What ``GET /metrics`` serves, in the format the scraper asks for (pure: no server): every
service's registry, then the process-wide one; OpenMetrics with each family's unit to a scraper
that asks for it (a Prometheus does), Prometheus's text format to one that does not."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from dlora.common.exporter import metrics_endpoint as exporter_endpoint
from dlora.common.exporter import metrics_response, render
from dlora.common.messages import TokenChunk
from dlora.services.dispatcher.metrics import DispatcherMetrics
from dlora.services.gateway.metrics import Metrics as GatewayMetrics
from dlora.services.migrator.metrics import MigratorMetrics
from dlora.services.worker.metrics import WorkerMetrics
from tests.grafana import documented_by_section
from tests.unit.test_worker_metrics import _view

# What a Prometheus (2.x and 3.x) sends.
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,"
    "text/plain;version=0.0.4;q=0.3,*/*;q=0.2"
)
UNITS = ("seconds", "bytes", "ratio")


def registries() -> dict[str, CollectorRegistry]:
    """Every service's registry, with a sample in each labelled family."""
    gateway = GatewayMetrics()
    for histogram in (gateway.ttft, gateway.tpot, gateway.e2e, gateway.queue):
        histogram.labels("a").observe(0.1)
    worker = WorkerMetrics("w0", _view)
    worker.moved(100, "queue-delay")
    dispatcher = DispatcherMetrics(lambda: 1)
    dispatcher.decisions.labels("w0").inc()
    migrator = MigratorMetrics()
    migrator.makespan.labels("before").set(1.0)
    return {
        "Gateway": gateway.registry,
        "Worker": worker.registry,
        "Dispatcher": dispatcher.registry,
        "Migrator": migrator.registry,
    }


@pytest.mark.parametrize("section", ["Gateway", "Worker", "Dispatcher", "Migrator"])
def test_openmetrics_to_a_prometheus_with_every_unit_and_the_same_names(section: str) -> None:
    registry = registries()[section]
    assert metrics_response(registry, PROMETHEUS_ACCEPT).content_type == "application/openmetrics-text"
    body, content_type = render(registry, PROMETHEUS_ACCEPT)
    assert content_type.startswith("application/openmetrics-text; version=1.0.0")
    text = body.decode()
    assert text.endswith("# EOF\n") and text.count("# EOF") == 1  # one exposition, process families in it
    families = {f.name: f for f in openmetrics_families(text)}  # the strict parser: it is valid OpenMetrics
    assert "process_cpu_seconds" in families or "python_info" in families
    # Each family's samples under its name: asked as Prometheus 2.x asks, prometheus_client wrote
    # vllm:num_requests_waiting's samples as vllm_num_requests_waiting (a helper's finding)
    samples = {sample.name for family in families.values() for sample in family.samples}
    assert not any(name.startswith("vllm_") for name in samples)
    assert section != "Worker" or any(name.startswith("vllm:") for name in samples)
    # Every documented family under its documented name (a counter's family drops `_total`, a
    # histogram's keeps it: vllm:iteration_tokens_total), and each whose name ends in a unit says so.
    for name in documented_by_section()[section]:
        family = families[name] if name in families else families[name.removesuffix("_total")]
        unit = next((u for u in UNITS if family.name.endswith("_" + u)), "")
        assert family.unit == unit, (family.name, family.unit)


def test_prometheus_text_without_an_accept_header_with_the_same_samples() -> None:
    registry = registries()["Migrator"]
    text, content_type = render(registry)
    assert content_type.startswith("text/plain; version=0.0.4")
    assert b"# UNIT" not in text and b"# EOF" not in text
    plain = {s.name: s.value for f in text_string_to_metric_families(text.decode()) for s in f.samples}
    opened, _ = render(registry, PROMETHEUS_ACCEPT)
    strict = {s.name: s.value for f in openmetrics_families(opened.decode()) for s in f.samples}
    assert {n: v for n, v in plain.items() if n.startswith("dlora_")} == {
        n: v for n, v in strict.items() if n.startswith("dlora_")
    }


@pytest.mark.parametrize(
    "accept",
    [
        PROMETHEUS_ACCEPT,  # a Prometheus 2.x: no escaping named
        "application/openmetrics-text",  # no version: prometheus_client forces underscores
        # a Prometheus 3 set to legacy names
        "application/openmetrics-text;version=1.0.0;escaping=underscores;q=0.6,text/plain;version=0.0.4;q=0.3",
        # a Prometheus 3 set to dots (which doubles underscores): the names went out as they are
        # under a header saying dots (a helper); said now as underscores, what they are
        "application/openmetrics-text;version=1.0.0;escaping=dots",
    ],
)
def test_openmetrics_samples_keep_the_vllm_names_however_asked(accept: str) -> None:
    """A helper's finding, then a review's: asked for underscores, prometheus_client wrote
    ``vllm:num_requests_waiting``'s samples as ``vllm_num_requests_waiting`` under a TYPE line
    keeping the colon (prometheus/client_python#1177). Every name is legal as it is, so written as
    it is, the body is what any escaping means."""
    body, content_type = render(registries()["Worker"], accept)
    assert content_type.startswith("application/openmetrics-text")
    assert "escaping=dots" not in content_type and "escaping=values" not in content_type  # what it is
    samples = {s.name for f in openmetrics_families(body.decode()) for s in f.samples}
    assert not any(name.startswith("vllm_") for name in samples)
    assert any(name.startswith("vllm:") for name in samples)


def test_every_name_is_legal_unescaped() -> None:
    """What lets ``render`` write OpenMetrics names as they are for a scraper that asked for them
    escaped: a name that needed escaping would be quoted, and a Prometheus 2.x refuses the scrape."""
    import re

    metric, label = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*"), re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
    for registry in registries().values():
        text = render(registry)[0].decode()  # Prometheus's text format: no escaping at all
        for family in text_string_to_metric_families(text):
            assert metric.fullmatch(family.name), family.name
            for sample in family.samples:
                assert metric.fullmatch(sample.name) and all(map(label.fullmatch, sample.labels)), sample


def test_latency_histograms_reach_two_hours_and_vllms_names_keep_vllms_buckets() -> None:
    """They ended at 60 s: every slower request fell in +Inf and a slow hour's P50 and P99 both
    read 60 (a helper's Prometheus, fed requests of 90, 200 and 600 s)."""
    from dlora.services.gateway.metrics import Metrics

    metrics = Metrics("model")
    for seconds in (90.0, 200.0, 600.0):
        metrics.e2e.labels("lora-0").observe(seconds)
        metrics.vllm["e2e_request_latency_seconds"].labels("model").observe(seconds)
    metrics.vllm["time_to_first_token_seconds"].labels("model").observe(0.03)
    text = generate_latest(metrics.registry).decode()
    assert 'dlora_e2e_request_latency_seconds_bucket{adapter="lora-0",le="240.0"} 2.0' in text
    assert 'vllm:e2e_request_latency_seconds_bucket{le="960.0",model_name="model"} 3.0' in text
    assert 'vllm:time_to_first_token_seconds_bucket{le="0.04",model_name="model"} 1.0' in text  # vLLM's edges


def test_the_gateway_drops_the_series_of_adapters_no_longer_registered() -> None:
    """Each adapter name ever served held ~94 series for good (a helper: 14,609 after 150 adapters
    registered, used and deleted); the status page's tally likewise."""
    from dlora.services.gateway.metrics import PRIVATE, Metrics, RequestTimer

    metrics = Metrics("model")
    for name, public in (("kept", True), ("deleted", True), ("model", True), ("mine", False)):
        timer = RequestTimer(metrics, name, public)
        timer.chunk(TokenChunk(request_id=name, seq=0, token_ids=[5], queue_seconds=0.01), 1)
        timer.done(3, 3)
    metrics.failed("?", 404)
    assert metrics.keep_only(["kept", "deleted"]) == 0
    assert metrics.keep_only(["kept"]) == 0  # absent once: a Redis emptied a moment drops nothing
    assert metrics.keep_only(["kept"]) == 1  # absent twice: deleted's series (its request count, four histograms)
    text = generate_latest(metrics.registry).decode()
    assert 'adapter="deleted"' not in text and 'adapter="kept"' in text and f'adapter="{PRIVATE}"' in text
    assert 'adapter="model"' in text and 'adapter="?"' in text
    assert set(metrics.traffic.by_label) == {"kept", "model", "?"}  # mine: private, not registered now


def test_the_gateway_names_a_bounded_number_of_public_adapters() -> None:
    """A helper's trial: one request to each of 4,000 adapters left 301,000 series (22 MB a
    scrape). The first ``max_adapter_labels`` served are named, until removed; the rest are
    "other"; the base model and a tenant's own ("private") are labelled as before."""
    from dlora.services.gateway.metrics import OTHER, PRIVATE, Metrics, RequestTimer

    metrics = Metrics("model", max_adapter_labels=2)
    for name, public in (("a", True), ("b", True), ("c", True), ("model", True), ("mine", False), ("a", True)):
        RequestTimer(metrics, name, public).done(3, 3)
    labels = {s.labels["adapter"] for m in metrics.requests.collect() for s in m.samples}
    assert labels == {"a", "b", OTHER, "model", PRIVATE}
    running = RequestTimer(metrics, "b", True)  # still running when b's place is freed
    metrics.keep_only(["a"])
    metrics.keep_only(["a"])  # b removed: its place is free
    assert metrics.label("c") == "c" and metrics.label("d") == OTHER
    running.done(3, 3)  # written where its label is now (c took the place), not outside the bound: a review
    labels = {s.labels["adapter"] for m in metrics.requests.collect() for s in m.samples}
    assert labels == {"a", OTHER, "model", PRIVATE}
    # an adapter named "other" is not counted with the ones past the bound (a review)
    assert OTHER != "other" and Metrics("model", max_adapter_labels=1).label("other") == "other"
    # nor a public adapter named "private" with the tenants' own
    assert PRIVATE != "private" and Metrics("model").label("private") == "private"


async def test_the_gateways_page_is_rendered_beside_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """A helper's trial: 4,000 adapters' series (22 MB) took 3-8 s to render on the gateway's event
    loop, and every request waited that long. The same page, rendered on another thread."""
    import threading

    from dlora.common import exporter

    rendered_on: list[threading.Thread] = []
    render_here = exporter.render

    def render_and_say(registry: CollectorRegistry, accept: str = "") -> tuple[bytes, str]:
        rendered_on.append(threading.current_thread())
        return render_here(registry, accept)

    monkeypatch.setattr(exporter, "render", render_and_say)
    registry = registries()["Gateway"]
    response = await exporter.metrics_response_beside(registry, "text/plain")
    assert rendered_on and rendered_on[0] is not threading.main_thread()
    assert isinstance(response.body, bytes) and b"# TYPE dlora_requests_total counter" in response.body


async def test_a_workers_page_is_read_on_its_loop_and_rendered_beside_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """A helper's measure: a worker's page, one ``dlora_adapter_resident`` series per registered
    adapter, took 54 ms to render at 4,000 adapters and 0.3-0.4 s at 20,000, on the event loop
    that delivers its chunks and starts its steps: every scrape stalled every stream that long.
    The view (the loop's own state) is still read on the loop; the page is made from it beside."""
    import threading

    import aiohttp

    from dlora.common.settings import Common
    from dlora.services.servers import free_port
    from dlora.services.worker import metrics as worker_metrics

    viewed_on: list[threading.Thread] = []
    made_on: list[threading.Thread] = []
    families_here = worker_metrics.families

    def view() -> worker_metrics.WorkerView:
        viewed_on.append(threading.current_thread())
        return _view()

    def families_and_say(v: worker_metrics.WorkerView):  # type: ignore[no-untyped-def]
        made_on.append(threading.current_thread())
        return families_here(v)

    monkeypatch.setattr(worker_metrics, "families", families_and_say)
    m = WorkerMetrics("w0", view)
    s = Common(metrics_port=free_port(), metrics_host="127.0.0.1")
    async with (
        exporter_endpoint(s, m.registry, m.take),
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{s.metrics_port}/metrics") as r,
    ):
        text = await r.text()
    assert r.status == 200 and 'dlora_num_requests_running{worker="w0"} 2.0' in text
    assert viewed_on == [threading.main_thread()]  # (pytest-asyncio's loop runs on the main thread)
    assert made_on and all(t is not threading.main_thread() for t in made_on)


@pytest.mark.parametrize("accept", ["", PROMETHEUS_ACCEPT])
@pytest.mark.parametrize("section", ["Gateway", "Worker", "Dispatcher", "Migrator"])
def test_no_created_series_as_vllm_serves_none(section: str, accept: str) -> None:
    """prometheus_client wrote a ``_created`` sample beside every counter and histogram series:
    in Prometheus's text format each is a series of its own (``dlora_requests_created{adapter,
    status}``, ``vllm:e2e_request_latency_seconds_created``), 5 of the ~94 each adapter name costs
    the gateway, which vLLM does not serve (it turns them off: ``disable_created_metrics``). A
    helper's finding, replaying label-cardinality reports."""
    body, _ = render(registries()[section], accept)
    assert b"_created" not in body


def test_the_gateways_tidy_reads_no_series_on_its_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """``keep_only`` runs on the gateway's event loop every minute; it read every sample of the
    four latency histograms to learn their adapter labels: 0.29 s at the 256 adapters named
    (measured here), every stream on the gateway held that long each minute. A helper's finding,
    replaying "metrics blocks the event loop" reports. The labels are the gateway's own (those it
    named); no family's samples are read."""
    from dlora.services.gateway.metrics import Metrics, RequestTimer

    metrics = Metrics("model")
    for name in ("kept", "deleted"):
        timer = RequestTimer(metrics, name)
        timer.chunk(TokenChunk(request_id=name, seq=0, token_ids=[5], queue_seconds=0.01), 1)
        timer.done(3, 3)
    metrics.failed("deleted", 400)
    for family in (metrics.requests, *metrics._ours):

        def unread() -> None:
            raise AssertionError("a family's samples read")

        monkeypatch.setattr(family, "collect", unread)
    metrics.keep_only(["kept"])
    assert metrics.keep_only(["kept"]) == 1  # deleted's series: its label's, in every family
    monkeypatch.undo()
    text = generate_latest(metrics.registry).decode()
    assert 'adapter="deleted"' not in text and 'adapter="kept"' in text


def test_vllms_latency_names_time_each_choice_by_its_own_first_token_and_end(monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM observes each of n as its own request (its IterationStats): here a choice that came
    first and ended at once, and one whose first token came later and took 4 tokens. Ours time the
    request once, from its first chunk to its end."""
    import types

    from dlora.common.messages import FinishReason
    from dlora.services.gateway import metrics as gateway_metrics
    from dlora.services.gateway.metrics import Metrics, RequestTimer

    now = [100.0]
    monkeypatch.setattr(gateway_metrics, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    metrics = Metrics("model")
    timer = RequestTimer(metrics, "lora-0", start=99.0)
    for at, rid, seq, finish, tokens in (
        (100.0, "a", 0, None, 1),
        (101.0, "b", 0, None, 1),
        (102.0, "a", 1, FinishReason.LENGTH, 2),
        (107.0, "b", 3, FinishReason.STOP, 4),
    ):
        now[0] = at
        timer.chunk(TokenChunk(request_id=rid, seq=seq, token_ids=[5], finish_reason=finish, queue_seconds=0.5), tokens)
    timer.done(4, 6)

    def observed(family: object) -> list[float]:
        return [s.value for f in family.collect() for s in f.samples if s.name.endswith(("_sum", "_count"))]  # type: ignore[attr-defined]

    assert observed(metrics.vllm["time_to_first_token_seconds"]) == [2.0, 1.0 + 2.0]  # count, sum
    assert observed(metrics.vllm["e2e_request_latency_seconds"]) == [2.0, 3.0 + 8.0]
    assert observed(metrics.vllm["request_time_per_output_token_seconds"]) == [
        2.0,
        2.0 + 2.0,
    ]  # (102-100)/1, (107-101)/3
    assert observed(metrics.vllm["request_queue_time_seconds"]) == [2.0, 1.0]
    assert observed(metrics.ttft) == [1.0, 1.0] and observed(metrics.e2e) == [1.0, 8.0]
    assert observed(metrics.tpot) == [1.0, 7.0 / 3]  # the longest choice's tokens, from the first chunk


def test_vllms_time_per_output_token_observes_each_finished_choice_a_one_token_one_as_zero(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """vLLM observes request_time_per_output_token once each finished request, 0 for one of a
    single token or whose tokens came in one step (IterationStats.update_from_finished_request:
    ``decode_time / (n - 1) if n - 1 > 0 else 0``), so its ``_count`` is e2e's. A max_tokens 1
    choice, and one whose tokens came in one chunk, were left out: an n = 4 max_tokens = 1 request
    read 4 in e2e's ``_count`` and 0 here, and a dashboard's mean per-token time went up."""
    import types

    from dlora.common.messages import FinishReason
    from dlora.services.gateway import metrics as gateway_metrics
    from dlora.services.gateway.metrics import Metrics, RequestTimer

    now = [100.0]
    monkeypatch.setattr(gateway_metrics, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    metrics = Metrics("model")
    timer = RequestTimer(metrics, "lora-0", start=99.0)
    for at, rid, ids in ((100.0, "a", [5]), (101.0, "b", [5, 6, 7])):  # each over in its first chunk
        now[0] = at
        timer.chunk(TokenChunk(request_id=rid, seq=0, token_ids=ids, finish_reason=FinishReason.LENGTH), len(ids))

    def count_and_sum(name: str) -> list[float]:
        family = metrics.vllm[name]
        return [s.value for f in family.collect() for s in f.samples if s.name.endswith(("_sum", "_count"))]

    assert count_and_sum("e2e_request_latency_seconds") == [2.0, 1.0 + 2.0]
    assert count_and_sum("request_time_per_output_token_seconds") == [2.0, 0.0]


def test_a_workers_unavailable_error_ending_as_the_gateway_stops_is_still_an_error() -> None:
    """The gateway's stop cuts what still runs with its own UNAVAILABLE error, counted "abort".
    It was told from any other by a flag set at the stop: a choice failed by the server (no
    worker left to run it, its chunk timeout) whose handler was still writing its error to a slow
    client when the gateway began to stop was counted "abort" too, and the error hidden."""
    from dlora.common.messages import ErrorCode
    from dlora.services.gateway.metrics import SHUTTING_DOWN, Metrics
    from dlora.services.gateway.replies import ReplyStream

    metrics = Metrics("model")
    failed, cut = ReplyStream("a"), ReplyStream("b")
    failed.take(TokenChunk(request_id="a", seq=0, error="no worker is available", error_code=ErrorCode.UNAVAILABLE))
    cut.take(TokenChunk(request_id="b", seq=0, error=SHUTTING_DOWN, error_code=ErrorCode.UNAVAILABLE))
    metrics.finished([failed, cut])
    samples = [s for f in metrics.success.collect() for s in f.samples if s.name.endswith("_total")]
    by_reason = {s.labels["finished_reason"]: s.value for s in samples}
    assert (by_reason["error"], by_reason["abort"]) == (1.0, 1.0), by_reason
