"""Penalties and logprobs against the reference: repetition_penalty against transformers' generate
(its RepetitionPenaltyLogitsProcessor), frequency and presence penalties against the oracle's
logits with OpenAI's formula applied step by step, logprobs against the oracle's log-softmax."""

from __future__ import annotations

import pytest
import torch

from dlora.common.messages import SamplingParams
from dlora.model.make_tiny import TinyOutput
from tests.engine.helpers import make_engine
from tests.engine.oracle import Oracle

PROMPT = [5, 40, 41, 300, 17, 40, 41]
N = 16


@pytest.fixture(scope="module")
def oracle(tiny_llama: TinyOutput) -> Oracle:
    return Oracle(tiny_llama)


def engine_tokens(tiny: TinyOutput, adapter: str | None, policy: str, **params) -> list[int]:
    engine = make_engine(tiny, policy=policy)
    engine.add_request(
        "r", prompt_token_ids=PROMPT, params=SamplingParams(max_tokens=N, ignore_eos=True, **params), adapter=adapter
    )
    out = []
    while engine.has_unfinished():
        for o in engine.step():
            out += o.new_token_ids
    return out


@pytest.mark.parametrize(
    "adapter,policy", [(None, "unmerged-only"), ("lora-1", "unmerged-only"), ("lora-1", "merged-only")]
)
@pytest.mark.parametrize("penalty", [0.3, 0.6])
def test_repetition_penalty_equals_transformers(
    tiny_llama: TinyOutput, oracle: Oracle, adapter, policy, penalty: float
) -> None:
    expected = oracle.generate(adapter, PROMPT, N, repetition_penalty=penalty, min_new_tokens=N)
    plain = oracle.generate(adapter, PROMPT, N, min_new_tokens=N)
    assert expected != plain  # the penalty matters here, so equality proves something
    assert engine_tokens(tiny_llama, adapter, policy, repetition_penalty=penalty) == expected


@pytest.mark.parametrize("frequency,presence", [(1.5, 0.0), (0.0, 2.0), (0.5, -2.0)])
def test_frequency_and_presence_follow_openai_over_the_oracle(
    tiny_llama: TinyOutput, oracle: Oracle, frequency: float, presence: float
) -> None:
    out: list[int] = []
    for _ in range(N):
        logits = oracle.last_logits("lora-0", PROMPT + out)
        counts = torch.bincount(torch.tensor(out, dtype=torch.int64), minlength=logits.numel()).float()
        logits = logits - counts * frequency - (counts > 0).float() * presence
        out.append(int(logits.argmax()))
    assert out != oracle.generate("lora-0", PROMPT, N, min_new_tokens=N)
    got = engine_tokens(tiny_llama, "lora-0", "unmerged-only", frequency_penalty=frequency, presence_penalty=presence)
    assert got == out


def test_logprobs_are_the_oracles_log_softmax(tiny_llama: TinyOutput, oracle: Oracle) -> None:
    engine = make_engine(tiny_llama)
    engine.add_request(
        "r",
        prompt_token_ids=PROMPT,
        params=SamplingParams(max_tokens=5, logprobs=3, temperature=0.8, seed=2, repetition_penalty=1.3),
        adapter="lora-2",
    )
    tokens, entries = [], []
    while engine.has_unfinished():
        for o in engine.step():
            tokens += o.new_token_ids
            entries += o.logprobs
    assert [e.token_id for e in entries] == tokens
    for k, e in enumerate(entries):
        # the model's own distribution at that position: before penalties and temperature
        expected = torch.log_softmax(oracle.last_logits("lora-2", PROMPT + tokens[:k]), -1)
        assert e.logprob == pytest.approx(float(expected[e.token_id]), abs=1e-4)
        top = torch.topk(expected, 3)
        assert [t for t, _ in e.top] == top.indices.tolist()
        assert [lp for _, lp in e.top] == pytest.approx(top.values.tolist(), abs=1e-4)


@pytest.mark.parametrize("adapter,policy", [("lora-1", "unmerged-only"), ("lora-1", "merged-only"), (None, "dlora")])
def test_logit_bias_and_min_tokens_equal_transformers(tiny_llama: TinyOutput, oracle: Oracle, adapter, policy) -> None:
    plain = oracle.generate(adapter, PROMPT, N, min_new_tokens=N)
    first = oracle.last_logits(adapter, PROMPT)
    banned, favoured = plain[0], int(first.argsort(descending=True)[2])  # the third most likely comes first
    bias = {favoured: float(first[banned] - first[favoured]) + 0.5, banned: -100.0}
    expected = oracle.generate(adapter, PROMPT, N, min_new_tokens=N, sequence_bias={(t,): b for t, b in bias.items()})
    assert expected[0] == favoured and expected != plain  # the bias matters here
    assert engine_tokens(tiny_llama, adapter, policy, logit_bias=bias) == expected
    # A stop token the model emits second: only after min_tokens with it (HF: min_new_tokens, the
    # stop token as one more end-of-sequence id).
    stop = plain[1]
    engine = make_engine(tiny_llama, policy=policy)
    for rid, least in (("early", 0), ("late", 5)):
        params = SamplingParams(max_tokens=N, min_tokens=least, stop_token_ids=[stop])
        engine.add_request(rid, prompt_token_ids=PROMPT, params=params, adapter=adapter)
    got: dict[str, list[int]] = {"early": [], "late": []}
    reasons = {}
    while engine.has_unfinished():
        for o in engine.step():
            got[o.request_id] += o.new_token_ids
            reasons[o.request_id] = o.stop_reason
    assert got["early"] == plain[:2] and reasons["early"] == stop
    late = oracle.generate(adapter, PROMPT, N, min_new_tokens=5, eos_token_id=[2, stop])
    assert got["late"] == late and len(late) > 5 and stop not in late[:5]


