"""Public reports about scheduling requests of many LoRA adapters (vLLM, SGLang, vllm-metal)
replayed against the engine on the tiny model: more adapters in flight than ``max_loras`` device
slots, a busy adapter beside a rare one, base requests among LoRA ones, slot eviction, priority.
Each test names its report; tokens are compared with an engine of slots enough for every
adapter (whose own parity with transformers + peft is tests/engine/test_parity.py's), bounds
are in steps and counts."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from dataclasses import replace

import pytest

from dlora.common.messages import FinishReason, SamplingParams
from dlora.model.make_tiny import TinyOutput
from dlora.services.worker.engine import LLMEngine
from dlora.services.worker.policy import StepDecision, StepRecord
from tests.engine.helpers import add_all, make_engine, run_all

POLICIES = ["unmerged-only", "dlora"]
MAX_TOKENS = 6
TICK = 0.25  # seconds a look at a counted clock advances: the dlora wait bound in few steps
Requests = dict[str, tuple[str | None, list[int]]]


def _prompt(i: int, n: int = 5) -> list[int]:
    return [7 + i, 8, 9, 30 + i, 40 + i][:n] + list(range(100 + i, 100 + i + max(0, n - 5)))


def _observed(engine: LLMEngine) -> list[StepRecord]:
    """What every step of ``engine`` ran, as its policy is told (``Policy.observe_repeated``: a
    policy may take a step in there without ``observe``), from now on."""
    records: list[StepRecord] = []
    observe = engine.policy.observe_repeated

    def recording(decision: StepDecision, record: StepRecord, seconds: list[float]) -> None:
        records.extend(replace(record, seconds=t) for t in seconds)
        observe(decision, record, seconds)

    engine.policy.observe_repeated = recording  # type: ignore[method-assign]
    return records


def _steps(
    engine: LLMEngine,
    arrive: Callable[[int], None] | None = None,
    decide: Callable[[], StepDecision] | None = None,
    limit: int = 200,
) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """Step until every request ends (``arrive(step)`` first, each step, to add requests; each
    step ``decide()``'s decision, or the policy's): per request the step numbers its tokens came
    in, and its tokens; reaching ``limit`` steps is a stall, a request that fails a failure."""
    seen: dict[str, list[int]] = {}
    got: dict[str, list[int]] = {}
    for i in range(limit):
        if arrive is not None:
            arrive(i)
        if not engine.has_unfinished():
            break
        for o in engine.step(decide() if decide is not None else None):
            assert o.finish_reason is not FinishReason.ERROR, (o.request_id, o)
            seen.setdefault(o.request_id, []).extend([i] * len(o.new_token_ids))
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
    assert not engine.has_unfinished(), sorted(engine.seqs)
    return seen, got


_ROOMY: dict[tuple, dict[str, list[int]]] = {}


def _roomy(tiny: TinyOutput, requests: Requests, max_tokens: int = MAX_TOKENS) -> dict[str, list[int]]:
    """The tokens of ``requests`` on an engine with a slot for every adapter (each set run once:
    the tests of both policies share it)."""
    key = (tiny.model, max_tokens, *((rid, a, tuple(ids)) for rid, (a, ids) in sorted(requests.items())))
    if key not in _ROOMY:
        _ROOMY[key] = run_all(make_engine(tiny, max_loras=8), requests, max_tokens)
    return _ROOMY[key]


@pytest.mark.parametrize("policy", POLICIES)
def test_more_adapters_in_flight_than_slots_each_step_within_them_under_chunked_prefill(
    tiny_llama: TinyOutput, policy: str
) -> None:
    """vllm-project/vllm #14495 (a batch asking for more LoRAs than slots raised "No free lora
    slots"), sgl-project/sglang #23141 / #25078 / #26029 (a chunked prefill staged before the
    slot count was made let one adapter too many in, and the scheduler died): eight requests of
    four adapters on two slots, prompts longer than the 16-token budget so they are chunked:
    every step runs at most two adapters unmerged, none fails, each gives the roomy tokens."""
    requests = {f"r{i}": (f"lora-{i % 4}", _prompt(i, 12)) for i in range(8)}
    engine = make_engine(tiny_llama, policy=policy, max_loras=2, max_num_batched_tokens=16)
    records = _observed(engine)
    add_all(engine, requests, MAX_TOKENS)
    _, got = _steps(engine)
    assert got == _roomy(tiny_llama, requests)
    assert len(records) >= 8  # (a step each, at least)
    for r in records:
        assert len({a for a in r.adapters if a not in (None, r.merged)}) + (r.mode == "mixed") <= 2, r


def _starts_in_time(engine: LLMEngine, records: list[StepRecord], due: int, started: int) -> None:
    """A request FCFS runs in step ``due`` first ran in step ``started``: then under unmerged-only
    (FCFS), at most ``wait_bound_s(t_max)`` seconds of steps later under dlora (whose credits
    bound what its merged and mixed steps put off, the module's docstring)."""
    if engine.config.policy.name == "unmerged-only":
        assert started == due
        return
    t_max = max(r.seconds + r.switch_seconds for r in records)
    waited = sum(r.seconds + r.switch_seconds for r in records[due:started])
    assert waited <= engine.policy.wait_bound_s(t_max), (due, started, waited, t_max)  # type: ignore[attr-defined]


@pytest.mark.parametrize("policy", POLICIES)
def test_a_rare_adapter_runs_within_its_bound_while_the_busy_one_keeps_coming(
    tiny_llama: TinyOutput, policy: str
) -> None:
    """sgl-project/sglang #15129 (``max_loras_per_batch=1``, queue A, B, A, A, ...: while A held
    the batch, B was never scheduled) and vllm-project/vllm #16876 (a later request of the loaded
    LoRA ran before an earlier one of another): one slot, a request of lora-1 behind one of
    lora-0, and a new lora-0 request every step until lora-1's ends (a stall if it never does).
    FCFS (unmerged-only): lora-1's request is older than every later lora-0 one, so it takes the
    slot in the step after the first lora-0 request ends. dlora: the busy adapter may be merged
    (its correction then holds the only slot), but from that step lora-1's request waits at most
    ``wait_bound_s(t_max)`` seconds of steps (credits; the clock counted, ``TICK`` a look)."""
    engine = make_engine(tiny_llama, policy=policy, max_loras=1)
    engine.clock = functools.partial(next, itertools.count(TICK, TICK))  # a look, TICK seconds on
    records = _observed(engine)
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    engine.add_request("a0", prompt_token_ids=_prompt(0), params=params, adapter="lora-0")
    engine.add_request("b", prompt_token_ids=_prompt(1), params=params, adapter="lora-1")

    def arrive(step: int) -> None:
        if step and "b" in engine.seqs:
            engine.add_request(f"a{step}", prompt_token_ids=_prompt(step + 2), params=params, adapter="lora-0")

    seen, _ = _steps(engine, arrive)
    assert len(seen["b"]) == MAX_TOKENS
    _starts_in_time(engine, records, seen["a0"][-1] + 1, seen["b"][0])


@pytest.mark.parametrize("policy", POLICIES)
def test_base_requests_and_the_slotted_adapter_s_run_past_one_waiting_for_a_slot(
    tiny_llama: TinyOutput, policy: str
) -> None:
    """vllm-project/vllm #15422 (the V1 scheduler stopped at the first request whose LoRA found no
    slot, holding back base requests and those of LoRAs already in the batch) and
    sgl-project/sglang #14795 / #16687 (base-model requests blocked behind LoRA cache misses):
    one slot, queue lora-0, lora-1, base, lora-0, base: the first step runs all but lora-1's."""
    engine = make_engine(tiny_llama, policy=policy, max_loras=1)
    records = _observed(engine)
    queue = [("a", "lora-0"), ("b", "lora-1"), ("base1", None), ("a2", "lora-0"), ("base2", None)]
    for i, (rid, adapter) in enumerate(queue):
        engine.add_request(rid, prompt_token_ids=_prompt(i), params=SamplingParams(max_tokens=2), adapter=adapter)
    first = {o.request_id for o in engine.step()}
    assert first == {"a", "base1", "a2", "base2"}, (first, records[0])


def test_adapters_rotate_through_one_slot_each_loaded_once_and_evicted_when_idle(tiny_llama: TinyOutput) -> None:
    """vllm-project/vllm-metal #641 (with ``max_loras=1`` the first adapter served held the cache
    and later adapters were refused) and sgl-project/sglang #13349 (adapter swaps dominating TTFT
    once more adapters were active than slots): four adapters' requests on one slot, two each,
    all queued at once. FCFS keeps each adapter's requests together once its slot is taken, so
    each adapter is copied to the device once (four loads, three evictions), and every request
    gives the roomy tokens."""
    requests: Requests = {f"r{i}": (f"lora-{i // 2}", _prompt(i)) for i in range(8)}
    # Arrival order interleaves them, the worst case for a swap per step: 0,1,2,3,0,1,2,3.
    order = sorted(requests, key=lambda r: (int(r[1:]) % 2, r))
    engine = make_engine(tiny_llama, max_loras=1)
    got = run_all(engine, {rid: requests[rid] for rid in order}, MAX_TOKENS)
    assert got == _roomy(tiny_llama, requests)
    assert (engine.stats.adapter_loads, engine.stats.adapter_evictions) == (4, 3)


def test_the_adapter_merged_is_not_evicted_from_its_slot_by_a_mixed_step_s_others(tiny_llama: TinyOutput) -> None:
    """sgl-project/sglang #16333 / #16687 (the base model's LoRA slot evicted while its requests
    ran) and vllm-project/vllm #14495: in a mixed step the merged adapter's correction holds a
    slot; with two slots, lora-0 merged, and lora-1 and lora-2 waiting, a step runs lora-0's and
    one other adapter's requests only, and every request gives the roomy tokens."""
    requests: Requests = {"a": ("lora-0", _prompt(0)), "b": ("lora-1", _prompt(1)), "c": ("lora-2", _prompt(2))}
    engine = make_engine(tiny_llama, max_loras=2)
    records = _observed(engine)
    add_all(engine, requests, MAX_TOKENS)
    _, got = _steps(
        engine,
        decide=lambda: StepDecision("lora-0", sorted(engine.seqs, key=lambda r: engine.seqs[r].arrival), mixed=True),
    )
    assert got == _roomy(tiny_llama, requests)
    assert all(len(set(r.adapters) - {"lora-0"}) <= 1 for r in records), [r.adapters for r in records]


@pytest.mark.parametrize("policy", POLICIES)
def test_a_higher_priority_request_of_another_adapter_takes_the_only_slot_without_preempting(
    tiny_llama: TinyOutput, policy: str
) -> None:
    """vllm-project/vllm #40004 / #54530 (under priority scheduling a higher-priority waiting
    request never displaced lower-priority running ones once they held the batch): one slot,
    lora-0's request running; a lora-1 request of priority -1 arrives. FCFS (unmerged-only) runs
    it in the next step; dlora may keep lora-0 merged a while, within its wait bound (priority is
    its FCFS key). lora-0's pauses with its KV kept (no preemption) and ends with the roomy tokens."""
    engine = make_engine(tiny_llama, policy=policy, max_loras=1)
    engine.clock = functools.partial(next, itertools.count(TICK, TICK))  # a look, TICK seconds on
    records = _observed(engine)
    params = SamplingParams(max_tokens=MAX_TOKENS)
    engine.add_request("low", prompt_token_ids=_prompt(0), params=params, adapter="lora-0")
    got = {o.request_id: o.new_token_ids for o in engine.step()}
    engine.add_request("high", prompt_token_ids=_prompt(1), params=params, adapter="lora-1", priority=-1)
    seen, rest = _steps(engine)
    _starts_in_time(engine, records, 1, seen["high"][0] + 1)
    assert engine.stats.preemptions == 0
    assert got["low"] + rest.get("low", []) == _roomy(tiny_llama, {"low": ("lora-0", _prompt(0))})["low"]


@pytest.mark.parametrize("policy", POLICIES)
def test_a_slot_the_budget_leaves_unused_goes_to_the_next_adapter_in_line(tiny_llama: TinyOutput, policy: str) -> None:
    """lightseekorg/tokenspeed #268 (review: a request the step could not schedule still took one
    of ``max_loras`` and held later adapters' requests back) and vllm-project/vllm #15422: one
    slot, chunked prefill off; a base prompt of 50 of the 64 tokens, then lora-1's of 20 (which
    the 14 left cannot hold: it waits), lora-2's of 5 and a base one of 10. lora-2's runs in the
    first step, in the slot lora-1's could not use, ahead of the later base prompt (which the 9
    left cannot hold), then pauses for lora-1's (older), and all give the roomy tokens. dlora too:
    its FCFS batch is the refilled one, and it merges no adapter for a step that would feed none
    of its requests."""
    requests: Requests = {
        "big": (None, list(range(10, 60))),
        "x": ("lora-1", list(range(100, 120))),
        "y": ("lora-2", [5, 6, 7, 8, 9]),
        "z": (None, list(range(60, 70))),
    }
    kw = {"enable_chunked_prefill": False, "max_model_len": 64, "max_num_batched_tokens": 64}
    engine = make_engine(tiny_llama, policy=policy, max_loras=1, **kw)
    add_all(engine, requests, 3)
    first = engine.step()
    assert {o.request_id for o in first} == {"big", "y"}
    _, got = _steps(engine)
    tokens = {o.request_id: o.new_token_ids + got.get(o.request_id, []) for o in first} | {r: got[r] for r in "xz"}
    assert tokens == _roomy(tiny_llama, requests, 3)
