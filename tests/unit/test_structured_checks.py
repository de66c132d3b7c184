"""What the gateway and a worker refuse of a structured output before any token (``structured.check``),
without a tokenizer: each a 400 naming why, never a crash."""

from __future__ import annotations

import json

import pytest

from dlora.common.messages import SamplingParams
from dlora.services.worker.engine.structured import GrammarError, check


@pytest.mark.parametrize(
    "schema",
    [
        # llguidance crashed its process (SIGSEGV): the gateway's, and each worker's a request reached
        {"type": "integer", "minimum": -(2**63), "maximum": -(2**63) + 1},
        # clamped to 2**63 - 1: a 200 whose number broke the schema
        {"type": "integer", "minimum": 2**70, "maximum": 2**70 + 3},
        {"type": "object", "properties": {"n": {"anyOf": [{"type": "number", "exclusiveMaximum": 1e300}]}}},
    ],
)
def test_numeric_bounds_past_64_bits_are_refused_before_the_grammar_engine(schema: dict) -> None:
    with pytest.raises(GrammarError, match="outside the range the grammar engine holds numbers in"):
        check(SamplingParams(json_schema=json.dumps(schema)))


def test_a_grammars_json_block_is_held_to_the_same_bounds() -> None:
    grammar = 'start: %json {"type": "integer", "minimum": -9223372036854775808, "maximum": 0}'
    with pytest.raises(GrammarError, match="minimum -9223372036854775808 is outside the range"):
        check(SamplingParams(grammar=grammar))


def test_bounds_within_64_bits_are_taken() -> None:
    """int64's maximum (OpenAPI's and protobuf's bound) read as a float was 2**63, and refused; a
    "maximum" key inside an enum's or a default's object is data, not a bound."""
    for schema in (
        {"type": "integer", "minimum": -(2**62), "maximum": 2**62},
        {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
        {"enum": [{"maximum": 10**19}]},
        {"type": "object", "default": {"maximum": 1e300}},
    ):
        check(SamplingParams(json_schema=json.dumps(schema)))


def test_a_refused_bound_is_quoted_as_written() -> None:
    with pytest.raises(GrammarError, match="maximum 1E\\+300 is outside"):  # (int(1e300): 301 digits)
        check(SamplingParams(json_schema='{"type": "number", "maximum": 1e300}'))


@pytest.mark.parametrize(
    "regex,reason",
    [("(?=a)ab", "look-around"), ("(unclosed", "unclosed group")],
)
def test_a_regex_the_engine_cannot_read_says_why(regex: str, reason: str) -> None:
    """The message ended at 'regex parse error:' (the reason is on llguidance's later lines)."""
    with pytest.raises(GrammarError, match=reason):
        check(SamplingParams(regex=regex))
