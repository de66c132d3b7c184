"""Greedy output equals transformers + peft token for token, in every mode and mix."""

from __future__ import annotations

import pytest
import torch

from dlora.common.messages import SamplingParams
from dlora.kernels.lora_triton import interpreting
from dlora.model.make_tiny import TinyOutput
from dlora.services.worker.policy import Mode
from tests.engine.helpers import make_engine, run_all, run_plan
from tests.engine.oracle import Oracle

MAX_TOKENS = 12
TEXTS = ["kalo remi suta nevo", "da", "pole simu gano befi tuza chsh thqu aren", "rimu lore kasi. ", "no"]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def arch(request: pytest.FixtureRequest, tiny_llama: TinyOutput, tiny_qwen: TinyOutput) -> tuple[TinyOutput, Oracle]:
    tiny = tiny_llama if request.param == "llama" else tiny_qwen
    return tiny, Oracle(tiny)


def _prompts(tiny: TinyOutput) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny.model)
    return [tok.encode(t) for t in TEXTS]


def _expected(
    oracle: Oracle, requests: dict[str, tuple[str | None, list[int]]], max_tokens: int = MAX_TOKENS
) -> dict[str, list[int]]:
    return {rid: oracle.generate(a, ids, max_tokens) for rid, (a, ids) in requests.items()}


POLICIES = ["unmerged-only", "merged-only", "dlora", "mixed-only"]
ARCHS = ["llama", "qwen2"]


def with_triton(torch_cases: list[tuple[str, ...]], *triton_cases: tuple[str, ...]) -> pytest.MarkDecorator:
    """Parametrize ``arch,kernels`` (and what follows) with the torch path on the given cases and
    the Triton path on ``triton_cases`` only. Under the interpreter on CPU a Triton case takes
    10-30 s here, so each drives the kernels in one distinct way (unmerged mixed batches, a
    mixed step's subtracted pass, preemption, resume over a cached prefix, prefill logits, moved KV) on one
    architecture: the kernels see the same code paths for both (the architectures differ in the
    q/k/v bias and the tied LM head, outside them), and tests/kernels covers their shapes. Merged steps run
    no LoRA kernel at all."""
    cases = [(arch, "torch", *rest) for arch, *rest in torch_cases]
    cases += [(arch, "triton", *rest) for arch, *rest in triton_cases]
    names = "arch,kernels,policy" if len(cases[0]) == 3 else "arch,kernels"
    return pytest.mark.parametrize(names, cases, indirect=["arch"])


@pytest.mark.parametrize("policy", POLICIES[:2])
def test_each_adapter_alone(arch, policy: str) -> None:
    tiny, oracle = arch
    engine = make_engine(tiny, policy=policy)
    prompt = _prompts(tiny)[0]
    for adapter in [None, *tiny.adapters]:
        requests = {f"{adapter}": (adapter, prompt)}
        assert run_all(engine, requests, MAX_TOKENS) == _expected(oracle, requests), adapter


def test_adapters_change_the_output(arch) -> None:
    tiny, oracle = arch
    prompt = _prompts(tiny)[0]
    outputs = {tuple(oracle.generate(a, prompt, MAX_TOKENS)) for a in [None, *tiny.adapters]}
    assert len(outputs) == len(tiny.adapters) + 1  # otherwise the parity tests prove little


@with_triton([(a, p) for a in ARCHS for p in POLICIES], ("llama", "unmerged-only"), ("qwen2", "mixed-only"))
def test_mixed_batch(arch, kernels: str, policy: str) -> None:
    """Every adapter and the base, prompts of different lengths, all submitted at once."""
    tiny, oracle = arch
    prompts = _prompts(tiny)
    adapters = [None, *tiny.adapters]
    requests = {f"r{i}": (adapters[i % len(adapters)], prompts[i % len(prompts)]) for i in range(2 * len(adapters))}
    engine = make_engine(tiny, policy=policy, kernels=kernels)
    assert engine.kernels.name == kernels
    # Under the Triton interpreter every step costs about 2 s whatever the batch: one decode step
    # there after the prefill (the kernels see the same segments in each).
    max_tokens = 2 if kernels == "triton" else MAX_TOKENS
    got = run_all(engine, requests, max_tokens)
    assert got == _expected(oracle, requests, max_tokens)
    if policy == "merged-only":
        assert engine.stats.merges >= len(tiny.adapters)
    elif policy == "unmerged-only":
        assert engine.stats.merges == 0
    elif policy == "mixed-only":
        assert engine.stats.merges >= 1 and engine.stats.steps_by_mode.get(Mode.MIXED, 0) > 0


