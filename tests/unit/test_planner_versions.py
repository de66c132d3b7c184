"""The migrator plans by the adapter *version* a request runs on, as dispatch prices it
(``test_dispatch_versions.py``): after an in-place reload (vLLM's load_inplace; an RL trainer
reloading its policy every few steps) a worker holding and running only the old version must read
the new one, into a slot of its own, before a moved request of it runs there."""

from __future__ import annotations

import msgspec
import pytest

from dlora.common.messages import AdapterResidency, RequestLoad, WorkerStats
from dlora.services.migrator.costs import Standing, running_adapters
from dlora.services.migrator.greedy import greedy_moves
from dlora.services.migrator.planner import plan
from dlora.services.migrator.snapshot import ClusterSnapshot, RequestState, WorkerState, runs_among, takes
from dlora.services.migrator.trigger import snapshot_from_stats
from tests.unit.planner_cases import worker_stats

# Run as on a machine of its own: under its time bound the planner runs CBC only where the pace it
# measures leaves CBC time (``pace.Clock``; ``test_planner_pace`` fakes a loaded one).
pytestmark = pytest.mark.usefixtures("whole_core")


def _load(rid: str, version: str, remaining: int = 100, pinned: bool = False) -> RequestLoad:
    return RequestLoad(
        request_id=rid, adapter="rl", context_tokens=50, remaining_tokens=remaining, pinned=pinned, version=version
    )


def _stats(name: str, held: tuple[tuple[str, str], ...], loads: list[RequestLoad], slots: int = 2) -> WorkerStats:
    """A worker holding ``held`` (name, version) in host memory, running ``loads``."""
    adapters = [AdapterResidency(name=a, slot=None, merged=False, version=v) for a, v in held]
    return worker_stats(name, loads, 0.01, max_loras=slots, adapters=adapters)


# y runs four requests of rl@v2 (4 s of work); x runs a short one of rl@v1, pinned there (its
# version retiring). Two moved to x would save 2 s, less than the 3 s of reading v2 there.
BUSY = [_load(f"v2-{i}", "v2") for i in range(4)]
OLD = [_load("v1-0", "v1", remaining=10, pinned=True)]


def _snapshot(x_held: tuple[tuple[str, str], ...], x_loads: list[RequestLoad], slots: int = 2) -> ClusterSnapshot:
    stats = [_stats("x", x_held, x_loads, slots), _stats("y", (("rl", "v2"),), BUSY)]
    return snapshot_from_stats(stats, {"rl": 16}, adapter_load_seconds=3.0)


def test_a_worker_running_only_the_old_version_pays_the_new_ones_read() -> None:
    """Found by a helper: x held and ran rl@v1 and was planned as holding rl@v2 (by name), so y's
    v2 requests moved there for a gain smaller than the read they then waited for. It is now
    planned as a worker that lacks rl is: no move pays for that read."""
    old = _snapshot((("rl", "v1"),), OLD)
    assert plan(old).moves == []
    # the same as where x held no rl at all (a request of the base model of the same work)
    lacking = _snapshot((), [msgspec.structs.replace(OLD[0], adapter=None, version="")])
    assert plan(lacking).moves == []
    # where x holds v2 as well, the moves cost no read, and go
    both = _snapshot((("rl", "v1"), ("rl", "v2")), OLD)
    moves = plan(both).moves
    assert moves and {m.to_worker for m in moves} == {"x"} and all(m.request_id.startswith("v2") for m in moves)


@pytest.mark.parametrize("solver", ["ilp", "greedy"])
def test_each_version_takes_a_slot_of_its_own(solver: str) -> None:
    """x has one slot and runs rl@v1 in it: rl@v2 would be a second adapter for its steps (the
    engine keeps each version under its own key), so y's v2 requests may not go there, however
    cheap the read; by name they did."""
    snap = snapshot_from_stats(
        [_stats("x", (("rl", "v1"),), OLD, slots=1), _stats("y", (("rl", "v2"),), BUSY * 1)],
        {"rl": 16},
        adapter_load_seconds=0.0,
    )
    assert running_adapters(snap) == {"x": {"rl@v1"}, "y": {"rl@v2"}}
    moves = plan(snap).moves if solver == "ilp" else greedy_moves(Standing(snap, 1.0))
    assert moves == []
    # the same requests on v1 (another worker's, before its reload) may join x's
    same = [msgspec.structs.replace(r, version="v1") for r in BUSY]
    snap = snapshot_from_stats(
        [_stats("x", (("rl", "v1"),), OLD, slots=1), _stats("y", (("rl", "v1"),), same)],
        {"rl": 16},
        adapter_load_seconds=0.0,
    )
    moves = plan(snap).moves if solver == "ilp" else greedy_moves(Standing(snap, 1.0))
    assert moves and {m.to_worker for m in moves} == {"x"}


