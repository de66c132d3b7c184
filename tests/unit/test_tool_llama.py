"""llama3_json's text after its calls: the model's text exactly, apart from the calls and the
separators between them, whole and however streamed."""

from __future__ import annotations

import pytest

from dlora.services.gateway.tool_base import joined
from dlora.services.gateway.tool_parsers import ToolParser
from tests.unit.tool_cases import read_decoded, splits

CALL = '{"name": "a", "parameters": {"x": 1}}'
A = ("a", {"x": 1})


@pytest.mark.parametrize(
    ("text", "content", "calls"),
    [
        # the line breaks between the last call and the prose after it were dropped
        (CALL + "\n\nThat is all.", "\n\nThat is all.", [A]),
        (CALL + "; " + CALL + " \n That is all.", " \n That is all.", [A, A]),
        # a separator and the whitespace before it are the list's; what follows it is the text's
        (CALL + " ;\n\nThat is all.", "\n\nThat is all.", [A]),
        (CALL + '; {"temperature": 3} ok', ' {"temperature": 3} ok', [A]),
        (CALL + "\n<|python_tag|> Done.", " Done.", [A]),
        (CALL + " \n", "", [A]),  # whitespace alone after the calls is none, as before them
        (CALL + ";\n", "", [A]),
    ],
)
def test_text_after_llama3_json_calls_keeps_its_whitespace(
    text: str, content: str, calls: list[tuple[str, object]]
) -> None:
    for pieces in splits(text, len(text)):
        assert read_decoded("llama3_json", pieces) == (content, calls), pieces


def test_whitespace_after_a_llama3_json_call_is_kept_not_joined_at_each_token() -> None:
    """Kept for text that may follow, the whitespace after a call is not joined to what is held at
    every token (a model writing newlines to max_tokens after its call: copied again per token)."""
    parser = ToolParser("llama3_json")
    assert parser.feed(CALL) == ("", [(0, "a", '{"x": 1}')])
    for _ in range(1000):
        assert parser.feed("\n") == ("", [])
    assert parser._held == ""
    assert joined(parser.feed("Done."), parser.finish()) == ("\n" * 1000 + "Done.", [])
