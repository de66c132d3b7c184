from dataclasses import replace
from types import SimpleNamespace

import torch

from dlora.common.messages import SamplingParams
from dlora.services.worker.engine.block_manager import BlockManager
from dlora.services.worker.engine.queue_view import queued
from dlora.services.worker.engine.scheduler import Limits, schedule
from dlora.services.worker.engine.sequence import PRIORITY_SPAN, Sequence, Status, requeue
from dlora.services.worker.policy import StepDecision, SwitchedFeeds

LIMITS = Limits(max_num_seqs=8, max_num_batched_tokens=64, max_adapters=2, chunked_prefill=False)


class _NoText:
    def decode(self, ids, skip_special_tokens=True):
        return ""


def seq(rid: str, arrival: int, prompt_len: int, adapter: str | None = None, outputs: int = 0) -> Sequence:
    from dlora.services.worker.engine.detokenizer import IncrementalDetokenizer

    s = Sequence(
        rid,
        adapter,
        list(range(prompt_len)),
        SamplingParams(),
        arrival,
        IncrementalDetokenizer(_NoText(), []),
        torch.Generator(),
    )
    s.output_ids = list(range(outputs))
    return s


def running(s: Sequence, bm: BlockManager) -> Sequence:
    s.status = Status.RUNNING
    s.num_cached = s.total_len - 1
    bm.grow(s.request_id, s.num_cached)
    return s


def test_admits_prefills_within_free_blocks_in_order() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    seqs = {s.request_id: s for s in [seq("a", 0, 8), seq("b", 1, 9), seq("c", 2, 4)]}
    plan = schedule(StepDecision(None, ["a", "b", "c"]), seqs, bm, LIMITS)
    # b needs 3 blocks and only 2 are left: it waits; c still fits after it
    assert [s.request_id for s in plan.seqs] == ["a", "c"]
    assert plan.preempted == []


def test_no_prompt_keyed_behind_a_recompute_that_does_not_fit_starts() -> None:
    """vLLM's waiting loop stops there: past it, small prompts kept taking the blocks the recompute
    waited for. A prompt holding blocks already (in vLLM's running list) goes on."""
    bm = BlockManager(num_blocks=4, block_size=4)
    d = running(seq("d", 0, 3, outputs=1), bm)
    r = seq("r", 1, 8, outputs=5)  # 13 tokens: 4 blocks, 2 free
    h = seq("h", 3, 8)
    h.num_cached = 4
    bm.grow("h", 4)  # its first chunk in: the second takes 1 block
    seqs = {s.request_id: s for s in [d, r, h, seq("p", 4, 4)]}
    plan = schedule(StepDecision(None, ["d", "r", "h", "p"]), seqs, bm, LIMITS)
    assert [s.request_id for s in plan.seqs] == ["d", "h"]
    assert not bm.holds("p") and not bm.holds("r")


def test_without_chunked_prefill_no_prompt_keyed_behind_a_recompute_over_the_budget_left_starts() -> None:
    """The token budget's stop as vLLM's (its waiting loop ends at a prompt over the budget left
    when chunked prefill is off): past it, small prompts kept the step's budget taken by their
    decodes, and the recompute waited as long as they came."""
    bm = BlockManager(num_blocks=32, block_size=4)
    d = running(seq("d", 0, 3, outputs=1), bm)
    seqs = {s.request_id: s for s in [d, seq("r", 1, 60, outputs=4), seq("p", 2, 4)]}
    plan = schedule(StepDecision(None, ["d", "r", "p"]), seqs, bm, LIMITS)  # r: 64 tokens, 63 left
    assert [s.request_id for s in plan.seqs] == ["d"]


