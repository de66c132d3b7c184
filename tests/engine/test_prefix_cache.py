"""Prefix caching and chunked prefill in the engine: greedy output still equals transformers +
peft token for token, with the cache warm, across preemption and migration, with chunks that
split blocks; a hit is always KV of the same adapter weights computed the same way."""

from __future__ import annotations

import pytest
import torch

from dlora.common.messages import SamplingParams
from dlora.model.make_tiny import TinyOutput
from dlora.services.worker.engine import LLMEngine
from dlora.services.worker.engine.kv_transfer import KVSnapshot
from dlora.services.worker.policy import StepDecision, SwitchedFeeds
from tests.engine.helpers import make_engine, run_all
from tests.engine.oracle import Oracle

MAX_TOKENS = 8
# A shared "system prompt" and user turns after it, as token ids (any ids are a prompt here).
SYSTEM = [(7 * i + 3) % 200 + 10 for i in range(21)]
TURNS = [[41, 42, 43], [51, 52, 53, 54, 55], [61]]


@pytest.fixture(scope="module")
def oracle(tiny_llama: TinyOutput) -> Oracle:
    return Oracle(tiny_llama)


def _hits(engine: LLMEngine) -> int:
    return engine.stats.prefix_cache_hits


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_later_turns_reuse_the_cache_and_match_the_oracle(tiny_llama: TinyOutput, oracle: Oracle, kernels: str) -> None:
    """Each turn resends the conversation so far: its prefill starts after the cached blocks, and
    every adapter's output (the base's too) equals the oracle's."""
    engine = make_engine(tiny_llama, block_size=4, kernels=kernels)
    # Under the Triton interpreter each step takes about a second: one adapter, two turns.
    adapters, turns, max_tokens = (
        ([None, *sorted(tiny_llama.adapters)[:2]], TURNS, MAX_TOKENS)
        if kernels == "torch"
        else (["lora-1"], TURNS[:2], 3)
    )
    for adapter in adapters:
        history: list[int] = list(SYSTEM)
        for turn, user in enumerate(turns):
            history += user
            before = (engine.stats.prefix_cache_queries, _hits(engine))
            got = run_all(engine, {f"{adapter}-{turn}": (adapter, history)}, max_tokens)[f"{adapter}-{turn}"]
            assert got == oracle.generate(adapter, history, max_tokens), (adapter, turn)
            queries, hits = engine.stats.prefix_cache_queries - before[0], _hits(engine) - before[1]
            assert queries == len(history)
            if turn > 0:  # every full block of the previous turn's prompt, at least
                assert hits >= (len(history) - len(user) - max_tokens) // 4 * 4 > 0, (adapter, turn, hits)
            history += got


def test_an_adapter_registered_again_with_other_weights_never_reads_the_old_kv(
    tiny_llama: TinyOutput, oracle: Oracle
) -> None:
    """The cache is keyed by what an adapter is, not what it is called (vLLM #42125: re-registered
    under the same name, it served the old adapter's KV)."""
    engine = make_engine(tiny_llama, block_size=4)
    prompt = SYSTEM + TURNS[0]
    first, second = sorted(tiny_llama.adapters)[:2]
    engine.unregister_adapter(first)
    engine.register_adapter(first, tiny_llama.adapters[first])
    assert run_all(engine, {"a": (first, prompt)}, MAX_TOKENS)["a"] == oracle.generate(first, prompt, MAX_TOKENS)
    engine.unregister_adapter(first)
    engine.register_adapter(first, tiny_llama.adapters[second])  # the same name, the other weights
    hits = _hits(engine)
    assert run_all(engine, {"b": (first, prompt)}, MAX_TOKENS)["b"] == oracle.generate(second, prompt, MAX_TOKENS)
    assert _hits(engine) == hits
    # The same weights under two names are one adapter to the cache.
    assert run_all(engine, {"c": (second, prompt)}, MAX_TOKENS)["c"] == oracle.generate(second, prompt, MAX_TOKENS)
    assert _hits(engine) > hits