@pytest.mark.parametrize("chunk", [None, 3])
def test_prompt_logprobs_are_the_oracles_over_the_prompt(tiny_llama: TinyOutput, oracle: Oracle, chunk) -> None:
    """vLLM's prompt_logprobs (the completions API's echo with logprobs): each prompt token's
    log-probability after the ones before it, with its top alternatives; the same whole, in
    prefill chunks that split blocks, and with the prompt's blocks cached by an earlier request."""
    prompt = PROMPT * 3  # 21 tokens: blocks of 16 are cached after the first request
    engine = make_engine(tiny_llama, **({"max_num_batched_tokens": chunk} if chunk else {}))
    expected = torch.log_softmax(oracle.all_logits("lora-2", prompt), -1)  # (n, vocab): position p predicts p + 1
    for rid in ("cold", "warm"):
        engine.add_request(
            rid, prompt_token_ids=prompt, params=SamplingParams(max_tokens=2, prompt_logprobs=3), adapter="lora-2"
        )
        entries = None
        while engine.has_unfinished():
            for o in engine.step():
                assert o.prompt_logprobs is None or entries is None  # once, with the first token
                entries = entries if o.prompt_logprobs is None else o.prompt_logprobs
        assert [e.token_id for e in entries] == prompt[1:]
        for p, e in enumerate(entries):
            assert e.logprob == pytest.approx(float(expected[p, prompt[p + 1]]), abs=1e-4)
            # its rank, vLLM's count (the tokens at least as likely), up to ties within the tolerance
            own = expected[p, prompt[p + 1]]
            assert int((expected[p] > own + 1e-4).sum()) + 1 <= e.rank <= int((expected[p] >= own - 1e-4).sum())
            top = expected[p].topk(3)
            assert [t for t, _ in e.top] == top.indices.tolist()
            assert [v for _, v in e.top] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_prompt_logprobs_survive_a_preemption_before_the_first_token(tiny_llama: TinyOutput, oracle: Oracle) -> None:
    """Two long decodes hold the KV cache while prompts wanting their logprobs prefill in chunks of
    6: the decodes' growth preempts them midway through their prompts, and they are recomputed;
    each still gets every entry once, as the oracle's."""
    engine = make_engine(tiny_llama, block_size=4, num_blocks=14, max_num_batched_tokens=6)
    for rid in ("d0", "d1"):
        engine.add_request(rid, prompt_token_ids=PROMPT, params=SamplingParams(max_tokens=40, ignore_eos=True))
    prompts = {f"r{i}": (PROMPT * 3)[i:] + PROMPT[:i] for i in range(3)}
    for rid, prompt in prompts.items():
        params = SamplingParams(max_tokens=2, prompt_logprobs=0, ignore_eos=True)
        engine.add_request(rid, prompt_token_ids=prompt, params=params, adapter="lora-0")
    got: dict[str, list] = {}
    early: set[str] = set()  # preempted before their first token, entries collected already
    while engine.has_unfinished():
        for o in engine.step():
            if o.prompt_logprobs is not None:
                assert o.request_id not in got  # once
                got[o.request_id] = o.prompt_logprobs
        early |= {r for r in prompts if (s := engine.seqs.get(r)) and s.num_preemptions and s.prompt_logprobs}
    assert early and got.keys() == prompts.keys()
    for rid, prompt in prompts.items():
        expected = torch.log_softmax(oracle.all_logits("lora-0", prompt), -1)
        assert [e.token_id for e in got[rid]] == prompt[1:]
        assert [e.logprob for e in got[rid]] == pytest.approx(
            [float(expected[p, t]) for p, t in enumerate(prompt[1:])], abs=1e-4
        )


def test_allowed_token_ids_equal_transformers_restricted_to_them(tiny_llama: TinyOutput, oracle: Oracle) -> None:
    """vLLM's allowed_token_ids: transformers' generate with those tokens allowed at every step."""
    allowed = list(range(100, 140))
    expected = oracle.generate("lora-2", PROMPT, N, prefix_allowed_tokens_fn=lambda _b, _ids: allowed)
    assert expected != oracle.generate("lora-2", PROMPT, N)  # the restriction matters
    assert engine_tokens(tiny_llama, "lora-2", "unmerged-only", allowed_token_ids=allowed) == expected


def test_bad_words_mask_each_word_s_last_token_after_the_rest_over_the_oracle(
    tiny_llama: TinyOutput, oracle: Oracle
) -> None:
    """vLLM's bad_words: a word's last token is masked where the output ends with its others (a
    one-token word always); the words as the engine tokenizes them, the oracle's logits masked
    step by step."""
    from dlora.services.worker.engine.bad_words import bad_words_token_ids, banned_now

    engine = make_engine(tiny_llama)
    plain = oracle.generate("lora-0", PROMPT, N, min_new_tokens=N)
    words = [engine.tokenizer.decode(plain[2:4]), engine.tokenizer.decode(plain[6:7])]
    sequences = bad_words_token_ids(engine.tokenizer, words)
    out: list[int] = []
    for _ in range(N):
        logits = oracle.last_logits("lora-0", PROMPT + out).clone()
        logits[banned_now(sequences, out)] = float("-inf")
        out.append(int(logits.argmax()))
    assert out != plain
    assert engine_tokens(tiny_llama, "lora-0", "unmerged-only", bad_words=words) == out
