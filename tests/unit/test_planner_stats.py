"""The co-migration planner on snapshots built from workers' stats (``snapshot_from_stats``): what
a worker's stats say (failed reads, slots, ranks, base models, unlisted requests) bounds its moves."""

from __future__ import annotations

import dataclasses

import pytest

from dlora.common.messages import AdapterResidency, RequestLoad, WorkerStats
from dlora.services.migrator.costs import Standing, completion_times
from dlora.services.migrator.greedy import greedy_moves
from dlora.services.migrator.planner import plan
from dlora.services.migrator.snapshot import ClusterSnapshot, RequestState, WorkerState
from tests.unit.planner_cases import reqs, worker, worker_stats

# Run as on a machine of its own: under its time bound the planner runs CBC only where the pace it
# measures leaves CBC time (``pace.Clock``; ``test_planner_pace`` fakes a loaded one).
pytestmark = pytest.mark.usefixtures("whole_core")


@pytest.mark.parametrize("solver", ["ilp", "greedy"])
def test_no_request_moves_to_a_worker_whose_read_of_its_adapter_failed(solver: str) -> None:
    """A helper's multi-host trial: one GPU host's copy of an adapter's files differed from the
    registered version; dispatch kept its requests off it, but the migrator moved running ones
    there, and they failed mid-stream (a worker hands a request back once)."""
    from dlora.services.migrator.trigger import snapshot_from_stats

    loads = [RequestLoad(request_id=f"r{i}", adapter="a", context_tokens=50, remaining_tokens=100) for i in range(12)]
    # and one of another adapter, its length the same, listed first (a review: the planner kept
    # one set of destinations per length, and a's requests took b's, w1 included)
    other = [RequestLoad(request_id="b0", adapter="b", context_tokens=50, remaining_tokens=100)]
    snap = snapshot_from_stats(
        [
            worker_stats("w-b", other, 0.01, adapters=[AdapterResidency(name="b", slot=0, merged=False)]),
            worker_stats("w0", loads, 0.01, adapters=[AdapterResidency(name="a", slot=0, merged=False)]),
            worker_stats("w1", [], 0.01, failed_adapters=["a"]),
            worker_stats("w2", [], 0.01),
        ],
        {"a": 16, "b": 16},
    )
    moves = plan(snap).moves if solver == "ilp" else greedy_moves(Standing(snap, 1.0))
    assert moves and not {m.to_worker for m in moves if m.adapter == "a"} & {"w1"}


def test_the_planner_reads_worker_stats_in_the_engines_slots() -> None:
    """Workers as they report themselves: max_loras adapters of any rank. w1 holds one rank-64
    adapter in two slots, so it has room for the hot rank-8 adapter (read as rank-16 units, the
    rank-64 one filled four and w1 looked full)."""
    from dlora.services.migrator.trigger import snapshot_from_stats

    def stats(name: str, adapters: dict[str, int], loads: list[RequestLoad]) -> WorkerStats:
        held = [AdapterResidency(name=a, slot=i, merged=False) for i, a in enumerate(adapters)]
        return worker_stats(name, loads, 0.01, adapters=held)

    hot = [RequestLoad(request_id=f"r{i}", adapter="small", context_tokens=50, remaining_tokens=100) for i in range(12)]
    snap = snapshot_from_stats(
        [stats("w0", {"small": 8, "other": 8}, hot), stats("w1", {"big": 64}, [])], {"small": 8, "other": 8, "big": 64}
    )
    p = plan(snap)
    assert p.moves and all(m.to_worker == "w1" and m.adapter == "small" for m in p.moves)
    # The names a caller already has (a simulated cluster's dispatcher, of the same messages) are
    # the ones it would list.
    workers = [stats("w0", {"small": 8, "other": 8}, hot), stats("w1", {"big": 64}, [])]
    held = {"w0": frozenset({"small", "other"})}
    ranks = {"small": 8, "other": 8, "big": 64}
    assert snapshot_from_stats(workers, ranks, held) == snapshot_from_stats(workers, ranks)


