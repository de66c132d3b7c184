"""Async scheduling (``EngineConfig.async_scheduling``): each step is launched before the last
one's tokens reach the host, its inputs taking them on the device. Every request's outputs equal
the synchronous engine's, whatever ends, preempts, aborts or moves a request meanwhile."""

from __future__ import annotations

import json
import time

import pytest
import torch

from dlora.common.messages import FinishReason, SamplingParams
from dlora.model.make_tiny import TinyOutput
from dlora.services.worker.engine import LLMEngine
from dlora.services.worker.engine.graphs import decode_graphs
from dlora.services.worker.engine.inputs import Carry, carry_into
from dlora.services.worker.engine.lora import AdapterError
from dlora.services.worker.engine.sequence import RESERVED, Sequence, Status
from dlora.services.worker.policy import StepDecision
from tests.engine.helpers import make_engine
from tests.engine.test_structured import SCHEMA

Outputs = dict[str, tuple[list[int], str, FinishReason | None, list]]


def requests(tiny: TinyOutput, n: int = 12, shared: int = 0) -> list[tuple[str, str | None, list[int], SamplingParams]]:
    """A mix of what a step's sampling reads from a request's history: greedy, seeded draws,
    penalties, logprobs, min_tokens, stop tokens, a JSON Schema; the base and every adapter;
    outputs of different lengths, so requests end at different steps. ``shared``: tokens every
    prompt begins with (the prefix cache's)."""
    adapters = [None, *sorted(tiny.adapters)]
    kinds = [
        SamplingParams(max_tokens=9),
        SamplingParams(max_tokens=14, temperature=0.9, top_p=0.9, seed=3),
        SamplingParams(max_tokens=11, presence_penalty=0.8, frequency_penalty=0.4, repetition_penalty=1.3),
        SamplingParams(max_tokens=7, logprobs=3, min_tokens=5, stop_token_ids=[7, 9, 11, 13, 15, 17]),
        SamplingParams(max_tokens=40, json_schema=json.dumps(SCHEMA), temperature=1.0, seed=8),
        SamplingParams(max_tokens=16, temperature=0.7, seed=4, logprobs=1, stop_token_ids=[21, 22, 23]),
    ]
    head = [3 + t % 50 for t in range(shared)]
    return [
        (
            f"r{i}",
            adapters[i % len(adapters)],
            head + [(7 * i + j) % 300 + 3 for j in range(4 + i)],
            kinds[i % len(kinds)],
        )
        for i in range(n)
    ]


def run(engine: LLMEngine, reqs: list, abort: dict[int, str] | None = None) -> Outputs:
    """Every request added at once, stepped to the end (``abort``: call number -> request to drop
    before that call); per request its tokens, text, finish reason and logprobs."""
    for rid, adapter, ids, params in reqs:
        engine.add_request(rid, prompt_token_ids=ids, params=params, adapter=adapter)
    out: Outputs = {rid: ([], "", None, []) for rid, *_ in reqs}
    calls = 0
    while engine.has_unfinished():
        if abort and calls in abort:
            engine.abort(abort[calls])
        for o in engine.step():
            tokens, text, _, lps = out[o.request_id]
            got = [(lp.token_id, lp.logprob, lp.top) for lp in o.logprobs or []]
            out[o.request_id] = (tokens + o.new_token_ids, text + o.new_text, o.finish_reason, lps + got)
        calls += 1
    return out


def same(a: Outputs, b: Outputs) -> bool:
    """Equal outputs, logprobs to float rounding: a batch that holds a request the last step
    ended may round a logprob's 7th digit otherwise. Token ids (and which tokens are the top
    ones) exactly."""

    def shape(out: Outputs) -> dict:
        return {r: (*v[:3], [(t, [i for i, _ in top]) for t, _, top in v[3]]) for r, v in out.items()}

    def values(out: Outputs) -> list[float]:
        return [x for v in out.values() for _, p, top in v[3] for x in (p, *(q for _, q in top))]

    return shape(a) == shape(b) and values(a) == pytest.approx(values(b), abs=1e-4)


