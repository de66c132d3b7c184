"""One request's fault stays its own: extreme sampling parameters are served, and a request whose
step fails ends with the reason while its batch mates and later requests are served as before."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dlora.common.messages import FinishReason, SamplingParams
from dlora.model.make_tiny import TinyOutput
from dlora.services.worker.engine import LLMEngine
from dlora.services.worker.engine.faults import DeviceLost
from dlora.services.worker.engine.offline import generate_lines
from dlora.services.worker.policy import StepDecision
from tests.engine.helpers import make_engine, run_all

PROMPT = [5, 40, 41, 300, 17]
POISON = 333  # a prompt holding this token id makes the (wrapped) model raise


@pytest.fixture
def engine(tiny_llama: TinyOutput) -> LLMEngine:
    return make_engine(tiny_llama)


def poison_forward(engine: LLMEngine, error: str = "injected fault") -> None:
    """Fault injection: the model raises on any batch holding POISON, as a kernel fault would."""
    forward = engine.model.forward

    def faulty(inputs):
        if (inputs.input_ids == POISON).any():
            raise RuntimeError(error)
        return forward(inputs)

    engine.model.forward = faulty


def run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, dict]:
    for rid, (ids, params) in requests.items():
        engine.add_request(rid, prompt_token_ids=ids, params=params, adapter="lora-0")
    out = {rid: {"tokens": [], "reason": None, "error": None} for rid in requests}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id]["tokens"] += o.new_token_ids
            if o.finished:
                out[o.request_id]["reason"], out[o.request_id]["error"] = o.finish_reason, o.error
    return out


@pytest.mark.parametrize(
    "params",
    [
        dict(temperature=1e-39),
        dict(temperature=1e-300),
        dict(temperature=5e-6, top_k=40),
        dict(temperature=1.0, top_p=0.0),
        dict(temperature=1.0, top_k=1),
        dict(temperature=1.0, top_p=1e-12),
    ],
    ids=str,
)
def test_extreme_parameters_the_api_accepts_act_greedy(engine: LLMEngine, params: dict) -> None:
    greedy = run_all(engine, {"g": ("lora-0", PROMPT)}, max_tokens=6)["g"]
    got = run(engine, {"x": (PROMPT, SamplingParams(max_tokens=6, seed=3, **params))})["x"]
    assert got["error"] is None and got["tokens"] == greedy


@pytest.mark.parametrize(
    "params",
    [
        dict(temperature=2.0, repetition_penalty=100.0),
        dict(temperature=2.0, top_k=100000, top_p=1.0),
        dict(temperature=0.5, top_k=-1, top_p=1e-3),
    ],
    ids=str,
)
def test_other_edge_values_sample_without_fault(engine: LLMEngine, params: dict) -> None:
    got = run(engine, {"x": (PROMPT, SamplingParams(max_tokens=5, seed=1, **params))})["x"]
    assert got["error"] is None and len(got["tokens"]) == 5


def test_a_failing_request_fails_alone_and_the_engine_serves_on(engine: LLMEngine) -> None:
    expected = run_all(engine, {"a": ("lora-0", PROMPT), "b": ("lora-0", PROMPT[::-1])}, max_tokens=6)
    poison_forward(engine)
    out = run(
        engine,
        {
            "a": (PROMPT, SamplingParams(max_tokens=6)),
            "bad": ([7, POISON, 9], SamplingParams(max_tokens=6)),
            "b": (PROMPT[::-1], SamplingParams(max_tokens=6)),
        },
    )
    assert out["bad"]["reason"] is FinishReason.ERROR and out["bad"]["tokens"] == []
    assert "RuntimeError: injected fault" in out["bad"]["error"]
    assert out["a"]["tokens"] == expected["a"] and out["b"]["tokens"] == expected["b"]
    assert not engine.has_unfinished() and engine.blocks.num_free == engine.blocks.num_blocks
    assert run(engine, {"c": (PROMPT, SamplingParams(max_tokens=6))})["c"]["tokens"] == expected["a"]


def test_a_device_lost_for_good_is_raised_not_failed_request_by_request(engine: LLMEngine) -> None:
    """After a sticky CUDA error every later call fails too: failing requests one by one would fail
    every request given to this worker from then on, so the step raises DeviceLost."""
    poison_forward(engine, "CUDA error: an illegal memory access was encountered")
    engine.add_request("bad", prompt_token_ids=[7, POISON, 9], params=SamplingParams(max_tokens=4))
    engine.add_request("mate", prompt_token_ids=PROMPT, params=SamplingParams(max_tokens=4))
    with pytest.raises(DeviceLost, match="illegal memory access"):
        engine.step()


def test_non_finite_logits_fail_the_row_with_a_reason(engine: LLMEngine) -> None:
    _poisoned_rows_go_nan(engine)
    out = run(
        engine,
        {
            "ok": (PROMPT, SamplingParams(max_tokens=3)),
            "nan": ([POISON, 8], SamplingParams(max_tokens=3, temperature=0.7, seed=1)),
        },
    )
    assert out["nan"]["reason"] is FinishReason.ERROR and "not finite" in out["nan"]["error"]
    assert len(out["ok"]["tokens"]) == 3 and out["ok"]["error"] is None


def _poisoned_rows_go_nan(engine: LLMEngine) -> None:
    """``engine``'s logits are NaN in the rows of sequences whose tokens fed this step hold POISON."""
    forward = engine.model.forward

    def nan_rows(inputs):
        logits = forward(inputs)
        poisoned = torch.zeros(len(logits), dtype=torch.bool)
        starts = torch.cat([torch.zeros(1, dtype=torch.int64), inputs.last_index[:-1].cpu() + 1])
        for i, (s, e) in enumerate(zip(starts.tolist(), inputs.last_index.tolist())):
            poisoned[i] = bool((inputs.input_ids[s : e + 1] == POISON).any())
        return logits.masked_fill(poisoned[:, None].to(logits.device), float("nan"))

    engine.model.forward = nan_rows