def test_a_salted_request_shares_blocks_only_with_its_salt(tiny_llama: TinyOutput, oracle: Oracle) -> None:
    """vLLM's cache_salt: a prompt cached under one salt (or none) is no hit under another, and
    is one under the same; the output is the oracle's every time."""
    engine = make_engine(tiny_llama, block_size=4)
    prompt, want = SYSTEM + TURNS[0], oracle.generate("lora-1", SYSTEM + TURNS[0], MAX_TOKENS)
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)

    def served(rid: str, salt: str) -> tuple[list[int], int]:
        hits = _hits(engine)
        engine.add_request(rid, prompt_token_ids=prompt, params=params, adapter="lora-1", cache_salt=salt)
        out: list[int] = []
        while engine.has_unfinished():
            out += [t for o in engine.step() for t in o.new_token_ids]
        return out, _hits(engine) - hits

    assert served("plain", "") == (want, 0)
    assert served("tenant-a", "salt-a") == (want, 0)  # not the unsalted blocks
    assert served("tenant-b", "salt-b") == (want, 0)  # nor another salt's
    got, hits = served("tenant-a-again", "salt-a")
    assert got == want and hits >= len(prompt) // 4 * 4 - 4  # its own salt's blocks
    got, hits = served("plain-again", "")
    assert got == want and hits > 0


