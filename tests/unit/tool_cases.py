"""What the tool-call parser tests share: an output read by a parser from given pieces, and the
ways to cut an output into pieces (whole, a character at a time, random pieces as a batched
detokenizer or speculative decoding gives them)."""

from __future__ import annotations

import json
import random

import pytest

from dlora.services.gateway import tool_scan
from dlora.services.gateway.tool_parsers import ToolParser

PING = ("ping", "{}")
PING_CALL = '<tool_call>{"name": "ping", "arguments": {}}</tool_call>'
UNESCAPED = '<tool_call>{"name": "find", "arguments": {"q": "5" inches"}}</tool_call>'  # a quote left unescaped


def read(kind: str, pieces: list[str]) -> tuple[str, list[tuple[str, str]], list[str]]:
    """Content, calls (name, arguments JSON), and the content given out at each piece (then at the finish)."""
    parser = ToolParser(kind)
    content, calls, said = "", [], []
    for piece in pieces:
        text, new = parser.feed(piece)
        content, calls, said = content + text, calls + new, [*said, text]
    text, new = parser.finish()
    assert [k for k, _, _ in calls + new] == list(range(len(calls + new)))
    return content + text, [(n, a) for _, n, a in calls + new], [*said, text]


def read_decoded(kind: str, pieces: list[str]) -> tuple[str, list[tuple[str, object]]]:
    """Content and calls, their arguments decoded (a test states them as Python values)."""
    content, calls, _ = read(kind, pieces)
    return content, [(name, json.loads(arguments)) for name, arguments in calls]


def splits(text: str, seed: int) -> list[list[str]]:
    """``text`` whole, a character at a time, and cut at random in 60 ways (seeded)."""
    rng = random.Random(seed)
    out = [[text], list(text)]
    for _ in range(60):
        cuts = sorted(rng.sample(range(1, len(text)), k=min(rng.randint(1, 12), len(text) - 1)))
        out.append([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])])
    return out


def counting_braces(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A counter (its one item) of the characters the parsers' quoted-tag check counts braces in
    from now on (``tool_scan.brace_balance``): each at most once per call is the bound to test."""
    counted = [0]
    balance = tool_scan.brace_balance

    def counting(text: str, start: int, end: int) -> int:
        counted[0] += end - start
        return balance(text, start, end)

    monkeypatch.setattr(tool_scan, "brace_balance", counting)
    return counted