def test_a_request_whose_activations_overflow_leaves_no_nan_for_the_others(
    tiny_llama: TinyOutput, tmp_path: Path
) -> None:
    """An adapter within every registration limit (weights of 30) overflows fp16 activations: its
    request fails with non-finite logits, as it should, but its K/V were NaN and its freed block 0
    pads every later batch's tables; the torch attention read them (0 · NaN) and every request of
    the worker failed "not finite" from then on, base model included (vllm-project/vllm#50283's
    kind). The others must be served as by an engine that never saw it, beside it and after it."""
    bad = tmp_path / "overflows"
    shutil.copytree(tiny_llama.adapters["lora-0"], bad)
    tensors = load_file(str(bad / "adapter_model.safetensors"))
    save_file({k: torch.full_like(v, 30.0) for k, v in tensors.items()}, str(bad / "adapter_model.safetensors"))
    good = {"long": ("lora-1", list(range(3, 23))), "base": (None, [5, 40, 41]), "other": ("lora-0", [6, 7, 8, 9])}
    want = run_all(make_engine(tiny_llama, dtype="float16", num_blocks=16), good, max_tokens=6)
    engine = make_engine(tiny_llama, dtype="float16", num_blocks=16)
    engine.register_adapter("overflows", bad)
    for rid, (adapter, ids) in {"bad": ("overflows", PROMPT), **good}.items():
        engine.add_request(rid, prompt_token_ids=ids, params=SamplingParams(max_tokens=6), adapter=adapter)
    got: dict[str, list[int]] = {rid: [] for rid in ["bad", *good]}
    errors = {}
    while engine.has_unfinished():
        for o in engine.step():
            got[o.request_id] += o.new_token_ids
            if o.error:
                errors[o.request_id] = o.error
    assert list(errors) == ["bad"] and "not finite" in errors["bad"]
    assert {rid: got[rid] for rid in good} == want
    assert bool(engine.model.kv.v.isnan().any())  # what it left behind
    assert run_all(engine, good, max_tokens=6) == want


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_nan_that_ended_requests_left_in_free_blocks_reaches_no_later_request(
    tiny_llama: TinyOutput, kernels: str
) -> None:
    """Requests that failed or were aborted mid-prefill (never looked at) leave NaN K/V in the
    blocks they free. The torch attention reads whole blocks, masking keys past each context, and
    0 · NaN is NaN: a later request given such a block, short of its end, beside a longer one,
    failed "not finite". The blocks a sequence is given are zeroed first (vLLM's approach,
    vllm-project/vllm#50283); the Triton kernel reads nothing past a context (either path, the
    same tokens). Every block but the pad block 0, which nobody is given, holds NaN here."""
    good = {"long": ("lora-1", list(range(3, 23))), "base": (None, [5, 40, 41]), "other": ("lora-0", [6, 7, 8, 9])}
    want = run_all(make_engine(tiny_llama, block_size=4, num_blocks=24), good, max_tokens=4)
    engine = make_engine(tiny_llama, block_size=4, num_blocks=24, kernels=kernels)
    for pool in (engine.model.kv.k, engine.model.kv.v):
        pool[:, 4:] = float("nan")
    assert run_all(engine, good, max_tokens=4) == want


