"""The /v1/status document from what a gateway heard (pure)."""

import msgspec

from dlora.common.messages import (
    AdapterEntry,
    AdapterResidency,
    MovePlan,
    MoveRequest,
    PlanMethod,
    PlanTrigger,
    RequestLoad,
    WorkerStats,
)
from dlora.services.gateway.status import ClusterStatus, ClusterView, Traffic, cluster_status


def _stats(worker: str, adapters: list[AdapterResidency], requests: list[RequestLoad], mode: str = "") -> WorkerStats:
    return WorkerStats(
        worker=worker,
        running=sum(r.running for r in requests),
        waiting=sum(not r.running for r in requests),
        free_blocks=30,
        total_blocks=40,
        block_size=16,
        max_loras=2,
        mode=mode,
        adapters=adapters,
        requests=requests,
    )


def test_workers_adapters_and_plans_as_the_page_shows_them() -> None:
    view = ClusterView()
    merged_a = AdapterResidency(name="a", slot=None, merged=True)
    view.heard(
        _stats(
            "w1",
            [merged_a, AdapterResidency(name="b", slot=None, merged=False)],
            [RequestLoad(request_id="1", adapter="a", context_tokens=4, remaining_tokens=3)],
            "merged",
        ),
        10.0,
    )
    w0 = _stats("w0", [AdapterResidency(name="a", slot=1, merged=False)], [])
    reads = {"adapter_read_seconds": 1.5, "adapter_read_bytes": 24.0e6, "adapter_read_seconds_per_byte": 1e-8}
    view.heard(msgspec.structs.replace(w0, **reads, output_tokens_quantiles=[3] * 16), 11.0)
    view.heard(_stats("gone", [], []), 0.0)
    move = MoveRequest(request_id="1", adapter="a", to_worker="w0", ship_kv=True)
    for i in range(3):
        view.planned(MovePlan(plan_id=f"p{i}", moves=[move], method=PlanMethod.ILP, trigger=PlanTrigger.QUEUE_DELAY))
    traffic = Traffic()
    for seconds in (0.1, 0.2, 0.3):
        traffic.first_token("a", seconds)
        traffic.done("a", seconds * 10, 8)
    traffic.failed("a")
    traffic.aborted("a")
    registered = [
        AdapterEntry(name="b", path="/b", rank=8, created=0.0),
        AdapterEntry(name="a", path="/a", rank=16, created=0.0, version="v"),
    ]
    doc = cluster_status(view.live(12.0, 5.0), list(view.plans), registered, traffic, "llama", "gw", 1e9)
    doc = msgspec.json.decode(msgspec.json.encode(doc), type=ClusterStatus)  # what a script reads
    assert [w.worker for w in doc.workers] == ["w0", "w1"]  # live ones, by name
    w1 = doc.workers[1]
    assert (w1.mode, w1.merged, w1.running, w1.kv_cache_usage, w1.stats_age_s) == ("merged", "a", 1, 0.25, 2.0)
    assert doc.workers[0].mode == "idle"  # no request held
    assert (doc.workers[0].adapter_read_seconds, w1.adapter_read_seconds) == (1.5, 0.0)  # what loads are priced at
    assert (doc.workers[0].adapter_read_bytes, doc.workers[0].adapter_read_seconds_per_byte) == (24.0e6, 1e-8)
    assert (doc.workers[0].output_tokens_quantiles, w1.output_tokens_quantiles) == ([3] * 16, [])  # a request's price
    # a merged adapter needs no slot: its weights are in the device's
    assert [p.tier for p in doc.workers[0].adapters + w1.adapters] == ["gpu", "gpu", "cpu"]
    assert [a.name for a in doc.adapters] == ["llama", "a", "b"] and doc.adapters[0].base
    a = doc.adapters[1]
    assert (a.rank, a.version, a.placement, a.running, a.waiting) == (16, "v", {"w0": "gpu", "w1": "gpu"}, 1, 0)
    assert (a.requests, a.errors, a.aborted, a.tokens, a.ttft_p50_s, a.e2e_p50_s) == (3, 1, 1, 24, 0.2, 2.0)
    assert doc.adapters[2].requests == 0 and doc.adapters[2].ttft_p50_s is None
    assert doc.adapters[2].placement == {"w1": "cpu"}
    assert [p.plan_id for p in doc.migrations] == ["p2", "p1", "p0"]  # newest first
    assert doc.migrations[0].trigger == "queue-delay" and doc.migrations[0].moves[0].ship_kv


def test_a_worker_with_no_request_shows_idle_not_its_last_step_s_mode() -> None:
    view = ClusterView()
    view.heard(_stats("w0", [], [], "mixed"), 10.0)  # its last step ran mixed, then it emptied
    view.heard(
        _stats("w1", [], [RequestLoad(request_id="1", adapter=None, context_tokens=4, remaining_tokens=3)]), 10.0
    )
    doc = cluster_status(view.live(10.0, 5.0), [], [], Traffic(), "llama", "gw", 1e9)
    assert [(w.worker, w.mode) for w in doc.workers] == [("w0", "idle"), ("w1", "")]  # w1: no step yet


