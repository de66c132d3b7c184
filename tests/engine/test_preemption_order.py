"""Who gives up KV, and who runs next, when the cache runs out: vLLM's rules where dLoRA's steps
leave room for a choice. Every case's tokens are those of the same requests on a cache with room."""

from __future__ import annotations

from dlora.common.messages import SamplingParams
from dlora.model.make_tiny import TinyOutput
from dlora.services.worker.engine import LLMEngine
from dlora.services.worker.policy import StepDecision
from tests.engine.helpers import make_engine

PARAMS = SamplingParams(max_tokens=10, ignore_eos=True)


def add(engine: LLMEngine, requests: dict[str, tuple[str | None, int]]) -> None:
    """``requests``: id -> (adapter, priority), each a 4-token prompt of its own (one block of 4)."""
    for i, (rid, (adapter, priority)) in enumerate(requests.items()):
        prompt = [11 + 7 * i, 40 + i, 300 + 3 * i, 17 + i]
        engine.add_request(rid, prompt_token_ids=prompt, params=PARAMS, adapter=adapter, priority=priority)


def step(engine: LLMEngine, got: dict[str, list[int]], decision: StepDecision | None = None) -> set[str]:
    """One step (the policy's, unless ``decision``); the requests that made a token."""
    outs = engine.step(decision)
    for o in outs:
        got.setdefault(o.request_id, []).extend(o.new_token_ids)
    return {o.request_id for o in outs if o.new_token_ids}


def finish(engine: LLMEngine, got: dict[str, list[int]]) -> dict[str, list[int]]:
    while engine.has_unfinished():
        step(engine, got)
    assert engine.blocks.num_free == engine.blocks.num_blocks
    return got


def unpressured(tiny: TinyOutput, requests: dict[str, tuple[str | None, int]], **limits) -> dict[str, list[int]]:
    engine = make_engine(tiny, block_size=4, num_blocks=64, **limits)
    add(engine, requests)
    return finish(engine, {})


def test_a_merged_step_of_low_priority_never_takes_a_higher_priority_request_s_blocks(tiny_llama: TinyOutput) -> None:
    """The lead's decision on dLoRA's victim rule: a merged step of adapter A's low-priority
    decodes, short of a block, preempts its own (vLLM's lowest priority), not the urgent request
    of adapter B that the step leaves paused (the rule took the latest holder outside the step,
    whatever its priority: a helper's fuzz)."""
    a, b = sorted(tiny_llama.adapters)[:2]
    requests = {"urgent": (b, 0), "low": (a, 5)}
    engine = make_engine(tiny_llama, block_size=4, num_blocks=4)
    add(engine, requests)
    got: dict[str, list[int]] = {}
    assert step(engine, got, StepDecision(None, ["urgent", "low"])) == {"urgent", "low"}
    while not engine.stats.preemptions:  # merged on A: the urgent stream is paused
        step(engine, got, StepDecision(a, ["low"]))
    assert engine.seqs["urgent"].num_preemptions == 0
    assert finish(engine, got) == unpressured(tiny_llama, requests)


def test_a_preempted_request_waits_behind_the_decodes_running_when_it_was_preempted(tiny_llama: TinyOutput) -> None:
    """vLLM puts a preempted request at the front of its waiting queue, and schedules its running
    requests before the waiting ones: in a full step (two sequences) the recompute of "r", which
    arrived before "n", does not take the seat of "n", still decoding (it kept its arrival, ran
    before "n" and left it paused: a helper's fuzz)."""
    requests = {"p": (None, 0), "r": (None, 0), "n": (None, 0)}
    engine = make_engine(tiny_llama, block_size=4, num_blocks=4, max_num_seqs=2)
    add(engine, requests)
    got: dict[str, list[int]] = {}
    assert step(engine, got) == {"p", "r"}
    assert step(engine, got, StepDecision(None, ["n"])) == {"n"}
    # Each needs its second block now; one is free: "r", the latest outside the step, gives its up.
    assert step(engine, got, StepDecision(None, ["n", "p"])) == {"n", "p"}
    assert engine.seqs["r"].num_preemptions == 1
    assert step(engine, got) == {"p", "n"}
    assert finish(engine, got) == unpressured(tiny_llama, requests, max_num_seqs=2)


