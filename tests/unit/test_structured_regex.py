"""vLLM's ``regex`` field (``structured_outputs.regex``, ``guided_regex``) read as vLLM's backends
read it: its "." is any character but "\\n" (a "\\r" too), as guidance (llguidance, Rust's regex)
and outlines (interegular, Python's ``re``) read it; xgrammar's takes "\\n" as well. A JSON
Schema ``pattern`` is ECMA-262's instead (no line terminator: ``ecma_pattern``)."""

from __future__ import annotations

import functools
import json
from typing import Any

from dlora.common.messages import SamplingParams
from dlora.services.worker.engine.structured import Grammars
from tests.unit.test_token_bytes import byte_level


@functools.cache
def _grammars() -> tuple[Grammars, Any]:
    hf = byte_level()
    return Grammars(hf, len(hf), {hf.eos_token_id}), hf


def takes(params: SamplingParams, text: str) -> bool:
    """Whether the constraint of ``params`` accepts ``text`` whole, fed as a byte-level model's tokens."""
    grammars, hf = _grammars()
    matcher = grammars.matcher(params, [])
    assert matcher is not None
    ids = hf.encode(text, add_special_tokens=False)
    return matcher.consume_tokens(ids) and not matcher.is_error() and matcher.is_accepting()


def test_a_regex_fields_dot_is_any_character_but_a_newline() -> None:
    dotted = SamplingParams(regex="a.b")
    for inner in ("x", "\r", "\u2028", "\t", "."):
        assert takes(dotted, f"a{inner}b"), repr(inner)
    assert not takes(dotted, "a\nb")
    assert takes(SamplingParams(regex="(?s:a.b)"), "a\nb")  # a dotAll group, as Python's and Rust's
    # the same "." in a schema's pattern is ECMA-262's: no "\r" there
    pattern = SamplingParams(json_schema=json.dumps({"type": "string", "pattern": "^a.b$"}))
    assert takes(pattern, '"axb"') and not takes(pattern, '"a\\rb"')