def test_a_worker_is_seen_stepping_only_when_its_step_count_moves() -> None:
    """What the gateway's patient wait asks: a request queued at a worker that steps waits on;
    one at a worker whose count stands still (wedged, heartbeat or not) or is gone times out."""
    view = ClusterView()
    view.heard(msgspec.structs.replace(_stats("w1", [], []), steps=5), now=1.0)
    assert view.stepped_since("w1", since=0.5)  # first heard counts as a step
    view.heard(msgspec.structs.replace(_stats("w1", [], []), steps=5), now=3.0)
    assert not view.stepped_since("w1", since=2.0)  # the same count: wedged
    view.heard(msgspec.structs.replace(_stats("w1", [], []), steps=9), now=4.0)
    assert view.stepped_since("w1", since=3.5)  # however late the check that reads it
    assert not view.stepped_since("w1", since=4.5)  # not heard stepping since: gone or wedged
    assert not view.stepped_since("w2", since=0.0)  # never heard


def test_a_worker_silent_for_ten_ttls_is_forgotten() -> None:
    """Every worker id ever heard from was kept (a helper: a replaced host's new id, an autoscaled one's)."""
    view = ClusterView()
    view.heard(_stats("old", [], []), 0.0)
    view.heard(_stats("new", [], []), 40.0)
    assert [st.worker for st, _ in view.live(45.0, 5.0)] == ["new"] and "old" in view.workers  # within 10 TTLs
    view.heard(_stats("new", [], []), 50.0)
    assert [st.worker for st, _ in view.live(51.0, 5.0)] == ["new"] and "old" not in view.workers
    assert not view.stepped_since("old", -1.0)


def test_latency_percentiles_as_statistics_makes_them_each_alone(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Each adapter's P50 and P90 were read from ``statistics.quantiles``'s 99 cut points: every
    poll of an open status page (once a second) took 0.77 s of the gateway's event loop at 4,000
    adapters that had served 20 requests each (a helper's measure), stalling every stream. Each
    percentile is now worked out alone, the same values."""
    import random
    import statistics
    from collections import deque

    from dlora.services.gateway.status import _quantile

    rng = random.Random(5)
    for n in (1, 2, 3, 7, 20, 199, 200):
        values = deque(rng.expovariate(3.0) for _ in range(n))
        for q in (0.5, 0.9):
            want = values[0] if n == 1 else statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]
            assert abs(_quantile(sorted(values), q) - want) <= 1e-12 * max(1.0, abs(want)), (n, q)  # type: ignore[operator]
    assert _quantile(deque(), 0.5) is None

    def all_99(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("99 cut points made for one")

    monkeypatch.setattr(statistics, "quantiles", all_99)
    traffic, registered = _fifty_adapters_served()
    doc = cluster_status([], [], registered, traffic, "model", "g", 0.0)
    assert {(round(a.ttft_p50_s or 0, 9), round(a.e2e_p90_s or 0, 9)) for a in doc.adapters[1:]} == {(0.95, 3.42)}


def test_a_poll_works_out_again_only_the_percentiles_of_adapters_with_new_latencies(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Every poll sorted each adapter's latencies four times: ~0.4 s of the gateway's event loop per
    poll of each open status page at 4,000 adapters with 200 latencies each (this session's measure),
    though most had served nothing since the last poll. The same figures, the others' reused."""
    from dlora.services.gateway import status

    traffic, registered = _fifty_adapters_served()
    first = cluster_status([], [], registered, traffic, "model", "g", 0.0)
    sorts: list[int] = []

    def counted(values, **kwargs):  # type: ignore[no-untyped-def]
        out = sorted(values, **kwargs)
        sorts.append(len(out))
        return out

    monkeypatch.setattr(status, "sorted", counted, raising=False)
    again = cluster_status([], [], registered, traffic, "model", "g", 0.0)
    assert msgspec.json.encode(again) == msgspec.json.encode(first)
    assert [n for n in sorts if n == 20] == []  # (the rows are sorted too: 50 of them)
    traffic.done("a7", 100.0, 3)
    doc = cluster_status([], [], registered, traffic, "model", "g", 0.0)
    assert [n for n in sorts if n in (20, 21)] == [20, 21]  # a7's TTFTs (20) and end-to-end latencies (21)
    a7 = next(a for a in doc.adapters if a.name == "a7")
    assert a7.e2e_p90_s is not None and a7.e2e_p90_s > first.adapters[8].e2e_p90_s  # type: ignore[operator]


def _fifty_adapters_served() -> tuple[Traffic, list[AdapterEntry]]:
    """50 registered adapters, each with 20 first tokens and 20 ends timed."""
    traffic = Traffic()
    for i in range(50):
        for k in range(20):
            traffic.first_token(f"a{i}", 0.1 * k)
            traffic.done(f"a{i}", 0.2 * k, 3)
    return traffic, [AdapterEntry(name=f"a{i}", path="/x", rank=8, created=1.0) for i in range(50)]
