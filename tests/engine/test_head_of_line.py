"""A step whose batching decision cannot run as chosen (its prompt's blocks, or the only device
slot, held by a request it left out) runs the head of line instead: each request ends, where the
engine stepped nothing, or evicted each prompt in turn, for ever (livelocks found by fuzzing)."""

from __future__ import annotations

from dlora.common.messages import FinishReason, SamplingParams
from dlora.model.make_tiny import TinyOutput
from dlora.services.worker.policy import StepDecision
from tests.engine.helpers import make_engine


def test_two_prompts_the_cache_holds_one_at_a_time_both_finish_under_alternating_decisions(
    tiny_llama: TinyOutput,
) -> None:
    """A cache of two blocks, prompts of two blocks each fed three tokens a step, and a policy
    that alternates between them as starvation credits do (one merged step for the adapter's prompt,
    then three mixed ones for the base request): each prefill evicted the other before it ended,
    and neither ever made another token (a livelock found by fuzzing the engine under default
    dLoRA credits). The earlier request's recompute is no longer evicted by a later prompt's: the
    step then runs the head of line."""
    engine = make_engine(
        tiny_llama, num_blocks=2, block_size=16, max_num_seqs=1, max_num_batched_tokens=3, enable_chunked_prefill=True
    )
    assert engine.max_model_len == 32
    ignore = dict(ignore_eos=True, temperature=0.0)
    engine.add_request("a", prompt_token_ids=[3 + i for i in range(24)], params=SamplingParams(max_tokens=8, **ignore))
    adapter = next(iter(tiny_llama.adapters))
    b_ids = [100 + i for i in range(29)]
    engine.add_request("b", prompt_token_ids=b_ids, params=SamplingParams(max_tokens=2, **ignore), adapter=adapter)
    got: dict[str, list[int]] = {"a": [], "b": []}
    reasons = {}
    for i in range(300):
        if not engine.has_unfinished():
            break
        started = bool(got["a"])
        decision = (
            StepDecision(adapter, ["b"])
            if started and i % 4 == 0
            else StepDecision(adapter, ["a", "b"] if "a" in engine.seqs else ["b"], mixed=True)
        )
        for o in engine.step(decision):
            got[o.request_id] += o.new_token_ids
            if o.finished:
                reasons[o.request_id] = o.finish_reason
    assert reasons == {"a": FinishReason.LENGTH, "b": FinishReason.LENGTH}, (reasons, engine.stats.preemptions)
    assert len(got["a"]) == 8 and len(got["b"]) == 2
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_a_decision_that_only_waits_for_blocks_runs_the_head_of_line(tiny_llama: TinyOutput) -> None:
    """A policy that keeps choosing a prompt the cache has no room for while an earlier request,
    left out, holds the blocks: the step ran nothing, the policy saw nothing change and chose the
    same again, for ever. The step now runs the head of line, and both end."""
    engine = make_engine(tiny_llama, num_blocks=2, block_size=16, max_num_seqs=1, max_num_batched_tokens=8)
    ignore = dict(ignore_eos=True, temperature=0.0)
    engine.add_request("a", prompt_token_ids=[3 + i for i in range(24)], params=SamplingParams(max_tokens=4, **ignore))
    engine.step()  # a holds its first block, 8 tokens in
    adapter = next(iter(tiny_llama.adapters))
    engine.add_request(
        "b",
        prompt_token_ids=[100 + i for i in range(29)],
        params=SamplingParams(max_tokens=2, **ignore),
        adapter=adapter,
    )
    ended = []
    for _ in range(100):
        if not engine.has_unfinished():
            break
        ended += [o.request_id for o in engine.step(StepDecision(adapter, ["b"])) if o.finished]
    assert sorted(ended) == ["a", "b"]
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_the_head_of_line_on_another_adapter_runs_when_the_merged_one_holds_the_only_slot(
    tiny_llama: TinyOutput,
) -> None:
    """One device slot (max_loras 1): beside a merged adapter its correction holds it, so the head
    of line, a prompt of another adapter holding the cache, could not run in the mixed step the
    fallback made, the decision's prompt waited for its blocks, and no step ever ran again. The
    fallback unmerges for it instead."""
    engine = make_engine(tiny_llama, num_blocks=2, block_size=16, max_num_seqs=1, max_num_batched_tokens=8, max_loras=1)
    merged, other = list(tiny_llama.adapters)[:2]
    params = SamplingParams(max_tokens=2, ignore_eos=True, temperature=0.0)
    engine.add_request("a", prompt_token_ids=[3 + i for i in range(30)], params=params, adapter=other)
    for _ in range(3):
        engine.step()  # a holds the whole cache, 24 tokens in
    assert engine.blocks.num_free == 0
    engine.add_request("b", prompt_token_ids=[100 + i for i in range(20)], params=params, adapter=merged)
    ended = []
    for _ in range(100):
        if not engine.has_unfinished():
            break
        ended += [o.request_id for o in engine.step(StepDecision(merged, ["b"], mixed=True)) if o.finished]
    assert sorted(ended) == ["a", "b"]
    assert engine.blocks.num_free == engine.blocks.num_blocks
