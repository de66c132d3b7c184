"""Grammars as vLLM's users write them: Lark told from GBNF as vLLM's backends tell them."""

from __future__ import annotations

import pytest

from dlora.common.messages import SamplingParams
from dlora.services.worker.engine.structured import Grammars, check
from tests.unit.test_token_bytes import byte_level

# vLLM's offline example and structured-output benchmark grammar, as they write it.
VLLM_SQL = """
    ?start: select_statement

    ?select_statement: "SELECT " column_list " FROM " table_name

    ?column_list: column_name ("," column_name)*

    ?table_name: identifier

    ?column_name: identifier

    ?identifier: /[a-zA-Z_][a-zA-Z0-9_]*/
"""


@pytest.mark.parametrize(
    "grammar,text",
    [
        (VLLM_SQL, "SELECT username,email FROM users"),
        ('!start: "a" b\nb: "c"\n', "ac"),  # "!": keep its tokens
        ('?start : "x"\n', "x"),
    ],
)
def test_a_prefixed_lark_start_rule_is_lark(grammar: str, text: str) -> None:
    """Lark's "?start:" (an inlined rule) was read as GBNF and refused, "Failed to convert the
    grammar from GBNF to Lark: Expected name": a 400 for vLLM's own example grammar, which its
    default backend serves (its Lark conversion strips the "?") and llguidance reads as it is."""
    params = SamplingParams(grammar=grammar)
    check(params)
    hf = byte_level()
    matcher = Grammars(hf, len(hf), {hf.eos_token_id}).matcher(params, [])
    assert matcher is not None
    assert matcher.consume_tokens(hf.encode(text, add_special_tokens=False)) and matcher.is_accepting()
