import msgspec

from dlora.common.messages import (
    AdapterResidency,
    RequestLoad,
    WorkerStats,
)
from dlora.services.dispatcher.affinity import prefix_keys
from dlora.services.dispatcher.choose import (
    DispatchCosts,
    DispatchMode,
    choose_worker,
    holding_version,
    version_gone,
)
from dlora.services.dispatcher.state import DispatchState


def w(
    name: str, queued: list[tuple[str | None, int]] = (), adapters: tuple[str, ...] = (), spt: float = 0.01
) -> WorkerStats:
    reqs = [
        RequestLoad(request_id=f"{name}{i}", adapter=a, context_tokens=10, remaining_tokens=n)
        for i, (a, n) in enumerate(queued)
    ]
    return WorkerStats(
        worker=name,
        running=len(reqs),
        waiting=0,
        free_blocks=100,
        total_blocks=100,
        block_size=16,
        max_loras=4,
        adapters=[AdapterResidency(name=a, slot=0, merged=False) for a in adapters],
        seconds_per_token=spt,
        requests=reqs,
    )


def test_no_workers_no_choice() -> None:
    assert choose_worker([], "a") is None


def test_least_queued_work_wins_not_least_requests() -> None:
    few_long = w("x", [(None, 500)])
    many_short = w("y", [(None, 5)] * 4)
    assert choose_worker([few_long, many_short], None) == "y"


def test_every_worker_is_priced_at_the_live_workers_mean_speed() -> None:
    """A batched worker's seconds per token fall as its batch grows: the busier x measures 1 ms,
    the idler y 10 ms. Priced by its own figure, x won with twice y's queue and drew still more
    (simulated: 35k-107k tokens per replica, a third above round-robin's latency); at the mean
    the shorter queue wins. The measured speed still prices queued work against a load."""
    assert choose_worker([w("x", [(None, 100)], spt=0.001), w("y", [(None, 50)], spt=0.01)], None) == "y"
    costs = DispatchCosts(adapter_load_s=0.3)
    for spt, expected in ((0.001, "x"), (0.01, "y")):  # fast: a 0.3 s load outweighs 50 tokens; slow: not
        x, y = w("x", [(None, 100)], ("a",), spt=spt), w("y", [(None, 50)], spt=10 * spt)
        assert choose_worker([x, y], "a", costs=costs) == expected


def test_a_request_is_priced_at_its_max_tokens_where_that_is_below_the_expected_length() -> None:
    """A trial: a burst of 16-token requests, each priced at ``expected_tokens`` (64) on the worker
    holding their adapter, looked 4x their work; from the third on they went to a worker that read
    the adapter again. Priced at their bound, seven go where the adapter is; a request whose bound is
    not known, or above the expected length, is still priced at that."""
    for max_tokens, on_holder in ((16, 7), (0, 2), (4096, 2)):
        state = DispatchState(5.0, DispatchMode.PROACTIVE, DispatchCosts())
        state.heard(w("x", adapters=("a",)), 0.0)
        state.heard(msgspec.structs.replace(w("y"), adapter_read_seconds=1.0), 0.0)
        picks = [state.choose(state.live(0.0), "a", tokens=state.price(max_tokens)) for _ in range(8)]
        assert picks[: on_holder + 1] == ["x"] * on_holder + ["y"], (max_tokens, picks)
        priced = min(64, max_tokens or 64)
        assert state.sent_tokens["x"] == picks.count("x") * priced
        state.unsend("x", "a", tokens=state.price(max_tokens), heard=1)  # taken back as counted
        assert state.sent_tokens["x"] == (picks.count("x") - 1) * priced
        state.heard(w("x", [("a", 32)], ("a",)), 1.0)
        state.choose([state.workers["x"][0]], "a", tokens=16.0)
        state.unsend("x", "a", tokens=16.0, heard=1)  # counted against the stats before: out already
        assert state.sent_tokens["x"] == 16.0 and state.sent_adapters["x"] == {"a": 1}
    # one that ignores EOS runs to its max_tokens; none is priced below its min_tokens
    assert (state.price(200, ignore_eos=True), state.price(200, min_tokens=100), state.price(0)) == (200, 100, 64)


