"""Where a hermes call's closing tag comes outside its JSON strings (``TagEnd``): the same answers
as a walk of every character, with work that grows with the characters that matter, not all."""

from __future__ import annotations

import random
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Any

import pytest

from dlora.services.gateway import tool_scan
from dlora.services.gateway.tool_scan import TagEnd

TAG = "</tool_call>"


@dataclass
class Walk:
    """The walk TagEnd made before it jumped: every character read in Python (the reference)."""

    tag: str
    in_string: bool = False
    escaped: bool = False
    matched: int = 0

    def find(self, text: str, begin: int) -> int | None:
        tag, n = self.tag, len(self.tag)
        for i in range(begin, len(text)):
            char = text[i]
            if self.in_string:
                self.escaped, self.in_string = not self.escaped and char == "\\", self.escaped or char != '"'
            elif char == '"':
                self.in_string, self.matched = True, 0
            elif char == tag[self.matched]:
                self.matched += 1
                if self.matched == n:
                    self.in_string, self.escaped, self.matched = False, False, 0
                    return i + 1 - n
            else:
                self.matched = 1 if char == tag[0] else 0
        return None

    def open_through(self, piece: str) -> bool:
        before = self.in_string, self.escaped, self.matched
        if self.find(piece, 0) is None:
            return True
        self.in_string, self.escaped, self.matched = before
        return False


# what a model's call may hold where the scan's answer turns: quotes, escapes, tags whole and cut
BITS = ['"', "\\", '\\"', "\\\\", TAG, TAG[:5], TAG[3:], "<", "</", "<tool_call>", "a", " ", "{", "}", "é", "\n"]


def state(scan: TagEnd | Walk) -> tuple[bool, bool, int]:
    return scan.in_string, scan.escaped, scan.matched


def test_a_scan_blind_to_quotes_finds_the_tag_wherever_it_comes() -> None:
    """quotes=False (a hermes output whose quotes were found untrustworthy): the first tag, as
    str.find answers, looked at piece by piece and as the text grows."""
    rng = random.Random(45167)
    for _ in range(2000):
        text = "".join(rng.choice(BITS) for _ in range(rng.randint(1, 40)))
        want = text.find(TAG)
        assert TagEnd(TAG, quotes=False).find(text, 0) == (want if want >= 0 else None), text
        scan, read, found = TagEnd(TAG, quotes=False), 0, None
        for cut in sorted(rng.sample(range(1, len(text) + 1), min(len(text), rng.randint(1, 8)))):
            if (found := scan.find(text[:cut], read)) is not None:
                break
            read = cut
        if found is None:  # no tag whole in what was read
            assert want < 0 or want + len(TAG) > read, text
        else:
            assert found == want, text


def test_the_jumping_scan_answers_as_the_walk_of_every_character() -> None:
    """A fuzz: random outputs of quotes, escapes and tags inside and outside strings, read whole,
    read as it grows (each look from where the last ended, as the hermes reading looks), and piece
    by piece through open_through: each answer and each state after it is the walk's."""
    rng = random.Random(55848)
    for _ in range(3000):
        text = "".join(rng.choice(BITS) for _ in range(rng.randint(1, 40)))
        new, old = TagEnd(TAG), Walk(TAG)
        assert new.find(text, 0) == old.find(text, 0) and state(new) == state(old), text
        cuts = sorted(rng.sample(range(1, len(text) + 1), min(len(text), rng.randint(1, 8))))
        new, old, read = TagEnd(TAG), Walk(TAG), 0
        for cut in cuts:  # the held text grows; the look resumes where it ended, past a found tag
            found = new.find(text[:cut], read)
            assert found == old.find(text[:cut], read) and state(new) == state(old), (text, read)
            read = cut if found is None else found + len(TAG)
        new, old = TagEnd(TAG), Walk(TAG)
        for a, b in zip([0, *cuts], cuts):
            assert new.open_through(text[a:b]) == old.open_through(text[a:b]) and state(new) == state(old), text


@contextmanager
def lines_run(path: str) -> Iterator[list[int]]:
    """Counts the Python lines run in the module at ``path``, whichever of its functions runs
    them: the work, not the clock (one function's alone read none where it handed its walk on)."""
    count = [0]

    def local(frame: FrameType, event: str, arg: object) -> Any:
        count[0] += event == "line"
        return local

    def calls(frame: FrameType, event: str, arg: object) -> Any:
        return local if frame.f_code.co_filename == path else None

    before = sys.gettrace()
    sys.settrace(calls)
    try:
        yield count
    finally:
        sys.settrace(before)


