import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dlora.common.messages import SamplingParams
from dlora.common.sampling import RANGES
from dlora.services.worker.engine import sampler
from dlora.services.worker.engine.penalties import apply_penalties, apply_penalties_rows
from dlora.services.worker.engine.sampler import (
    SamplingError,
    filtered_probs,
    filtered_probs_rows,
    sample,
)


def test_greedy_takes_the_argmax_per_row() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 1.0]])
    assert sample(logits, [SamplingParams(), SamplingParams()], [None, None]) == [1, 0]


def test_top_k_keeps_k_tokens() -> None:
    p = filtered_probs(torch.tensor([1.0, 4.0, 3.0, 2.0]), SamplingParams(temperature=1.0, top_k=2))
    assert (p > 0).tolist() == [False, True, True, False]
    assert p.sum().item() == pytest.approx(1.0)


def test_top_p_keeps_the_smallest_nucleus() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    p = filtered_probs(logits, SamplingParams(temperature=1.0, top_p=0.75))
    assert (p > 0).tolist() == [True, True, False, False]
    # top_p below the first token's probability still keeps that token
    p = filtered_probs(logits, SamplingParams(temperature=1.0, top_p=0.1))
    assert (p > 0).tolist() == [True, False, False, False]


def test_low_temperature_concentrates_mass() -> None:
    logits = torch.tensor([1.0, 2.0, 0.5])
    assert filtered_probs(logits, SamplingParams(temperature=0.05))[1] > 0.99


def test_seeded_rows_repeat_whatever_the_batch() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    params = SamplingParams(temperature=1.0, seed=7)
    draws = [sample(logits[:1], [params], [torch.Generator().manual_seed(7)])[0] for _ in range(3)]
    batched = sample(
        logits,
        [params, SamplingParams(temperature=1.0), params],
        [torch.Generator().manual_seed(7), torch.Generator(), torch.Generator().manual_seed(7)],
    )
    assert len(set(draws)) == 1 and batched[0] == draws[0]


@pytest.mark.parametrize(
    "params,fragment",
    [
        (SamplingParams(max_tokens=0), "max_tokens"),
        (SamplingParams(temperature=-1.0), "temperature"),
        (SamplingParams(top_p=1.5), "top_p"),
        (SamplingParams(top_k=-2), "top_k"),
        (SamplingParams(stop=[""]), "stop"),
        (SamplingParams(stop_token_ids=[-1]), "stop_token_ids"),
        (SamplingParams(min_tokens=17), "min_tokens"),
        (SamplingParams(min_p=1.5), "min_p"),
        (SamplingParams(min_tokens=-1), "min_tokens"),
        (SamplingParams(logit_bias={3: 100.5}), "logit_bias"),
        (SamplingParams(logit_bias={3: float("nan")}), "logit_bias"),
        (SamplingParams(logit_bias={-1: 1.0}), "logit_bias"),
        (SamplingParams(logit_bias=dict.fromkeys(range(1025), 1.0)), "logit_bias"),
    ],
)
def test_bad_parameters_are_named(params: SamplingParams, fragment: str) -> None:
    assert fragment in params.problem()


def test_good_parameters_pass() -> None:
    assert SamplingParams(temperature=0.7, top_p=0.9, top_k=40, stop=["\n"]).problem() is None


def test_with_seed_draws_one_only_for_unseeded_sampling() -> None:
    from dlora.common.messages import GenerateRequest
    from dlora.common.seeds import with_seed

    def req(**params) -> GenerateRequest:
        return GenerateRequest(request_id="r", reply_to="x", prompt_token_ids=[1], params=SamplingParams(**params))

    greedy, seeded = req(temperature=0.0), req(temperature=0.7, seed=3)
    assert with_seed(greedy) is greedy and with_seed(seeded) is seeded
    drawn = with_seed(req(temperature=0.7))
    assert drawn.params.seed is not None and drawn.params.temperature == 0.7
    assert with_seed(req(temperature=0.7)).params.seed != drawn.params.seed


