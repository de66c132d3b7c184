"""A regular expression's Perl classes as vLLM's default backend reads them."""

from __future__ import annotations

import pytest

from dlora.common.messages import SamplingParams
from dlora.services.worker.engine.structured import Grammars
from tests.unit.test_token_bytes import byte_level


@pytest.mark.parametrize(
    "regex,text,ok",
    [
        (r"\d{3}", "123", True),
        (r"\d{3}", "۸९߂", False),  # Unicode digits: what llguidance's Rust regexes read \d as
        (r"\w+", "kalo_9", True),
        (r"\w+", "é", False),
        (r"[\d_]+", "1_2", True),
        (r"[\d_]+", "१", False),
        (r"\D", "१", True),
        (r"a\\d", "a\\d", True),  # an escaped backslash, then a letter
        (r"\s", "\u3000", True),  # \s stays Unicode's, as ECMA-262's
    ],
)
def test_perl_classes_of_a_regex_are_ascii(regex: str, text: str, ok: bool) -> None:
    """vLLM's default backend (xgrammar), outlines, llama.cpp and JSON Schema's patterns read \\d
    and \\w as [0-9] and [0-9a-zA-Z_]: here a guided_regex "\\d{3}" answered "۸९߂" (a random
    model's; a JavaScript client's parseInt reads NaN), where the same pattern in a schema gave
    ASCII digits."""
    hf = byte_level()
    grammars = Grammars(hf, len(hf), {hf.eos_token_id})
    matcher = grammars.matcher(SamplingParams(regex=regex), [])
    assert matcher is not None
    taken = matcher.consume_tokens(hf.encode(text, add_special_tokens=False))
    assert (taken and matcher.is_accepting()) is ok, (regex, text)
