"""Public vLLM scheduler and sampling bug reports replayed against the engine: each test names
its report, builds the smallest case of its kind (tiny model, few tokens) and checks the engine's
tokens against transformers + peft (``Oracle``), or its counts where the report is about them."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from dlora.common.messages import FinishReason, SamplingParams
from dlora.model.make_tiny import TinyOutput
from dlora.services.worker.engine import LLMEngine
from dlora.services.worker.engine.admission import RequestError
from tests.engine.helpers import make_engine
from tests.engine.oracle import Oracle

PROMPTS = {  # a shared four-token header, as a system prompt, then each one's own tokens
    "a": ("lora-0", [7, 8, 9, 10, 31, 32, 33]),
    "b": ("lora-1", [7, 8, 9, 10, 41, 42, 43, 44]),
    "c": (None, [7, 8, 9, 10, 51]),
    "d": ("lora-0", [7, 8, 9, 10, 61, 62]),
}


GREEDY_TOKENS = 10  # the most greedy tokens a test here compares
Greedy = Callable[[str | None, list[int], int], list[int]]  # (adapter, prompt, n) -> the first n


@pytest.fixture(scope="module")
def oracle(tiny_llama: TinyOutput) -> Oracle:
    return Oracle(tiny_llama)


@pytest.fixture(scope="module")
def greedy(oracle: Oracle) -> Greedy:
    """The oracle's first ``n`` greedy tokens of a prompt under an adapter: each prompt generated
    once, ``GREEDY_TOKENS`` of them (fewer are their first ``n``), for every test here; an HF
    ``generate`` on the CPU costs about what an engine's whole run of these few tokens does."""
    made: dict[tuple[str | None, tuple[int, ...]], list[int]] = {}

    def tokens(adapter: str | None, ids: list[int], n: int) -> list[int]:
        assert n <= GREEDY_TOKENS
        key = (adapter, tuple(ids))
        if key not in made:
            made[key] = oracle.generate(adapter, ids, GREEDY_TOKENS)
        return made[key][:n]

    return tokens


@pytest.fixture(scope="module")
def shared(tiny_llama: TinyOutput) -> LLMEngine:
    return make_engine(tiny_llama)


@pytest.fixture
def plain(shared: LLMEngine) -> Iterator[LLMEngine]:
    """An engine of the default config, shared by the tests that need no other (an engine costs
    about what a test's run does); what a failing test leaves in it is aborted after it."""
    yield shared
    for rid in list(shared.seqs):
        shared.abort(rid)


def _drive(engine: LLMEngine, requests: dict[str, tuple[str | None, list[int], SamplingParams]]) -> dict:
    """Add every request, step until all end: per request its tokens and finish reason."""
    for rid, (adapter, ids, params) in requests.items():
        engine.add_request(rid, prompt_token_ids=ids, params=params, adapter=adapter)
    out: dict[str, dict] = {rid: {"tokens": [], "reason": None} for rid in requests}
    for _ in range(400):  # far over what these few tokens take: reaching it is a stall
        if not engine.has_unfinished():
            break
        for o in engine.step():
            out[o.request_id]["tokens"] += o.new_token_ids
            out[o.request_id]["reason"] = o.finish_reason or out[o.request_id]["reason"]
    assert not engine.has_unfinished(), sorted(engine.seqs)
    return out


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_recompute_preemption_of_lora_requests_completes_each_with_its_own_adapter(
    tiny_llama: TinyOutput, greedy: Greedy, async_scheduling: bool
) -> None:
    """vllm-project/vllm #16832 (after a PreemptionMode.RECOMPUTE warning the preempted output
    was incomplete) and #38606 (KV blocks corrupted under rapid LoRA adapter alternation): four
    requests on two adapters and the base model, sharing a prefix the cache holds, on a cache
    of 7 blocks of 4 where they need 16: some are preempted and recomputed, and each still gives
    max_tokens tokens, those of transformers + peft with its own adapter."""
    engine = make_engine(
        tiny_llama, block_size=4, num_blocks=7, enable_prefix_caching=True, async_scheduling=async_scheduling
    )
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    got = _drive(engine, {rid: (a, ids, params) for rid, (a, ids) in PROMPTS.items()})
    assert engine.stats.preemptions > 0  # the pressure the reports are about
    for rid, (adapter, ids) in PROMPTS.items():
        assert got[rid]["tokens"] == greedy(adapter, ids, 8), rid
        assert got[rid]["reason"] is FinishReason.LENGTH


