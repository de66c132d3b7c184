"""A structured output whose grammar starts after a token sequence (``structured_after_token_ids``:
a reasoning model's ``</think>``): the output runs free up to and including the sequence's first
occurrence, exactly as unconstrained, and what follows is a document of the grammar (vLLM applies
the grammar once the reasoning has ended)."""

from __future__ import annotations

import json

import pytest

from dlora.common.messages import FinishReason, SamplingParams
from dlora.model.make_tiny import TinyOutput
from dlora.services.worker.engine import LLMEngine
from tests.engine.helpers import make_engine
from tests.engine.test_structured import PROMPT, SCHEMA

FREE = 10  # tokens of the unconstrained run looked at for an "end" sequence


def generate(engine: LLMEngine, rid: str, params: SamplingParams, resumed: list[int] | None = None) -> tuple:
    engine.add_request(rid, prompt_token_ids=PROMPT, params=params, adapter="lora-0", resume_token_ids=resumed)
    tokens, reason = [], None
    while engine.has_unfinished():
        for o in engine.step():
            tokens += o.new_token_ids
            reason = o.finish_reason or reason
    return tokens, reason


def end_sequence(free: list[int], length: int) -> tuple[list[int], int]:
    """An "end" sequence of ``length`` tokens the free run emits, first occurring at its 3rd token
    or later (some free tokens before it), and the index just past that first occurrence."""
    for k in range(2, len(free) - length + 1):
        after = free[k : k + length]
        if all(free[i : i + length] != after for i in range(k)):
            return after, k + length
    # The free run is greedy on a fixed model, so this never varies: a change that makes it repeat
    # itself must fail here, not skip the tests that need the sequence.
    pytest.fail(f"the free run {free} repeats itself: no fresh end sequence of {length} tokens")


def follows_the_schema(engine: LLMEngine, tail: list[int]) -> None:
    doc = json.loads(engine.tokenizer.decode(tail))
    assert set(doc) == {"size", "ok", "tag"} and doc["size"] in (1, 2, 3) and doc["tag"] in ("kalo", "remi")


@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("length", [1, 2])
def test_the_grammar_binds_only_the_tokens_after_the_end_sequence(
    tiny_llama: TinyOutput, async_scheduling: bool, length: int
) -> None:
    engine = make_engine(tiny_llama, async_scheduling=async_scheduling)
    free, _ = generate(engine, "free", SamplingParams(max_tokens=FREE, ignore_eos=True))
    after, start = end_sequence(free, length)
    params = SamplingParams(max_tokens=200, json_schema=json.dumps(SCHEMA), structured_after_token_ids=after)
    tokens, reason = generate(engine, "json", params)
    assert tokens[:start] == free[:start]  # unmasked up to and including the end sequence
    assert reason is FinishReason.STOP
    follows_the_schema(engine, tokens[start:])


def test_without_the_end_sequence_the_output_runs_free(tiny_llama: TinyOutput) -> None:
    """No ``</think>`` yet: no mask, and the matcher takes nothing (a token it would refuse does
    not fail the request)."""
    engine = make_engine(tiny_llama)
    free, _ = generate(engine, "free", SamplingParams(max_tokens=FREE, ignore_eos=True))
    never = next(t for t in range(engine.model_config.vocab_size) if t not in free)
    params = SamplingParams(
        max_tokens=FREE, ignore_eos=True, json_schema=json.dumps(SCHEMA), structured_after_token_ids=[never]
    )
    assert generate(engine, "json", params) == (free, FinishReason.LENGTH)


@pytest.mark.parametrize("cut", ["before", "at", "after"])
def test_a_resumed_request_lands_where_its_output_so_far_left_the_grammar(tiny_llama: TinyOutput, cut: str) -> None:
    """A moved or recovered request's output is replayed: the grammar's start is found in it, and
    only the tokens past it are fed to the matcher."""
    engine = make_engine(tiny_llama)
    free, _ = generate(engine, "free", SamplingParams(max_tokens=FREE, ignore_eos=True))
    after, start = end_sequence(free, 1)
    params = SamplingParams(max_tokens=200, json_schema=json.dumps(SCHEMA), structured_after_token_ids=after)
    whole, reason = generate(engine, "whole", params)
    assert reason is FinishReason.STOP and whole[:start] == free[:start] and len(whole) > start + 2
    at = {"before": start - 1, "at": start, "after": start + 2}[cut]
    rest, again = generate(engine, "resumed", params, resumed=whole[:at])
    assert (whole[:at] + rest, again) == (whole, reason)


@pytest.mark.parametrize("steps", [1, 3, 6])
def test_a_request_moved_from_an_async_engine_with_its_cache_keeps_its_grammar_state(
    tiny_llama: TinyOutput, steps: int
) -> None:
    """Async scheduling: drained (what a move does first), exported with its KV and resumed on
    another engine, before, across and after the end sequence: the tokens of the unmoved run."""
    engine = make_engine(tiny_llama)
    free, _ = generate(engine, "free", SamplingParams(max_tokens=FREE, ignore_eos=True))
    after, _ = end_sequence(free, 1)
    params = SamplingParams(max_tokens=200, json_schema=json.dumps(SCHEMA), structured_after_token_ids=after)
    whole, _ = generate(engine, "whole", params)
    source, destination = make_engine(tiny_llama, async_scheduling=True), make_engine(tiny_llama)
    source.add_request("r", prompt_token_ids=PROMPT, params=params, adapter="lora-0")
    sent = [t for _ in range(steps) for o in source.step() for t in o.new_token_ids]
    sent += [t for o in source.drain() for t in o.new_token_ids]
    kv = source.export_kv("r")
    destination.add_request("r", prompt_token_ids=PROMPT, params=params, adapter="lora-0", resume_token_ids=sent, kv=kv)
    rest = [t for _ in range(300) if destination.has_unfinished() for o in destination.step() for t in o.new_token_ids]
    assert sent + rest == whole