def test_once_workers_report_finished_lengths_a_request_is_priced_at_what_those_took() -> None:
    """A chat client that sets no max_tokens: priced at 64 while the answers were 1-32 tokens, a
    read of its adapter elsewhere looked cheaper than a short queue on its holder (simulated, reads
    30x NVMe's: 30.2/45.3 ms/token mean/P90 -> 24.7/34.5). Each request is priced at what requests
    of its bound took on the workers lately (their quantiles pooled); before any did, as before."""
    state = DispatchState(5.0, DispatchMode.PROACTIVE, DispatchCosts())
    x = msgspec.structs.replace(w("x", adapters=("a",)), output_tokens_quantiles=[8] * 8 + [24] * 8)
    y = msgspec.structs.replace(w("y"), adapter_read_seconds=1.0)
    state.heard(x, 0.0)
    state.heard(y, 0.0)
    picks = [state.choose(state.live(0.0), "a") for _ in range(8)]  # no bound: 16 tokens each
    assert picks[:6] == ["x"] * 6 and state.sent_tokens["x"] == 16 * picks.count("x")
    state.heard(x, 1.0)
    state.choose(state.live(1.0), "a", tokens=state.price(8))  # bounded at 8: every one took 8 or more
    assert state.sent_tokens["x"] == 8
    state.forget("x")
    state.choose(state.live(1.0), "a")  # nobody says: the setting
    assert state.sent_tokens["y"] == 16 * picks.count("y") + 64


def test_the_prefix_worker_s_slack_is_in_the_request_s_own_work() -> None:
    """A trial: 60 one-token requests sharing a prompt prefix all went to one worker, its slack two
    requests of 64 tokens whatever theirs. Two of the request's own now: a 64-token request still
    goes where its prefix is cached behind a 64-token queue; a one-token one goes to the idle one."""
    x, y = w("x", [("a", 64)], ("a",)), w("y", adapters=("a",))
    assert choose_worker([x, y], "a", affine="x", tokens=64.0) == "x"
    assert choose_worker([x, y], "a", affine="x", tokens=1.0) == "y"


def test_holding_the_adapter_saves_its_load_and_same_adapter_batches_run_merged() -> None:
    costs = DispatchCosts(adapter_load_s=1.0)
    assert choose_worker([w("x"), w("y", adapters=("a",))], "a", costs=costs) == "y"
    # a worker busy with adapter a takes a's request before an equally loaded one busy with b
    assert choose_worker([w("x", [("b", 50)], ("a", "b")), w("y", [("a", 50)], ("a", "b"))], "a") == "y"
    # ...but not against a much less loaded worker
    assert choose_worker([w("x"), w("y", [("a", 800)], ("a",))], "a", costs=costs) == "x"


def test_placement_and_recent_sends_count() -> None:
    costs = DispatchCosts(adapter_load_s=1.0)
    assert choose_worker([w("x"), w("y")], "a", placement={"y": ["a"]}, costs=costs) == "y"
    assert choose_worker([w("x"), w("y")], None, sent_tokens={"x": 192.0}) == "y"


def test_a_worker_holds_a_request_only_whole() -> None:
    from dlora.services.dispatcher.choose import holds_request

    small = WorkerStats(
        worker="w", running=0, waiting=0, free_blocks=8, total_blocks=8, block_size=16, max_loras=1, max_model_len=128
    )
    assert holds_request(small, 128) and not holds_request(small, 129)
    assert holds_request(msgspec.structs.replace(small, max_model_len=0), 10**6)  # an older worker: unknown