def test_a_pass_after_one_that_preempted_starts_no_prompt_of_a_lower_priority() -> None:
    """The engine's head-of-line pass, after a decision whose pass preempted a priority-0 request
    and ran nothing, passes that on (``floor``): vLLM admits no waiting request in such a step."""
    bm = BlockManager(num_blocks=4, block_size=4)
    seqs = {s.request_id: s for s in [seq("p", 0, 4), seq("l", 2 * PRIORITY_SPAN, 4)]}
    plan = schedule(StepDecision(None, ["p", "l"]), seqs, bm, LIMITS, floor=0)
    assert [s.request_id for s in plan.seqs] == ["p"]


def test_decode_preempts_the_latest_running_sequence_outside_the_batch() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    old = running(seq("old", 0, 4, outputs=1), bm)  # 4 cached, needs a 2nd block for token 5
    mid = running(seq("mid", 1, 4, outputs=1), bm)
    new = running(seq("new", 2, 8, outputs=1), bm)  # holds 2 blocks
    assert bm.num_free == 0
    seqs = {s.request_id: s for s in (old, mid, new)}
    plan = schedule(StepDecision(None, ["old", "mid"]), seqs, bm, LIMITS)
    assert plan.preempted == [new]
    assert new.status is Status.WAITING and new.num_cached == 0 and bm.table("new") == []
    assert [s.request_id for s in plan.seqs] == ["old", "mid"]


def test_a_sequence_with_no_victim_preempts_itself() -> None:
    bm = BlockManager(num_blocks=1, block_size=4)
    s = running(seq("a", 0, 4, outputs=1), bm)
    plan = schedule(StepDecision(None, ["a"]), {"a": s}, bm, LIMITS)
    assert plan.seqs == [] and plan.preempted == [s]


def test_a_decode_never_takes_a_higher_priority_s_blocks_but_takes_a_lower_one_s_in_the_step() -> None:
    """vLLM's priority scheduling (the lead's decision on dLoRA's victim rule): the urgent decode,
    after a low-priority one the decision put first (credits), takes that one's blocks, though it
    is in the step, not those of the paused urgent one outside it; the low-priority one, short of
    a block itself, gives up its own."""
    bm = BlockManager(num_blocks=4, block_size=4)
    low = running(seq("low", 10, 2, adapter="a", outputs=1), bm)  # its next token fits its block
    urgent = running(seq("urgent", 4, 4, adapter="b", outputs=1), bm)
    paused = running(seq("paused", 2, 8, adapter="c", outputs=1), bm)  # holds 2 blocks
    low.arrival += 5 * PRIORITY_SPAN
    seqs = {s.request_id: s for s in (low, urgent, paused)}
    plan = schedule(StepDecision(None, ["low", "urgent"]), seqs, bm, LIMITS)
    assert plan.preempted == [low] and [s.request_id for s in plan.seqs] == ["urgent"]
    assert low.num_scheduled == 0 and bm.holds("paused") and bm.table("low") == []
    bm = BlockManager(num_blocks=3, block_size=4)
    low, paused = running(seq("low", 10, 4, outputs=1), bm), running(seq("paused", 2, 8, outputs=1), bm)
    low.arrival += 5 * PRIORITY_SPAN
    plan = schedule(StepDecision(None, ["low"]), {"low": low, "paused": paused}, bm, LIMITS)
    assert plan.seqs == [] and plan.preempted == [low] and bm.holds("paused")


def test_limits_on_adapters_sequences_and_tokens() -> None:
    bm = BlockManager(num_blocks=64, block_size=4)
    seqs = {
        s.request_id: s
        for s in [
            seq("a", 0, 4, "x"),
            seq("b", 1, 4, "y"),
            seq("c", 2, 4, "z"),
            seq("d", 3, 4, None),
            seq("e", 4, 60, "x"),
        ]
    }
    plan = schedule(StepDecision(None, list(seqs)), seqs, bm, LIMITS)
    # z would be a third adapter; e would pass the 64-token budget
    assert [s.request_id for s in plan.seqs] == ["a", "b", "d"]


