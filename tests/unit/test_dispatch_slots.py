"""Dispatch counts a worker's device slots by adapter *version*: its engine holds each version of an
adapter under a key of its own (``name@version``), and one step runs at most ``max_loras`` of them,
so after an in-place reload a request of the new version beside the old one's requests takes a slot
of its own. By name, it was priced as sharing the old version's slot (and as merged with it)."""

import msgspec

from dlora.common.messages import AdapterResidency, RequestLoad, WorkerStats
from dlora.services.dispatcher.choose import (
    DispatchCosts,
    DispatchMode,
    WorkerLoad,
    choose_worker,
    requests_by_version,
    shares_slot,
    slots_taken,
)
from dlora.services.dispatcher.state import DispatchState

COSTS = DispatchCosts(adapter_load_s=1.0)


def w(name: str, queued: tuple[tuple[str | None, str, int], ...] = (), slots: int = 1, **more: object) -> WorkerStats:
    """A worker with ``slots`` device slots and a request of each (adapter, version, remaining tokens)
    ``queued``; it reads nothing (a newer worker's stats: ``reading`` said)."""
    return WorkerStats(
        worker=name,
        running=len(queued),
        waiting=0,
        free_blocks=100,
        total_blocks=100,
        block_size=16,
        max_loras=slots,
        adapters=[AdapterResidency(name=a, slot=0, merged=False, version=v) for a, v, _ in queued if a],
        seconds_per_token=0.01,
        requests=[
            RequestLoad(request_id=f"{name}{i}", adapter=a, context_tokens=10, remaining_tokens=n, version=v)
            for i, (a, v, n) in enumerate(queued)
        ],
        reading=[],
        **more,  # type: ignore[arg-type]
    )


def test_a_new_version_beside_the_old_ones_requests_takes_a_slot_of_its_own() -> None:
    """x's one slot runs rl@v1's rollouts; y's two slots run another adapter's requests, a little
    more work than x's. Neither holds rl@v2. On x a request of v2 waits for the slot v1 holds (a
    step runs one of the two), and runs unmerged: y, with a slot free, finishes it sooner. By name
    x looked as if v2 joined v1 in its slot, merged, and took it."""
    x = w("x", (("rl", "v1", 10),), slots=1)
    y = w("y", (("other", "", 12),), slots=2)
    assert choose_worker([x, y], "rl", costs=COSTS, tokens=10, version="v2") == "y"
    # its own version's request shares the slot and the merge: x, as before
    assert choose_worker([x, y], "rl", costs=COSTS, tokens=10, version="v1") == "x"
    assert choose_worker([x, y], "rl", costs=COSTS, tokens=10) == "x"  # no version said: any
    assert WorkerLoad.of(x).dominant == "rl@v1" and WorkerLoad.of(x).queued_adapters == {"rl"}


def test_sends_since_the_stats_crowd_slots_by_version() -> None:
    """Both idle with one slot; a request of rl@v1 went to x since its stats. The next, of rl@v2,
    would wait on x for the slot the first holds (by name, the two shared it)."""
    state = DispatchState(5.0, DispatchMode.PROACTIVE, COSTS)
    state.heard(w("x"), 0.0)
    state.heard(w("y", (("other", "", 12),), slots=2), 0.0)
    live = state.live(0.0)
    assert state.choose(live, "rl", tokens=10, version="v1") == "x"
    assert state.choose(live, "rl", tokens=10, version="v2") == "y"


def test_requests_not_listed_are_counted_by_version_where_the_worker_says() -> None:
    """Past MAX_LISTED, or waiting on arrival, a request is counted only by adapter; a newer
    worker also counts it by version (``WorkerStats.unlisted_by_version``)."""
    unlisted = {"unlisted_requests": 3, "unlisted_by_adapter": {"rl": (0, 3)}}
    x = w("x", slots=1, unlisted_by_version={"rl@v1": (0, 3)}, **unlisted)
    y = w("y", (("other", "", 1),), slots=2)
    assert requests_by_version(x) == {"rl@v1": 3}
    assert choose_worker([x, y], "rl", costs=COSTS, tokens=10, version="v2") == "y"
    # an older worker's (no versions said): a name alone, which shares any version's slot
    older = w("x", slots=1, **unlisted)
    assert requests_by_version(older) == {"rl": 3}
    assert choose_worker([older, y], "rl", costs=COSTS, tokens=10, version="v2") == "x"


def test_an_older_workers_stats_still_decode_and_an_older_reader_ignores_the_new_field() -> None:
    raw = msgspec.json.encode(w("x", unlisted_by_version={"rl@v1": (0, 1)}))
    old = msgspec.json.decode(raw.replace(b',"unlisted_by_version":{"rl@v1":[0,1]}', b""), type=WorkerStats)
    assert old.unlisted_by_version is None

    class OlderStats(msgspec.Struct, kw_only=True):  # a reader from before it (unknown fields ignored)
        worker: str
        unlisted_by_adapter: dict[str, tuple[int, int]] = {}

    assert msgspec.json.decode(raw, type=OlderStats).worker == "x"
    after = b',"unlisted_kv_blocks":0,"arriving_kv_blocks":0,"refused_moves":{}'
    assert raw.endswith(b',"unlisted_by_version":{"rl@v1":[0,1]}' + after + b"}")
    # the ones after it alike: an older worker's blocks not listed, or on their way, count none (as
    # before), and it says no move refused (its refused moves stay pinned for settle_s, as before)
    older = msgspec.json.decode(raw.replace(after, b""), type=WorkerStats)
    assert older.unlisted_kv_blocks == older.arriving_kv_blocks == 0 and older.unlisted_by_version == {"rl@v1": (0, 1)}
    assert older.refused_moves == {}