@settings(max_examples=400, deadline=None)
@given(
    temperature=st.floats(RANGES["temperature"].low, RANGES["temperature"].high),
    top_p=st.floats(0.0, 1.0),
    top_k=st.integers(-1, 80),
    scale=st.sampled_from([1e-3, 1.0, 1e3, 1e30]),
    repetition=st.floats(0.0, 1e300, exclude_min=True),
    presence=st.floats(-2.0, 2.0),
    frequency=st.floats(-2.0, 2.0),
)
def test_every_accepted_parameter_gives_a_token_or_fails_its_row(
    temperature: float, top_p: float, top_k: int, scale: float, repetition: float, presence: float, frequency: float
) -> None:
    """Whatever the API accepts (tiny temperatures, top_p 0, top_k past the vocabulary, huge
    logits, extreme penalties), sampling never raises: each row gets a token id, or a
    SamplingError of its own, and the other rows are served."""
    p = SamplingParams(
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=1,
        repetition_penalty=repetition,
        presence_penalty=presence,
        frequency_penalty=frequency,
    )
    assert p.problem() is None
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * scale
    history = ([1, 2, 3], [4, 4, 5])
    out = sample(logits, [p, p, SamplingParams()], [torch.Generator().manual_seed(1), None, None], [history] * 3)
    assert all((isinstance(t, int) and 0 <= t < 50) or isinstance(t, SamplingError) for t in out)
    assert out[2] == int(logits[2].argmax())


def test_tiny_temperatures_and_single_token_filters_are_greedy() -> None:
    logits = torch.tensor([[0.5, 3.0, 2.9, -1.0]])
    for p in (
        SamplingParams(temperature=1e-39),
        SamplingParams(temperature=1.0, top_p=0.0),
        SamplingParams(temperature=1.0, top_k=1),
    ):
        assert sample(logits, [p], [torch.Generator().manual_seed(0)]) == [1]


def test_a_row_of_non_finite_logits_fails_alone() -> None:
    logits = torch.tensor([[0.0, 1.0], [float("nan"), 1.0], [float("inf"), 0.0]])
    out = sample(logits, [SamplingParams()] * 3, [None] * 3)
    assert out[0] == 1 and all(isinstance(e, SamplingError) and "not finite" in str(e) for e in out[1:])


def test_repetition_penalty_is_transformers_processor() -> None:
    from transformers import RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 40, generator=g) * 3
    prompt, output = [1, 5, 5, 9], [9, 12, 30]
    for penalty in (0.7, 1.3, 2.0):
        expected = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([prompt + output]), logits.clone())[0]
        got = apply_penalties(logits[0], SamplingParams(repetition_penalty=penalty), prompt, output)
        assert torch.allclose(got, expected)


def test_a_repetition_penalty_far_from_one_saturates_where_it_overflowed() -> None:
    """vLLM takes any penalty above 0: 1e-40 pushed a seen positive logit to infinity and 1e300
    (infinity in float32) a seen 0 to NaN, and the request failed ("pushed the logits out of the
    float range", a 500). Saturated at float32's largest, each gives a token, the seen one
    favoured (1e-40) or shunned (1e300); a masked token stays masked."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, float("-inf")]])
    history = ([1, 2, 4], [3])  # seen: 1 (positive), 2 (zero), 3 (negative), 4 (masked)
    for penalty, seen_wins in ((1e-40, True), (1e300, False)):
        p = SamplingParams(repetition_penalty=penalty)
        assert p.problem() is None
        got = apply_penalties(logits[0], p, *history)
        rows = apply_penalties_rows(logits, [p], [history])[0]
        assert torch.equal(got, rows) and not got.isnan().any() and got[4] == float("-inf")
        assert got[:4].isfinite().all(), (penalty, got)
        assert sample(logits, [p], [None], [history]) == [1 if seen_wins else 0]


def test_a_saturated_logit_stays_finite_under_any_temperature_sampled_with() -> None:
    """Saturated at float32's largest, a favoured logit divided by a temperature below 1 (0.7, a
    common default) became infinity again and the softmax NaN: the request failed as before."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, float("-inf")]])
    history = ([1, 2, 4], [3])
    for temperature in (0.7, 0.5, sampler.GREEDY_BELOW):
        p = SamplingParams(repetition_penalty=1e-40, temperature=temperature)
        rows = sampler.filtered_probs_rows(apply_penalties_rows(logits, [p], [history]), [p])
        one = sampler.filtered_probs(apply_penalties(logits[0], p, *history), p)
        assert rows.isfinite().all() and one.isfinite().all(), (temperature, rows, one)
        assert sample(logits, [p], [0], [history]) == [1]