def test_merged_decision_runs_only_that_adapter() -> None:
    bm = BlockManager(num_blocks=64, block_size=4)
    seqs = {s.request_id: s for s in [seq("a", 0, 4, "x"), seq("b", 1, 4, None), seq("c", 2, 4, "x")]}
    plan = schedule(StepDecision("x", ["a", "b", "c"]), seqs, bm, LIMITS)
    assert [s.request_id for s in plan.seqs] == ["a", "c"]


def test_an_empty_step_takes_blocks_from_paused_sequences() -> None:
    """Merged on x while y's sequences hold every block: x's prefill must still run."""
    bm = BlockManager(num_blocks=2, block_size=4)
    paused = running(seq("p", 0, 8, "y", outputs=1), bm)
    fresh = seq("f", 1, 4, "x")
    plan = schedule(StepDecision("x", ["f"]), {"p": paused, "f": fresh}, bm, LIMITS)
    assert plan.seqs == [fresh] and plan.preempted == [paused]


def test_an_empty_step_s_prefill_takes_a_lower_priority_s_blocks_in_the_decision_first() -> None:
    """Not those of a paused request of its own priority outside the decision: that one would wait
    for blocks while the lower priority went on (the lead's rule: never preempted for lower work)."""
    bm = BlockManager(num_blocks=3, block_size=4)
    paused = running(seq("p", 0, 4, outputs=1), bm)
    half = seq("h", 5 * PRIORITY_SPAN + 2, 12)
    bm.grow("h", 8)  # two chunks in
    fresh = seq("f", 4, 4)
    seqs = {"p": paused, "f": fresh, "h": half}
    plan = schedule(StepDecision(None, ["f", "h"]), seqs, bm, LIMITS)
    assert plan.seqs == [fresh] and plan.preempted == [half] and bm.holds("p")


def test_a_mixed_step_runs_others_beside_the_merged_adapter_within_the_slots_left() -> None:
    bm = BlockManager(num_blocks=64, block_size=4)
    adapters = ["m", "x", None, "m", "y", "x"]
    seqs = {f"r{i}": seq(f"r{i}", i, 2, a) for i, a in enumerate(adapters)}
    ids = list(seqs)
    merged_only = schedule(StepDecision("m", ids), seqs, bm, LIMITS)
    assert [s.request_id for s in merged_only.seqs] == ["r0", "r3"]
    # two slots: m's correction holds one, x the other; y waits
    mixed = schedule(StepDecision("m", ids, mixed=True), seqs, BlockManager(64, 4), LIMITS)
    assert [s.request_id for s in mixed.seqs] == ["r0", "r1", "r2", "r3", "r5"]


CHUNKED = Limits(max_num_seqs=8, max_num_batched_tokens=16, max_adapters=2, chunked_prefill=True)


def test_a_long_prefill_runs_in_chunks_beside_the_decodes() -> None:
    bm = BlockManager(num_blocks=64, block_size=4)
    d1, d2 = running(seq("d1", 0, 5, outputs=1), bm), running(seq("d2", 1, 3, outputs=2), bm)
    long = seq("long", 2, 40)
    seqs = {s.request_id: s for s in (d1, d2, long)}
    plan = schedule(StepDecision(None, ["d1", "d2", "long"]), seqs, bm, CHUNKED)
    assert [(s.request_id, s.num_scheduled) for s in plan.seqs] == [("d1", 1), ("d2", 1), ("long", 14)]
    assert len(bm.table("long")) == 4  # room for the 14 tokens of this chunk only
    # Without chunks the budget holds the decodes only and the prompt waits for a step of its own.
    bm2 = BlockManager(num_blocks=64, block_size=4)
    seqs2 = {s.request_id: s for s in (running(seq("d1", 0, 5, outputs=1), bm2), seq("long", 2, 40))}
    plan = schedule(StepDecision(None, ["d1", "long"]), seqs2, bm2, replace(CHUNKED, chunked_prefill=False))
    assert [s.request_id for s in plan.seqs] == ["d1"]