def test_a_lower_priority_prompt_does_not_start_in_a_step_that_preempted_a_higher_one(tiny_llama: TinyOutput) -> None:
    """vLLM admits no waiting request in a step that preempted one: here "r" takes the blocks of
    "v" (both priority 0; the decision left "v" out), and the blocks left over went to the prompt
    of "l" (priority 2), which then decoded on while "v" waited for blocks (a fuzz of the fix of
    dLoRA's victim rule)."""

    def add_all(engine: LLMEngine) -> None:
        engine.add_request("r", prompt_token_ids=[11, 40, 300, 17], params=PARAMS)
        engine.add_request("v", prompt_token_ids=list(range(50, 62)), params=SamplingParams(max_tokens=3))
        engine.add_request("l", prompt_token_ids=[5, 6, 7], params=PARAMS, priority=2)

    engine = make_engine(tiny_llama, block_size=4, num_blocks=4)
    add_all(engine)
    got: dict[str, list[int]] = {}
    assert step(engine, got, StepDecision(None, ["r", "v"])) == {"r", "v"}  # 1 + 3 blocks: full
    assert step(engine, got, StepDecision(None, ["r", "l"])) == {"r"}
    assert engine.seqs["v"].num_preemptions == 1 and not engine.blocks.holds("l")
    want = make_engine(tiny_llama, block_size=4, num_blocks=64)
    add_all(want)
    assert finish(engine, got) == finish(want, {})


def test_prompts_arriving_after_a_recompute_do_not_start_before_it(tiny_llama: TinyOutput) -> None:
    """vLLM's waiting loop stops at a request the free blocks cannot hold. dlora's went on past a
    recompute (here "r", resumed with 25 tokens made elsewhere: 8 of the 12 blocks) to the small
    prompts behind it: with two always queued (a new one whenever one ends) the blocks "r" waited
    for were taken again each time, and it ran only once "a", the older stream ahead of it, had
    ended and it could evict them (11 steps; with a policy ordering another adapter ahead, never)."""
    engine = make_engine(tiny_llama, block_size=4, num_blocks=12)
    small = SamplingParams(max_tokens=6, ignore_eos=True)
    count = 0

    def feed() -> None:
        nonlocal count
        engine.add_request(f"s{count}", prompt_token_ids=[5 + count, 6, 7], params=small)
        count += 1

    got: dict[str, list[int]] = {}
    engine.add_request("a", prompt_token_ids=[3, 4, 5], params=SamplingParams(max_tokens=16, ignore_eos=True))
    feed()
    for _ in range(3):  # the small streams a few tokens apart: one always holds 2 blocks
        step(engine, got)
    feed()
    step(engine, got)
    r = SamplingParams(max_tokens=28, ignore_eos=True)
    engine.add_request("r", prompt_token_ids=list(range(20, 27)), resume_token_ids=list(range(30, 55)), params=r)
    older = set(engine.seqs)
    while "r" not in got:
        while len([rid for rid in engine.seqs if rid not in ("a", "r")]) < 2:
            feed()
        ran = step(engine, got)
        assert "r" in ran or ran <= older  # no newcomer before it
    assert "a" in engine.seqs  # nor did it wait for the stream ahead of it to end
    finish(engine, got)


def test_a_long_prompt_passed_over_for_small_ones_starts_once_the_requests_ahead_of_it_end(
    tiny_llama: TinyOutput,
) -> None:
    """vLLM #31731's trade (its waiting loop stops at a prompt the free blocks cannot hold; dLoRA
    lets smaller ones behind it start): the skipped prompt must not starve while they keep coming.
    Here "L" (28 tokens: 7 of 12 blocks) arrives into a full cache with four small streams always
    queued (a new one whenever one ends); it may be passed over, but once every request older than
    it has ended it is first in its step and takes the blocks of those behind it (``_fits``)."""
    engine = make_engine(tiny_llama, block_size=4, num_blocks=12)
    count = 0

    def feed() -> None:
        nonlocal count
        tokens = SamplingParams(max_tokens=2 + (5 * count) % 11, ignore_eos=True)  # ends staggered
        engine.add_request(f"s{count}", prompt_token_ids=[5 + count, 6, 7], params=tokens)
        count += 1

    got: dict[str, list[int]] = {}
    for _ in range(40):
        while len(engine.seqs) < 4:
            feed()
        step(engine, got)
    engine.add_request("L", prompt_token_ids=list(range(20, 48)), params=SamplingParams(max_tokens=3, ignore_eos=True))
    older = set(engine.seqs) - {"L"}
    ended_at, overtaken = None, False
    for t in range(100):
        while len([rid for rid in engine.seqs if rid != "L"]) < 4:
            feed()
        if ended_at is None and not older & set(engine.seqs):
            ended_at = t
        ran = step(engine, got)
        if "L" in ran:
            break
        overtaken |= bool(ran - older)
    assert "L" in got, "passed over for as long as small prompts came"
    assert overtaken  # (the case: prompts behind it started first)
    assert ended_at is None or t <= ended_at  # at the latest in the first step with nothing older left