def test_slots_and_shared_weights_by_key() -> None:
    assert slots_taken({"a@1", "a@2", "b"}) == 3 and slots_taken({"a@1", "a"}) == 1 and slots_taken({"a", "b"}) == 2
    assert slots_taken(set()) == 0 and slots_taken({"a@1", "ab"}) == 2
    assert shares_slot("a@1", "a@1") and shares_slot("a", "a@1") and shares_slot("a@1", "a")
    assert not shares_slot("a@1", "a@2") and not shares_slot("a", "ab") and not shares_slot("a@1", "ab@1")


def test_a_request_waiting_on_arrival_is_counted_under_its_version() -> None:
    from dlora.common.messages import GenerateRequest, SamplingParams
    from dlora.services.worker.snapshot import arriving_key

    def req(adapter: str | None, version: str | None) -> GenerateRequest:
        return GenerateRequest(
            request_id="r",
            reply_to="x",
            prompt_token_ids=[1],
            params=SamplingParams(max_tokens=1),
            adapter=adapter,
            adapter_version=version,
        )

    assert arriving_key(req("rl", "v2")) == "rl@v2" and arriving_key(req("rl", None)) == "rl"
    assert arriving_key(req(None, None)) is None


def test_a_workers_slots_with_a_request_and_the_sends_since_its_stats() -> None:
    older = WorkerLoad.of(w("x", (("a", "", 1), ("b", "", 1))))  # an older worker's: names alone
    assert older.slots_with(["a@1"]) == 2 and older.slots_with(["c@1"]) == 3 and older.slots_with(["c", "a"]) == 3
    newer = WorkerLoad.of(w("x", (("a", "1", 1),)))
    assert newer.slots_with(["a"]) == 1 and newer.slots_with(["a@2", "a@1"]) == 2 and newer.slots_with(["b"]) == 2
    idle = WorkerLoad.of(w("x"))
    assert idle.slots_with(["a", "a@1"]) == 1 and idle.slots_with([]) == 0 and idle.slots_with(["a@1", "a@2"]) == 2


def test_a_requests_key_alone_is_added_to_the_slots_counted_once_per_stats() -> None:
    """Every worker is priced for every request: where nothing was sent to a worker since its stats
    (most of them), its slots with the request's key come from those its stats' requests take,
    summed once, with no set of its keys built a worker (``frozenset.union`` for each cost a choice
    at 256 workers 10-30 % over cf5f512's); the same count as ``slots_taken`` of them all."""
    import dataclasses
    import itertools

    unions = 0

    class Keys(frozenset[str]):
        def union(self, *others: object) -> frozenset[str]:  # type: ignore[override]
            nonlocal unions
            unions += 1
            return super().union(*others)  # type: ignore[arg-type]

    pool = ["a", "a@1", "a@2", "b", "b@1"]
    for n in range(len(pool) + 1):
        for queued in itertools.combinations(pool, n):
            load = WorkerLoad.of(w("x", tuple((k.partition("@")[0], k.partition("@")[2], 1) for k in queued)))
            load = dataclasses.replace(load, queued_keys=Keys(load.queued_keys))
            for key in [*pool, "c", "c@1"]:
                assert load.slots_with((key,)) == slots_taken({*queued, key}), (queued, key)
    assert unions == 0
    workers = [w(f"x{i}", (("a", "1", 1), ("b", "1", 1))) for i in range(8)]
    state = DispatchState(5.0, DispatchMode.PROACTIVE, COSTS)
    for x in workers:
        state.heard(x, 0.0)
    state.loads = {k: dataclasses.replace(v, queued_keys=Keys(v.queued_keys)) for k, v in state.loads.items()}
    live = state.live(0.0)
    assert choose_worker(live, "c", costs=COSTS, loads=state.loads, version="1") is not None
    assert unions == 0


def test_a_name_alone_on_a_worker_that_counts_by_version_is_a_slot_of_its_own() -> None:
    """An entry registered before versions (``AdapterEntry.version`` "") runs on a newer worker
    under the plain name, its engine key; reloaded in place, its new version runs under rl@v2 beside
    it: two keys, two slots, two sets of weights. x's one slot runs rl's old requests; y holds rl@v2
    and runs a little more work of another adapter in two slots. Taken as an older worker's name
    alone (any version), x looked uncrowded and merged for rl@v2, and took it to wait for the slot."""
    v2 = AdapterResidency(name="rl", slot=None, merged=False, version="v2")
    x = w("x", (("rl", "", 10),), slots=1, unlisted_by_version={})
    y = w("y", (("other", "", 12),), slots=2, unlisted_by_version={})
    y = msgspec.structs.replace(y, adapters=[*y.adapters, v2])
    assert choose_worker([x, y], "rl", costs=COSTS, tokens=10, version="v2") == "y"
    assert WorkerLoad.of(x).slots_with(("rl@v2",)) == 2 and WorkerLoad.of(x).slots_with(("rl", "rl@v2")) == 2
    # an older worker's (it does not count by version): the name alone is whatever version it runs
    older = WorkerLoad.of(w("x", (("rl", "", 10),), slots=1))
    assert older.slots_with(("rl@v2",)) == 1