def test_a_chunked_prompt_starts_only_where_all_of_it_fits_the_blocks_free() -> None:
    """vLLM's admission (scheduler_reserve_full_isl, on by default; vLLM #21793): let in for its
    first chunk's blocks, a prompt the cache could not hold whole filled it and was evicted by the
    decodes' next blocks, to be computed again; the short prompt behind it still starts."""
    bm = BlockManager(num_blocks=6, block_size=4)
    d = running(seq("d", 0, 3, outputs=1), bm)  # 1 block: 5 free
    seqs = {s.request_id: s for s in (d, seq("long", 1, 24), seq("short", 2, 8))}  # 6 blocks, 2
    plan = schedule(StepDecision(None, ["d", "long", "short"]), seqs, bm, replace(CHUNKED, max_num_batched_tokens=8))
    assert [(s.request_id, s.num_scheduled) for s in plan.seqs] == [("d", 1), ("short", 7)]
    assert not bm.holds("long")


def test_decodes_keep_their_place_in_the_budget_behind_a_prefill_decided_first() -> None:
    """A prompt of a higher priority comes first in the decision: its chunk took the whole budget
    and every running stream stalled for its prefill (a user's trial). The decodes go first in
    the budget, as in vLLM; the chunk takes what they leave."""
    bm = BlockManager(num_blocks=64, block_size=4)
    d1, d2 = running(seq("d1", 1, 5, outputs=1), bm), running(seq("d2", 2, 3, outputs=2), bm)
    urgent = seq("urgent", 0, 40)
    seqs = {s.request_id: s for s in (d1, d2, urgent)}
    plan = schedule(StepDecision(None, ["urgent", "d1", "d2"]), seqs, bm, CHUNKED)
    assert [(s.request_id, s.num_scheduled) for s in plan.seqs] == [("urgent", 14), ("d1", 1), ("d2", 1)]
    # a prompt that fits whole leaves them their room too, and one with none left waits
    short = seq("short", 0, 15)
    plan = schedule(StepDecision(None, ["short", "d1", "d2"]), {"short": short, "d1": d1, "d2": d2}, bm, CHUNKED)
    assert [(s.request_id, s.num_scheduled) for s in plan.seqs] == [("short", 14), ("d1", 1), ("d2", 1)]
    # no more room held than the step has sequences left for (a merged-only decision is uncapped)
    many = {f"m{i}": running(seq(f"m{i}", 10 + i, 3, outputs=1), bm) for i in range(10)}
    first = seq("first", 0, 40)
    plan = schedule(StepDecision(None, ["first", *many]), {"first": first, **many}, bm, CHUNKED)
    assert [(s.request_id, s.num_scheduled) for s in plan.seqs][0] == ("first", 16 - 7)  # 8 seqs: 7 decodes
    tight = replace(CHUNKED, max_num_batched_tokens=2)
    late = seq("late", 0, 40)
    plan = schedule(StepDecision(None, ["late", "d1", "d2"]), {"late": late, "d1": d1, "d2": d2}, bm, tight)
    assert [s.request_id for s in plan.seqs] == ["d1", "d2"] and bm.table("late") == []


def test_a_prompt_longer_than_the_budget_is_chunked_even_when_it_runs_first() -> None:
    bm = BlockManager(num_blocks=64, block_size=4)
    s = seq("p", 0, 40)
    s.num_cached = 0
    plan = schedule(StepDecision(None, ["p"]), {"p": s}, bm, CHUNKED)
    assert plan.seqs == [s] and s.num_scheduled == 16
    s.num_cached = 16  # the engine moves it on after the step; the next chunk continues there
    plan = schedule(StepDecision(None, ["p"]), {"p": s}, bm, CHUNKED)
    assert s.num_scheduled == 16 and len(bm.table("p")) == 8