def test_a_worker_that_has_not_measured_is_priced_at_its_peers_speed() -> None:
    """Restarted, it has no measured speed yet: at a fixed 10 ms per token guess it lost every
    request to a measured 3 ms peer under light load and stayed idle. At the peers' mean it takes
    one as soon as the peer has work queued."""
    fresh = w("a-fresh", spt=0.0)
    busy = w("b-busy", [(None, 20)], spt=0.003)
    assert choose_worker([fresh, busy], None) == "a-fresh"
    assert choose_worker([fresh, w("b-idle", spt=0.003)], None) == "a-fresh"  # a tie: by name
    # with no worker measured, the configured guess prices all alike
    assert choose_worker([w("y", spt=0.0), w("x", [(None, 1)], spt=0.0)], None) == "y"


def test_dispatch_state_counts_sends_until_the_next_stats_and_drops_stale_or_draining_workers() -> None:
    from dlora.services.dispatcher.choose import DispatchMode

    state = DispatchState(ttl_s=5.0, mode=DispatchMode.PROACTIVE, costs=DispatchCosts())
    state.heard(w("x"), now=0.0)
    state.heard(w("y"), now=0.0)
    state.heard(msgspec.structs.replace(w("z"), draining=True), now=0.0)
    assert [st.worker for st in state.live(now=1.0)] == ["x", "y"]
    picks = [state.choose(state.live(1.0), None) for _ in range(4)]
    assert picks == ["x", "y", "x", "y"]  # each send counts against its worker until it reports
    state.heard(w("x"), now=2.0)
    assert state.sent_tokens == {"x": 0, "y": 2 * 64, "z": 0}
    # The same message heard again (a simulated idle replica's) is not summed again; a new one is.
    st = w("x", [("a", 3)])
    state.heard(st, now=3.0)
    load = state.loads["x"]
    state.heard(st, now=3.5)
    assert state.loads["x"] is load and state.workers["x"] == (st, 3.5) and state.sent_tokens["x"] == 0
    state.heard(w("x"), now=4.0)
    assert state.loads["x"] is not load and not state.loads["x"].busy
    assert [st.worker for st in state.live(now=6.0)] == ["x"]  # y's stats are 6 s old
    rr = DispatchState(ttl_s=5.0, mode=DispatchMode.ROUND_ROBIN, costs=DispatchCosts())
    for name in ("b", "a"):
        rr.heard(w(name, [(None, 900)] if name == "a" else []), now=0.0)
    assert [rr.choose(rr.live(0.0), None) for _ in range(3)] == ["a", "b", "a"]  # blind to load
    assert rr.choose([], None) is None


def test_loads_kept_per_stats_choose_as_the_stats_do_and_stale_ones_are_not_read() -> None:
    """The dispatcher sums each worker's stats once (``WorkerLoad``), not per request; a load kept
    of older stats of the same worker is never read in place of the stats it is handed."""
    from dlora.services.dispatcher.choose import WorkerLoad

    x, y = w("x", [("b", 50), ("b", 5), ("a", 9)], ("a", "b")), w("y", [("a", 50)], ("a", "b"))
    load = WorkerLoad.of(x)
    assert (load.queued_tokens, load.dominant, load.busy, load.adapters) == (64, "b", True, frozenset({"a", "b"}))
    for adapter in ("a", "b", None):
        assert choose_worker([x, y], adapter, loads={"x": load, "y": WorkerLoad.of(y)}) == choose_worker(
            [x, y], adapter
        )
    idle_x = w("x", adapters=("a", "b"))
    assert choose_worker([idle_x, y], "a") == "x"
    assert choose_worker([idle_x, y], "a", loads={"x": load}) == "x"  # the kept load is of x's older stats


def test_a_worker_running_more_adapters_than_it_has_slots_is_priced_for_the_crowding() -> None:
    """x has requests of 4 adapters in its 4 slots; a fifth can only run a few adapters at a time
    there, so a step serves each adapter a fraction of the time. Priced without that (simulated,
    8 replicas x 64 adapters, 8 slots each: 58.8 against round-robin's 1,014 ms/token once priced,
    994 before), dispatch spread every adapter over every worker, as round-robin does."""
    crowded = w("x", [(a, 10) for a in "abcd"], adapters=tuple("abcd"))
    roomy = w("y", [("e", 30), ("f", 30)], adapters=("e", "f"))
    assert choose_worker([crowded, roomy], "g") == "y"  # a fifth adapter: where it has a slot
    assert choose_worker([crowded, roomy], "a") == "x"  # one of x's own: the shorter queue
    assert choose_worker([crowded, roomy], None) == "x"  # the base model needs no slot