def test_every_worker_is_priced_at_the_clusters_mean_speed() -> None:
    """A batched engine's seconds per token fall as its batch grows: w0 runs 12 requests and
    measures 5 ms a token, w1 runs 4 and measures 20 ms. Priced by their own figures w1 looked the
    more loaded (8 s against 6 s) and requests would move towards the busier w0; at the mean
    (12.5 ms, for the adapter too) w0 is, and moves go from it to w1."""
    from dlora.services.migrator.trigger import snapshot_from_stats

    def stats(name: str, n: int, spt: float) -> WorkerStats:
        loads = [
            RequestLoad(request_id=f"{name}-{i}", adapter="a", context_tokens=50, remaining_tokens=100)
            for i in range(n)
        ]
        return worker_stats(name, loads, spt, adapter_seconds_per_token={"a": spt})

    snap = snapshot_from_stats([stats("w0", 12, 0.005), stats("w1", 4, 0.02)], {"a": 8})
    assert all(w.cost("a") == w.cost(None) == 0.0125 for w in snap.workers)
    p = plan(snap)
    assert p.moves and all(m.to_worker == "w1" for m in p.moves), p


def test_slots_count_the_adapters_a_worker_runs_not_those_it_keeps_in_memory() -> None:
    """w1 keeps four idle adapters (its four slots' worth) and runs nothing: a's requests may go
    there (it loads a in place of an idle one). w2 runs two adapters in its two slots: a third would
    split its steps, so a may not join them."""
    snap = ClusterSnapshot(
        workers=[worker("w0", ["a"]), worker("w1", ["p", "q", "r", "s"]), worker("w2", ["b", "c"], slots=2)],
        requests=reqs("w0", "a", 12) + reqs("w2", "b", 1) + reqs("w2", "c", 1),
        file_bytes={"a": 16, "b": 16, "c": 16},
    )
    for moves in (plan(snap).moves, greedy_moves(Standing(snap, 1.0))):
        assert moves and {m.to_worker for m in moves} == {"w1"}


@pytest.mark.parametrize("solver", ["ilp", "greedy"])
def test_a_request_moves_only_where_its_adapters_rank_loads_and_never_when_pinned(solver: str) -> None:
    """A migrator moved a rank-32 adapter's requests to a worker whose max_lora_rank is 8, and
    requests on an adapter version replaced since (that no other worker could load any more): both
    failed mid-stream. w1 loads rank 8 at most; w0's pinned requests stay whatever the imbalance."""
    snap = ClusterSnapshot(
        workers=[
            WorkerState("w0", 1000, 16, 4, frozenset(["a", "b"]), 0.01, max_lora_rank=64),
            WorkerState("w1", 1000, 16, 4, frozenset(), 0.01, max_lora_rank=8),
            WorkerState("w2", 1000, 16, 4, frozenset(), 0.01),  # an older worker: says no rank
        ],
        requests=[RequestState(f"pinned-{i}", "w0", "b", 50, 100, rank=8, pinned=True) for i in range(8)]
        + [RequestState(f"big-{i}", "w0", "a", 50, 100, rank=32) for i in range(8)],
        file_bytes={"a": 16, "b": 16},
    )
    moves = plan(snap).moves if solver == "ilp" else greedy_moves(Standing(snap, 1.0))
    assert moves and {(m.request_id.split("-")[0], m.to_worker) for m in moves} == {("big", "w2")}
    pinned = dataclasses.replace(snap, requests=snap.requests[:8])
    assert not (plan(pinned).moves if solver == "ilp" else greedy_moves(Standing(pinned, 1.0)))