@pytest.mark.parametrize(
    "config",
    [
        {"policy": "dlora"},  # merges, unmerges and mixes as it decides
        {"policy": "unmerged-only", "num_blocks": 14},  # preempts: tokens in flight go back to waiting
        {"policy": "unmerged-only", "max_num_batched_tokens": 24, "block_size": 4},  # chunks split blocks
    ],
    ids=["dlora", "preemption", "chunked"],
)
def test_every_request_gets_the_synchronous_engines_outputs(tiny_llama: TinyOutput, config: dict) -> None:
    reqs = requests(tiny_llama, shared=8 if "max_num_batched_tokens" in config else 0)
    sync, overlapped = make_engine(tiny_llama, **config), make_engine(tiny_llama, async_scheduling=True, **config)
    expected = run(sync, reqs)
    assert same(run(overlapped, reqs), expected)
    assert {r for r, (_, _, reason, _) in expected.items() if reason is FinishReason.STOP}, "nothing ended early"
    assert overlapped.stats.steps >= sync.stats.steps  # a step taken in per call, the last one too
    if "num_blocks" in config:
        assert overlapped.stats.preemptions > 0 and sync.stats.preemptions > 0
    if "max_num_batched_tokens" in config:
        assert overlapped.stats.prefix_cache_hits > 0


def test_outputs_come_a_call_later_and_drain_takes_them_at_once(tiny_llama: TinyOutput) -> None:
    engine = make_engine(tiny_llama, async_scheduling=True)
    params = SamplingParams(max_tokens=6, ignore_eos=True, logprobs=2)
    engine.add_request("r", prompt_token_ids=[5, 40, 41, 300, 17], params=params)
    assert engine.step() == []  # the prefill is launched; its token is on its way
    assert engine._in_flight is not None and engine._in_flight.logprobs is not None  # its logprobs with it
    seq = engine.seqs["r"]
    assert seq.output_ids == [RESERVED] and seq.num_cached == 5 and engine.has_unfinished()
    with pytest.raises(RuntimeError, match="drain"):
        engine.export_kv("r")  # its last token is not on the host
    first = engine.step()  # launches the second token, takes in the first
    assert [o.new_token_ids for o in first] == [seq.output_ids[:1]] and seq.output_ids[-1] == RESERVED
    second = engine.drain()
    assert len(second) == 1 and seq.output_ids == first[0].new_token_ids + second[0].new_token_ids
    assert [lp.token_id for o in first + second for lp in o.logprobs] == seq.output_ids
    assert engine.export_kv("r") is not None and engine.drain() == []


def test_a_request_ended_or_aborted_while_its_token_is_in_flight(tiny_llama: TinyOutput) -> None:
    """One ended by its length runs once more, its row dropped; one aborted with a token in
    flight gets nothing more; its adapter stays in use until the step that ran it is taken in."""
    reqs = [
        (f"r{i}", "lora-1" if i == 2 else None, [5 + i, 40, 41, 300, 17], SamplingParams(max_tokens=3 + 4 * i))
        for i in range(3)
    ]
    expected = run(make_engine(tiny_llama), reqs[:2])
    engine = make_engine(tiny_llama, async_scheduling=True)
    got = run(engine, reqs, abort={3: "r2"})
    assert same({r: got[r] for r in ("r0", "r1")}, expected) and got["r0"][2] is FinishReason.LENGTH
    assert len(got["r2"][0]) == 2  # taken in before the abort: two calls' tokens
    engine.add_request("x", prompt_token_ids=[9, 9, 9], params=SamplingParams(max_tokens=4), adapter="lora-1")
    engine.step()
    engine.abort("x")
    assert engine.in_use("lora-1") and not engine.seqs  # the step in flight ran it
    with pytest.raises(AdapterError, match="in flight"):
        engine.unregister_adapter("lora-1")
    assert engine.step() == [] and not engine.in_use("lora-1")
    engine.unregister_adapter("lora-1")


@pytest.mark.parametrize("ship_kv", [False, True], ids=["recompute", "kv"])
def test_a_request_moved_after_a_drain_continues_exactly(tiny_llama: TinyOutput, ship_kv: bool) -> None:
    params = SamplingParams(max_tokens=12, ignore_eos=True, temperature=0.8, seed=2)
    prompt = [5, 40, 41, 300, 17]
    whole = run(make_engine(tiny_llama), [("r", "lora-0", prompt, params)])["r"][0]
    source, destination = make_engine(tiny_llama, async_scheduling=True), make_engine(tiny_llama)
    source.add_request("r", prompt_token_ids=prompt, params=params, adapter="lora-0")
    sent = [t for _ in range(4) for o in source.step() for t in o.new_token_ids]
    sent += [t for o in source.drain() for t in o.new_token_ids]  # what a move does first
    seq = source.seqs["r"]
    assert seq.output_ids == sent and len(sent) == 4
    kv = source.export_kv("r") if ship_kv else None
    destination.add_request("r", prompt_token_ids=prompt, params=params, adapter="lora-0", resume_token_ids=sent, kv=kv)
    rest = []
    while destination.has_unfinished():
        rest += [t for o in destination.step() for t in o.new_token_ids]
    assert sent + rest == whole
    assert destination.stats.prefill_tokens == (0 if ship_kv else len(prompt) + len(sent))


