"""A rolling upgrade: an older worker does not say which version of an adapter its requests run on
(``RequestLoad.version`` ""), so the migrator takes them as running on any version of it, both ways:
moved onto a worker running a version of that adapter, they join its slot (they took a slot of their
own, and a worker whose slots were all in use could take none of them)."""

from __future__ import annotations

import msgspec
import pytest

from dlora.services.migrator.costs import Standing, running_adapters
from dlora.services.migrator.greedy import greedy_moves
from dlora.services.migrator.planner import apply, plan
from dlora.services.migrator.snapshot import Running, runs_among, takes
from dlora.services.migrator.trigger import snapshot_from_stats
from tests.unit.test_planner_versions import _load, _stats

# Run as on a machine of its own: under its time bound the planner runs CBC only where the pace it
# measures leaves CBC time (``pace.Clock``; ``test_planner_pace`` fakes a loaded one).
pytestmark = pytest.mark.usefixtures("whole_core")

# x, an older worker, runs eight requests of rl (8 s of work); y runs one short one of rl@v1 in its
# only slot, and holds v1.
OLDER = [msgspec.structs.replace(_load(f"o-{i}", ""), context_tokens=1) for i in range(8)]
SHORT = [_load("v1-0", "v1", remaining=10)]


@pytest.mark.parametrize("solver", ["ilp", "greedy"])
def test_an_older_workers_requests_join_the_slot_of_a_version_of_their_adapter(solver: str) -> None:
    snap = snapshot_from_stats(
        [_stats("x", (("rl", ""),), OLDER), _stats("y", (("rl", "v1"),), SHORT, slots=1)],
        {"rl": 16},
        adapter_load_seconds=0.0,
    )
    moves = plan(snap).moves if solver == "ilp" else greedy_moves(Standing(snap, 1.0))
    assert moves and {m.to_worker for m in moves} == {"y"}
    # another adapter's requests still find no slot there
    other = [msgspec.structs.replace(r, adapter="other") for r in OLDER]
    snap = snapshot_from_stats(
        [_stats("x", (("other", ""),), other), _stats("y", (("rl", "v1"),), SHORT, slots=1)],
        {"rl": 16, "other": 16},
        adapter_load_seconds=0.0,
    )
    assert (plan(snap).moves if solver == "ilp" else greedy_moves(Standing(snap, 1.0))) == []


def test_a_name_alone_shares_a_versions_slot() -> None:
    assert runs_among({"rl@v1"}, "rl") and runs_among(Running(["rl@v1"]), "rl")
    assert not runs_among({"rlx@v1"}, "rl") and not runs_among(Running(["rlx@v1", "r"]), "rl")
    assert runs_among({"rl"}, "rl@v2") and not runs_among({"rl@v1"}, "rl@v2")
    running = Running(["a", "a@1"])
    assert len(running) == 2 and running.slots == 1
    running.add("a@2")
    running.add("a@2")
    assert running.slots == 2 and Running(["a@1", "a", "b"]).slots == 2 and Running().slots == 0
    assert takes(Running(["a@1"]), "a", 1) and not takes(Running(["a@1"]), "b", 1)
    assert takes(Running(["a", "a@1"]), "b", 2)  # (a and a@1 share one slot: one free)


@pytest.mark.parametrize("solver", ["ilp", "greedy"])
def test_a_name_alone_sharing_a_versions_slot_leaves_no_slot_for_another_version(solver: str) -> None:
    """x has one slot: its requests of rl unversioned share it with those of rl@v1 (``Running.slots``
    1). rl@v2 is a second version beside them: a slot of its own, which x lacks. Taken as joining
    the name alone (any version), y's v2 requests moved there, and x ran two versions in one slot
    by the planner's own count (a review)."""
    plain = [msgspec.structs.replace(_load("o-0", "", remaining=10), context_tokens=1)]
    busy = [_load(f"v2-{i}", "v2") for i in range(4)]
    snap = snapshot_from_stats(
        [_stats("x", (("rl", "v1"), ("rl", "v2")), [*SHORT, *plain], slots=1), _stats("y", (("rl", "v2"),), busy)],
        {"rl": 16},
        adapter_load_seconds=0.0,
    )
    moves = plan(snap).moves if solver == "ilp" else greedy_moves(Standing(snap, 1.0))
    assert "x" not in {m.to_worker for m in moves}
    assert not takes(Running(["rl", "rl@v1"]), "rl@v2", 1) and takes(Running(["rl"]), "rl@v2", 1)


