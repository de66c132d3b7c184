import msgspec

from dlora.common.messages import (
    AdapterResidency,
    GenerateRequest,
    RequestLoad,
    SamplingParams,
    WorkerStats,
)
from dlora.services.dispatcher.affinity import PrefixAffinity, cache_key, prefix_keys, request_keys
from dlora.services.dispatcher.choose import (
    DispatchCosts,
    DispatchMode,
    choose_worker,
    holding_version,
    version_gone,
)
from dlora.services.dispatcher.state import MAX_GROUP_REQUESTS, DispatchState


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


def test_prefix_keys_a_granule_each_and_a_longer_prompt_shares_a_shorter_ones() -> None:
    system = list(range(100, 140))  # 40 tokens: keys at 16 and 32
    assert len(prefix_keys("a", "", system)) == 2 and prefix_keys("a", "", system[:15]) == []
    turn2 = prefix_keys("a", "", [*system, *range(7, 60)])  # 93 tokens: 5 keys
    assert turn2[:2] == prefix_keys("a", "", system) and len(turn2) == 5
    # other weights or another salt compute other KV: no shared key
    assert not set(prefix_keys("b", "", system)) & set(turn2)
    assert not set(prefix_keys("a", "tenant-x", system)) & set(turn2)
    assert not set(prefix_keys(None, "", system)) & set(turn2)


def test_a_prefix_counts_where_it_covers_half_the_prompt() -> None:
    """A review: every prompt beginning with the same chat-template header (or a short system
    prompt) matched the worker of the last one, drawing every new conversation there."""
    affinity = PrefixAffinity()
    turn1 = list(range(100, 200))  # 100 tokens: kept at 16, 32, 64 and 96
    affinity.sent(prefix_keys("a", "", turn1), "x")
    turn2 = [*turn1, *range(7, 70)]  # 163 tokens: 96 of them shared, over half
    assert affinity.worker_for(prefix_keys("a", "", turn2), {"x", "y"}) == "x"
    assert affinity.worker_for(prefix_keys("a", "", turn2), {"y"}) is None  # x is not live
    other = [*turn1[:40], *range(300, 400)]  # 140 tokens, 32 shared: a header, not a conversation
    assert affinity.worker_for(prefix_keys("a", "", other), {"x", "y"}) is None


def test_a_chats_next_turn_goes_where_its_history_went_unless_that_worker_is_far_behind() -> None:
    """A user's trial: a conversation's turns landed on either of two workers, and its prefix cache
    hit 35 % of prompt tokens where one worker hit 80 %."""
    state = DispatchState(5.0, DispatchMode.PROACTIVE, DispatchCosts())
    history = list(range(100, 200))
    x, y = w("x", [("a", 5)], ("a",)), w("y", adapters=("a",))  # the first turn goes to y, not to x by name
    state.heard(x, 0.0)
    state.heard(y, 0.0)
    assert state.choose([x, y], "a", prefix_keys("a", "", history)) == "y"
    # the next turn (history and more) follows it, though x is now the soonest
    y_busier = w("y", [("a", 20)], ("a",))
    state.heard(x, 1.0)
    state.heard(y_busier, 1.0)
    assert state.choose([x, y_busier], "a", prefix_keys("a", "", [*history, 5, 6, 7])) == "y"
    # without the history, x: the test would pass by name otherwise
    assert choose_worker([x, y_busier], "a") == "x"
    # far behind the soonest (here 3x its queued work): load wins over the cache
    busy = w("y", [("a", 200)], ("a",))
    state.heard(busy, 2.0)
    state.heard(x, 2.0)
    assert state.choose([busy, x], "a", prefix_keys("a", "", history)) == "x"
    # with prefix_affinity 1 it is off
    assert choose_worker([y_busier, x], "a", affine="y", costs=DispatchCosts(prefix_affinity=1.0)) == "x"
    # the keys follow where the prompt went last; a worker lost takes them with it
    keys = prefix_keys("a", "", history)
    assert state.affinity.worker_for(keys, {"x", "y"}) == "x"
    state.forget("x")
    assert state.affinity.worker_for(keys, {"x", "y"}) is None


def test_requests_sharing_a_prompt_cache_key_go_together_whatever_their_prompts_share() -> None:
    """OpenAI's prompt_cache_key, put after the prefix keys: a conversation whose client names it
    finds its worker even where its prompts share little (a summarised history)."""
    state = DispatchState(5.0, DispatchMode.PROACTIVE, DispatchCosts())
    x, y = w("x", [("a", 5)], ("a",)), w("y", adapters=("a",))
    state.heard(x, 0.0)
    state.heard(y, 0.0)

    def keys(prompt: list[int], key: str) -> list[bytes]:
        return [*prefix_keys("a", "", prompt), cache_key("a", "", key)]

    assert state.choose([x, y], "a", keys(list(range(100, 140)), "c1")) == "y"
    y_busier = w("y", [("a", 20)], ("a",))
    state.heard(x, 1.0)
    state.heard(y_busier, 1.0)
    assert state.choose([x, y_busier], "a", keys(list(range(500, 600)), "c1")) == "y"  # nothing shared but the key
    assert state.choose([x, y_busier], "a", keys(list(range(700, 800)), "c2")) == "x"  # another conversation
    assert state.choose([x, y_busier], "a", keys([1, 2, 3], "c1")) == "y"  # a prompt too short for a key


def test_a_shared_prefix_is_found_wherever_its_length_falls() -> None:
    """A review: kept at doubling lengths, a 500-token prefix shared with a 540-token prompt (or
    1,000 of 1,040) read as 256 (512) tokens, under half, and was refused."""
    for shared in (300, 500, 520, 700, 1000, 1100, 2000):
        affinity = PrefixAffinity()
        base = list(range(1000, 1000 + shared))
        affinity.sent(prefix_keys("a", "", [*base, *range(5, 45)]), "x")
        assert affinity.worker_for(prefix_keys("a", "", [*base, *range(50, 90)]), {"x"}) == "x", shared