def test_a_prefill_that_cannot_run_gives_its_cached_blocks_back() -> None:
    bm = BlockManager(num_blocks=4, block_size=4, enable_prefix_caching=True)
    a = seq("a", 0, 9)
    schedule(StepDecision(None, ["a"]), {"a": a}, bm, CHUNKED)
    bm.computed("a", a.all_ids(), 0, 9, b"")
    bm.free("a")  # finished: its two full blocks stay cached
    hog = running(seq("hog", 1, 7, outputs=1), bm)  # takes the two never-cached blocks
    late = seq("late", 2, 30)  # begins with a's first two blocks, then needs more than is free
    plan = schedule(StepDecision(None, ["hog", "late"]), {"hog": hog, "late": late}, bm, CHUNKED)
    assert [s.request_id for s in plan.seqs] == ["hog"]
    assert late.num_cached == 0 and bm.table("late") == [] and bm.num_cached == 2


def test_two_half_prefilled_prompts_that_fill_the_cache_do_not_stall_it() -> None:
    """Each got a chunk in turn (the policy's order changed between the steps) and together they
    hold every block: the earlier one takes the later one's blocks, as a step must run."""
    bm = BlockManager(num_blocks=8, block_size=4)
    p1, p2 = seq("p1", 0, 30), seq("p2", 1, 30)
    seqs = {"p1": p1, "p2": p2}
    schedule(StepDecision(None, ["p1", "p2"]), seqs, bm, CHUNKED)
    p1.num_cached = 16
    schedule(StepDecision(None, ["p2", "p1"]), seqs, bm, CHUNKED)
    p2.num_cached = 16
    assert bm.num_free == 0
    plan = schedule(StepDecision(None, ["p2", "p1"]), seqs, bm, CHUNKED)
    assert plan.seqs == [p1] and plan.preempted == [p2] and p2.num_cached == 0


def test_a_prompt_whose_next_block_a_prefill_computes_this_step_waits_and_then_finds_it_cached() -> None:
    """Identical prompts admitted together (n > 1 choices): the first computes the prompt, the
    others wait one step and reuse its blocks instead of computing the same KV beside it; a prompt
    under another key, or sharing nothing, runs at once."""
    bm = BlockManager(num_blocks=64, block_size=4, enable_prefix_caching=True)
    a, b, other, salted = seq("a", 0, 10), seq("b", 1, 10), seq("c", 2, 10), seq("d", 3, 10)
    other.prompt_ids = [t + 100 for t in other.prompt_ids]
    salted.cache_salt = "s"
    seqs = {s.request_id: s for s in (a, b, other, salted)}
    roomy = replace(CHUNKED, max_num_batched_tokens=64)
    plan = schedule(StepDecision(None, list(seqs)), seqs, bm, roomy)
    assert [s.request_id for s in plan.seqs] == ["a", "c", "d"]
    assert b.num_cached == 0 and not bm.holds("b") and [s.lookup for s in plan.seqs] == [(10, 0)] * 3
    for s in plan.seqs:
        bm.computed(s.request_id, s.all_ids(), 0, 10, s.salted(b""))
        s.status, s.num_cached = Status.RUNNING, 10
    plan = schedule(StepDecision(None, ["b"]), seqs, bm, roomy)
    assert b.num_cached == 8 and b.num_scheduled == 2 and b.lookup == (10, 8)


def test_a_prompt_sharing_only_a_short_header_with_one_prefilling_does_not_wait() -> None:
    """A shared block ahead of a long prompt of its own: waiting a step would save less than half
    of what it computes now, so it runs (and computes the header again)."""
    bm = BlockManager(num_blocks=64, block_size=4, enable_prefix_caching=True)
    a, b = seq("a", 0, 10), seq("b", 1, 40)
    b.prompt_ids = a.prompt_ids[:4] + [t + 100 for t in b.prompt_ids[4:]]
    plan = schedule(StepDecision(None, ["a", "b"]), {"a": a, "b": b}, bm, replace(CHUNKED, max_num_batched_tokens=64))
    assert [s.request_id for s in plan.seqs] == ["a", "b"] and b.num_cached == 0


