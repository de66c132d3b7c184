"""mistral and granite-20b-fc calls whose quotes are unsound (a quote the model left unescaped),
read by hermes' check (``tool_scan.QuotedTag``): the call is text at the next call's tag and the
calls after it are read, whole and however streamed; a tag an argument quotes stays the argument's."""

from __future__ import annotations

import json
import random

import pytest

from tests.unit.tool_cases import PING, counting_braces, read

MISTRAL_TAG, FC_TAG = "[TOOL_CALLS]", "<function_call>"


def _mistral(arguments: str, name: str = "find") -> str:
    return f"{MISTRAL_TAG}{name}[ARGS]{arguments}"


def _fc(arguments: str, name: str = "find") -> str:
    return f'{FC_TAG} {{"name": "{name}", "arguments": {arguments}}}'


CALLS = {"mistral": _mistral, "granite-20b-fc": _fc}
UNSOUND = ['{"q": "5" inches"}', '{"q": 5"}', '{"t": "a ":"}', '{"t": ["a ":"]}']


@pytest.mark.parametrize("kind", CALLS)
@pytest.mark.parametrize("arguments", UNSOUND)
def test_a_call_with_unsound_quotes_is_text_at_the_next_calls_tag(kind: str, arguments: str) -> None:
    """hermes' quotes check, which mistral and granite-20b-fc lacked: after "5" inches" the rest of
    the output read as one string, so the stream said nothing after "Looking." until the output
    ended, then gave all of it as text, the good call after the bad one lost."""
    call = CALLS[kind]
    bad = call(arguments)
    text = "Looking. " + bad + " " + call("{}", "ping")
    tag = MISTRAL_TAG if kind == "mistral" else FC_TAG
    second = text.index(tag, len("Looking. ") + 1)
    content, calls, said = read(kind, [text[: second + len(tag)], text[second + len(tag) :]])
    assert (content, calls) == ("Looking. " + bad + " ", [PING])
    assert said[0] == content  # (the bad call's text goes out at the next call's tag)
    assert read(kind, [text])[:2] == read(kind, list(text))[:2] == (content, calls)


@pytest.mark.parametrize("kind", CALLS)
def test_a_call_whose_escaped_quote_took_in_the_next_calls_ends_at_its_first_tag(kind: str) -> None:
    """A backslash left unescaped ("C:\\") keeps the string open over the next call's tag, so
    its quotes show unsound only at a later tag: cut there, the call between was the broken
    one's text, lost. It ends at the first tag its braces allow, the calls after it read."""
    call = CALLS[kind]
    bad = call('{"path": "C:\\"}')
    text = "Looking. " + bad + " " + call('{"city": "SF"}', "get") + " " + call("{}", "ping")
    expected = ("Looking. " + bad + " ", [("get", '{"city": "SF"}'), PING])
    assert read(kind, [text])[:2] == read(kind, list(text))[:2] == expected


@pytest.mark.parametrize("kind", CALLS)
@pytest.mark.parametrize("arguments", ['{"path": "C:\\"}', '{"q": "5" inches"'])
def test_a_call_the_output_ends_inside_is_text_at_the_next_calls_tag(kind: str, arguments: str) -> None:
    """A backslash left unescaped ("C:\\") or a brace left open made the rest the call's, the
    next call's tag with it (no unsound quote, or no "}", before it for the check): the output
    ended inside it, all of it text, the good call after it lost. hermes' end reads its first
    tag as closing it; so do these."""
    call = CALLS[kind]
    bad = call(arguments)
    text = "Looking. " + bad + " " + call("{}", "ping")
    expected = ("Looking. " + bad + " ", [PING])
    assert read(kind, [text])[:2] == read(kind, list(text))[:2] == expected
    # a later call ended alike: the calls before it and after it answered, its text none
    text = call("{}", "ping") + bad + call("{}", "ping") + bad
    assert read(kind, [text])[:2] == read(kind, list(text))[:2] == ("", [PING, PING])