def test_n_choices_of_one_prompt_preempted_each_give_the_oracle_s_tokens(
    tiny_llama: TinyOutput, greedy: Greedy
) -> None:
    """vllm-project/vllm #1082 and #14759 (``n > 1``: a preempted sequence group recomputed
    wrong, "Waiting sequence group should have only one prompt sequence", an assertion on
    context_len after reset_state_for_recompute). Here ``n`` choices are ``n`` requests with one
    prompt (the gateway's ``cmpl-...-0``, ``-1``, ...): three of them on a cache too small for all,
    prefix caching on, preempt each other and each ends with the greedy tokens of the prompt."""
    prompt = [7, 8, 9, 10, 11, 12, 13]
    engine = make_engine(tiny_llama, block_size=2, num_blocks=14, enable_prefix_caching=True)
    params = SamplingParams(max_tokens=9, ignore_eos=True)
    got = _drive(engine, {f"cmpl-0-{i}": ("lora-2", prompt, params) for i in range(3)})
    want = greedy("lora-2", prompt, 9)
    assert engine.stats.preemptions > 0
    assert [g["tokens"] for g in got.values()] == [want] * 3


def test_min_tokens_holds_back_every_stop_token_and_eos_as_transformers_min_new_tokens(
    plain: LLMEngine, oracle: Oracle, greedy: Greedy
) -> None:
    """vllm-project/vllm PR #5849 (``min_tokens`` held back the tokenizer's EOS but not the other
    end-of-sequence ids, which then stopped a request early) and #21987 (``min_tokens`` not kept
    when a stop came early). The stop token is the one greedy decoding draws first: held back for
    three tokens, the request goes on as transformers' ``min_new_tokens`` (which masks each of
    ``eos_token_id``) goes on, and stops where transformers stops, on that token again or EOS."""
    adapter, ids = PROMPTS["a"]
    first = greedy(adapter, ids, 1)[0]
    eos = oracle.model.generation_config.eos_token_id
    ends = [first, *(eos if isinstance(eos, list) else [eos] if eos is not None else [])]
    want = oracle.generate(adapter, ids, 12, min_new_tokens=3, eos_token_id=ends)
    params = SamplingParams(max_tokens=12, min_tokens=3, stop_token_ids=[first])
    got = _drive(plain, {"r": (adapter, ids, params)})["r"]
    assert len(got["tokens"]) >= 3 and got["tokens"] == want
    assert got["reason"] is (FinishReason.STOP if want[-1] in ends else FinishReason.LENGTH)


def test_min_tokens_holds_back_a_stop_string_the_first_tokens_complete(plain: LLMEngine, greedy: Greedy) -> None:
    """vllm-project/vllm #21987: with ``min_tokens=200`` and ``stop=["\\n"]`` generation stopped
    at the first newline, 2 tokens in. Here the stop string is the output's first character: it
    stops a request at once (the token completing that character), and with ``min_tokens`` two
    past that the request goes on with the greedy tokens, ending at a stop string after them (or
    at max_tokens)."""
    adapter, ids = PROMPTS["b"]
    want = greedy(adapter, ids, 10)
    engine = plain
    engine.add_request("plain", prompt_token_ids=ids, params=SamplingParams(max_tokens=10), adapter=adapter)
    text = "".join(o.new_text for _ in range(12) for o in engine.step())
    stop = text[:1]
    assert stop  # (the tiny model's greedy tokens give some text)
    stopped = _drive(engine, {"r": (adapter, ids, SamplingParams(max_tokens=10, stop=[stop]))})["r"]
    assert stopped["reason"] is FinishReason.STOP and stopped["tokens"] == want[: len(stopped["tokens"])]
    held = SamplingParams(max_tokens=10, min_tokens=len(stopped["tokens"]) + 2, stop=[stop])
    got = _drive(engine, {"r": (adapter, ids, held)})["r"]
    assert len(got["tokens"]) >= held.min_tokens and got["tokens"] == want[: len(got["tokens"])]