def test_a_sibling_waits_for_the_chunk_that_computes_its_next_block_then_reuses_all_of_it() -> None:
    bm = BlockManager(num_blocks=64, block_size=4, enable_prefix_caching=True)
    a, b = seq("a", 0, 30), seq("b", 1, 30)
    seqs = {"a": a, "b": b}
    ran = []
    for _ in range(2):  # a's chunks: tokens [0, 16) alone, then [16, 30) with room left that b waits out
        plan = schedule(StepDecision(None, ["a", "b"]), seqs, bm, CHUNKED)
        ran.append([(s.request_id, s.num_cached, s.num_scheduled) for s in plan.seqs])
        bm.computed("a", a.all_ids(), a.num_cached, a.num_cached + a.num_scheduled, b"")
        a.num_cached += a.num_scheduled
    assert ran == [[("a", 0, 16)], [("a", 16, 14)]] and not bm.holds("b")
    a.status = Status.RUNNING
    plan = schedule(StepDecision(None, ["b"]), seqs, bm, CHUNKED)
    assert (b.num_cached, b.num_scheduled) == (28, 2)  # every block but the last token's


def test_the_policy_sees_a_waiting_prompt_without_what_it_would_find_cached_under_each_merged_state() -> None:
    """A prompt of adapter x whose first 8 tokens were computed with nothing merged and first 12
    with x merged: with nothing merged now it feeds 8 of 16, 4 were x merged, all 16 under another
    merge; with y merged now, 16. Each key's names are hashed once; only as many prompts of an
    adapter as one step can run are looked up."""
    bm = BlockManager(num_blocks=64, block_size=4, enable_prefix_caching=True)
    for rid, n, key in (("a", 10, b"x|"), ("c", 17, b"x|x")):
        done = seq(rid, 0, n, adapter="x")
        schedule(StepDecision(None, [rid]), {rid: done}, bm, CHUNKED)
        bm.grow(rid, n)
        bm.computed(rid, done.all_ids(), 0, n, key)
    again, later = seq("b", 1, 16, adapter="x"), seq("d", 2, 16, adapter="x")
    adapters = {a: SimpleNamespace(rank=8) for a in "xy"}
    wide = Limits(max_num_seqs=8, max_num_batched_tokens=64, max_adapters=2)

    def key(adapter: str | None, merged: str | None) -> bytes:
        return f"{adapter}|{merged or ''}".encode()

    q = queued([again], adapters, wide, {}, bm, key, None)["b"]
    assert (q.num_new, q.switched, q.work) == (8, SwitchedFeeds(8, 4, 16), 4)
    assert (q.fed(None, None), q.fed("x", None), q.fed("y", None)) == (8, 4, 16)
    q = queued([again], adapters, wide, {}, bm, key, "y")["b"]
    assert (q.num_new, q.fed(None, "y"), q.fed("x", "y"), q.fed("z", "y"), q.work) == (16, 8, 4, 16, 4)
    assert set(again.block_names) == {b"x|", b"x|x", b"x|y"}
    # it attends the tokens found cached as well as those it feeds: 8 + 8 of its 16, 12 + 4 with x merged
    assert (queued([again], adapters, wide, {}, bm, key, None)["b"].context, q.context) == (16, 16)
    assert queued([again], adapters, wide, {}, bm, key, "x")["b"].context == 16
    tight = Limits(max_num_seqs=1, max_num_batched_tokens=6, max_adapters=2)
    both = queued([again, later], adapters, tight, {}, bm, key, None)
    assert (both["b"].num_new, both["b"].switched) == (6, SwitchedFeeds(6, 4, 6))  # within the budget
    assert both["b"].context == 8 + 6  # cached 8, fed 6 of the other 8
    # all it has left past the budget, under each merged state (what a counterfactual feeds in chunks)
    assert (both["b"].left(None, None), both["b"].left("x", None), both["b"].left("y", None)) == (8, 4, 16)
    # under each merged state a candidate could run it: what that state's key holds, and its feed
    b = both["b"]
    assert (b.attends(None, None), b.attends("x", None), b.attends("y", None)) == (8 + 6, 12 + 4, 0 + 6)
    chunk = b.cut(3)
    assert (chunk.attends(None, None), chunk.attends("x", None), chunk.attends("y", None)) == (11, 15, 3)
    assert both["d"].switched is None  # one step runs one of x's prompts: d is not looked up
    assert queued([again], adapters, wide, {})["b"].num_new == 16  # no cache given: the whole prompt