def test_an_older_workers_stats_are_read_by_name() -> None:
    """A worker from before versions (its requests' and residency's ""): what it holds and runs is
    taken as any version, as every worker's was before (a rolling upgrade). Its stats decode; a
    newer worker's decode in an older reader, the version left out."""
    raw = msgspec.json.encode(_load("r", "v2"))
    assert raw.endswith(b',"v2"]')
    older = msgspec.json.decode(raw.removesuffix(b',"v2"]') + b"]", type=RequestLoad)
    assert older.version == ""

    class OlderLoad(msgspec.Struct, array_like=True):  # RequestLoad before ``version``
        request_id: str
        adapter: str | None
        context_tokens: int
        remaining_tokens: int
        total_tokens: int = 0
        running: bool = True
        rank: int = 0
        pinned: bool = False

    assert msgspec.json.decode(raw, type=OlderLoad).request_id == "r"
    unsaid = _snapshot((("rl", ""),), [msgspec.structs.replace(OLD[0], version="")])
    moves = plan(unsaid).moves
    assert moves and {m.to_worker for m in moves} == {"x"}  # held, as before: no read priced


def test_version_keys_and_their_matches() -> None:
    def key(adapter: str | None, version: str = "") -> str:
        return RequestState("r", "x", adapter, 10, 10.0, version=version).key

    assert key("rl", "v2") == "rl@v2" and key("rl") == "rl" and key(None, "v") == ""
    assert runs_among({"rl@v2"}, "rl@v2") and not runs_among({"rl@v1"}, "rl@v2")
    assert runs_among({"rl"}, "rl@v2")  # an older worker's requests: any version
    assert runs_among({"rl@v1"}, "rl")  # and its own, moved (test_planner_older.py)
    assert not runs_among({"rlx@v2"}, "rl") and not runs_among(set(), "rl")
    assert takes({"a@1"}, "", 1) and not takes({"a@1"}, "a@2", 1) and takes({"a@1"}, "a@2", 2)
    w = WorkerState("x", 10, 16, 2, frozenset({"rl"}), 0.01, versions=frozenset({("rl", "v1")}))
    assert w.has("rl@v1") and not w.has("rl@v2") and w.has("rl") and not w.has("other")
    assert WorkerState("x", 10, 16, 2, frozenset({"rl"}), 0.01).has("rl@v2")  # versions not known


@pytest.mark.parametrize("newer", [True, False])
@pytest.mark.parametrize("solver", ["ilp", "greedy"])
def test_requests_a_worker_counts_but_does_not_list_hold_their_slots(solver: str, newer: bool) -> None:
    """x lists one short request of rl@v1 and counts, past its list (the latest of thousands, or
    waiting on a moved cache), requests of other@v3: its two slots are both taken. y's requests of a
    third adapter have none there; taken by its list alone, x had one free and they went there to
    wait (``unlisted_by_version``, by name from an older worker: left by the last session)."""
    counted = {"other@v3" if newer else "other": (0, 5), "": (0, 1)}
    x = msgspec.structs.replace(
        _stats("x", (("rl", "v1"), ("other", "v3")), OLD),
        unlisted_requests=6,
        unlisted_remaining_tokens=6,
        unlisted_by_adapter={"other": (0, 5), "": (0, 1)},
        unlisted_by_version=counted if newer else None,
    )
    third = [msgspec.structs.replace(r, adapter="third", version="") for r in BUSY]
    snap = snapshot_from_stats([x, _stats("y", (("third", ""),), third)], {"rl": 16}, adapter_load_seconds=0.0)
    assert running_adapters(snap)["x"] == {"rl@v1", "other@v3" if newer else "other"}
    assert (plan(snap).moves if solver == "ilp" else greedy_moves(Standing(snap, 1.0))) == []
    # listed, the same requests of rl@v1 may join x's
    same = [msgspec.structs.replace(r, version="v1") for r in BUSY]
    snap = snapshot_from_stats([x, _stats("y", (("rl", "v1"),), same)], {"rl": 16}, adapter_load_seconds=0.0)
    moves = plan(snap).moves if solver == "ilp" else greedy_moves(Standing(snap, 1.0))
    assert moves and {m.to_worker for m in moves} == {"x"}