def _next_forward_goes_nan(engine: LLMEngine) -> None:
    """``engine``'s next forward writes NaN into the K slots it fills and returns NaN logits (a
    kernel fault, an overflow); the ones after are its own."""
    forward, armed = engine.model.forward, [True]

    @torch.inference_mode()
    def goes_nan_once(inputs):
        logits = forward(inputs)
        if armed.pop() if armed else False:
            engine.model.kv.k[:, inputs.attention.slots] = float("nan")
            logits = torch.full_like(logits, float("nan"))
        return logits

    engine.model.forward = goes_nan_once


def test_a_request_with_nan_logits_leaves_no_cached_blocks_and_its_error_names_the_adapter(
    tiny_llama: TinyOutput,
) -> None:
    """A step that went NaN once (a kernel fault, an overflow) writes NaN K/V, and the blocks the
    prompt filled were cached before its logits were looked at: the same prompt and adapter sent
    again (a client retrying a 500) reused them and failed again, for good. vLLM evicts such a
    request's blocks (vllm-project/vllm#50283); users of LoRA in vLLM saw only "Out of range float
    values are not JSON compliant: nan" (vllm-project/vllm#47869, #48590): the error names the
    adapter and the worker's precision."""
    prompt = list(range(3, 23))  # five full blocks of 4
    want = run_all(make_engine(tiny_llama, block_size=4), {"x": ("lora-0", prompt)}, max_tokens=4)["x"]
    engine = make_engine(tiny_llama, block_size=4, enable_prefix_caching=True)
    _next_forward_goes_nan(engine)
    engine.register_adapter("lora-0@1652cf58", tiny_llama.adapters["lora-0"])  # as a worker keys a version
    engine.add_request("bad", prompt_token_ids=prompt, params=SamplingParams(max_tokens=4), adapter="lora-0@1652cf58")
    (out,) = engine.step()
    assert out.finish_reason is FinishReason.ERROR and out.error is not None and "not finite" in out.error
    assert "adapter 'lora-0' (version 1652cf58) in float32" in out.error and out.error_code == "internal"
    assert engine.blocks.num_cached == 0
    assert run_all(engine, {"again": ("lora-0@1652cf58", prompt)}, max_tokens=4)["again"] == want