def test_ignore_eos_runs_to_max_tokens_through_eos(plain: LLMEngine) -> None:
    """huggingface/text-generation-inference #1544 (``ignore_eos_token`` ignored: one EOS token and
    finish_reason eos_token) and vectorch-ai/ScaleLLM #304 (``ignore_eos`` with ``max_tokens`` 1024
    stopped at 560). EOS made certain by ``logit_bias``: with ``ignore_eos`` every one of the
    ``max_tokens`` is generated, EOS each, and it ends on length; without it, on the first."""
    engine = plain
    eos = engine.primary_eos
    assert eos is not None
    biased = {"logit_bias": {eos: 100.0}, "max_tokens": 6}
    got = _drive(
        engine,
        {
            "ignored": (None, [7, 8, 9], SamplingParams(ignore_eos=True, **biased)),
            "kept": (None, [7, 8, 9], SamplingParams(**biased)),
        },
    )
    assert got["ignored"] == {"tokens": [eos] * 6, "reason": FinishReason.LENGTH}
    assert got["kept"] == {"tokens": [eos], "reason": FinishReason.STOP}


def test_a_seeded_request_draws_the_same_tokens_whether_its_batch_mate_is_seeded_or_not(
    tiny_llama: TinyOutput, plain: LLMEngine
) -> None:
    """vllm-project/vllm #51226 (on CPU, ``seed=42`` was not respected when another request of the
    batch had no seed; giving the other one a seed made the first reproducible). A seeded request
    at temperature 0.8 draws the same tokens alone and beside another, unseeded (on an engine of
    another seed) or seeded."""
    seeded = SamplingParams(seed=42, temperature=0.8, max_tokens=8, ignore_eos=True)
    alone = _drive(plain, {"s": ("lora-0", [7, 8, 9, 10], seeded)})["s"]["tokens"]
    for engine, other_seed in ((make_engine(tiny_llama, seed=12345), None), (plain, 7)):
        mate = SamplingParams(seed=other_seed, temperature=0.8, max_tokens=8, ignore_eos=True)
        both = _drive(engine, {"s": ("lora-0", [7, 8, 9, 10], seeded), "m": ("lora-1", [11, 12, 13], mate)})
        assert both["s"]["tokens"] == alone


def test_a_prompt_over_max_model_len_is_refused_and_the_engine_serves_on(
    tiny_llama: TinyOutput, greedy: Greedy
) -> None:
    """vllm-project/vllm #40302 and PR #12600 (a prompt longer than ``max_model_len`` passed
    admission and an AssertionError in the model runner killed the engine, every request in flight
    with it) and #16445 (a prompt of exactly ``max_model_len``). Refused at ``add_request`` with a
    reason (the gateway's 400), while a request already running goes on to the oracle's tokens; a
    prompt of exactly ``max_model_len`` is refused too: it leaves no room for a token."""
    engine = make_engine(tiny_llama, max_model_len=32)
    adapter, ids = PROMPTS["d"]
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    engine.add_request("ok", prompt_token_ids=ids, params=params, adapter=adapter)
    got = [t for o in engine.step() for t in o.new_token_ids]
    for n in (33, 32):
        with pytest.raises(RequestError, match="32"):
            engine.add_request(f"long-{n}", prompt_token_ids=[5] * n, params=SamplingParams(max_tokens=1))
    while engine.has_unfinished():
        got += [t for o in engine.step() for t in o.new_token_ids]
    assert got == greedy(adapter, ids, 6) and not engine.seqs


