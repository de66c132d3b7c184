"""One table of sampling ranges (``common.sampling.RANGES``): the engine's check, the gateway's
400 and ``dlora loadgen``'s options and ``--extra-body`` refuse a value outside it in one sentence,
vLLM's (``SamplingParams._verify_args``). They were three tables: the engine took temperature up to
100 where the gateway stopped at 2, and loadgen's --top-p had no upper bound at all. Through the
real stack: ``tests/integration/test_structured_schemas.py``."""

from __future__ import annotations

import json
import math

import msgspec
import pytest

from dlora.common.messages import SamplingParams
from dlora.common.sampling import RANGES
from dlora.loadgen.vllm_options import backend_problem, logprobs_problem
from dlora.services.cli import build_parser
from dlora.services.gateway import sampling
from dlora.services.gateway.openai import APIError, CompletionBody, decode_body

# A value just outside each of the table's fields' ranges (low - 1, or high + 0.5)
OUTSIDE = {
    name: (int(r.low) - 1 if name == "top_k" else r.high + 0.5 if r.high != math.inf else r.low - 1.0)
    for name, r in RANGES.items()
}
# The fields loadgen has an option for, and its spelling
OPTIONS = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")


def _cli_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["loadgen", *argv])
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("name", OPTIONS)
def test_each_surface_refuses_a_value_outside_the_table_in_vllms_words(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    value = OUTSIDE[name]
    why = SamplingParams(**{name: value}).problem()  # the engine's: an application's request over NATS
    assert why == f"{name} must be {RANGES[name].span()}, got {value}."
    body = msgspec.convert({"model": "m", "prompt": "x", name: value}, CompletionBody)
    with pytest.raises(APIError) as gateway:
        sampling.sampling_params(body, 7)
    assert (gateway.value.status, gateway.value.message, gateway.value.param) == (400, why, name)
    option = f"--{name.replace('_', '-')}"
    assert _cli_error([option, str(value)], capsys).endswith(f"argument {option}: {why}")
    assert _cli_error(["--extra-body", json.dumps({name: value})], capsys).endswith(f"argument --extra-body: {why}")


def test_the_edges_of_each_range_are_taken_everywhere() -> None:
    for name in OPTIONS:
        r = RANGES[name]
        for value in {r.low, r.high} - {math.inf} - ({r.low} if r.above else set()):
            assert SamplingParams(**{name: value}).problem() is None, (name, value)
            option = f"--{name.replace('_', '-')}"
            assert build_parser().parse_args(["loadgen", option, str(value)]).__dict__[name] == value
            assert build_parser().parse_args(["loadgen", "--extra-body", json.dumps({name: value})]).extra_body


@pytest.mark.parametrize(
    "extra, said",
    [
        ({"temperature": "hot"}, "temperature must be a number, got 'hot'"),
        ({"top_p": True}, "top_p must be a number, got True"),
        ({"min_p": float("nan")}, "min_p must be in [0, 1], got nan."),
        # an integer field's fraction: a 400 at the gateway, at vLLM's server too (pydantic)
        ({"top_k": 2.5}, "top_k must be an integer, got 2.5"),
        ({"prompt_logprobs": 1.5}, "prompt_logprobs must be an integer, got 1.5"),
        # the bodies' own counts, unchecked before (every request of the run was a 400)
        ({"n": 0}, "n must be in [1, 128], got 0."),
        ({"n": 2.5}, "n must be an integer, got 2.5"),
        ({"best_of": 21}, "best_of must be in [0, 20], got 21."),
        ({"top_logprobs": 21.0}, "top_logprobs must be in [0, 20], got 21."),
        ({"top_logprobs": "5"}, "top_logprobs must be an integer, got '5'"),
    ],
)
def test_an_extra_bodys_sampling_value_that_is_no_number_is_refused_before_the_run(
    extra: dict[str, object], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--extra-body '{"temperature": 5}'`` was taken, and every request of the run answered 400."""
    assert _cli_error(["--extra-body", json.dumps(extra)], capsys).endswith(said)


@pytest.mark.parametrize(
    "extra", [{"best_of": 2}, {"n": 3, "best_of": 2}, {"n": 2, "best_of": 0}, {"n": 2.0, "best_of": 4}]
)
def test_an_extra_bodys_best_of_other_than_n_is_refused_as_the_gateway_refuses_it(
    extra: dict[str, object], capsys: pytest.CaptureFixture[str]
) -> None:
    """Each field inside its range, the two apart (a rule across both) passed ``--extra-body``, and
    every request of the run was a 400: refused before the run, in the gateway's sentence."""
    body = decode_body(json.dumps({"model": "m", "prompt": "x", **extra}).encode(), CompletionBody)
    with pytest.raises(APIError) as gateway:
        sampling.sampling_params(body, 7)
    assert gateway.value.param == "best_of"
    assert _cli_error(["--extra-body", json.dumps(extra)], capsys).endswith(f"--extra-body: {gateway.value.message}")
    taken = {"n": extra.get("n", 1), "best_of": extra.get("n", 1)}  # (best_of equal to n: both take it)
    assert build_parser().parse_args(["loadgen", "--extra-body", json.dumps(taken)]).extra_body == taken


def test_a_chats_and_a_completions_own_ranges_stay_theirs() -> None:
    """A completion's max_tokens may be 0 (its echo alone) and its logprobs is a count of at most 5;
    the engine's max_tokens is at least 1, its logprobs up to 20 (a chat's top_logprobs)."""
    body = msgspec.convert({"model": "m", "prompt": "x", "logprobs": 6}, CompletionBody)
    with pytest.raises(APIError, match=r"logprobs must be in \[0, 5\], got 6\.$"):
        sampling.sampling_params(body, 7)
    assert SamplingParams(logprobs=6).problem() is None
    assert SamplingParams(max_tokens=0).problem() == "max_tokens must be at least 1, got 0."


@pytest.mark.parametrize(
    "value, why",
    [
        (1e-40, None),  # was refused below 0.01
        (250.0, None),  # was refused above 100
        (1e300, None),
        (0.0, "repetition_penalty must be greater than zero, got 0.0."),  # vLLM's words
        (-1.0, "repetition_penalty must be greater than zero, got -1.0."),
        (math.inf, "repetition_penalty must be a finite number, got inf."),
        (math.nan, "repetition_penalty must be greater than zero, got nan."),
    ],
)
def test_repetition_penalty_takes_what_vllm_takes(value: float, why: str | None) -> None:
    """vLLM's ``_verify_args`` takes any finite repetition_penalty above 0; the table capped it at
    100 and refused it below 0.01 (the engine now saturates what would overflow float32)."""
    assert SamplingParams(repetition_penalty=value).problem() == why
    body = msgspec.convert({"model": "m", "prompt": "x", "repetition_penalty": value}, CompletionBody)
    if why is None:
        assert sampling.sampling_params(body, 7).repetition_penalty == value
    else:
        with pytest.raises(APIError) as refused:
            sampling.sampling_params(body, 7)
        assert (refused.value.message, refused.value.param) == (why, "repetition_penalty")


def test_an_extra_bodys_integral_float_is_taken_as_the_gateway_takes_it() -> None:
    """``{"top_k": 40.0}`` was refused before the run, where vLLM's server and now the gateway
    (``common.integers``) take it."""
    extra = {"top_k": 40.0, "prompt_logprobs": 1.0, "n": 2.0, "seed": 3.0}
    assert build_parser().parse_args(["loadgen", "--extra-body", json.dumps(extra)]).extra_body == extra


@pytest.mark.parametrize(
    "given, chat, said",
    [
        (6, False, "logprobs must be in [0, 5], got 6."),  # a completion's count
        (2.5, False, "logprobs must be an integer, got 2.5"),
        (True, False, "logprobs must be an integer, got True"),
        (3, True, "logprobs must be true or false (--backend openai-chat), got 3"),  # a chat's flag
        (5.0, False, None),
        (0, False, None),
        (True, True, None),
    ],
)
def test_an_extra_bodys_logprobs_is_checked_as_its_backends_api_takes_it(
    given: object, chat: bool, said: str | None
) -> None:
    assert logprobs_problem({"logprobs": given}, chat) == said
    assert logprobs_problem({}, chat) is None
    assert backend_problem({"logprobs": given}, chat) == said


@pytest.mark.parametrize(
    ("extra", "chat", "said"),
    [
        ({"best_of": 2, "top_k": 5}, True, "best_of: no field of the --backend's /v1/chat/completions body"),
        ({"suffix": "x", "echo": True}, True, "suffix: no field of the --backend's /v1/chat/completions body"),
        ({"tools": [], "top_k": 5}, False, "tools: no field of the --backend's /v1/completions body"),
        ({"best_of": 2, "echo": True, "min_p": 0.1}, False, None),
        ({"chat_template_kwargs": {}, "tool_choice": "none"}, True, None),
    ],
)
def test_an_extra_body_field_its_backends_body_has_not_is_refused_before_the_run(
    extra: dict, chat: bool, said: str | None
) -> None:
    """``--extra-body '{"best_of": 2}'`` with ``--backend openai-chat`` passed loadgen's checks
    (each field inside its range) and every request of the run was a 400: the gateway refuses a
    field its endpoint's body has not (the chat API has no best_of)."""
    assert backend_problem(extra, chat) == said


def test_stop_token_ids_and_bad_words_count_each_once_as_vllms() -> None:
    """Each stop id and bad word is kept once, in order: a list joined from a model's and a
    client's own (the same EOS twice, 300 entries) was refused here as over MAX_STOPS, where vLLM
    (no bound; it stops on the set of the ids) serves it. Over NATS (the Struct) and through the
    gateway alike."""
    params = SamplingParams(stop_token_ids=[7, 2, 7] * 100, bad_words=["kalo", "remi", "kalo"])
    assert (params.problem(), params.stop_token_ids, params.bad_words) == (None, [7, 2], ["kalo", "remi"])
    wire = msgspec.json.encode({"stop_token_ids": [7, 2, 7] * 100, "bad_words": ["kalo", "remi", "kalo"]})
    assert msgspec.json.decode(wire, type=SamplingParams) == params  # (an application's, over NATS)
    body = msgspec.convert(
        {"model": "m", "prompt": "x", "stop_token_ids": [5] * 300, "bad_words": ["a", "a"]}, CompletionBody
    )
    assert (sent := sampling.sampling_params(body, 7)).stop_token_ids == [5] and sent.bad_words == ["a"]


def test_n_above_1_at_temperature_0_is_served_as_openais_api_serves_it() -> None:
    """vLLM refuses it ("n must be 1 when using greedy sampling"); OpenAI's API answers n choices
    (each the greedy answer), and clients written for it send n with temperature 0 (evaluation
    harnesses): served, as OpenAI does."""
    body = msgspec.convert({"model": "m", "prompt": "x", "n": 3, "temperature": 0}, CompletionBody)
    assert sampling.sampling_params(body, 7).temperature == 0.0