def test_generate_writes_an_error_line_and_serves_the_rest(engine: LLMEngine) -> None:
    poison_forward(engine)
    lines = [
        json.dumps(
            {"id": "tiny-t", "adapter": "lora-0", "prompt_token_ids": PROMPT, "max_tokens": 4, "temperature": 1e-39}
        ),
        json.dumps({"id": "bad", "prompt_token_ids": [POISON, 4], "max_tokens": 4}),
        json.dumps({"id": "ok", "prompt_token_ids": PROMPT, "max_tokens": 4}),
    ]
    results = generate_lines(engine, lines)
    assert [r["id"] for r in results] == ["tiny-t", "bad", "ok"]
    assert len(results[0]["token_ids"]) == 4 and len(results[2]["token_ids"]) == 4
    assert set(results[1]) == {"id", "error"} and "injected fault" in results[1]["error"]


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_prompt_chunk_that_goes_nan_fails_its_request_before_another_reuses_its_blocks(
    tiny_llama: TinyOutput, async_scheduling: bool
) -> None:
    """A chunk short of its prompt's end draws no token, so nobody looked at its logits: its NaN
    K/V were cached, and a request with the same prompt and adapter arriving before the last
    chunk reused them and failed too (vLLM aborts on NaN in intermediate chunks for it,
    vllm-project/vllm#50283). The request fails at that chunk (async scheduling: when the step is
    taken in, one call later), its blocks out of the cache; the other computes its own."""
    prompt = list(range(3, 23))  # chunks of 8: five blocks of 4
    want = run_all(make_engine(tiny_llama, block_size=4), {"x": ("lora-0", prompt)}, max_tokens=4)["x"]
    engine = make_engine(
        tiny_llama,
        block_size=4,
        max_num_batched_tokens=8,
        enable_prefix_caching=True,
        async_scheduling=async_scheduling,
    )
    _next_forward_goes_nan(engine)
    engine.add_request("bad", prompt_token_ids=prompt, params=SamplingParams(max_tokens=4), adapter="lora-0")
    outs = [o for _ in range(1 + async_scheduling) for o in engine.step()]
    assert [(o.request_id, o.finish_reason) for o in outs] == [("bad", FinishReason.ERROR)]
    assert engine.blocks.num_cached == 0
    assert run_all(engine, {"mate": ("lora-0", prompt)}, max_tokens=4)["mate"] == want


def test_under_async_scheduling_a_request_arriving_after_a_nan_prefill_does_not_reuse_its_blocks(
    tiny_llama: TinyOutput,
) -> None:
    """Async scheduling looks at a step's logits one call later, after the next step was scheduled:
    a request with the same prompt and adapter arriving in between found the NaN prefill's blocks
    cached (``taking.written`` named them), reused them, and failed "not finite" too: a 500 for a request
    nothing was wrong with (the synchronous step fails the first before it schedules another). Now
    the check preempts it before anything is drawn from its row, and it computes its prompt again,
    each token given once."""
    prompt = list(range(3, 23))  # five blocks of 4, one step
    want = run_all(make_engine(tiny_llama, block_size=4), {"x": ("lora-0", prompt)}, max_tokens=4)["x"]
    engine = make_engine(tiny_llama, block_size=4, enable_prefix_caching=True, async_scheduling=True)
    _next_forward_goes_nan(engine)
    engine.add_request("bad", prompt_token_ids=prompt, params=SamplingParams(max_tokens=4), adapter="lora-0")
    outs = engine.step()  # its prefill, NaN, in flight
    engine.add_request("mate", prompt_token_ids=prompt, params=SamplingParams(max_tokens=4), adapter="lora-0")
    preempted = 0  # the request's own count, as the engine's (they disagreed: 0 against 1)
    while engine.has_unfinished():
        outs += engine.step()
        preempted = max(preempted, engine.seqs["mate"].num_preemptions if "mate" in engine.seqs else 0)
    mate = [o for o in outs if o.request_id == "mate"]
    assert all(o.finish_reason is not FinishReason.ERROR for o in mate), mate[-1].error
    assert [t for o in mate for t in o.new_token_ids] == want
    assert engine.stats.preemptions == preempted == 1  # it did reuse them, and was computed again