def test_the_line_count_sees_a_walk_of_every_character() -> None:
    """The counter's own check: the walk (this module's) of 10,000 characters runs some lines per
    character, and the jumping scan runs some at all (a counter that saw nothing would pass all)."""
    text = '"' + "x" * 10_000 + '" ' + TAG
    with lines_run(__file__) as walked:
        assert Walk(TAG).find(text, 0) == len(text) - len(TAG)
    with lines_run(tool_scan.__file__) as jumped:
        assert TagEnd(TAG).find(text, 0) == len(text) - len(TAG)
    assert walked[0] >= 2 * len(text) and 0 < jumped[0] < 400


@pytest.mark.parametrize("piece", [100_000, 64])
def test_a_long_argument_is_looked_at_where_it_matters_not_per_character(piece: int) -> None:
    """A review: TagEnd walked every character of a call in Python, a 1 MB argument read whole
    went from 0.003 s to 0.24 s of the gateway's loop, streamed in 4-character tokens from 0.52 s
    to 0.86 s. A look jumps to the quotes, escapes and tag starts: the lines run grow with those
    and with the looks, not with the argument's length (checked by the lines, not by the clock)."""
    body = '{"name": "write", "arguments": {"text": "' + "x" * 100_000 + ' \\" </tool_call> y"}}'
    scan = TagEnd(TAG)
    with lines_run(tool_scan.__file__) as count:
        if piece > len(body):
            assert scan.find(body + TAG, 0) == len(body)
        else:
            for a in range(0, len(body), piece):
                assert scan.open_through(body[a : a + piece])
            assert not scan.open_through(TAG)
    looks = -(-len(body) // piece) + 1
    assert 0 < count[0] <= 20 * looks + 200  # (a walk: some 4 lines per character, 400,000 and more)


@dataclass
class LiteralWalk(Walk):
    """The walk, a tag inside a string found too (``quoted``): every character read in Python."""

    quoted: bool = False

    def find(self, text: str, begin: int) -> int | None:
        self.quoted = False
        tag, n = self.tag, len(self.tag)
        for i in range(begin, len(text)):
            char = text[i]
            if self.in_string and (self.escaped or char in '"\\'):  # (no tag across an escape)
                self.escaped, self.in_string = not self.escaped and char == "\\", self.escaped or char != '"'
                self.matched = 0
            elif not self.in_string and char == '"':
                self.in_string, self.matched = True, 0
            elif char == tag[self.matched]:
                self.matched += 1
                if self.matched == n:
                    self.matched, self.quoted = 0, self.in_string  # (a string goes on past its tag)
                    return i + 1 - n
            else:
                self.matched = 1 if char == tag[0] else 0
        return None


def test_a_literal_scan_stops_at_a_tag_in_a_string_as_the_walk_does() -> None:
    """literal=True (hermes: a tag in a string may close a call whose quotes are unsound, the
    caller judges): it stops there too, saying so (``quoted``), whole, as the text grows, and
    piece by piece; each answer and state after it is the reference walk's."""
    rng = random.Random(4812)
    for _ in range(3000):
        text = "".join(rng.choice(BITS) for _ in range(rng.randint(1, 40)))
        new, old = TagEnd(TAG, literal=True), LiteralWalk(TAG)
        assert new.find(text, 0) == old.find(text, 0) and state(new) == state(old), text
        assert new.quoted == old.quoted, text
        cuts = sorted(rng.sample(range(1, len(text) + 1), min(len(text), rng.randint(1, 8))))
        new, old, read = TagEnd(TAG, literal=True), LiteralWalk(TAG), 0
        for cut in cuts:
            found = new.find(text[:cut], read)
            assert found == old.find(text[:cut], read) and state(new) == state(old), (text, read)
            assert new.quoted == old.quoted, text
            read = cut if found is None else found + len(TAG)
        new, old = TagEnd(TAG, literal=True), LiteralWalk(TAG)
        for a, b in zip([0, *cuts], cuts):
            assert new.open_through(text[a:b]) == old.open_through(text[a:b]) and state(new) == state(old), text


@pytest.mark.parametrize("filler", ["x", "<b>y</b> "])
def test_a_literal_scan_jumps_over_a_strings_other_characters(filler: str) -> None:
    """Tags looked for in strings too, its look still jumps (a regex, in C) past what is no quote,
    escape or tag: the lines run grow with the looks, not with the string's length or its "<"s
    (HTML an argument writes; a character-by-character match at each "<" doubled a stream's cost)."""
    body = '{"name": "write", "arguments": {"text": "' + filler * (100_000 // len(filler))
    scan = TagEnd(TAG, literal=True)
    with lines_run(tool_scan.__file__) as count:
        for a in range(0, len(body), 64):
            assert scan.open_through(body[a : a + 64])
    assert 0 < count[0] <= 20 * (len(body) // 64 + 1) + 200