def test_a_prompt_alone_in_its_step_evicts_no_one_when_that_would_not_make_it_fit(tiny_llama: TinyOutput) -> None:
    """The decision's prompt "big" (priority 0), alone in its step, evicted "v" (0) and still did
    not fit beside "h" (-1, not its to evict): nothing ran, and the head-of-line pass that ran
    instead started "v" again from its prompt in the same step: its KV thrown away for nothing."""

    def add_all(engine: LLMEngine) -> None:
        engine.add_request("h", prompt_token_ids=list(range(80, 85)), params=PARAMS, priority=-1)  # 2 blocks
        engine.add_request("v", prompt_token_ids=[11, 40, 300], params=PARAMS)
        engine.add_request("l", prompt_token_ids=[5, 6, 7], params=PARAMS, priority=2)
        engine.add_request("big", prompt_token_ids=list(range(60, 73)), params=SamplingParams(max_tokens=3))

    engine = make_engine(tiny_llama, block_size=4, num_blocks=4)
    add_all(engine)
    got: dict[str, list[int]] = {}
    assert step(engine, got, StepDecision(None, ["h", "v"])) == {"h", "v"}  # 1 block left
    assert step(engine, got, StepDecision(None, ["big"])) == {"h", "v", "l"}  # (the head of line)
    assert engine.stats.preemptions == 0
    want = make_engine(tiny_llama, block_size=4, num_blocks=64)
    add_all(want)
    assert finish(engine, got) == finish(want, {})


def test_long_prompts_chunked_into_a_short_cache_are_not_computed_twice(tiny_llama: TinyOutput) -> None:
    """vLLM #21793's kind: three 36-token prompts (9 blocks each of 24) beside three streams, at
    8 tokens a step. Let in a chunk at a time, each took the blocks free and the streams' next
    blocks evicted the latest before its prompt was in, to be let in again (6 prompt prefills
    thrown away; 83 prompt tokens computed again, 30 now). Let in only where all of it fits."""

    def add_all(engine: LLMEngine) -> None:
        for i in range(3):
            tokens = SamplingParams(max_tokens=30 + 5 * i, ignore_eos=True)
            engine.add_request(f"d{i}", prompt_token_ids=[3 + i, 4, 5], params=tokens)
        engine.step()
        for j in range(3):
            prompt = list(range(100 + 50 * j, 136 + 50 * j))
            engine.add_request(f"L{j}", prompt_token_ids=prompt, params=SamplingParams(max_tokens=4, ignore_eos=True))

    engine = make_engine(tiny_llama, block_size=4, num_blocks=24, max_num_batched_tokens=8)
    add_all(engine)
    got: dict[str, list[int]] = {}
    thrown = 0
    while engine.has_unfinished():
        before = {rid: (s.num_preemptions, bool(s.output_ids)) for rid, s in engine.seqs.items()}
        step(engine, got)
        seqs = engine.seqs.items()
        thrown += sum(s.num_preemptions > before[r][0] and not before[r][1] for r, s in seqs if r in before)
    # (6 before) the streams' growth may still take the blocks of one let in whole, 30 tokens in:
    # vLLM's check, too, is of the blocks free when it starts
    assert thrown <= 1
    want = make_engine(tiny_llama, block_size=4, num_blocks=64, max_num_batched_tokens=8)
    add_all(want)
    assert got == finish(want, {})