def test_under_async_scheduling_a_readmission_dropped_for_nan_blocks_counts_its_first_lookup_once(
    tiny_llama: TinyOutput,
) -> None:
    """The engine's path to f3b7442b: a request whose lookup the stats took in, preempted, admitted
    again onto the blocks a NaN prefill had just named (its prefill dropped, ``recompute``) had
    that lookup forgotten as if pending, and its next admission counted it again: the prefix
    cache's queries twice for one request (23 more here). Its tokens are those it would have made."""
    prompt = list(range(3, 23))  # five blocks of 4
    want = run_all(make_engine(tiny_llama, block_size=4), {"x": ("lora-0", prompt)}, max_tokens=6)["x"]
    engine = make_engine(tiny_llama, block_size=4, num_blocks=8, enable_prefix_caching=True, async_scheduling=True)
    engine.add_request("mate", prompt_token_ids=prompt, params=SamplingParams(max_tokens=6), adapter="lora-0")
    outs = [o for _ in range(3) for o in engine.step()]  # its lookup counted, 3 tokens made
    engine.add_request("other", prompt_token_ids=list(range(40, 56)), params=SamplingParams(max_tokens=1))
    outs += engine.step(StepDecision(None, ["other"]))  # 5 blocks wanted, 2 free: "mate" preempted
    while "other" in engine.seqs:
        outs += engine.step(StepDecision(None, []))
    engine.reset_prefix_cache()  # the prompt's blocks are the NaN step's alone
    _next_forward_goes_nan(engine)
    engine.add_request("bad", prompt_token_ids=prompt, params=SamplingParams(max_tokens=4), adapter="lora-0")
    outs += engine.step(StepDecision(None, ["bad"]))  # its prefill, NaN, in flight
    counted = (engine.stats.prefix_cache_queries, engine.stats.prefix_cache_hits)
    outs += engine.step(StepDecision(None, ["mate"]))  # admitted onto them, then dropped
    assert engine.seqs["mate"].num_preemptions == engine.stats.preemptions == 2
    while engine.has_unfinished():
        outs += engine.step()
    assert (engine.stats.prefix_cache_queries, engine.stats.prefix_cache_hits) == counted
    assert [t for o in outs if o.request_id == "mate" for t in o.new_token_ids] == want
    assert [o.request_id for o in outs if o.finish_reason is FinishReason.ERROR] == ["bad"]


def test_under_async_scheduling_a_request_preempted_before_its_nan_step_is_looked_at_leaves_no_cached_blocks(
    tiny_llama: TinyOutput,
) -> None:
    """A request preempted after its NaN prefill was launched and before its logits were looked at
    (async scheduling: the next step is scheduled first) had freed its blocks, still cached, so
    ``forget`` found nothing to take out: a retry of the same prompt reused the NaN blocks and
    failed "not finite" for good."""
    prompt = list(range(3, 23))  # five blocks of 4
    want = run_all(make_engine(tiny_llama, block_size=4), {"x": ("lora-0", prompt)}, max_tokens=4)["x"]
    engine = make_engine(tiny_llama, block_size=4, num_blocks=8, enable_prefix_caching=True, async_scheduling=True)
    _next_forward_goes_nan(engine)
    engine.add_request("bad", prompt_token_ids=prompt, params=SamplingParams(max_tokens=4), adapter="lora-0")
    assert engine.step() == []  # its prefill, NaN, in flight; 3 blocks left
    engine.add_request("other", prompt_token_ids=list(range(40, 56)), params=SamplingParams(max_tokens=1))
    # 4 blocks wanted and the step empty else: "bad", left out, gives its blocks back
    outs = engine.step(StepDecision(None, ["other"]))
    assert [(o.request_id, o.finish_reason) for o in outs] == [("bad", FinishReason.ERROR)]
    assert engine.stats.preemptions == 1
    while engine.has_unfinished():  # "other" ends
        engine.step()
    assert run_all(engine, {"again": ("lora-0", prompt)}, max_tokens=4)["again"] == want


