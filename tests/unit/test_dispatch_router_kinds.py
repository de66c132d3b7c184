"""LoRA-aware routers' public bug kinds, replayed against dispatch's pure choice core
(``choose_worker``): each case is what the report's users expected of the router."""

from dlora.common.messages import AdapterResidency, RequestLoad, WorkerStats
from dlora.services.dispatcher.choose import DispatchCosts, WorkerLoad, choose_worker, estimated_finish

COSTS = DispatchCosts(adapter_load_s=1.0)


def w(
    name: str,
    queued: tuple[tuple[str | None, str, bool], ...] = (),
    held: tuple[str, ...] = (),
    slots: int = 2,
) -> WorkerStats:
    """A worker with a 10-token request of each (adapter, version, running) ``queued``, holding
    ``held`` (at version "v1") and the adapters of its requests."""
    names = dict.fromkeys([*held, *(a for a, _, _ in queued if a)])
    return WorkerStats(
        worker=name,
        running=sum(r for _, _, r in queued),
        waiting=sum(not r for _, _, r in queued),
        free_blocks=100,
        total_blocks=100,
        block_size=16,
        max_loras=slots,
        adapters=[AdapterResidency(name=a, slot=0, merged=False, version="v1") for a in names],
        seconds_per_token=0.01,
        requests=[
            RequestLoad(
                request_id=f"{name}{i}", adapter=a, context_tokens=10, remaining_tokens=10, running=r, version=v
            )
            for i, (a, v, r) in enumerate(queued)
        ],
        reading=[],
    )


def test_an_adapter_running_and_waiting_takes_one_slot() -> None:
    """llm-d-router #2605: the router kept vLLM's running and waiting LoRA lists apart and summed
    their sizes, so an adapter with requests in both filled two of a pod's slots (its capacity
    tier never saw a free slot). Here x runs and queues requests of a in its two slots: b fits
    beside it, uncrowded, as on y, which runs two requests of a."""
    x = WorkerLoad.of(w("x", (("a", "v1", True), ("a", "v1", False))))
    y = WorkerLoad.of(w("y", (("a", "v1", True), ("a", "v1", True))))
    assert x.queued_keys == {"a@v1"}
    args = ("b", 0.0, set(), COSTS, (), 10.0, 1.0, "v1")
    assert estimated_finish(x, *args) == estimated_finish(y, *args)
    # unversioned (an older worker) beside versioned, and a send of it since: still one slot
    z = WorkerLoad.of(w("z", (("a", "", True), ("a", "v1", False))))
    assert estimated_finish(z, "b", 0.0, set(), COSTS, ("a@v1",), 10.0, 1.0, "v1") == estimated_finish(y, *args)


def test_an_idle_worker_holding_the_adapter_takes_its_request() -> None:
    """llm-d-router #2792: the router read adapters from requests in flight only, so an adapter
    loaded at start, or idle since, looked absent and its next request went to a pod that had to
    load it. x holds rl with nothing queued; y lacks it."""
    assert choose_worker([w("y"), w("x", held=("rl",))], "rl", costs=COSTS, version="v1") == "x"


def test_a_worker_with_its_slots_full_of_other_adapters_loses_to_one_with_a_slot_free() -> None:
    """gateway-api-inference-extension #423's capacity tier (a pod with a free LoRA slot beats one
    whose slots are full, where neither holds the adapter), by version: x's one slot runs a@v1,
    y's one slot is free though y is a little busier with base-model requests."""
    x = w("x", (("a", "v1", True),), slots=1)
    y = w("y", ((None, "", True), (None, "", True)), slots=1)
    assert choose_worker([x, y], "b", costs=COSTS, tokens=10.0, version="v1") == "y"
    assert choose_worker([x, y], "a", costs=COSTS, tokens=10.0, version="v2") == "y"  # (a@v2: a second slot)