@pytest.mark.parametrize("solver", ["ilp", "greedy"])
def test_a_name_alone_on_a_worker_that_counts_by_version_takes_a_slot_of_its_own(solver: str) -> None:
    """On a worker that says ``unlisted_by_version`` (a newer one) a name alone is its engine's key
    for an entry registered before versions: reloaded in place, rl's old requests (pinned, retiring)
    and rl@v1's run on two sets of weights, in x's two slots. Taken as an older worker's name alone
    (sharing rl@v1's slot), x looked to have a slot free, and y's requests of another adapter
    moved there to wait for one (a review)."""
    newer = {"unlisted_by_version": {}}
    old = [msgspec.structs.replace(_load("o-0", "", remaining=10, pinned=True), context_tokens=1)]
    other = [msgspec.structs.replace(_load(f"b-{i}", ""), adapter="other") for i in range(8)]
    x = msgspec.structs.replace(_stats("x", (("rl", ""), ("rl", "v1"), ("other", "")), [*old, *SHORT]), **newer)
    y = msgspec.structs.replace(_stats("y", (("other", ""),), other), **newer)
    snap = snapshot_from_stats([x, y], {"rl": 16, "other": 16}, adapter_load_seconds=0.0)
    moves = plan(snap).moves if solver == "ilp" else greedy_moves(Standing(snap, 1.0))
    assert "x" not in {m.to_worker for m in moves}
    assert Running(["rl", "rl@v1"], by_version=True).slots == 2
    assert not runs_among(Running(["rl"], by_version=True), "rl@v2")


@pytest.mark.parametrize("solver", ["ilp", "greedy"])
def test_a_name_alone_and_a_version_of_it_moving_to_one_worker_take_one_slot(solver: str) -> None:
    """x, an older worker, runs rl's requests by name alone (some version); y runs rl@v1's; z, idle,
    has one slot. Both groups may go to z together: there the name alone shares rl@v1's slot, as it
    would were either running there (``Running.slots``). The ILP gave each arriving key a slot of its
    own, so only one group could go there, the other's worker stayed as busy, and the plan was no
    gain: nothing moved, where the greedy pass took work from both (left by the last session)."""
    # Neither may go to the other (where it would join rl, as any version): x's requests are of a
    # rank y does not load, y's too long for x's context.
    ranked = [msgspec.structs.replace(r, rank=32) for r in OLDER]
    v1 = [msgspec.structs.replace(_load(f"v1-{i}", "v1"), context_tokens=1, total_tokens=200) for i in range(8)]
    x = msgspec.structs.replace(_stats("x", (("rl", ""),), ranked), max_model_len=100)
    y = msgspec.structs.replace(_stats("y", (("rl", "v1"),), v1), max_lora_rank=16, unlisted_by_version={})
    z = _stats("z", (("rl", "v1"),), [], slots=1)
    snap = snapshot_from_stats([x, y, z], {"rl": 16}, adapter_load_seconds=0.0)
    moves = plan(snap).moves if solver == "ilp" else greedy_moves(Standing(snap, 1.0))
    assert {m.to_worker for m in moves} == {"z"}
    assert {m.request_id[:2] for m in moves} == {"o-", "v1"}


@pytest.mark.parametrize("solver", ["ilp", "greedy"])
def test_two_versions_arriving_beside_a_name_alone_take_a_second_slot(solver: str) -> None:
    """x, an older worker with one slot, runs a short request of rl by name alone: a version arriving
    there joins its slot, but a second version takes a slot of its own (``Running.slots`` 2). y runs
    rl@v1's requests and z rl@v2's, each may go to x, and the ILP counted each as running there, so
    it sent both: x then held two versions in one slot by the planner's own count (a seeded fuzz)."""
    plain = [msgspec.structs.replace(_load("o-0", "", remaining=10), context_tokens=1)]
    v1 = [_load(f"v1-{i}", "v1") for i in range(4)]
    v2 = [_load(f"v2-{i}", "v2") for i in range(4)]
    snap = snapshot_from_stats(
        [_stats("x", (("rl", ""),), plain, slots=1), _stats("y", (("rl", "v1"),), v1)]
        + [_stats("z", (("rl", "v2"),), v2)],
        {"rl": 16},
        adapter_load_seconds=0.0,
    )
    moves = plan(snap).moves if solver == "ilp" else greedy_moves(Standing(snap, 1.0))
    arrived = running_adapters(apply(snap, moves))["x"]
    assert moves and arrived.slots <= 1