def test_a_requests_choices_go_to_one_worker_while_it_is_live_whatever_the_load() -> None:
    """A user's trial: a request's n = 8 choices spread over both workers by load (the prefix's
    affinity holds only within two requests' work), and each worker computed the prompt. Choices
    of a group go where the first went, round-robin too; a lost worker's group goes elsewhere."""
    for mode in DispatchMode:
        state = DispatchState(5.0, mode, DispatchCosts())
        x, y = w("x"), w("y")
        state.heard(x, 0.0)
        state.heard(y, 0.0)
        first = state.choose([x, y], "a", group="r1/0")
        assert all(state.choose([x, y], "a", group="r1/0") == first for _ in range(7)), mode
        other = next(s for s in (x, y) if s.worker != first)
        assert state.choose([other], "a", group="r1/0") == other.worker  # its worker gone: elsewhere, then there
        assert state.choose([x, y], "a", group="r1/0") == other.worker
    # an application's one group for everything pins at most a request's worth to a worker
    rr = DispatchState(5.0, DispatchMode.ROUND_ROBIN, DispatchCosts())
    pinned = {rr.choose([x, y], "a", group="all") for _ in range(MAX_GROUP_REQUESTS)}
    assert len(pinned) == 1 and rr.choose([x, y], "a", group="all") not in pinned
    assert {rr.choose([x, y], "a", group="all") for _ in range(4)} == {"x", "y"}  # by load (here, turns) from then on


def test_a_requests_keys_follow_its_adapters_files_not_its_name() -> None:
    """A user's trial: the workers' caches key KV by the adapter's files (its version), the
    affinity keyed it by name: a second name of the same files went anywhere."""

    def req(adapter: str, version: str, key: str = "", tenant: str = "") -> GenerateRequest:
        return GenerateRequest(
            request_id="r",
            reply_to="x",
            adapter=adapter,
            adapter_version=version,
            prompt_token_ids=list(range(40)),
            params=SamplingParams(),
            prompt_cache_key=key,
            tenant=tenant,
        )

    assert request_keys(req("a", "d1")) == request_keys(req("a-twin", "d1"))
    assert request_keys(req("a", "d1")) != request_keys(req("a", "d2"))  # loaded again onto other files
    assert request_keys(req("a", "d1", "c"))[-1] != request_keys(req("a", "d1", "c", tenant="t2"))[-1]


def test_a_chats_turns_sent_back_to_back_stay_with_its_worker_between_stats() -> None:
    """A user's trial: turns of one chat sent as soon as each answer came (faster than the
    workers' stats) went to the other, idle worker one time in five, cache cold: each turn sent
    counted as two requests' work still to do there until the next stats, though the turn before
    had ended (its answer is in the next prompt). A prompt that extends an earlier one exactly
    takes that request off its worker's count: with a prompt_cache_key too, and past the tokens
    the keys cover."""
    for keyed, start, tokens in ((False, 280, None), (True, 280, None), (False, 9000, None), (False, 280, 16.0)):
        state = DispatchState(5.0, DispatchMode.PROACTIVE, DispatchCosts())
        x, y = w("x", [("a", 5)], ("a",)), w("y", adapters=("a",))
        state.heard(x, 0.0)
        state.heard(y, 0.0)
        history = list(range(100, 100 + start))
        for turn in range(8):
            history += [7] * 8 + list(range(400 + 20 * turn, 420 + 20 * turn))  # an answer, a question
            keys = [*prefix_keys("a", "", history), *([cache_key("a", "", "c")] if keyed else [])]
            assert state.choose([x, y], "a", keys, prompt=history, tokens=tokens) == "y", (keyed, start, turn)
        assert state.sent_tokens["y"] == (tokens or 64)  # the last turn, still running (at its own price)


def test_only_a_prompt_that_extends_an_earlier_one_exactly_takes_it_off() -> None:
    """A review: prompts sharing a long header and ending in an item of a token or two share the
    header's last block key, and each took the one before off its worker's count; sent at once,
    they all still run. The same prompt sent again whole is not an extension either. And a request
    that never went (``unsend``) is not taken off a second time by a prompt extending it."""
    state = DispatchState(5.0, DispatchMode.PROACTIVE, DispatchCosts())
    x, y = w("x"), w("y")
    state.heard(x, 0.0)
    state.heard(y, 0.0)
    header = list(range(1000, 1158))  # 9 blocks and 14 tokens: an item of 2 completes the 10th
    for item in range(6):
        prompt = [*header, *range(5000 + 10 * item, 5001 + 10 * item + item % 2)]
        state.choose([x, y], "a", prefix_keys("a", "", prompt), prompt=prompt)
    for _ in range(2):
        state.choose([x, y], "a", prefix_keys("a", "", header), prompt=header)
    assert sum(state.sent_tokens.values()) == 8 * 64
    state = DispatchState(5.0, DispatchMode.PROACTIVE, DispatchCosts())
    state.heard(x, 0.0)
    state.heard(y, 0.0)
    first, after = list(range(100, 300)), list(range(100, 340))
    keys = prefix_keys("a", "", first)
    assert state.choose([x], "a", keys, prompt=first) == "x"
    state.choose([x], "b", prefix_keys("b", "", first), prompt=first)  # another request there
    state.unsend("x", "a", keys, first)
    state.choose([x], "a", prefix_keys("a", "", after), prompt=after)
    assert state.sent_tokens["x"] == 2 * 64  # b's and the last


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
