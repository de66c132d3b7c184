"""Dispatch's affinity (``dispatcher.affinity``, ``DispatchState``): a chat's next turn, requests
sharing a prompt_cache_key or a long prefix, and a request's choices go to the worker whose KV
cache holds what they share, unless it is far behind; keys follow an adapter's files."""

from dlora.common.messages import GenerateRequest, SamplingParams
from dlora.services.dispatcher.affinity import PrefixAffinity, cache_key, prefix_keys, request_keys
from dlora.services.dispatcher.choose import DispatchCosts, DispatchMode, choose_worker
from dlora.services.dispatcher.state import MAX_GROUP_REQUESTS, DispatchState
from tests.unit.test_dispatch_choice import w


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
