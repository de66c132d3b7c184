"""Decode steps through DecodeGraphs' static buffers equal transformers + peft token for token.

On a GPU (make gpu-check: DLORA_TEST_DEVICE=cuda) the engine records and replays CUDA graphs; on
the CPU the same padded static-buffer step runs eagerly under TRITON_INTERPRET=1."""

from __future__ import annotations

import pytest
import torch

from dlora.common.messages import SamplingParams
from dlora.kernels.lora import LoraProjection
from dlora.model.make_tiny import TinyOutput
from dlora.services.worker.engine import LLMEngine
from dlora.services.worker.engine.graphs import capture_sizes, decode_graphs
from dlora.services.worker.engine.model import StepInputs
from tests.engine.helpers import make_engine, run_plan
from tests.engine.oracle import Oracle
from tests.engine.test_parity import _prompts


def test_capture_sizes_are_vllms_buckets_up_to_max_num_seqs() -> None:
    assert capture_sizes(1) == [1]
    assert capture_sizes(6) == [1, 2, 4, 6]
    assert capture_sizes(32) == [1, 2, 4, 8, 16, 24, 32]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]


def test_slot_tables_change_in_place(tiny_llama: TinyOutput) -> None:
    """A captured graph reads the LoRA tables where it was captured: loading a slot must rewrite
    those tensors, not replace them."""
    engine = make_engine(tiny_llama, kernels="triton", max_loras=2)
    proj: LoraProjection = engine.device_loras.layers[0]["qkv"]
    assert proj.tables is not None
    before = proj.tables.a_ptrs.data_ptr(), proj.tables.ranks.data_ptr()
    name = sorted(tiny_llama.adapters)[0]
    engine.device_loras.load(1, engine.adapters[name])
    assert (proj.tables.a_ptrs.data_ptr(), proj.tables.ranks.data_ptr()) == before
    assert int(proj.tables.ranks[0, 1]) == engine.adapters[name].rank and proj.tables.max_rank > 0
    assert engine.device_loras.rank_bound == max(16, 1 << (engine.adapters[name].rank - 1).bit_length())