def test_frequency_and_presence_penalties_follow_openai() -> None:
    logits = torch.zeros(6)
    output = [2, 2, 2, 4]
    got = apply_penalties(logits, SamplingParams(frequency_penalty=0.5, presence_penalty=1.5), [2, 3], output)
    # mu[j] - c[j] * frequency - (c[j] > 0) * presence, over the output tokens only (the prompt's 3 untouched)
    assert got.tolist() == [0.0, 0.0, -3.0, 0.0, -2.0, 0.0]
    assert apply_penalties(logits, SamplingParams(presence_penalty=-1.0), [], output)[4] == 1.0  # negative: favoured


def test_seeds_apart_by_powers_of_two_draw_differently() -> None:
    """torch's CPU generator keeps 32 bits of its seed: s and s + 2**32, or -1 and 2**63 - 1, drew
    the same tokens when the seed was mixed arithmetically."""

    def draws(seed: int, position: int = 0) -> list[float]:
        return torch.rand(4, generator=sampler.position_generator(seed, position)).tolist()

    assert draws(7) == draws(7) and draws(7, 1) != draws(7, 0)
    for a, b in ((1, 1 + 2**32), (-1, 2**63 - 1), (0, 2**62), (-(2**63), 0)):
        assert draws(a) != draws(b)


def test_logit_bias_and_min_tokens_are_transformers_processors() -> None:
    from transformers import MinNewTokensLengthLogitsProcessor, SequenceBiasLogitsProcessor

    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(5))
    eos, prompt = {2, 39}, torch.zeros(1, 4, dtype=torch.long)
    params = [
        SamplingParams(logit_bias={3: 100.0, 7: -2.5}),
        SamplingParams(min_tokens=2, stop_token_ids=[11], max_tokens=4),
        SamplingParams(min_tokens=2, ignore_eos=True, stop_token_ids=[11], logit_bias={11: 3.0}),
    ]
    got = sampler.bias(logits, params, [0, 1, 1], eos)
    expected = SequenceBiasLogitsProcessor({(3,): 100.0, (7,): -2.5})(prompt, logits[:1].clone())
    assert torch.equal(got[0], expected[0])
    banned = MinNewTokensLengthLogitsProcessor(4, 6, [2, 39, 11])(torch.zeros(1, 5, dtype=torch.long), logits[1:2])
    assert torch.equal(got[1], banned[0])  # one of two new tokens made: EOS and the stop tokens are masked
    assert got[2, 11] == float("-inf") and got[2, 2] == float(
        "-inf"
    )  # bias added to -inf; EOS masked with ignore_eos too (vLLM)
    reached = sampler.bias(logits, params, [0, 2, 2], eos)  # min_tokens reached: only the bias is left
    assert reached[1].equal(logits[1]) and reached[2, 11] == logits[2, 11] + 3.0
    assert sampler.bias(logits, [SamplingParams()] * 3, [0, 0, 0], eos) is logits  # nothing asked: no copy
    assert sampler.bias(logits, [SamplingParams(logit_bias={40: 1.0})] * 3, [0] * 3, eos).equal(logits)  # past the row


def test_penalties_change_the_greedy_choice() -> None:
    logits = torch.tensor([[0.0, 5.0, 4.9]])
    p = SamplingParams(frequency_penalty=0.2)
    assert sample(logits, [p], [None], [([0], [1])]) == [2]  # 1 was generated once: 4.8 < 4.9
    assert sample(logits, [SamplingParams()], [None], [([0], [1])]) == [1]


@settings(max_examples=60, deadline=None)
@given(
    temperature=st.floats(1e-3, 10.0),
    top_p=st.sampled_from([0.0, 1e-6, 0.3, 0.9, 1.0]),
    top_k=st.integers(-1, 60),
    min_p=st.sampled_from([0.0, 0.05, 0.5, 1.0]),
    ties=st.booleans(),
)
def test_rows_filtered_together_equal_each_row_alone(
    temperature: float, top_p: float, top_k: int, min_p: float, ties: bool
) -> None:
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(3))
    if ties:  # equal values at the top-k and nucleus bounds: kept or dropped as the row version does
        logits = logits.round()
    params = [
        SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.5, top_k=3),
        SamplingParams(temperature=2.0, top_p=0.5),
    ]
    together = filtered_probs_rows(logits, params)
    for row, p, got in zip(logits, params, together):
        assert torch.allclose(got, filtered_probs(row, p), atol=1e-6), p


