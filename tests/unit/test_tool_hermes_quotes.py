"""Hermes calls whose quotes are unsound (a quote the model left unescaped), streamed: the text
and calls after such a call go out as they come, not at the end of the output."""

from __future__ import annotations

import json
import random

import pytest

from dlora.services.gateway.tool_scan import QuotesCheck
from tests.unit.tool_cases import PING, PING_CALL, UNESCAPED, counting_braces, read

BAD_THEN_GOOD = "Looking.\n" + UNESCAPED + "\n" + PING_CALL


def test_a_call_with_an_unescaped_quote_goes_out_as_text_at_its_tag_and_the_next_call_at_its_own() -> None:
    """The closing notes' left item: after "5" inches" the rest of the output read as one string,
    so the stream said nothing after "Looking." until the output ended, then gave the bad call as
    text and the good one as a call, all at once. A tag inside a string after the call's object
    has closed (its braces balanced) closes it: each goes out as its tag comes, as unstreamed."""
    bad_end = BAD_THEN_GOOD.index("</tool_call>") + len("</tool_call>")
    pieces = [BAD_THEN_GOOD[:bad_end], BAD_THEN_GOOD[bad_end:-3], BAD_THEN_GOOD[-3:]]
    content, calls, said = read("hermes", pieces)
    assert (content, calls) == ("Looking.\n" + UNESCAPED + "\n", [PING])
    assert said == ["Looking.\n" + UNESCAPED, "\n", "", ""]
    assert read("hermes", list(BAD_THEN_GOOD))[:2] == (content, calls)


@pytest.mark.parametrize(
    "bad",
    [
        '<tool_call>{"name": "find", "arguments": {"q": 5"}}</tool_call>',  # a stray quote after a value
        '<tool_call>{"name": "say", "arguments": {"t": "a", b"}}</tool_call>',  # after a "," no key opens
        # a value's string followed by ":" (a key's is), its "b" left unescaped: the rest one string
        '<tool_call>{"name": "say", "arguments": {"t": "a ":"}}</tool_call>',
        '<tool_call>{"name": "say", "arguments": {"t": ["a ":"}]}</tool_call>',
    ],
)
def test_a_quote_where_json_lets_none_goes_out_as_text_at_its_tag(bad: str) -> None:
    """A review of the quotes check: it caught a string closed where JSON lets none ("5" inches)
    but not one opened so (``5"``, ``b"``), nor a value's closed before a ":" (``"a ":"``, which
    fits a key): that call's quotes read as sound, so its quoted tag was the argument's and the
    stream said nothing more until the output's end or a later call's quote flipped them back (as
    before the check, braces balanced cut it at its tag)."""
    text = "Looking.\n" + bad + "\n" + PING_CALL
    bad_end = text.index("</tool_call>") + len("</tool_call>")
    content, calls, said = read("hermes", [text[:bad_end], text[bad_end:-3], text[-3:]])
    assert (content, calls) == ("Looking.\n" + bad + "\n", [PING])
    assert said[0] == "Looking.\n" + bad
    assert read("hermes", list(text))[:2] == (content, calls)


@pytest.mark.parametrize(
    "arguments",
    [
        '{"text": "a {x} </tool_call> b"}',  # braces open before the tag: the argument's
        '{"text": "say </tool_call>", "n": {"k": 1}}',
        '{"code": "if x: {}\\n</tool_call>"}',
    ],
)
def test_a_tag_an_argument_quotes_stays_the_arguments(arguments: str) -> None:
    text = '<tool_call>{"name": "write", "arguments": ' + arguments + "}</tool_call>"
    expected = ("", [("write", json.dumps(json.loads(arguments)))])
    assert read("hermes", [text])[:2] == expected
    assert read("hermes", list(text))[:2] == expected


def test_fuzzed_hermes_outputs_read_alike_however_split() -> None:
    """Random runs of tags, quotes, escapes and braces (calls whose quotes are sound or not):
    any split reads as the whole does, and an output with no call is its own text."""
    rng = random.Random(55848)
    atoms = ["<tool_call>", "</tool_call>", "</tool", "{", "}", '"', '\\"', "\\", " ", "\n", "x", ":", ","]
    atoms += [PING_CALL, UNESCAPED, '{"name": "f", "arguments": {"a": "', '"}}', "}}"]
    for _ in range(3000):
        text = "".join(rng.choices(atoms, k=rng.randint(1, 14)))
        cuts = sorted(rng.sample(range(1, len(text)), k=min(rng.randint(1, 8), len(text) - 1)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        whole = read("hermes", [text])[:2]
        assert read("hermes", pieces)[:2] == whole, pieces
        assert whole[1] or whole[0] == text, text


def test_an_argument_quoting_many_tags_is_brace_counted_once_through(monkeypatch: pytest.MonkeyPatch) -> None:
    """A review: at each tag inside a string the call's text so far was sliced and its braces
    counted again, so an argument quoting the tag n times (a file-editing tool writing a document
    about hermes calls) cost n times its length: 4,000 tags in 48 kB counted 96 M characters. The
    braces are counted once through, each character at most once per call."""
    counted = counting_braces(monkeypatch)
    arguments = {"s": "{}</tool_call>" * 4000}  # (each tag after a "}": the braces counted at each)
    text = '<tool_call>{"name": "write", "arguments": ' + json.dumps(arguments) + "}</tool_call>"
    expected = ("", [("write", json.dumps(arguments))])
    for pieces in ([text], [text[i : i + 4] for i in range(0, len(text), 4)]):
        counted[0] = 0
        assert read("hermes", pieces)[:2] == expected
        assert counted[0] <= len(text)


@pytest.mark.parametrize(
    "arguments",
    [
        '{"s": "}}</tool_call>"}',  # the closing notes' left item: braces closed right before the tag
        '{"s": "a}}</tool_call> and }}</tool_call>", "t": "x"}',
        '{"code": "} } </tool_call>", "n": 1}',
        '{"a": {"b": "}}}</tool_call>"}}',
    ],
)
def test_a_tag_an_argument_quotes_after_closing_braces_stays_the_arguments(arguments: str) -> None:
    """Braces balanced and a "}" before a tag inside a string closed the call there (the fall back
    for a quote the model left unescaped): an argument that quotes the tag right after braces was
    cut and given out as text. Its quotes are sound (every string closes where JSON lets one), so
    the tag is the argument's."""
    text = '<tool_call>{"name": "write", "arguments": ' + arguments + "}</tool_call>"
    expected = ("", [("write", json.dumps(json.loads(arguments)))])
    assert read("hermes", [text])[:2] == expected
    assert read("hermes", list(text))[:2] == expected
    then_ping = "Sure.\n" + text + "\n" + PING_CALL
    assert read("hermes", [then_ping])[:2] == ("Sure.\n", [expected[1][0], PING])


def test_quotes_check_finds_a_string_closed_where_json_lets_none_reading_each_character_once() -> None:
    cases = [('{"q": "5" inches"}', True), ('{"q": 5"}', True), ('{"a": "x\\"y", "b": ["z" , {"c": "}}"}]}', False)]
    cases += [('{"t": "a ":"b"}', True), ('{"k" "v"}', True), ('{"a": [{"b": "c"}, "d"], "e" :\n"f"}', False)]
    for text, unsound in cases:
        check = QuotesCheck()
        assert [check.look(text, 0, end) for end in range(len(text) + 1)][-1] == unsound
        assert check.read <= len(text)