def test_decode_steps_through_static_buffers_match_peft(tiny_llama: TinyOutput) -> None:
    """Every adapter and the base, nine requests (bucket 8 with padding rows), two slots for three
    adapters (slots change between steps), the engine unmerged, mixed (a delta added and one
    subtracted), merged (no LoRA launch) and back: the oracle's tokens, every decode step graphed.
    The first key's recording fails (as a capture out of memory would): its steps run eagerly on
    the same buffers, the other keys still graph, and no key is recorded twice as slots change."""
    engine = make_engine(tiny_llama, kernels="triton", max_loras=2)
    if engine.graphs is None:  # no CUDA: the same buffers and padding, run eagerly
        engine.graphs = decode_graphs(engine, capture=False)
    graphs, record = engine.graphs, engine.graphs._record
    # The highest rank loaded first, so the launch sizes never grow (which drops every graph).
    engine.device_loras.load(1, max(engine.adapters.values(), key=lambda a: a.rank))

    def fail_first(inputs: StepInputs) -> tuple[object, object]:
        if not graphs.failed and not graphs._graphs:
            raise torch.OutOfMemoryError("out of memory while capturing")
        return record(inputs)

    graphs._record = fail_first
    oracle = Oracle(tiny_llama)
    prompts = _prompts(tiny_llama)
    adapters = [None, *sorted(tiny_llama.adapters)]
    # Every other request the base model's, so a step with two adapters' requests holds 5-7.
    requests = {
        f"r{i}": (adapters[(i + 1) // 2 % len(adapters)] if i % 2 else None, prompts[i % len(prompts)])
        for i in range(9)
    }
    max_tokens = 3
    a = adapters[1]
    got, _ = run_plan(engine, requests, max_tokens, [(None, False), (a, True), (a, False), (None, False)])
    assert got == {rid: oracle.generate(ad, ids, max_tokens) for rid, (ad, ids) in requests.items()}
    assert engine.graphs is graphs and len(graphs.failed) == 1 and graphs.failed < graphs._graphs.keys()
    assert engine.stats.cuda_graphs == len(graphs._graphs) and engine.stats.cuda_graph_seconds > 0
    buckets = {n for n, _, _ in engine.graphs.steps}
    passes = {(plus, minus) for _, plus, minus in engine.graphs.steps}
    assert 8 in buckets and buckets <= {1, 2, 4, 8}, engine.graphs.steps
    assert {(True, False), (True, True), (False, False)} <= passes, engine.graphs.steps
    # Padding rows wrote to the scratch block: had they written to a sequence's, its tokens would
    # differ; had they written to slot 0, the pad block every torch-path table is padded with
    # would not be zero (``block_manager.py``: keys past a context must be finite).
    scratch = engine.blocks.end * engine.config.block_size
    assert bool(engine.model.kv.k[:, scratch].abs().sum() > 0)
    assert not engine.model.kv.k[:, : engine.config.block_size].any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (make gpu-check)")
def test_graphed_half_precision_steps_give_the_eager_steps_logits(tiny_llama: TinyOutput) -> None:
    """bf16 on CUDA, graphs against enforce_eager, the same requests and decisions: logits within
    bf16 rounding at every step (the graphs' LoRA tiles and padded batch may round otherwise),
    same tokens but where the two best were within that rounding of each other (``same_steps``)."""
    engines = [make_engine(tiny_llama, device="cuda", dtype="bfloat16", enforce_eager=e) for e in (False, True)]
    assert engines[0].graphs is not None and engines[1].graphs is None
    same_steps(engines, tiny_llama, tolerance=2e-2)
    assert sum(engines[0].graphs.steps.values()) > 0


def same_steps(engines: list[LLMEngine], tiny: TinyOutput, tolerance: float) -> set[str]:
    """Six requests over the base and three adapters on both ``engines``, stepped together: each
    step's logits within ``tolerance`` of the largest (relative), and the same token, unless the
    two engines' tokens were a near-tie in the second's logits (within the same tolerance): such a
    request is followed no further. At most one may part so. Returns the ones that parted."""
    prompts = _prompts(tiny)
    adapters = [None, *sorted(tiny.adapters)]
    for engine in engines:
        for i in range(6):
            params = SamplingParams(max_tokens=6)
            engine.add_request(
                f"r{i}", prompt_token_ids=prompts[i % len(prompts)], params=params, adapter=adapters[i % 4]
            )
    parted: set[str] = set()
    while any(engine.has_unfinished() for engine in engines):
        tokens = [{o.request_id: o.new_token_ids for o in engine.step()} for engine in engines]
        first, second = (engine.last_logits for engine in engines)
        assert first.keys() - parted == second.keys() - parted
        for rid in first.keys() - parted:
            scale = second[rid].abs().max().item()
            assert (first[rid] - second[rid]).abs().max().item() <= tolerance * scale, rid
            if tokens[0].get(rid) != tokens[1].get(rid):
                assert tokens[0].get(rid) and tokens[1].get(rid), (rid, tokens)  # both drew one
                a, b = tokens[0][rid][-1], tokens[1][rid][-1]
                assert abs(second[rid][a] - second[rid][b]).item() <= tolerance * scale, (rid, a, b)
                parted.add(rid)
        for rid in parted:  # one may still run where the other ended: followed no further
            for engine in engines:
                engine.abort(rid)
    assert len(parted) <= 1, parted
    return parted


def test_a_replay_that_fails_turns_graphs_off_and_its_recording_is_still_counted(tiny_llama: TinyOutput) -> None:
    """The step goes on eagerly, with the oracle's tokens; the recording it paid before failing is
    in the stats and left out of the step's time."""
    engine = make_engine(tiny_llama, kernels="triton")
    engine.graphs = graphs = decode_graphs(engine, capture=False)
    fill = graphs._fill

    def fail_on_real_rows(n: int, ids: list[int], *rest: object) -> None:
        if ids:  # the padding-only fill before a recording passes; the step's own rows do not
            raise RuntimeError("replay refused")
        fill(n, ids, *rest)

    graphs._fill = fail_on_real_rows
    prompt = _prompts(tiny_llama)[0]
    engine.add_request("r", prompt_token_ids=prompt, params=SamplingParams(max_tokens=3))
    tokens = [t for _ in range(3) for o in engine.step() for t in o.new_token_ids]
    assert tokens == Oracle(tiny_llama).generate(None, prompt, 3)
    assert engine.graphs is None and engine.stats.cuda_graphs == 1 and engine.stats.cuda_graph_seconds > 0