def test_min_p_is_transformers_min_p_warper() -> None:
    from transformers import MinPLogitsWarper

    logits = torch.randn(1, 40, generator=torch.Generator().manual_seed(9)) * 3
    for min_p, temperature in ((0.05, 1.0), (0.3, 0.7), (1.0, 1.3)):
        p = SamplingParams(temperature=temperature, min_p=min_p)
        expected = MinPLogitsWarper(min_p)(torch.zeros(1, 1, dtype=torch.long), logits / temperature).softmax(-1)
        assert torch.allclose(filtered_probs(logits[0], p), expected[0], atol=1e-6)
        assert torch.allclose(filtered_probs_rows(logits, [p])[0], expected[0], atol=1e-6)
    assert (filtered_probs(logits[0], SamplingParams(temperature=1.0, min_p=0.3)) > 0).sum() < 40  # it filters


def test_the_exponential_race_draws_from_the_filtered_distribution() -> None:
    """4,000 rows of the same logits, each with its own generator, drawn in one call: the tokens'
    frequencies are the filtered probabilities (top_k 3 leaves three tokens), within 3 % each."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0]).repeat(4000, 1)
    p = SamplingParams(temperature=1.0, top_k=3, seed=1)
    out = sample(logits, [p] * 4000, [torch.Generator().manual_seed(i) for i in range(4000)])
    freq = torch.bincount(torch.tensor(out), minlength=5).float() / 4000
    assert torch.allclose(freq, filtered_probs(logits[0], p), atol=0.03), freq
    assert freq[3:].sum() == 0


@settings(max_examples=60, deadline=None)
@given(
    repetition=st.sampled_from([1.0, 0.5, 1.3]),
    presence=st.sampled_from([0.0, -0.5, 1.5]),
    frequency=st.sampled_from([0.0, 0.7]),
    histories=st.lists(
        st.tuples(st.lists(st.integers(0, 49), max_size=6), st.lists(st.integers(0, 49), max_size=6)),
        min_size=3,
        max_size=3,
    ),
)
def test_rows_penalised_together_equal_each_row_alone(
    repetition: float, presence: float, frequency: float, histories: list[tuple[list[int], list[int]]]
) -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(2)) * 3
    params = [
        SamplingParams(repetition_penalty=repetition, presence_penalty=presence, frequency_penalty=frequency),
        SamplingParams(repetition_penalty=1.2),
        SamplingParams(frequency_penalty=0.4),
    ]
    together = apply_penalties_rows(logits, params, histories)
    for row, p, history, got in zip(logits, params, histories, together):
        assert torch.equal(got, apply_penalties(row, p, *history)), p  # bit for bit


def test_a_generator_on_the_rows_device_is_used_as_it_is() -> None:
    """A device given without an index (``torch.Generator("cuda").device``) is the row's device,
    not a foreign one whose generator would be asked to draw there."""
    assert sampler._same_device(torch.device("cuda"), torch.device("cuda:0"))
    assert sampler._same_device(torch.device("cpu"), torch.device("cpu"))
    assert not sampler._same_device(torch.device("cuda:1"), torch.device("cuda:0"))
    assert not sampler._same_device(torch.device("cpu"), torch.device("cuda:0"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for a machine without a GPU")
def test_a_cuda_device_without_a_gpu_is_a_clear_error() -> None:
    from dlora.services.worker.engine.device import resolve_device

    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_device("cuda:0", "auto")


def test_keys_for_the_gpus_draws_keep_every_rows_source() -> None:
    """A GPU draws every sampled row from one Philox key each (``sampler._keys``): a key stays
    itself (as the int64 with its bits), the rows of one host generator take its next draws in
    row order (one call), rows without a generator draw theirs on the device."""
    g, h = torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)
    want_g = torch.randint(sampler._MASK, (2,), generator=torch.Generator().manual_seed(3)).tolist()
    want_h = torch.randint(sampler._MASK, (1,), generator=torch.Generator().manual_seed(4)).tolist()
    torch.manual_seed(11)
    keys = sampler._keys([5, 2**64 - 1, g, None, h, g, None], torch.device("cpu")).tolist()
    torch.manual_seed(11)
    fresh = torch.randint(sampler._MASK, (2,)).tolist()
    assert keys == [5, -1, want_g[0], fresh[0], want_h[0], want_g[1], fresh[1]]
    assert sampler.position_generator(7, 2).initial_seed() == sampler.position_key(7, 2)  # a CPU row's seed
