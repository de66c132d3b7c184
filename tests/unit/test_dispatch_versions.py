"""Dispatch prices a worker by the adapter *version* a request runs on, not its name alone: after an
in-place reload (vLLM's load_inplace; an RL trainer reloading its policy every few steps) a worker
still holding the old version, for the requests running on it, must read the new one first."""

import msgspec

from dlora.common.messages import AdapterResidency, RequestLoad, WorkerStats
from dlora.services.dispatcher.choose import DispatchCosts, DispatchMode, WorkerLoad, choose_worker
from dlora.services.dispatcher.state import DispatchState

COSTS = DispatchCosts(adapter_load_s=1.0)


def w(
    name: str,
    held: tuple[tuple[str, str], ...] = (),
    queued: tuple[str, ...] = (),
    reading: list[tuple[str, str]] | None = None,
) -> WorkerStats:
    """A worker holding ``held`` (name, version), with a 10-token request of each of ``queued``."""
    return WorkerStats(
        worker=name,
        running=len(queued),
        waiting=0,
        free_blocks=100,
        total_blocks=100,
        block_size=16,
        max_loras=4,
        adapters=[AdapterResidency(name=a, slot=0, merged=False, version=v) for a, v in held],
        seconds_per_token=0.01,
        requests=[
            RequestLoad(request_id=f"{name}{i}", adapter=a, context_tokens=10, remaining_tokens=10)
            for i, a in enumerate(queued)
        ],
        reading=reading,
    )


def test_a_worker_holding_only_the_old_version_pays_the_new_ones_read() -> None:
    """Found by a helper: x holds rl@v1 (its rollouts still run there) and was priced as holding
    rl@v2, so v2's requests piled onto it without a read priced in, while the idle y went unused;
    each then waited there for v2's read all the same."""
    x = w("x", held=(("rl", "v1"),), queued=("rl",), reading=[])
    y = w("y", reading=[])
    assert choose_worker([x, y], "rl", costs=COSTS, version="v2") == "y"
    assert not WorkerLoad.of(x).holds("rl", "v2") and WorkerLoad.of(x).holds("rl", "v1")
    # its own version's requests still go where it is held
    assert choose_worker([x, y], "rl", costs=COSTS, version="v1") == "x"
    assert choose_worker([x, y], "rl", costs=COSTS) == "x"  # no version said: by name, as before


def test_a_request_joins_a_read_of_its_own_version_under_way() -> None:
    """x is reading rl@v2 for a request waiting there: the next v2 request joins that read (priced
    as lacking it, a burst's requests spread and each worker read it)."""
    x = w("x", held=(("rl", "v1"),), queued=("rl", "rl"), reading=[("rl", "v2")])
    y = w("y", reading=[])
    assert choose_worker([x, y], "rl", costs=COSTS, version="v2") == "x"


def test_an_older_workers_stats_are_read_by_name() -> None:
    """A worker from before versions in its residency, or before ``reading``: what it holds and
    queues is taken as the request's version, as every worker's was before (a rolling upgrade)."""
    raw = msgspec.json.encode(w("x", held=(("rl", "v1"),), queued=("rl",)))
    old = msgspec.json.decode(raw.replace(b',"reading":null', b""), type=WorkerStats)
    assert old.reading is None  # its stats still decode
    y = w("y", reading=[])
    assert choose_worker([old, y], "rl", costs=COSTS, version="v2") == "x"  # joins, as it was read
    unversioned = w("x", held=(("rl", ""),), reading=[])
    assert choose_worker([unversioned, y], "rl", costs=COSTS, version="v2") == "x"


def test_the_dispatchers_state_passes_the_version_on() -> None:
    state = DispatchState(5.0, DispatchMode.PROACTIVE, COSTS)
    state.heard(w("x", held=(("rl", "v1"),), queued=("rl",), reading=[]), 0.0)
    state.heard(w("y", reading=[]), 0.0)
    assert state.choose(state.live(0.0), "rl", version="v2") == "y"


def test_a_request_joins_only_the_sends_of_its_own_version() -> None:
    """Found by a helper: the requests sent to a worker since its stats were counted by adapter
    name, so the first request of rl@v2 after an in-place reload was priced as joining the read of
    rl@v1 a request sent there a moment before set off (no read priced), and went there to wait for
    a read of its own. Now a send joins only one of its version (or where a version is not said)."""
    state = DispatchState(5.0, DispatchMode.PROACTIVE, COSTS)
    for name in ("x", "y"):
        state.heard(w(name, reading=[]), 0.0)
    live = state.live(0.0)
    assert state.choose(live, "rl", tokens=10, version="v1") == "x"  # (a tie: by name)
    assert state.choose(live, "rl", tokens=10, version="v2") == "y"  # x would read v2 too, and is busier
    assert state.sent_adapters["x"] == {"rl@v1": 1}
    assert state.choose(live, "rl", tokens=10, version="v2") == "y"  # joins the first v2's read there
    assert state.choose(live, "rl", tokens=10) in ("x", "y")  # no version said: joins either
    # taken back by the version it was counted under
    state.unsend("x", "rl", tokens=10, version="v1")
    assert "rl@v1" not in state.sent_adapters["x"]


def test_sends_join_by_name_where_a_version_is_not_said() -> None:
    from dlora.common.versions import engine_key
    from dlora.services.dispatcher.choose import estimated_finish, was_sent

    assert engine_key("rl", "v1") == "rl@v1" and engine_key("rl", "") == "rl"  # how sends are counted
    assert was_sent(["rl@v1"], "rl", "v1") and not was_sent(["rl@v1"], "rl", "v2")
    assert was_sent(["rl"], "rl", "v2") and was_sent(["rl@v1"], "rl") and not was_sent(["rlx@v1"], "rl")
    # slots are counted by version (each its own: test_dispatch_slots.py); a name alone shares one
    x = WorkerLoad.of(w("x", reading=[]))  # (4 slots)
    by_key = estimated_finish(x, "d", 0.0, set(), COSTS, ["a@1", "a@2", "b@1", "c@1"], 10, 1.0, "1")
    assert by_key == estimated_finish(x, "d", 0.0, set(), COSTS, ["a@1", "a@2", "b", "c"], 10, 1.0, "1")
    assert by_key > estimated_finish(x, "d", 0.0, set(), COSTS, ["a", "a@2", "b", "c"], 10, 1.0, "1")