def test_reserved_tokens_are_taken_from_the_device_where_the_step_feeds_them() -> None:
    """A decode's one token, the last of a prefill recomputed after a preemption; not a chunk
    short of it, nor a sequence the carry does not hold (or holds under another object)."""

    def seq(rid: str, prompt: int, outputs: list[int], cached: int, scheduled: int) -> Sequence:
        s = Sequence(rid, None, list(range(prompt)), SamplingParams(), arrival=0, detok=None)  # no text here
        s.output_ids, s.num_cached, s.num_scheduled, s.status = outputs, cached, scheduled, Status.RUNNING
        return s

    decode = seq("d", 4, [1, RESERVED], 5, 1)
    recompute = seq("p", 3, [2, 2, RESERVED], 0, 6)
    chunk = seq("c", 8, [RESERVED], 0, 4)
    other = seq("o", 2, [5], 2, 1)
    stranger = seq("s", 2, [RESERVED], 2, 1)
    batch = [decode, recompute, chunk, other, stranger]
    twin = seq("s", 2, [RESERVED], 2, 1)
    carry = Carry(
        torch.tensor([70, 71, 72, 73]), {"d": (decode, 2), "p": (recompute, 0), "c": (chunk, 3), "s": (twin, 1)}
    )
    ids = torch.full((sum(s.num_scheduled for s in batch),), -1, dtype=torch.int64)
    carry_into(ids, batch, carry)
    assert ids.tolist() == [72, -1, -1, -1, -1, -1, 70, -1, -1, -1, -1, -1, -1]


def test_async_steps_through_the_decode_graphs_buffers(tiny_llama: TinyOutput) -> None:
    """The graphs' static buffers take the reserved tokens on the device too (on a CPU the same
    buffers run eagerly under TRITON_INTERPRET=1)."""
    # The base model's (no LoRA pass: the carry does not meet it), one decode step each after the
    # prefill's token: TRITON_INTERPRET makes every step here cost seconds.
    reqs = [(f"r{i}", None, [5 + i, 40, 41, 300], SamplingParams(max_tokens=2)) for i in range(2)]
    expected = run(make_engine(tiny_llama), reqs)  # the torch path's tokens are the Triton path's (test_parity)
    engine = make_engine(tiny_llama, kernels="triton", async_scheduling=True)
    if engine.graphs is None:
        engine.graphs = decode_graphs(engine, capture=False)
    assert run(engine, reqs) == expected and sum(engine.graphs.steps.values()) > 0


def test_a_request_whose_next_forward_fails_keeps_its_token_and_one_that_ended_is_not_failed(
    tiny_llama: TinyOutput,
) -> None:
    """The step after a request's third token fails on that token: it fails with three tokens as
    a synchronous engine fails it (the token in flight is taken in first), and with max_tokens 3
    it ends by its length (the step it failed in ran it once more, after it ended)."""
    prompt, other = [5, 40, 41, 300, 17], [9, 8, 7, 6]
    third = run(make_engine(tiny_llama), [("x", None, prompt, SamplingParams(max_tokens=3, ignore_eos=True))])["x"][0][
        2
    ]
    for max_tokens in (8, 3):
        reqs = [
            ("x", None, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True)),
            ("y", None, other, SamplingParams(max_tokens=8, ignore_eos=True)),
        ]
        got = []
        for overlap in (False, True):
            # Eager: on a GPU a graph's replay would run the step without the patched forward.
            engine = make_engine(tiny_llama, async_scheduling=overlap, enforce_eager=True)
            forward = engine.model.forward

            def faulty(inputs, forward=forward):  # a kernel fault on that token
                if (inputs.input_ids == third).any():
                    raise RuntimeError("injected fault")
                return forward(inputs)

            engine.model.forward = faulty
            got.append(run(engine, reqs))
        assert got[0] == got[1] and len(got[0]["x"][0]) == 3
        assert got[0]["x"][2] is (FinishReason.ERROR if max_tokens == 8 else FinishReason.LENGTH)