@pytest.mark.parametrize("arch", ARCHS, indirect=True)
def test_mixed_steps_across_switches_match_and_unmerge_exactly(arch) -> None:
    """Every adapter and the base in flight while the engine goes unmerged, mixed on one adapter,
    mixed on another, merged on one (the others wait), mixed again and back: every output equals
    the oracle's, and the base weights come back bit for bit."""
    tiny, oracle = arch
    prompts = _prompts(tiny)
    adapters = [None, *sorted(tiny.adapters)]
    requests = {f"r{i}": (adapters[i % len(adapters)], prompts[i % len(prompts)]) for i in range(len(adapters) + 2)}
    engine = make_engine(tiny)
    original = [lw.qkv.clone() for lw in engine.merger.weights.layers]
    a, b = adapters[1], adapters[2]
    plan = [(None, False), (a, True), (a, True), (b, True), (b, False), (a, True), (None, False), (b, True)]
    got, modes = run_plan(engine, requests, MAX_TOKENS, plan)
    assert got == _expected(oracle, requests)
    assert modes == {Mode.UNMERGED, Mode.MERGED, Mode.MIXED}
    engine.switch(None)
    assert all(torch.equal(lw.qkv, w) for lw, w in zip(engine.merger.weights.layers, original))


@with_triton([(a, p) for a in ARCHS for p in ("unmerged-only", "mixed-only")], ("llama", "unmerged-only"))
def test_preempted_requests_resume_by_recompute(arch, kernels: str, policy: str) -> None:
    """With too few KV blocks for the whole batch, requests are preempted and still match."""
    tiny, oracle = arch
    prompts = _prompts(tiny)
    adapters = [None, *tiny.adapters]
    requests = {f"r{i}": (adapters[i % len(adapters)], prompts[i % len(prompts)]) for i in range(6)}
    engine = make_engine(tiny, block_size=4, num_blocks=14, kernels=kernels, policy=policy)
    max_tokens = MAX_TOKENS // 4 if kernels == "triton" else MAX_TOKENS  # see test_mixed_batch
    got = run_all(engine, requests, max_tokens)
    assert engine.stats.preemptions > 0
    assert policy == "unmerged-only" or engine.stats.steps_by_mode.get(Mode.MIXED, 0) > 0
    assert got == _expected(oracle, requests, max_tokens)


@with_triton([(a,) for a in ARCHS], ("qwen2",))
def test_resume_from_token_prefix(arch, kernels: str) -> None:
    tiny, oracle = arch
    prompt = _prompts(tiny)[2]
    adapter = next(iter(tiny.adapters))
    full = oracle.generate(adapter, prompt, MAX_TOKENS)
    engine = make_engine(tiny, kernels=kernels)
    engine.add_request(
        "r",
        prompt_token_ids=prompt,
        params=SamplingParams(max_tokens=MAX_TOKENS),
        adapter=adapter,
        resume_token_ids=full[:5],
    )
    new: list[int] = []
    while engine.has_unfinished():
        for o in engine.step():
            new += o.new_token_ids
            assert o.num_output_tokens == 5 + len(new)
    assert new == full[5:]


@with_triton([(a, p) for a in ARCHS for p in POLICIES[:2]], ("qwen2", "unmerged-only"))
def test_prefill_logits_close_to_peft(arch, kernels: str, policy: str) -> None:
    tiny, oracle = arch
    engine = make_engine(tiny, policy=policy, kernels=kernels)
    prompts, adapters = _prompts(tiny), [None, *tiny.adapters]
    pairs = [(p, a) for p in prompts for a in adapters]
    if kernels == "triton" and interpreting():
        # Each prefill step costs about 0.7 s under the interpreter: every prompt length once and
        # every adapter (each rank and target set) once, paired off, rather than all 25 pairs (a
        # GPU runs them all); the torch path checks every pair, and tests/kernels the kernels' shapes.
        n = max(len(prompts), len(adapters))
        pairs = [(prompts[i % len(prompts)], adapters[i % len(adapters)]) for i in range(n)]
    for prompt, adapter in pairs:
        engine.add_request("p", prompt_token_ids=prompt, params=SamplingParams(max_tokens=1), adapter=adapter)
        engine.step()
        got = engine.last_logits["p"].cpu()  # on the engine's device; the oracle's are on the CPU
        torch.testing.assert_close(got, oracle.last_logits(adapter, prompt), atol=1e-4, rtol=0)


