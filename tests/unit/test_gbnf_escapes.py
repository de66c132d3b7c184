"""GBNF's \\u and \\U escapes, as llama.cpp and vLLM's default backend read them."""

from __future__ import annotations

import pytest

from dlora.common.messages import SamplingParams
from dlora.services.worker.engine.structured import Grammars, check
from tests.unit.test_token_bytes import byte_level


@pytest.mark.parametrize(
    "grammar,text,ok",
    [
        ('root ::= "\\u0041" [\\u0042-\\u0043]\n', "AB", True),
        ('root ::= "\\u00e9\\U0001F600"\n', "é😀", True),
        ("root ::= [\\u0030-\\u0039]+\n", "42", True),
        ("root ::= [\\u0030-\\u0039]+\n", "4a", False),
        ('root ::= "\\u0022" "x" "\\u005D"\n', '"x]', True),  # a quote and a bracket stay escaped
        ('root ::= "\\\\u0041"\n', "\\u0041", True),  # an escaped backslash, then text
        ("root ::= [^\\u000A]+\n", "a\nb", False),
    ],
)
def test_unicode_escapes_in_gbnf_are_read(grammar: str, text: str, ok: bool) -> None:
    """llguidance's converter wrote \\u0041 as \\u41 and its Lark lexer refused the grammar
    ("lexer error"), a 400 for a grammar llama.cpp and vLLM's default backend serve."""
    params = SamplingParams(grammar=grammar)
    check(params)
    hf = byte_level()
    matcher = Grammars(hf, len(hf), {hf.eos_token_id}).matcher(params, [])
    assert matcher is not None
    taken = matcher.consume_tokens(hf.encode(text, add_special_tokens=False))
    assert (taken and matcher.is_accepting()) is ok, (grammar, text)