def test_a_prompt_over_the_token_budget_runs_with_chunked_prefill_off(tiny_llama: TinyOutput, greedy: Greedy) -> None:
    """vllm-project/vllm-metal #199 (PR #200), vllm-project/vllm #765 and PR #1534: with chunked
    prefill off, a prompt longer than ``max_num_batched_tokens`` (or than every block of the cache)
    waited in the queue for ever, and every request behind it. The budget is raised to the model's
    length as vLLM-metal's fix raises it, so the 20-token prompt runs in one step beside an
    8-token budget; one longer than the cache is refused at once. Both others end as the oracle."""
    engine = make_engine(tiny_llama, enable_chunked_prefill=False, max_num_batched_tokens=8, block_size=4, num_blocks=8)
    long, short = list(range(3, 23)), [7, 8, 9]
    with pytest.raises(RequestError):  # 33 tokens: over the 32 the cache holds
        engine.add_request("huge", prompt_token_ids=list(range(3, 36)), params=SamplingParams(max_tokens=1))
    got = _drive(
        engine,
        {
            "long": ("lora-1", long, SamplingParams(max_tokens=4, ignore_eos=True)),
            "short": (None, short, SamplingParams(max_tokens=4, ignore_eos=True)),
        },
    )
    assert got["long"]["tokens"] == greedy("lora-1", long, 4)
    assert got["short"]["tokens"] == greedy(None, short, 4)


def test_a_stop_string_across_two_tokens_stops_and_no_part_of_it_is_streamed(plain: LLMEngine) -> None:
    """vllm-project/vllm #2577 (a longer stop sequence did not stop a stream) and #3574 (while
    streaming, text that could start a stop sequence was sent, and stayed sent when the sequence
    completed). The stop string is the last character of one step's text and the first of the
    next's: the request stops at that next token, and the chunks streamed add up to the text
    before the stop string, nothing of it sent."""
    adapter, ids = PROMPTS["a"]
    plain.add_request("p", prompt_token_ids=ids, params=SamplingParams(max_tokens=12, ignore_eos=True), adapter=adapter)
    texts = [o.new_text for _ in range(14) for o in plain.step()]
    full = "".join(texts)
    ends = [len("".join(texts[: i + 1])) for i in range(len(texts))]
    # (the first boundary whose two characters appear nowhere before it)
    cut = next(e for e in ends if 0 < e < len(full) and full.find(full[e - 1 : e + 1]) == e - 1)
    stop = full[cut - 1 : cut + 1]
    plain.add_request("r", prompt_token_ids=ids, params=SamplingParams(max_tokens=12, stop=[stop]), adapter=adapter)
    outs = [o for _ in range(14) for o in plain.step()]
    assert "".join(o.new_text for o in outs) == full[: cut - 1]
    assert outs[-1].finish_reason is FinishReason.STOP and outs[-1].stop_reason == stop


def test_chunked_prefills_that_reuse_a_cached_prefix_give_the_oracle_s_tokens(
    tiny_llama: TinyOutput, greedy: Greedy
) -> None:
    """vllm-project/vllm PR #7753 (chunked prefill and prefix caching enabled together: a chunk
    starting inside a cached prefix) and #15730 (bad generations under many parallel queries that
    went away with prefix caching off). Prompts sharing a 9-token prefix (two full blocks of 4 and
    one token more) on two adapters and the base model, two on one adapter, fed 5 tokens a step under async scheduling
    (blocks named a call after their step): each chunk starts at a block's edge or inside one,
    after the cached blocks; every request ends as the oracle."""
    shared = [7, 8, 9, 10, 11, 12, 13, 14, 15]
    prompts = {"a": ("lora-0", [*shared, 40, 41, 42]), "b": ("lora-0", [*shared, 40, 41, 43, 44, 45, 46])}
    prompts |= {"c": ("lora-1", [*shared, 50]), "d": (None, [*shared, 60, 61])}  # (found nothing: other keys)
    engine = make_engine(
        tiny_llama, block_size=4, max_num_batched_tokens=5, enable_prefix_caching=True, async_scheduling=True
    )
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    first = _drive(engine, {"a": (*prompts["a"], params)})  # caches the prefix under lora-0
    got = first | _drive(engine, {rid: (*p, params) for rid, p in prompts.items() if rid != "a"})
    assert engine.stats.prefix_cache_hits > 0
    for rid, (adapter, ids) in prompts.items():
        assert got[rid]["tokens"] == greedy(adapter, ids, 5), rid