def test_drain_fails_a_prompt_chunk_that_went_nan(tiny_llama: TinyOutput) -> None:
    """``drain`` (before a move) takes in the step in flight: a prompt chunk of it whose logits are
    not finite fails its request there, as the next step would, and takes its blocks out of the
    cache before a request moved in meanwhile could reuse them."""
    prompt = list(range(3, 23))
    engine = make_engine(
        tiny_llama, block_size=4, max_num_batched_tokens=8, enable_prefix_caching=True, async_scheduling=True
    )
    _next_forward_goes_nan(engine)
    engine.add_request("bad", prompt_token_ids=prompt, params=SamplingParams(max_tokens=4), adapter="lora-0")
    assert engine.step() == []  # its first chunk, NaN
    assert [(o.request_id, o.finish_reason) for o in engine.drain()] == [("bad", FinishReason.ERROR)]
    assert engine.blocks.num_cached == 0 and not engine.has_unfinished()


@pytest.mark.parametrize("chunk", [None, 8])
def test_under_async_scheduling_a_request_aborted_before_its_nan_step_is_looked_at_leaves_no_cached_blocks(
    tiny_llama: TinyOutput, chunk: int | None
) -> None:
    """A request aborted (its client gone) after its NaN prefill, or prompt chunk, was launched and
    before its logits were looked at (async scheduling: a call later) was passed over there, its
    blocks still cached: the same prompt sent again reused them and failed "not finite"."""
    prompt = list(range(3, 23))  # five blocks of 4: one step, or chunks of 8
    want = run_all(make_engine(tiny_llama, block_size=4), {"x": ("lora-0", prompt)}, max_tokens=4)["x"]
    budget = {"max_num_batched_tokens": chunk} if chunk else {}
    engine = make_engine(tiny_llama, block_size=4, enable_prefix_caching=True, async_scheduling=True, **budget)
    _next_forward_goes_nan(engine)
    engine.add_request("bad", prompt_token_ids=prompt, params=SamplingParams(max_tokens=4), adapter="lora-0")
    assert engine.step() == []  # NaN, in flight
    assert engine.abort("bad")
    assert engine.step() == [] and engine.blocks.num_cached == 0
    assert run_all(engine, {"again": ("lora-0", prompt)}, max_tokens=4)["again"] == want


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_request_whose_decode_goes_nan_leaves_its_prompts_blocks_to_the_prompts_that_share_them(
    tiny_llama: TinyOutput, async_scheduling: bool
) -> None:
    """A decode step that went NaN wrote NaN only into the KV of its own token; the blocks of the
    prompt were read by the prefill, whose logits were finite. All of them were taken out of the
    cache: a request with the same prompt and adapter sent meanwhile (async scheduling: it reused
    them in the step launched before the NaN was looked at) was preempted and computed its prompt
    again, and every later one found nothing cached. Now it is served from the cache, unpreempted."""
    prompt = list(range(3, 23))  # five blocks of 4: four reused
    want = run_all(make_engine(tiny_llama, block_size=4), {"x": ("lora-0", prompt)}, max_tokens=4)["x"]
    engine = make_engine(tiny_llama, block_size=4, enable_prefix_caching=True, async_scheduling=async_scheduling)
    engine.add_request("bad", prompt_token_ids=prompt, params=SamplingParams(max_tokens=4), adapter="lora-0")
    outs = engine.step()  # its prefill, finite
    _next_forward_goes_nan(engine)
    outs += engine.step()  # its first decode, NaN
    engine.add_request("mate", prompt_token_ids=prompt, params=SamplingParams(max_tokens=4), adapter="lora-0")
    while engine.has_unfinished():
        outs += engine.step()
    assert [o.finish_reason for o in outs if o.request_id == "bad" and o.finished] == [FinishReason.ERROR]
    mate = [o for o in outs if o.request_id == "mate"]
    assert [t for o in mate for t in o.new_token_ids] == want
    assert engine.stats.preemptions == 0 and mate[-1].num_cached_tokens == 16