@pytest.mark.parametrize("solver", ["ilp", "greedy"])
def test_a_request_moves_only_to_a_worker_of_its_base_model(solver: str) -> None:
    """Workers started apart may serve different models (one host's other revision in the same
    path): a request moved between them would run its token ids under another tokenizer. w1 serves
    another model; w2 does not say (an older worker). Then two models' requests of one length
    (a review: the ILP's sets of workers that hold a request were shared between them)."""
    snap = ClusterSnapshot(
        workers=[
            WorkerState("w0", 1000, 16, 4, frozenset(["a"]), 0.01, model_digest="m1"),
            WorkerState("w1", 1000, 16, 4, frozenset(), 0.01, model_digest="m2"),
            WorkerState("w2", 1000, 16, 4, frozenset(), 0.01),
        ],
        requests=[RequestState(f"r-{i}", "w0", "a", 50, 100, model_digest="m1") for i in range(12)],
        file_bytes={"a": 16},
    )
    moves = plan(snap).moves if solver == "ilp" else greedy_moves(Standing(snap, 1.0))
    assert moves and {m.to_worker for m in moves} == {"w2"}
    mixed = ClusterSnapshot(
        workers=[
            WorkerState("a-m1", 1000, 16, 4, frozenset(["a"]), 0.01, model_digest="m1"),
            WorkerState("b-m2", 1000, 16, 4, frozenset(["b"]), 0.01, model_digest="m2"),
            WorkerState("c-m1", 1000, 16, 4, frozenset(), 0.01, model_digest="m1"),
        ],
        requests=[RequestState(f"a-{i}", "a-m1", "a", 50, 100, model_digest="m1") for i in range(2)]
        + [RequestState(f"b-{i}", "b-m2", "b", 50, 100, model_digest="m2") for i in range(12)],
        file_bytes={"a": 16, "b": 16},
    )
    moves = plan(mixed).moves if solver == "ilp" else greedy_moves(Standing(mixed, 1.0))
    assert not [m for m in moves if m.request_id.startswith("b-")], moves


def test_a_request_two_workers_list_is_left_out_not_a_crash() -> None:
    """Stats taken either side of a move (or one id an application sent to two workers) list a
    request twice: the ILP's start raised (a negative initial value) and the migrator died."""
    snap = ClusterSnapshot(
        workers=[worker("w0", ["a"]), worker("w1", ["a"]), worker("w2", ["a"])],
        requests=reqs("w0", "a", 12) + [RequestState("w0-a-0", "w1", "a", 50, 100)],
        file_bytes={"a": 16},
    )
    p = plan(snap)
    assert p.moves and "w0-a-0" not in {m.request_id for m in p.moves}


@pytest.mark.parametrize("solver", ["ilp", "greedy"])
def test_a_workers_requests_past_those_its_stats_list_count_as_its_load(solver: str) -> None:
    """A worker lists 4,096 requests in its stats and only counts the rest with their tokens: the
    planner read a worker with thousands more queued as no busier than its list, and moved
    requests onto it. w0 lists 10 and holds 50,000 tokens more; w1 lists 20; w2 is idle."""
    from dlora.services.migrator.trigger import snapshot_from_stats

    def loads(name: str, n: int) -> list[RequestLoad]:
        return [
            RequestLoad(request_id=f"{name}-{i}", adapter=None, context_tokens=50, remaining_tokens=100)
            for i in range(n)
        ]

    stats = [
        worker_stats("w0", loads("w0", 10), 0.01, unlisted_requests=500, unlisted_remaining_tokens=50_000),
        worker_stats("w1", loads("w1", 20), 0.01),
        worker_stats("w2", [], 0.01),
    ]
    snap = snapshot_from_stats(stats, {})
    assert completion_times(snap)["w0"] == pytest.approx(510.0)
    moves = plan(snap).moves if solver == "ilp" else greedy_moves(Standing(snap, 1.0))
    assert moves and all(m.request_id.startswith("w0") and m.to_worker != "w0" for m in moves)


def test_a_waiting_request_moves_without_a_recompute_charged() -> None:
    """A request that holds no KV (waiting for a batch) is prefilled wherever it runs: charged its
    context's recompute all the same, a worker queueing long prompts kept them all (12 s of work
    on w0, an idle w1) since each move was priced at 25 s."""
    from dlora.services.migrator.trigger import snapshot_from_stats

    queued = [
        RequestLoad(request_id=f"q{i}", adapter=None, context_tokens=500, remaining_tokens=100, running=False)
        for i in range(12)
    ]
    snap = snapshot_from_stats(
        [worker_stats("w0", queued, 0.01), worker_stats("w1", [], 0.01)],
        {},
        recompute_seconds_per_token=0.05,
        kv_transfer_seconds_per_token=0.05,
    )
    p = plan(snap)
    assert len(p.moves) == 6 and p.makespan_after_s == pytest.approx(6.0)
    assert len(greedy_moves(Standing(snap, 1.0))) == 6
