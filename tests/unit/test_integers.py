"""An integral float in an integer field is the integer it writes (``common.integers``), as vLLM's
server (pydantic's lax mode) reads it: ``"top_k": 40.0`` was a 400 at the gateway. A fraction stays
a 400 naming the field; strings and bools stay refused (msgspec's strict mode). Every integer
field of the completions, chat and Responses bodies alike, found from their types."""

from __future__ import annotations

import json

import msgspec
import pytest

from dlora.common import integers
from dlora.common.integers import NotWhole, integer_fields, whole
from dlora.services.gateway.keys import KeyBody
from dlora.services.gateway.openai import APIError, ChatBody, CompletionBody, decode_body
from dlora.services.gateway.responses_api import ResponsesBody
from dlora.services.gateway.tokenize_routes import DetokenizeBody

COMPLETION = {"model": "m", "prompt": "x"}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
RESPONSES = {"model": "m", "input": "x"}
BODIES = ((CompletionBody, COMPLETION), (ChatBody, CHAT), (ResponsesBody, RESPONSES))


def test_whole_takes_an_integral_float_and_refuses_the_rest_naming_the_field() -> None:
    assert [whole("n", v) for v in (3, 3.0, -2.0, 1e3)] == [3, 3, -2, 1000]
    assert type(whole("n", 3.0)) is int
    for bad in (40.5, float("inf"), float("nan"), True, "40", None):
        with pytest.raises(NotWhole, match=r"^top_k must be an integer, got ") as e:
            whole("top_k", bad)
        assert e.value.field == "top_k"


def test_the_integer_fields_are_found_from_each_bodys_types() -> None:
    """Each endpoint's counts, read from its type: a field added later is read alike."""
    shared = {"max_tokens", "n", "seed", "top_k", "min_tokens", "truncate_prompt_tokens", "prompt_logprobs"}
    assert shared | {"priority", "best_of", "logprobs"} <= integer_fields(CompletionBody)
    assert shared | {"priority", "max_completion_tokens", "top_logprobs"} <= integer_fields(ChatBody)
    assert "logprobs" not in integer_fields(ChatBody)  # a chat's is a flag
    assert {"max_output_tokens", "top_logprobs", "top_k", "seed", "priority"} <= integer_fields(ResponsesBody)
    assert not integer_fields(CompletionBody) & {"temperature", "prompt", "stop_token_ids"}


@pytest.mark.parametrize("kind, base", BODIES)
def test_every_integer_field_of_each_body_takes_an_integral_float(kind: type[msgspec.Struct], base: dict) -> None:
    for name in sorted(integer_fields(kind)):
        body = decode_body(json.dumps(base | {name: 3.0}).encode(), kind)
        got = getattr(body, name)
        assert (got, type(got)) == (3, int), name


@pytest.mark.parametrize("kind, base", BODIES)
def test_a_fraction_in_any_integer_field_is_a_400_naming_it(kind: type[msgspec.Struct], base: dict) -> None:
    for name in sorted(integer_fields(kind)):
        with pytest.raises(APIError) as refused:
            decode_body(json.dumps(base | {name: 3.5}).encode(), kind)
        assert (refused.value.status, refused.value.param) == (400, name)
        assert f"{name} must be an integer, got 3.5" in refused.value.message


def test_the_briefs_examples_and_what_stays_refused() -> None:
    body = decode_body(
        json.dumps(COMPLETION | {"top_k": 40.0, "max_tokens": 16.0, "n": 1.0, "seed": 3.0}).encode(), CompletionBody
    )
    assert (body.top_k, body.max_tokens, body.n, body.seed) == (40, 16, 1, 3)
    for value, said in (("40", "Expected `int | null`, got `str`"), (True, "Expected `int | null`, got `bool`")):
        with pytest.raises(APIError) as refused:
            decode_body(json.dumps(COMPLETION | {"top_k": value}).encode(), CompletionBody)
        assert said in refused.value.message and refused.value.param == "top_k"
    # another fault beside a lifted float is still named, as msgspec names it
    with pytest.raises(APIError) as refused:
        decode_body(json.dumps(COMPLETION | {"top_k": 40.0, "stream": "yes"}).encode(), CompletionBody)
    assert refused.value.param == "stream"
    with pytest.raises(APIError) as refused:  # an unknown field stays a 400 (OpenAI's)
        decode_body(json.dumps(COMPLETION | {"top_k": 40.0, "topk": 1}).encode(), CompletionBody)
    assert refused.value.param == "topk"


def test_an_int_inside_a_list_or_a_constrained_int_takes_an_integral_float_too() -> None:
    """Where the type asks for an int, not only a top-level ``int | None``: a token id list's items
    (pydantic's lax list[int] takes [1.0, 2.0]) and an ``Annotated[int, ...]`` (a key's limits)."""
    body = decode_body(
        json.dumps(COMPLETION | {"stop_token_ids": [1.0, 2], "allowed_token_ids": [3.0]}).encode(), CompletionBody
    )
    assert (body.stop_token_ids, body.allowed_token_ids) == ([1, 2], [3])
    assert all(type(t) is int for t in body.stop_token_ids)
    assert decode_body(b'{"tokens": [1.0, 2.0]}', DetokenizeBody).tokens == [1, 2]
    key = decode_body(b'{"tenant": "acme", "burst": 5.0, "concurrency": 4.0}', KeyBody)
    assert (key.burst, key.concurrency) == (5, 4)
    assert {"burst", "concurrency"} <= integer_fields(KeyBody)
    with pytest.raises(APIError) as refused:  # a fraction in a list: its field, and where in it
        decode_body(json.dumps(COMPLETION | {"stop_token_ids": [1, 2.5]}).encode(), CompletionBody)
    assert refused.value.param == "stop_token_ids" and "at `$.stop_token_ids[1]`" in refused.value.message
    # where a float is taken (temperature, logit_bias's values, a prompt's list of anything) it stays one
    body = decode_body(
        json.dumps(COMPLETION | {"temperature": 1.0, "logit_bias": {"5": 2.0}, "n": 2.0}).encode(), CompletionBody
    )
    assert (type(body.temperature), body.logit_bias, body.n) == (float, {"5": 2.0}, 2)


def test_a_body_that_decodes_strictly_is_read_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The second reading is only for a refused body: the usual one costs what it did."""
    monkeypatch.setattr(integers, "with_whole_numbers", lambda *_: pytest.fail("read twice"))
    assert integers.decode(json.dumps(COMPLETION | {"top_k": 40}).encode(), CompletionBody).top_k == 40


def test_a_refusal_deep_in_an_unknown_field_keeps_its_reason() -> None:
    """The typed read refuses the unknown field without following its nesting; the second, plain
    read (looking for integral floats) met msgspec's depth bound there and answered "nested too
    deeply", which hid the reason (test_gateway's bad-input case)."""
    deep = b'{"model": "m", "prompt": "x", "x": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    with pytest.raises(APIError) as e:
        decode_body(deep, CompletionBody)
    assert "unknown field" in e.value.message, e.value.message