def test_a_request_that_goes_nan_leaves_the_blocks_another_computed_beside_it_under_the_same_names(
    tiny_llama: TinyOutput,
) -> None:
    """Two prompts sharing a two-block prefix computed it in one step (the second's own part too
    long to wait for the first's blocks): the first cached it. The second's logits came out NaN
    (a token of its own part overflowed): taking out what it had named, by name, took the first's
    good blocks, so the next prompt with that prefix found nothing cached."""
    shared = list(range(3, 11))
    good, bad = [*shared, 50], [*shared, *range(60, 80), POISON, *range(80, 89)]
    want = run_all(make_engine(tiny_llama, block_size=4), {"x": ("lora-0", good)}, max_tokens=4)["x"]
    engine = make_engine(tiny_llama, block_size=4, enable_prefix_caching=True)
    _poisoned_rows_go_nan(engine)
    out = run(
        engine,
        {"good": (good, SamplingParams(max_tokens=4)), "bad": (bad, SamplingParams(max_tokens=4))},
    )
    assert out["good"]["tokens"] == want and out["bad"]["reason"] is FinishReason.ERROR
    engine.add_request("later", prompt_token_ids=good, params=SamplingParams(max_tokens=4), adapter="lora-0")
    later = [o for _ in range(8) for o in engine.step()]
    assert [t for o in later for t in o.new_token_ids] == want and later[-1].num_cached_tokens == 8


def test_a_prefill_recomputed_after_a_nan_counts_what_its_second_lookup_finds(tiny_llama: TinyOutput) -> None:
    """Async scheduling: a prompt reused four blocks, two of them named by a prompt chunk whose
    logits then came out NaN, and was recomputed. The stats kept the four blocks as hits (a hit
    rate for KV that was thrown away) and its usage said 0 cached tokens, though its second lookup
    found the two good blocks and reused them. Now it counts as one lookup, the one it ran on."""
    prompt = list(range(3, 23))  # chunks of 8: five blocks of 4
    want = run_all(make_engine(tiny_llama, block_size=4), {"x": ("lora-0", prompt)}, max_tokens=4)["x"]
    engine = make_engine(
        tiny_llama, block_size=4, max_num_batched_tokens=8, enable_prefix_caching=True, async_scheduling=True
    )
    engine.add_request("bad", prompt_token_ids=prompt, params=SamplingParams(max_tokens=4), adapter="lora-0")
    outs = engine.step()  # its first chunk, finite
    _next_forward_goes_nan(engine)
    outs += engine.step()  # its second, NaN
    engine.add_request("mate", prompt_token_ids=prompt, params=SamplingParams(max_tokens=4), adapter="lora-0")
    while engine.has_unfinished():
        outs += engine.step()
    mate = [o for o in outs if o.request_id == "mate"]
    assert [t for o in mate for t in o.new_token_ids] == want and engine.stats.preemptions == 1
    assert mate[-1].num_cached_tokens == 8
    assert (engine.stats.prefix_cache_queries, engine.stats.prefix_cache_hits) == (40, 8)


def test_a_prefill_past_its_first_chunk_is_not_recomputed_for_blocks_its_own_chunk_read(
    tiny_llama: TinyOutput,
) -> None:
    """Async scheduling: two prompts reused the same cached prefix in one step, a long one's first
    chunk and a short one whose logits came out NaN (its own last token). Nothing had read the
    prefix before the short one's step, so its blocks were taken out, and the long one, already
    on its next chunk, was preempted and computed its prompt again, though its first chunk's
    logits, finite, had read every block of that prefix."""
    shared = list(range(3, 11))  # two blocks of 4, cached by "first"
    long, short = [*shared, *range(60, 90)], [*shared, POISON, 61]
    want = run_all(make_engine(tiny_llama, block_size=4), {"x": ("lora-0", long)}, max_tokens=4)["x"]
    engine = make_engine(
        tiny_llama, block_size=4, max_num_batched_tokens=16, enable_prefix_caching=True, async_scheduling=True
    )
    _poisoned_rows_go_nan(engine)
    run(engine, {"first": ([*shared, 50], SamplingParams(max_tokens=1))})
    out = run(engine, {"short": (short, SamplingParams(max_tokens=4)), "long": (long, SamplingParams(max_tokens=4))})
    assert out["short"]["reason"] is FinishReason.ERROR and out["long"]["tokens"] == want
    assert engine.stats.preemptions == 0
