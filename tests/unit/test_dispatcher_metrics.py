"""The dispatcher's metrics from what it did (pure: no bus, no HTTP)."""

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dlora.services.dispatcher.metrics import REFUSALS, DispatcherMetrics


def _samples(m: DispatcherMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, its labels sorted) -> value."""
    text = generate_latest(m.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_decisions_refusals_losses_and_live_workers() -> None:
    live = [3]
    m = DispatcherMetrics(lambda: live[0])
    s = _samples(m)
    # every refusal reason is served from the start, at 0 (a rate over it is defined before the first)
    refusals = {dict(labels)["reason"]: v for (name, labels), v in s.items() if name == "dlora_dispatch_refusals_total"}
    assert refusals == dict.fromkeys(REFUSALS, 0.0)
    assert s["dlora_workers_live", ()] == 3 and s["dlora_worker_losses_total", ()] == 0
    assert not [name for name, _ in s if name == "dlora_dispatch_decisions_total"]  # none sent yet

    m.decisions.labels("w0").inc()
    m.decisions.labels("w0").inc()
    m.decisions.labels("w1").inc()
    m.refusals.labels("too-long").inc()
    m.losses.inc()
    m.recovered.inc(2)
    live[0] = 2  # read at scrape time
    s = _samples(m)
    assert s["dlora_dispatch_decisions_total", (("worker", "w0"),)] == 2
    assert s["dlora_dispatch_decisions_total", (("worker", "w1"),)] == 1
    assert s["dlora_dispatch_refusals_total", (("reason", "too-long"),)] == 1
    assert s["dlora_dispatch_refusals_total", (("reason", "no-worker"),)] == 0
    assert s["dlora_worker_losses_total", ()] == 1 and s["dlora_requests_recovered_total", ()] == 2
    assert s["dlora_workers_live", ()] == 2