def test_the_policy_sees_each_request_s_context_refreshed_as_it_grows() -> None:
    """A request's context is what it would attend fed this step: a prompt its whole length up to
    the budget, a decode all its tokens. A decode's entry is kept (not made anew each step) while
    its context grew by at most a sixteenth."""
    bm = BlockManager(num_blocks=256, block_size=4)
    adapters = {"x": SimpleNamespace(rank=8)}
    limits = Limits(max_num_seqs=8, max_num_batched_tokens=64, max_adapters=2)
    prompt, decode = seq("p", 0, 100, adapter="x"), running(seq("d", 1, 300, adapter="x", outputs=20), bm)
    last = queued([prompt, decode], adapters, limits, {})
    assert (last["p"].context, last["d"].context) == (64, 320)
    assert (last["p"].left(None, None), last["p"].length, last["d"].length) == (100, 100, 0)  # p past the budget
    first = last["d"]
    for grown in range(1, 40):
        decode.output_ids.append(0)
        decode.num_cached += 1
        last = queued([prompt, decode], adapters, limits, last)
        assert (last["d"] is first) == (320 + grown <= first.context + first.context // 16), grown
        first = last["d"]
    assert last["d"].context == 341  # made anew at 341 (past 320 + 20), kept up to 362


def test_an_empty_step_s_prefill_does_not_evict_an_earlier_prefill_left_out() -> None:
    """Two prompts the cache holds one at a time: the later one, alone in the decision, evicted
    the earlier one's half-done prefill, which evicted it back in turn, and neither ever ended."""
    bm = BlockManager(num_blocks=2, block_size=4)
    early, late = seq("early", 0, 8), seq("late", 2, 8)
    bm.grow("early", 4)
    early.num_cached = 4
    seqs = {"early": early, "late": late}
    plan = schedule(StepDecision(None, ["late"]), seqs, bm, LIMITS)
    assert plan.seqs == [] and plan.preempted == [] and bm.table("early") != []
    plan = schedule(StepDecision(None, ["early"]), seqs, bm, LIMITS)
    assert plan.seqs == [early] and early.num_scheduled == 4


def test_preempted_requests_go_back_behind_those_holding_kv_and_ahead_of_those_waiting() -> None:
    """vLLM's order: a preempted request at the front of the waiting queue, running ones first;
    half-prefilled prompts hold KV (vLLM's running list); those preempted keep their order, and a
    prompt that never made a token keeps its key."""
    bm = BlockManager(num_blocks=8, block_size=4)
    run, half = running(seq("run", 4, 4, outputs=1), bm), seq("half", 8, 8)
    bm.grow("half", 4)
    v1, v2, fresh, wait = (
        seq("v1", 2, 4, outputs=2),
        seq("v2", 6, 4, outputs=1),
        seq("fresh", 12, 4),
        seq("wait", 10, 4),
    )
    low = seq("low", 5 * PRIORITY_SPAN + 2, 4, outputs=1)
    seqs = [run, v1, half, v2, wait, fresh, low]
    assert requeue([v2, fresh, v1, low], seqs, bm.holds, 7) == 10
    order = sorted(seqs, key=lambda s: s.arrival)
    assert [s.request_id for s in order] == ["run", "half", "v1", "v2", "wait", "fresh", "low"]
    assert low.priority == 5 and low.arrival > 5 * PRIORITY_SPAN + 2
    assert requeue([run], seqs, bm.holds, 10) == 11 and run.arrival == v1.arrival  # ahead of "wait" too


def test_a_preempted_request_is_not_keyed_ahead_of_a_decode_running_behind_a_waiting_prompt() -> None:
    """A prompt left waiting (another adapter merged, or too long for the blocks free) sorts before
    a later decode that runs: the preempted request's key went just below that prompt's, ahead of
    the decode it had been behind, and as a step's first request short of KV evicted it."""
    bm = BlockManager(num_blocks=8, block_size=4)
    wait, run = seq("wait", 2, 4), running(seq("run", 4, 4, outputs=1), bm)
    gone = seq("gone", 6, 4, outputs=2)
    seqs = [wait, run, gone]
    assert requeue([gone], seqs, bm.holds, 7) == 8
    assert gone.arrival > run.arrival  # behind the decode running, as vLLM runs its running first
    order = sorted(seqs, key=lambda s: s.arrival)
    assert [s.request_id for s in order] == ["wait", "run", "gone"]


def test_a_preempted_request_of_a_negative_priority_goes_ahead_of_its_waiting_prompts() -> None:
    """vLLM's priorities go below 0: with none of its priority holding KV, a preempted request goes
    ahead of that priority's waiting prompts, as at priority 0."""
    bm = BlockManager(num_blocks=8, block_size=4)
    wait, gone = seq("wait", -PRIORITY_SPAN + 2, 4), seq("gone", -PRIORITY_SPAN + 4, 4, outputs=1)
    assert requeue([gone], [wait, gone], bm.holds, 7) == 8
    assert gone.arrival == wait.arrival - 1 and gone.priority == -1


def test_a_merged_step_does_not_evict_its_running_decode_for_a_recompute_keyed_past_a_paused_prompt() -> None:
    """dLoRA's merged step leaves another adapter's prompt waiting ahead of its running decode: a
    recompute keyed below that prompt was the step's first request short of KV and evicted it."""
    bm = BlockManager(num_blocks=4, block_size=4)
    wait, run = seq("wait", 2, 4, adapter="x"), running(seq("run", 4, 11, adapter="y", outputs=1), bm)
    gone = seq("gone", 6, 4, adapter="y", outputs=4)  # its recompute needs 2 blocks, 1 is free
    seqs = {s.request_id: s for s in (wait, run, gone)}
    requeue([gone], seqs.values(), bm.holds, 7)
    line = [s.request_id for s in sorted(seqs.values(), key=lambda s: s.arrival) if s.adapter == "y"]
    plan = schedule(StepDecision("y", line), seqs, bm, LIMITS)
    assert plan.seqs == [run] and plan.preempted == []


def test_a_prompt_preempted_in_the_step_that_admitted_it_is_no_preemption() -> None:
    """It lost no KV of its own (vLLM preempts only what an earlier step admitted), yet it counted
    in vllm:num_preemptions and in its own preemptions (with no prefix cache to take back)."""
    bm = BlockManager(num_blocks=4, block_size=4)
    urgent = running(seq("urgent", 0, 12, outputs=1), bm)  # 3 blocks: its next token needs the 4th
    prompt = seq("prompt", 1 + 5 * PRIORITY_SPAN, 3)  # a lower priority, decided first
    plan = schedule(StepDecision(None, ["prompt", "urgent"]), {"prompt": prompt, "urgent": urgent}, bm, LIMITS)
    assert plan.seqs == [urgent] and not bm.holds("prompt")  # it took the prompt's block
    assert plan.preempted == [] and prompt.num_preemptions == 0  # ([prompt] and 1 before)