def test_merged_and_unmerged_kv_differ_so_a_merged_step_does_not_reuse_unmerged_blocks(
    tiny_llama: TinyOutput,
) -> None:
    """The same prompt and adapter prefilled unmerged and then merged: the KV is close but not the
    same bits (the weights round differently), so the merged adapter is part of the key: the merged
    prefill finds nothing, and a later merged one finds the merged blocks."""
    engine = make_engine(tiny_llama, block_size=4)
    adapter = sorted(tiny_llama.adapters)[0]
    prompt = SYSTEM + TURNS[1]
    params = SamplingParams(max_tokens=4)
    for rid in ("unmerged", "merged", "merged-again"):
        engine.add_request(rid, prompt_token_ids=prompt, params=params, adapter=adapter)
    engine.step(StepDecision(None, ["unmerged"]))
    hits = _hits(engine)
    engine.step(StepDecision(adapter, ["merged"]))
    assert _hits(engine) == hits
    kv, bs = engine.model.kv, engine.blocks.block_size
    full = len(prompt) // bs * bs
    unmerged, merged = (engine.blocks.slots(rid, 0, full) for rid in ("unmerged", "merged"))
    assert not torch.equal(kv.k[:, unmerged], kv.k[:, merged])
    torch.testing.assert_close(kv.k[:, unmerged], kv.k[:, merged], atol=1e-4, rtol=1e-4)
    engine.step(StepDecision(adapter, ["merged-again"]))
    assert _hits(engine) - hits == full - (bs if full == len(prompt) else 0)
    assert engine.blocks.table("merged-again")[: full // bs] == engine.blocks.table("merged")[: full // bs]


def test_shared_blocks_survive_preemption_and_outputs_match(tiny_llama: TinyOutput, oracle: Oracle) -> None:
    """Requests that share a long prefix, too few blocks for all of them: some are preempted
    (their shared blocks stay with the others) and recomputed, and every output matches."""
    adapters = [None, *sorted(tiny_llama.adapters)]
    requests = {f"r{i}": (adapters[i % 2], SYSTEM + TURNS[i % 3] + [i]) for i in range(6)}
    engine = make_engine(tiny_llama, block_size=4, num_blocks=20, policy="mixed-only")
    got = run_all(engine, requests, MAX_TOKENS)
    assert engine.stats.preemptions > 0 and _hits(engine) > 0
    assert got == {rid: oracle.generate(a, ids, MAX_TOKENS) for rid, (a, ids) in requests.items()}
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_a_request_on_shared_blocks_moves_with_its_kv_and_continues_exactly(
    tiny_llama: TinyOutput, oracle: Oracle
) -> None:
    adapter = sorted(tiny_llama.adapters)[1]
    src, dst = make_engine(tiny_llama, block_size=4), make_engine(tiny_llama, block_size=4)
    prompt = SYSTEM + TURNS[1]
    run_all(src, {"warm": (adapter, SYSTEM + TURNS[0])}, 2)
    src.add_request("r", prompt_token_ids=prompt, params=SamplingParams(max_tokens=MAX_TOKENS), adapter=adapter)
    produced: list[int] = []
    for _ in range(3):
        produced += src.step()[0].new_token_ids
    assert _hits(src) > 0
    kv = KVSnapshot.from_bytes(src.export_kv("r").to_bytes())
    src.abort("r")
    params = SamplingParams(max_tokens=MAX_TOKENS)
    dst.add_request("r", prompt_token_ids=prompt, params=params, adapter=adapter, resume_token_ids=produced, kv=kv)
    while dst.has_unfinished():
        produced += dst.step()[0].new_token_ids
    assert produced == oracle.generate(adapter, prompt, MAX_TOKENS)
    assert dst.blocks.num_cached == 0  # moved KV is not named: which weights computed it is not known


@pytest.mark.parametrize("kernels,budget", [("torch", 5), ("torch", 7), ("triton", 6)])
def test_chunked_prefill_with_chunks_that_split_blocks_matches_and_bounds_every_step(
    tiny_llama: TinyOutput, oracle: Oracle, kernels: str, budget: int
) -> None:
    """A budget of a few tokens per step with 4-token blocks: prompts are prefilled in chunks that
    end mid-block, beside decodes; no step feeds more than the budget, outputs match."""
    adapters = [None, *sorted(tiny_llama.adapters)[:2]]
    n = 4 if kernels == "torch" else 2
    requests = {f"r{i}": (adapters[i % 3], SYSTEM[: 9 + 4 * i] + TURNS[i % 3]) for i in range(n)}
    engine = make_engine(
        tiny_llama, block_size=4, max_num_batched_tokens=budget, kernels=kernels, enable_prefix_caching=False
    )
    fed: list[int] = []
    observe = engine.policy.observe
    engine.policy.observe = lambda decision, record: (fed.append(record.num_tokens), observe(decision, record))[1]  # type: ignore[method-assign]
    max_tokens = MAX_TOKENS if kernels == "torch" else 3
    got = run_all(engine, requests, max_tokens)
    assert got == {rid: oracle.generate(a, ids, max_tokens) for rid, (a, ids) in requests.items()}
    assert max(fed) == budget and engine.stats.prefill_tokens == sum(len(ids) for _, ids in requests.values())


def test_a_running_stream_keeps_decoding_while_a_prompt_of_higher_priority_prefills(tiny_llama: TinyOutput) -> None:
    """A user's trial: with a budget of 16 tokens a 120-token prompt sent with priority -1 took every
    step's whole budget, and the running stream made no token for its whole prefill."""
    engine = make_engine(tiny_llama, max_num_batched_tokens=16)
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    engine.add_request("stream", prompt_token_ids=SYSTEM[:20], params=params)
    for _ in range(2):
        engine.step()
    engine.add_request("urgent", prompt_token_ids=(SYSTEM * 8)[:120], params=params, priority=-1)
    made, steps = {"stream": 0, "urgent": 0}, 0
    while not made["urgent"]:
        steps += 1
        for out in engine.step():
            made[out.request_id] += len(out.new_token_ids)
    assert steps > 1 and made["stream"] == steps  # a token at every step, beside each 15-token chunk


def test_choices_of_one_prompt_compute_it_once_and_match_the_oracle(tiny_llama: TinyOutput, oracle: Oracle) -> None:
    """n > 1 reaches the engine as n requests of one prompt at once: the first computes the prompt,
    the others wait a step and take its blocks (they computed all of it beside it before)."""
    adapter, prompt = sorted(tiny_llama.adapters)[0], SYSTEM + TURNS[1]  # 26 tokens: 6 full blocks of 4
    engine = make_engine(tiny_llama, block_size=4)
    got = run_all(engine, {f"c{i}": (adapter, prompt) for i in range(4)}, MAX_TOKENS)
    assert got == {f"c{i}": oracle.generate(adapter, prompt, MAX_TOKENS) for i in range(4)}
    assert _hits(engine) == 3 * 24 and engine.stats.prefill_tokens == 26 + 3 * 2


def test_vllms_tokens_per_step_leave_the_prompt_tokens_found_in_the_cache_out(tiny_llama: TinyOutput) -> None:
    """vllm:iteration_tokens_total counts a step's computed prompt tokens, not those its requests
    found in the prefix cache (vLLM #43346: with them, a step of cached prompts read as thousands
    of tokens that no forward ran); vllm:prompt_tokens_total still counts every prompt token."""
    prompt = SYSTEM + TURNS[1]  # 26 tokens: 6 full blocks of 4, reused by the three after the first
    engine = make_engine(tiny_llama, block_size=4)
    run_all(engine, {f"c{i}": (None, prompt) for i in range(4)}, MAX_TOKENS)
    assert engine.stats.prompt_tokens == 4 * 26 and _hits(engine) == 3 * 24
    assert engine.stats.iteration_tokens == 4 * 26 - 3 * 24 + engine.stats.tokens_generated == 32 + 4 * MAX_TOKENS
    assert sum(engine.stats.iteration_steps.values()) == engine.stats.steps


def test_the_policy_sees_what_a_waiting_prompt_would_find_cached_under_each_merged_state(
    tiny_llama: TinyOutput,
) -> None:
    """The queue the policy decides on: a prompt whose prefix was computed unmerged feeds only the
    rest with nothing merged and all of it with its adapter merged (another key), and is told what
    it would feed under each; once computed merged too, it finds it under both. What the dlora
    policy prices a switch by."""
    engine = make_engine(tiny_llama, block_size=4)
    adapter = sorted(tiny_llama.adapters)[0]
    prompt = SYSTEM + TURNS[1]
    rest = len(prompt) - (len(prompt) - 1) // 4 * 4  # never the last token's block from the cache
    run_all(engine, {"first": (adapter, prompt)}, 1)
    params = SamplingParams(max_tokens=1)
    engine.add_request("again", prompt_token_ids=prompt, params=params, adapter=adapter)
    (q,) = engine.queue()
    assert (q.num_new, q.switched) == (rest, SwitchedFeeds(rest, len(prompt), len(prompt)))
    engine.switch(adapter)
    (q,) = engine.queue()
    assert (q.num_new, q.fed(None, adapter), q.work) == (len(prompt), rest, rest)
    engine.step(StepDecision(adapter, ["again"]))  # computed merged: cached under that key too
    engine.add_request("third", prompt_token_ids=prompt, params=params, adapter=adapter)
    engine.switch(None)
    (q,) = (q for q in engine.queue() if q.request_id == "third")
    assert (q.num_new, q.switched) == (rest, SwitchedFeeds(rest, rest, len(prompt)))


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_each_step_reports_the_context_its_sequences_attend(tiny_llama: TinyOutput, async_scheduling: bool) -> None:
    """What the policy's cost model learns a step's KV read from (``StepRecord.context_tokens``):
    a prompt in chunks attends what it computed before and its chunk, a decode its whole length,
    a prompt that finds its prefix cached the cached blocks and what it feeds."""
    engine = make_engine(tiny_llama, block_size=4, max_num_batched_tokens=8, async_scheduling=async_scheduling)
    steps: list[tuple[int, int]] = []
    observe = engine.policy.observe
    engine.policy.observe = lambda d, r: (steps.append((r.num_tokens, r.context_tokens)), observe(d, r))[1]  # type: ignore[method-assign]
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    for rid in ("first", "again"):  # the same 21-token prompt twice, one after the other
        engine.add_request(rid, prompt_token_ids=SYSTEM, params=params)
        while engine.has_unfinished():
            engine.step()
    # first: chunks of 8, 8, 5, then two decodes (async scheduling launches a third before it
    # knows the request ended); again: 20 tokens (five blocks) found cached, 1 fed
    decodes = [(1, 22), (1, 23), (1, 24)] if async_scheduling else [(1, 22), (1, 23)]
    assert steps == [(8, 8), (8, 16), (5, 21), *decodes, (1, 21), *decodes]


def test_a_prompt_preempted_in_the_step_that_admitted_it_reports_what_it_later_found(tiny_llama: TinyOutput) -> None:
    """A prompt found 8 tokens cached and was admitted, then a decode of a higher priority later in
    the same step took its blocks, so it never ran; the cache was reset before it ran again and it
    computed its whole prompt. Its usage said 8 cached tokens (and the stats 8 hits) from the
    lookup of the step it did not run in; vLLM reports what the prefill that ran found."""
    engine = make_engine(tiny_llama, block_size=4, num_blocks=10)
    run_all(engine, {"warm": (None, SYSTEM[:9])}, 1)  # 8 tokens of the prompt's prefix cached
    urgent = SamplingParams(max_tokens=4, ignore_eos=True)
    engine.add_request("decode", prompt_token_ids=list(range(100, 112)), params=urgent, priority=-1)
    engine.step()  # 12 tokens in 3 blocks: its next token needs a fourth
    prompt = SYSTEM[:9] + list(range(300, 319))  # 7 blocks: the 2 cached and the 5 left free
    engine.add_request("prompt", prompt_token_ids=prompt, params=SamplingParams(max_tokens=2), priority=0)
    engine.step(StepDecision(None, ["prompt", "decode"]))
    assert engine.seqs["prompt"].num_scheduled == 0 and not engine.blocks.holds("prompt")  # it did not run
    engine.reset_prefix_cache()
    reported = []
    while engine.has_unfinished():
        reported += [o.num_cached_tokens for o in engine.step() if o.request_id == "prompt"]
    assert reported and set(reported) == {0}
    assert (engine.stats.prefix_cache_queries, engine.stats.prefix_cache_hits) == (9 + 12 + 28, 0)


def test_a_prompt_preempted_after_its_lookup_under_async_scheduling_counts_it_once(tiny_llama: TinyOutput) -> None:
    """Async scheduling takes a step's lookups into the stats in the call that launched it (its
    blocks named then), before the next step is scheduled: a prompt the decodes preempt once its
    step is in flight carries no lookup into a later schedule (whose take-back,
    ``scheduler._take_back``, would subtract it), and its queries and hits stay those of its first
    lookup (a preempted request's second look is not counted, as vLLM's)."""
    engine = make_engine(tiny_llama, block_size=2, num_blocks=11, async_scheduling=True, max_num_batched_tokens=3)
    run_all(engine, {"warm": (None, SYSTEM[:4])}, 1)  # 2 blocks cached
    urgent = SamplingParams(max_tokens=8, ignore_eos=True)
    for rid, start in (("d1", 100), ("d2", 110)):
        engine.add_request(rid, prompt_token_ids=list(range(start, start + 3)), params=urgent, priority=-1)
    for _ in range(3):
        engine.step(StepDecision(None, ["d1", "d2"]))
    prompt = SYSTEM[:4] + list(range(300, 304))  # its first 4 tokens cached
    engine.add_request("p", prompt_token_ids=prompt, params=SamplingParams(max_tokens=2, ignore_eos=True))
    reported, preempted = [], 0
    while engine.has_unfinished():
        out = engine.step(StepDecision(None, [r for r in ("d1", "p", "d2") if r in engine.seqs]))
        reported += [o.num_cached_tokens for o in out if o.request_id == "p"]
        preempted = max(preempted, engine.seqs["p"].num_preemptions if "p" in engine.seqs else 0)
    assert preempted >= 1  # the decodes' blocks took its own after it looked up
    assert reported and set(reported) == {4}
    assert (engine.stats.prefix_cache_queries, engine.stats.prefix_cache_hits) == (4 + 3 + 3 + 8, 4)
