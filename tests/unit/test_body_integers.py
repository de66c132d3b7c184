"""A body's integer fields outside the table (``common.sampling.BODY_RANGES``): ``dlora loadgen
--extra-body`` refuses before the run what the gateway would refuse in every request of it (seed,
priority, min_tokens and truncate_prompt_tokens were let through with a fraction or out of range),
and best_of below n is refused as vLLM refuses it."""

from __future__ import annotations

import json

import pytest

from dlora.services.cli import build_parser
from dlora.services.gateway import sampling
from dlora.services.gateway.openai import APIError, CompletionBody, decode_body

INT64 = 1 << 63


def _gateway_refusal(body: dict[str, object]) -> APIError | None:
    """The gateway's 400 for a completion body with these fields (None: taken)."""
    try:
        raw = json.dumps({"model": "m", "prompt": "x", "max_tokens": 7} | body).encode()
        sampling.sampling_params(decode_body(raw, CompletionBody), 7)
    except APIError as e:
        return e
    return None


@pytest.mark.parametrize(
    "extra, said",
    [
        ({"seed": 2.5}, "seed must be an integer, got 2.5"),
        ({"seed": INT64}, f"seed must be a 64-bit signed integer, got {INT64}."),
        ({"priority": 1.5}, "priority must be an integer, got 1.5"),
        ({"priority": -INT64 - 1}, f"priority must be a 64-bit signed integer, got {-INT64 - 1}."),
        ({"min_tokens": 0.5}, "min_tokens must be an integer, got 0.5"),
        ({"min_tokens": -1}, "min_tokens must be at least 0, got -1."),
        ({"truncate_prompt_tokens": 2.5}, "truncate_prompt_tokens must be an integer, got 2.5"),
        ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens must be -1 or at least 1, got 0."),
        ({"truncate_prompt_tokens": -2}, "truncate_prompt_tokens must be -1 or at least 1, got -2."),
    ],
)
def test_an_extra_body_integer_the_gateway_refuses_is_refused_before_the_run(
    extra: dict[str, object], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["loadgen", "--extra-body", json.dumps(extra)])
    assert capsys.readouterr().err.strip().endswith(f"argument --extra-body: {said}")
    refused = _gateway_refusal(extra)  # what every request of the run would have got
    assert refused is not None and refused.status == 400 and refused.param == next(iter(extra)), refused


@pytest.mark.parametrize(
    "extra",
    [
        {"seed": INT64 - 1},
        {"seed": -INT64},
        {"priority": -5, "min_tokens": 0},
        {"min_tokens": 3.0},  # an integral float, as the gateway takes it (common.integers)
        {"truncate_prompt_tokens": -1},  # vLLM's: as many as the context holds
        {"truncate_prompt_tokens": 1},
    ],
)
def test_the_edges_the_gateway_takes_are_taken(extra: dict[str, object]) -> None:
    assert build_parser().parse_args(["loadgen", "--extra-body", json.dumps(extra)]).extra_body == extra
    assert _gateway_refusal(extra) is None


@pytest.mark.parametrize("n, best_of", [(1, 0), (3, 2)])
def test_best_of_below_n_is_refused_in_vllms_words(n: int, best_of: int) -> None:
    """best_of 0 is inside OpenAI's range [0, 20] and was taken as n; vLLM's ``_verify_args``
    refuses any best_of below n."""
    refused = _gateway_refusal({"n": n, "best_of": best_of})
    assert refused is not None and (refused.status, refused.param) == (400, "best_of")
    assert refused.message == f"best_of must be greater than or equal to n, got n={n} and best_of={best_of}."
    assert _gateway_refusal({"n": n, "best_of": n}) is None  # best_of equal to n: taken


def test_seed_minus_one_asks_for_none() -> None:
    """vLLM #4531: clients that always send a seed (llama.cpp's convention) write -1 for a random
    one; it was taken as the seed -1, so every retry of such a request drew the same text."""
    decoded = decode_body(b'{"model": "m", "prompt": "x", "seed": -1}', CompletionBody)
    assert sampling.sampling_params(decoded, 7).seed is None
    decoded = decode_body(b'{"model": "m", "prompt": "x", "seed": -2}', CompletionBody)
    assert sampling.sampling_params(decoded, 7).seed == -2


def test_a_logit_bias_past_100_is_clamped_as_vllm_clamps_it() -> None:
    """vLLM #3027 clamps each bias to [-100, 100] (a client bans a token with -1000); it was a 400."""
    decoded = decode_body(
        b'{"model": "m", "prompt": "x", "logit_bias": {"5": -1000, "7": 1e9, "9": 2.5}}', CompletionBody
    )
    assert sampling.sampling_params(decoded, 7).logit_bias == {5: -100.0, 7: 100.0, 9: 2.5}