def test_adapters_sent_since_the_stats_count_in_the_crowding() -> None:
    """A burst of new adapters to an idle worker crowds its slots before its stats say so: x (2
    slots, idle) takes a1 and a2; a third adapter there would share 2 slots among 3 (1.5 x its
    queue: 4.5 requests' worth) where y's queue of base-model requests is 4.1 requests' worth.
    Counting only the stats' adapters, x looked uncrowded and took the whole burst."""
    from dlora.services.dispatcher.choose import DispatchMode

    costs = DispatchCosts()
    state = DispatchState(ttl_s=5.0, mode=DispatchMode.PROACTIVE, costs=costs)
    state.heard(msgspec.structs.replace(w("x"), max_loras=2), now=0.0)
    state.heard(msgspec.structs.replace(w("y", [(None, int(3 * costs.expected_tokens))]), max_loras=2), now=0.0)
    assert [state.choose(state.live(0.0), a) for a in ("a1", "a2", "a3")] == ["x", "x", "y"]
    assert state.sent_adapters == {"x": {"a1": 1, "a2": 1}, "y": {"a3": 1}}
    # one that another dispatcher recorded first is taken back: x is no longer crowded by it
    state.unsend("x", "a2")
    assert state.sent_adapters["x"] == {"a1": 1} and state.sent_tokens["x"] == costs.expected_tokens
    assert state.choose(state.live(0.0), "a4") == "x"
    state.heard(msgspec.structs.replace(w("x"), max_loras=2), now=1.0)
    assert not state.sent_adapters["x"]
    state.forget("y")
    assert "y" not in state.sent_adapters and "y" not in state.workers


def test_a_rewritten_adapter_goes_only_to_a_worker_holding_its_version() -> None:
    old = msgspec.structs.replace(w("w0"), adapters=[AdapterResidency(name="rl", slot=0, merged=False, version="v1")])
    new = msgspec.structs.replace(w("w1"), adapters=[AdapterResidency(name="rl", slot=0, merged=False, version="v2")])
    lacks = w("w2")
    assert [x.worker for x in holding_version([old, new, lacks], "rl", "v1", avoid=())] == ["w0"]
    assert holding_version([old, new, lacks], "rl", "v1", avoid={"w0"}) == []  # the worker that handed it back
    assert "load_inplace" in version_gone("rl", "v1")


def test_a_worker_is_quiet_past_half_the_ttl_and_three_of_its_own_gaps() -> None:
    """Quiet (likely dead, not yet lost): silent past half the TTL, unless its own stats come that
    far apart (a review: a worker's gaps are its interval plus its Redis writes); lost past the TTL."""
    state = DispatchState(5.0, DispatchMode.PROACTIVE, DispatchCosts())
    for at in (0.0, 0.5, 1.0):
        state.heard(w("fast"), at)
    for at in (0.0, 1.0, 2.0):
        state.heard(w("slow"), at)  # 1 s apart: quiet only past 3 s
    assert state.quiet(4.0) == {"fast"}  # 3 s silent: past 2.5 (half the TTL) and 1.5 (its gaps)
    assert state.quiet(5.5) == {"fast", "slow"}
    assert state.quiet(6.5) == {"slow"}  # "fast" past the TTL: lost, not quiet