def test_dlora_merges_a_skewed_queue_and_still_matches(arch) -> None:
    """Mostly one adapter, a few others and the base: dlora merges the hot one at some point,
    serves the rest unmerged, and every output equals the oracle's."""
    tiny, oracle = arch
    prompts = _prompts(tiny)
    hot, *others = sorted(tiny.adapters)
    requests = {f"h{i}": (hot, prompts[i % len(prompts)]) for i in range(8)}
    requests.update({f"o{i}": (a, prompts[i]) for i, a in enumerate([None, *others[:2]])})
    engine = make_engine(tiny, policy="dlora")
    got = run_all(engine, requests, MAX_TOKENS)
    assert engine.stats.merges >= 1 and engine.stats.steps > 0
    assert got == _expected(oracle, requests)


@with_triton([(a,) for a in ARCHS], ("llama",))
def test_a_request_moves_with_its_kv_and_continues_exactly(arch, kernels: str) -> None:
    """Five tokens on one engine, then the cache travels (as bytes) to another: no recompute there,
    and the rest of the output equals the oracle's."""
    from dlora.services.worker.engine.kv_transfer import KVSnapshot

    tiny, oracle = arch
    prompt = _prompts(tiny)[2]
    adapter = sorted(tiny.adapters)[1]
    full = oracle.generate(adapter, prompt, MAX_TOKENS)
    src, dst = make_engine(tiny, kernels=kernels), make_engine(tiny, kernels=kernels)
    src.add_request("r", prompt_token_ids=prompt, params=SamplingParams(max_tokens=MAX_TOKENS), adapter=adapter)
    produced: list[int] = []
    for _ in range(5):
        produced += src.step()[0].new_token_ids
    kv = KVSnapshot.from_bytes(src.export_kv("r").to_bytes())
    src.abort("r")
    dst.add_request(
        "r",
        prompt_token_ids=prompt,
        params=SamplingParams(max_tokens=MAX_TOKENS),
        adapter=adapter,
        resume_token_ids=produced,
        kv=kv,
    )
    while dst.has_unfinished():
        produced += dst.step()[0].new_token_ids
    assert produced == full
    assert dst.stats.prefill_tokens == 0  # decoding went on from the moved cache


@pytest.mark.parametrize("arch", ARCHS, indirect=True)
def test_a_request_moves_between_mixed_steps_and_continues_exactly(arch) -> None:
    """A request of adapter b runs beside a merged (its delta corrected) for five tokens, moves with
    its KV to an engine where b itself is merged and a runs beside it: every output, the moved
    one's and its batch mates' on both engines, equals the oracle's."""
    from dlora.services.worker.engine.kv_transfer import KVSnapshot

    tiny, oracle = arch
    prompts = _prompts(tiny)
    a, b = sorted(tiny.adapters)[:2]
    src, dst = make_engine(tiny, policy="mixed-only"), make_engine(tiny, policy="mixed-only")
    here = {"r": (b, prompts[2]), "s0": (a, prompts[0]), "s1": (a, prompts[1]), "s2": (None, prompts[3])}
    there = {"d0": (b, prompts[0]), "d1": (b, prompts[4]), "d2": (a, prompts[1])}
    for engine, requests in ((src, here), (dst, there)):
        for rid, (adapter, ids) in requests.items():
            engine.add_request(rid, prompt_token_ids=ids, params=SamplingParams(max_tokens=MAX_TOKENS), adapter=adapter)
    got: dict[str, list[int]] = {rid: [] for rid in [*here, *there]}
    for _ in range(5):
        for engine in (src, dst):
            for o in engine.step():
                got[o.request_id] += o.new_token_ids
    assert (src.merger.merged, dst.merger.merged) == (a, b)
    kv = KVSnapshot.from_bytes(src.export_kv("r").to_bytes())
    src.abort("r")
    dst.add_request(
        "r",
        prompt_token_ids=here["r"][1],
        params=SamplingParams(max_tokens=MAX_TOKENS),
        adapter=b,
        resume_token_ids=got["r"],
        kv=kv,
    )
    for engine in (src, dst):
        while engine.has_unfinished():
            for o in engine.step():
                got[o.request_id] += o.new_token_ids
    assert got == _expected(oracle, here | there)
    assert all(e.stats.steps_by_mode.get(Mode.MIXED, 0) > 0 for e in (src, dst))