@pytest.mark.parametrize("kind", CALLS)
@pytest.mark.parametrize(
    "arguments",
    ['{"s": "}}TAG"}', '{"s": "a}}TAG and }} TAG", "t": "x"}', '{"a": {"b": "}}}TAG"}}', '{"s": "say \\"TAG\\""}'],
)
def test_a_tag_an_argument_quotes_stays_the_arguments(kind: str, arguments: str) -> None:
    """Its quotes are sound (every string closes where JSON lets one): the tag is the argument's,
    even right after braces that balance the call's."""
    arguments = arguments.replace("TAG", MISTRAL_TAG if kind == "mistral" else FC_TAG)
    text = "Sure. " + CALLS[kind](arguments, "write") + " " + CALLS[kind]("{}", "ping")
    expected = ("Sure. ", [("write", json.dumps(json.loads(arguments), ensure_ascii=False)), PING])
    assert read(kind, [text])[:2] == expected
    assert read(kind, list(text))[:2] == expected


@pytest.mark.parametrize("kind", CALLS)
def test_fuzzed_outputs_read_alike_however_split(kind: str) -> None:
    """Random runs of tags, quotes, escapes and braces (calls whose quotes are sound or not): any
    split reads as the whole does, and an output with no call is its own text."""
    rng = random.Random(len(kind))
    tag = MISTRAL_TAG if kind == "mistral" else FC_TAG
    atoms = [tag, tag[:5], "{", "}", '"', '\\"', "\\", " ", "x", ":", ","]
    atoms += [CALLS[kind]("{}", "ping"), CALLS[kind](UNSOUND[0]), CALLS[kind]('{"a": "', "f"), '"}', "}}"]
    for _ in range(1500):
        text = "".join(rng.choices(atoms, k=rng.randint(1, 12)))
        cuts = sorted(rng.sample(range(1, len(text)), k=min(rng.randint(1, 8), len(text) - 1)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        whole = read(kind, [text])[:2]
        assert read(kind, pieces)[:2] == whole, pieces
        assert whole[1] or whole[0] == text, text


@pytest.mark.parametrize("kind", CALLS)
def test_an_argument_quoting_many_tags_is_counted_once_through(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each tag an argument quotes is looked at from where the last look ended: 4,000 of them
    cost the call's length once, not once per tag."""
    counted = counting_braces(monkeypatch)
    arguments = json.dumps({"s": ("{}" + (MISTRAL_TAG if kind == "mistral" else FC_TAG)) * 4000})
    text = CALLS[kind](arguments, "write")
    for pieces in ([text], [text[i : i + 4] for i in range(0, len(text), 4)]):
        counted[0] = 0
        assert read(kind, pieces)[:2] == ("", [("write", arguments)])
        assert counted[0] <= len(text)


def test_a_mistral_tag_no_call_follows_is_text_to_the_next_tag() -> None:
    """Its name was looked for up to 146 characters on, past the next [TOOL_CALLS]: "x y" took
    ping's object as its own (a name with spaces, no call), so ping was lost."""
    for before in ("", _mistral("{}", "ping")):
        text = "Looking. " + before + MISTRAL_TAG + "x y " + _mistral("{}", "ping")
        expected = ("Looking. " + ("" if before else MISTRAL_TAG + "x y "), [PING] * (1 + bool(before)))
        assert read("mistral", [text])[:2] == read("mistral", list(text))[:2] == expected


@pytest.mark.parametrize("kind", [*CALLS, "hermes"])
def test_a_call_the_output_ends_inside_goes_out_as_text_only_at_the_end(kind: str) -> None:
    """Until the output ends, the call may still close (a later quote, a later brace): nothing of
    it is said, then all of it is text, as the whole answer gives it (vLLM's stream sends it as a
    tool call its whole answer gives as text)."""
    text = {"hermes": '<tool_call>{"name": "find", "arguments": {"q": "5" inches"}}'}.get(kind)
    text = text or CALLS[kind]('{"q": "5" inches"}')
    content, calls, said = read(kind, ["Looking. ", *text])
    assert (content, calls) == ("Looking. " + text, []) and said[0] == "Looking. "
    assert not any(said[1:-1]) and said[-1] == text
