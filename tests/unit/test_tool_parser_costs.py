"""tool_choice "auto"'s parsers over long outputs: what a stream holds is kept in pieces and read
once, not joined or scanned again at each token (quadratic on a model's long argument or its run
of newlines); checked by what is kept, not by the clock."""

from __future__ import annotations

import pytest

from dlora.services.gateway.tool_base import joined
from dlora.services.gateway.tool_json import arguments_json
from dlora.services.gateway.tool_parsers import ToolParser
from dlora.services.gateway.tool_scan import TagEnd
from tests.unit.test_tool_parsers import LLAMA_ONE, SAY_CALL
from tests.unit.tool_cases import PING, PING_CALL, UNESCAPED, read


@pytest.mark.parametrize(
    ("kind", "opening", "closing"),
    [
        ("hermes", '<tool_call>{"name": "f", "arguments": {"s": "', '"}}</tool_call>'),
        ("llama3_json", '{"name": "f", "parameters": {"s": "', '"}}'),
        ("mistral", '[TOOL_CALLS]f{"s": "', '"}'),
        ("mistral", '[TOOL_CALLS] [{"name": "f", "arguments": {"s": "', '"}}]'),
    ],
)
def test_an_open_call_is_kept_in_pieces_not_copied_at_each_token(kind: str, opening: str, closing: str) -> None:
    """A review: the held text grew by a str concatenation at every token while a call was open,
    all of it copied each time (a 200 kB argument: 0.5-0.8 s of the gateway's loop). Its pieces are
    kept and joined once, when the call ends; checked by what is kept, not by the clock."""
    parser, piece = ToolParser(kind), "k]}{ </tool_cal"  # (in a string: no brace counts, no tag closes)
    assert parser.feed(opening) == ("", [])
    held = len(parser._held)
    for _ in range(1000):
        assert parser.feed(piece) == ("", [])
    assert len(parser._held) == held and len(parser._pieces) == 1000  # none joined yet
    content, calls = joined(parser.feed(closing), parser.finish())
    assert (content, calls) == ("", [(0, "f", arguments_json({"s": piece * 1000}))])
    assert parser._pieces == []


@pytest.mark.parametrize("then", ['{"name": "ping", "arguments": {}}</tool_call>', "Hi."])
def test_whitespace_after_a_hermes_call_tag_is_kept_in_pieces_not_joined_at_each_token(then: str) -> None:
    """Until what follows <tool_call> says whether it is a call (a JSON object) or text, the held
    text was joined again at every token: a model writing newlines there copied all of them per
    token (quadratic). They are kept as pieces, joined once; the reading is as before."""
    parser = ToolParser("hermes")
    assert parser.feed("<tool_call>") == ("", [])
    for _ in range(1000):
        assert parser.feed("\n") == ("", [])
    assert parser._held == "" and len(parser._pieces) == 1000
    content, calls = joined(parser.feed(then), parser.finish())
    text = "<tool_call>" + "\n" * 1000 + then
    assert (content, [(n, a) for _, n, a in calls]) == read("hermes", [text])[:2]
    assert (content, calls) == (("", [(0, *PING)]) if then.startswith("{") else (text, []))


def test_text_after_llama3_json_calls_or_instead_of_them_streams_as_it_comes() -> None:
    """An output that began as calls and then held an object that is none, or began as a JSON
    object that is no call (a JSON answer with tools on), was held to the end and given out at the
    finish: nothing streamed meanwhile. It goes out once it is known to be text, then as it comes."""
    parser = ToolParser("llama3_json")
    said = [parser.feed(piece) for piece in [LLAMA_ONE, "; ", '{"temperature": 3}', *["word "] * 1000]]
    assert said[2] == (' {"temperature": 3}', []) and said[3:] == [("word ", [])] * 1000
    assert parser._held == "" and not parser._pieces and parser.finish() == ("", [])
    _, _, said = read("llama3_json", ['\n{"temperature"', ": 3}", " is", " the answer"])
    assert said == ["", '\n{"temperature": 3}', " is", " the answer", ""]


@pytest.mark.parametrize(
    ("kind", "opening", "closing"),
    [
        ("hermes", '<tool_call>{"name": "f", "arguments": {"s": "', '"}}</tool_call>'),
        ("llama3_json", '{"name": "f", "parameters": {"s": "', '"}}'),
        ("mistral", '[TOOL_CALLS]f{"s": "', '"}'),
    ],
)
def test_an_empty_piece_does_not_join_an_open_call(kind: str, opening: str, closing: str) -> None:
    """A token that completes no character (an emoji's or a CJK character's first bytes) or that a
    stop string holds still has its event, with no text: each joined the open call's pieces,
    so an argument of such characters was copied at every other token again (a review of the
    pieces' change). Nothing new closes nothing: kept as it was; checked by what is kept."""
    parser = ToolParser(kind)
    assert parser.feed(opening) == ("", [])
    held = len(parser._held)
    for _ in range(1000):
        assert parser.feed("日本😀") == ("", []) and parser.feed("") == ("", [])
    assert len(parser._held) == held and len(parser._pieces) == 1000  # none joined yet
    assert joined(parser.feed(closing), parser.finish()) == ("", [(0, "f", arguments_json({"s": "日本😀" * 1000}))])


@pytest.mark.parametrize("then", ['{"name": "ping", "parameters": {}}', "Hi.", "<|python", ""])
def test_llama3_json_whitespace_before_its_start_is_not_held_and_scanned_at_each_token(then: str) -> None:
    """An output that opens with whitespace (a model writing newlines, as far as max_tokens) was
    held whole, joined and stripped again at every token until its first other character: 40k
    newlines took 0.7 s of the gateway's loop (the reasoning parser's fault of the same kind, fixed
    there). Checked by what is held, not by the clock; the output reads as before, whole and streamed."""
    parser = ToolParser("llama3_json")
    for _ in range(1000):
        assert parser.feed("\n") == ("", [])
    assert parser._held == ""
    text = "\n" * 1000 + then
    content, calls = joined(parser.feed(then), parser.finish())
    want = ("", [PING]) if then.startswith("{") else (text, [])
    assert (content, [(n, a) for _, n, a in calls]) == read("llama3_json", [text])[:2] == want


def test_an_output_ending_in_a_string_is_read_again_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its calls closing at their first tag, each read again from there to its end: a model
    repeating '<tool_call>{"\\"</tool_call>' (each call's rest one string) made the reading
    quadratic, 100 kB took 9 s of the gateway's loop. After one such fall back the output's calls
    close at their tag, strings or not: what the scan reads stays within twice the output."""
    looked, find = [0], TagEnd.find

    def counted(self: TagEnd, text: str, begin: int) -> int | None:
        at = find(self, text, begin)  # what a look reads: to its tag's end, or to the text's
        looked[0] += (len(text) if at is None else at + len(self.tag)) - begin
        return at

    monkeypatch.setattr(TagEnd, "find", counted)
    text = '<tool_call>{"\\"</tool_call>' * 1000 + PING_CALL
    assert read("hermes", [text])[:2] == (text.removesuffix(PING_CALL), [PING]) and looked[0] <= 2 * len(text)
    looked[0], text = 0, (UNESCAPED + SAY_CALL) * 300  # a call's tags flipped back: read again once too
    assert len(read("hermes", [text])[1]) == 300 and looked[0] <= 2 * len(text)