def test_a_worker_given_up_on_leaves_nothing_behind() -> None:
    """Its gaps and stats count stayed, one of each per worker id ever seen (helpers' churn of ids:
    replaced hosts under new names, pods). The requests sent to it go with its count: back under
    that id, counting from 0, an old request's count matched a new one's (a review) and its end
    took a new request's work off the count."""
    state = DispatchState(5.0, DispatchMode.PROACTIVE, DispatchCosts())
    for at in (0.0, 0.5):
        state.heard(w("gone"), at)
    old = list(range(100, 300))
    assert state.choose(state.live(0.5), "a", prefix_keys("a", "", old), prompt=old) == "gone"
    state.forget("gone")
    tables = (state.workers, state.loads, state.sent_tokens, state.sent_adapters, state.gaps, state.stats_heard)
    assert not any("gone" in table for table in tables) and not state.ends
    for at in (1.0, 1.5):  # back under the id, its count at 2 again
        state.heard(w("gone"), at)
    new = list(range(500, 700))
    state.choose(state.live(1.5), "b", prefix_keys("b", "", new), prompt=new)
    later = old + list(range(300, 340))  # the old one's chat, a turn on: its end is not taken off the new count
    state.choose(state.live(1.5), "a", prefix_keys("a", "", later), prompt=later)
    assert state.sent_tokens["gone"] == 2 * 64  # b's and the last


def test_dispatchers_with_salts_of_their_own_part_among_equal_workers() -> None:
    """A probe: two dispatchers that took one request each at the same moment both sent it to w0
    (9 of 9 trials) while w1 sat idle: each counts only its own sends, and ties went by name.
    Salted, each breaks them its own way: about half of the pairs part at once, and a pair that
    agrees on one tie does not on every tie after. Unsalted (the simulator): by name, as before."""
    idle = [w("w0"), w("w1"), w("w2")]

    def dispatcher(salt: bytes, mode: DispatchMode = DispatchMode.PROACTIVE) -> DispatchState:
        state = DispatchState(5.0, mode, DispatchCosts(), salt)
        for st in idle:
            state.heard(st, 0.0)
        return state

    def first(salt: bytes, mode: DispatchMode = DispatchMode.PROACTIVE) -> str | None:
        state = dispatcher(salt, mode)
        return state.choose(state.live(0.0), None)

    assert first(b"") == first(b"") == first(b"", DispatchMode.ROUND_ROBIN) == "w0"
    assert first(b"d1") == first(b"d1")  # one dispatcher's choice is its salt's
    assert len({first(b"d%d" % i) for i in range(30)}) == 3
    parted = sum(first(b"a%d" % i) != first(b"b%d" % i) for i in range(300))
    assert 150 < parted < 250, parted  # two thirds part, among three
    a, b = dispatcher(b"a0"), dispatcher(b"b0")
    agreed = 0
    for t in range(300):  # each takes one request, then hears the workers idle again
        agreed += a.choose(a.live(t), None) == b.choose(b.live(t), None)
        for st in idle:
            a.heard(st, t)
            b.heard(st, t)
    assert 50 < agreed < 150, agreed
    # round-robin dispatchers do not all begin at the same worker either
    assert len({first(b"r%d" % i, DispatchMode.ROUND_ROBIN) for i in range(30)}) == 3


def test_the_adapters_queued_on_a_worker_count_its_requests_past_those_listed() -> None:
    """A worker lists its first MAX_LISTED requests: an adapter whose requests all came after them
    (a burst) was not seen queued there, so its next requests were priced as needing a read and
    spread to other workers, each reading it again, and the slots' crowding was undercounted."""
    from dlora.services.dispatcher.choose import WorkerLoad

    x = msgspec.structs.replace(w("x", [("a", 5)]), unlisted_requests=40, unlisted_by_adapter={"b": (0, 40)})
    load = WorkerLoad.of(x)
    assert load.queued_adapters == {"a", "b"} and load.dominant == "b" and load.busy
    assert WorkerLoad.of(w("y", [(None, 5), ("a", 3), ("a", 2)])).dominant == "a"
    # equals: the first seen, in arrival order (those listed came before the rest)
    tied = msgspec.structs.replace(w("t", [("a", 5)]), unlisted_requests=1, unlisted_by_adapter={"b": (0, 1)})
    assert WorkerLoad.of(tied).dominant == "a"