def test_a_step_that_raises_after_taking_tokens_in_loses_none_of_them(tiny_llama: TinyOutput, monkeypatch) -> None:
    """The worker answers a step that raises with ``fail_all``: what that call had taken in (here
    a request's last token, which ended it) comes back with the failures."""
    from dlora.services.worker.engine import async_scheduling

    engine = make_engine(tiny_llama, async_scheduling=True)
    engine.add_request("short", prompt_token_ids=[5, 6, 7], params=SamplingParams(max_tokens=2, ignore_eos=True))
    engine.add_request("long", prompt_token_ids=[8, 9, 7], params=SamplingParams(max_tokens=9, ignore_eos=True))
    sample, calls = async_scheduling.sample_sequences, []

    def out_of_memory(*args, **kwargs):  # the third draw, after "short"'s last token was taken in
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("CUDA out of memory (injected)")
        return sample(*args, **kwargs)

    monkeypatch.setattr(async_scheduling, "sample_sequences", out_of_memory)
    tokens, ends = {"short": 0, "long": 0}, {}
    while engine.has_unfinished():
        try:
            outputs = engine.step()
        except RuntimeError as e:
            outputs = engine.fail_all(str(e))
        for o in outputs:
            tokens[o.request_id] += len(o.new_token_ids)
            ends.update({o.request_id: o.finish_reason} if o.finished else {})
    assert ends == {"short": FinishReason.LENGTH, "long": FinishReason.ERROR} and tokens == {"short": 2, "long": 2}


def test_the_merged_adapter_of_a_step_in_flight_stays_in_use(tiny_llama: TinyOutput) -> None:
    engine = make_engine(tiny_llama, async_scheduling=True)
    engine.add_request("b", prompt_token_ids=[5, 6, 7], params=SamplingParams(max_tokens=4, ignore_eos=True))
    engine.step(StepDecision("lora-1", ["b"], mixed=True))  # a base request beside lora-1 merged
    engine.switch(None)
    with pytest.raises(AdapterError, match="in flight"):
        engine.unregister_adapter("lora-1")  # the step's record names it when taken in
    engine.drain()
    engine.unregister_adapter("lora-1")


def test_step_times_and_adapter_tokens_are_the_synchronous_engines(tiny_llama: TinyOutput) -> None:
    """A step's seconds never go below 0 (a CUDA graph recorded while launching the next step
    is not the last one's time), and a step whose every row had ended counts no tokens."""

    class Recording:  # graphs that record one graph, taking 0.1 s, at the fourth launch
        steps: dict = {}

        def __init__(self) -> None:
            self.calls = 0

        def runs(self, batch: list) -> bool:
            return False

        def take_recorded(self) -> tuple[int, float]:
            self.calls += 1
            if self.calls == 4:
                time.sleep(0.1)
                return 1, 0.1
            return 0, 0.0

    engines = make_engine(tiny_llama), make_engine(tiny_llama, async_scheduling=True)
    seconds: list[float] = []
    for engine in engines:
        engine.graphs = Recording()  # type: ignore[assignment]
        observe = engine.policy.observe
        engine.policy.observe = lambda d, r, observe=observe: (seconds.append(r.seconds), observe(d, r))[1]
        engine.add_request("r", prompt_token_ids=[5, 6, 7], params=SamplingParams(max_tokens=6, ignore_eos=True))
        engine.add_request("s", prompt_token_ids=[8, 6], params=SamplingParams(max_tokens=4), adapter="lora-0")
        while engine.has_unfinished():
            engine.step()
    assert min(seconds) >= 0
    assert engines[0].stats.adapter_tokens == engines[1].stats.adapter_tokens
    assert engines[0].stats.tokens_generated == engines[1].stats.tokens_generated


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host synchronisations are a GPU's (make gpu-check)")
def test_an_async_decode_step_never_makes_the_host_wait_for_the_device(tiny_llama: TinyOutput) -> None:
    """What the overlap rests on: once its graphs are recorded, a decode step under async
    scheduling (greedy, seeded, penalised and logprobs rows, an adapter) launches without one
    implicit synchronisation (``.item()``, ``.tolist()``, a pageable copy); its only wait is on
    the last step's tokens, an event."""
    import warnings

    engine = make_engine(tiny_llama, device="cuda", kernels="triton", async_scheduling=True)
    kinds = [
        SamplingParams(max_tokens=200, ignore_eos=True),
        SamplingParams(max_tokens=200, ignore_eos=True, temperature=0.8, seed=1),
        SamplingParams(max_tokens=200, ignore_eos=True, presence_penalty=0.5),
        SamplingParams(max_tokens=200, ignore_eos=True, logprobs=2),
    ]
    for i, params in enumerate(kinds):
        engine.add_request(
            f"r{i}", prompt_token_ids=[5 + i, 40, 41, 300], params=params, adapter=[None, "lora-0"][i % 2]
        )
    for _ in range(6):  # prefill, then decodes until the bucket's graph is recorded
        engine.step()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(5):
                assert len(engine.step()) == len(kinds)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert [str(w.message) for w in caught] == []
    assert engine.graphs is not None and sum(engine.graphs.steps.values()) > 0  # the graphed path
