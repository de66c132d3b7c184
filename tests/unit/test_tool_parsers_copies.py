"""The tool parsers' cost measured by the work itself: how many characters of the held text are
copied, for an output of many calls (not by the clock: speed lives in the benchmarks)."""

from __future__ import annotations

import random

import pytest

from dlora.services.gateway.tool_base import joined
from dlora.services.gateway.tool_json import arguments_json
from dlora.services.gateway.tool_parsers import ToolParser
from dlora.services.gateway.tool_pythonic import PythonicReader


class Counted(ToolParser):
    """A parser that sums the lengths of the texts it holds (each a copy)."""

    copied: int = 0

    def __setattr__(self, name: str, value: object) -> None:
        if name == "_held" and isinstance(value, str):
            object.__setattr__(self, "copied", self.copied + len(value))
        super().__setattr__(name, value)


N = 400
MANY = {
    "hermes": "Sure.\n"
    + "".join(f'<tool_call>{{"name": "f", "arguments": {{"i": {i}}}}}</tool_call>\n' for i in range(N)),
    "mistral": "Sure." + "".join(f'[TOOL_CALLS]f{{"i": {i}}}' for i in range(N)),
    "llama3_json": "<|python_tag|>" + "; ".join(f'{{"name": "f", "parameters": {{"i": {i}}}}}' for i in range(N)),
}
CONTENT = {"hermes": "Sure.\n", "mistral": "Sure.", "llama3_json": ""}
CALLS = [(i, "f", arguments_json({"i": i})) for i in range(N)]


def read(parser: ToolParser, pieces: list[str]) -> tuple[str, list[tuple[int, str, str]]]:
    return joined(*(parser.feed(piece) for piece in pieces), parser.finish())


@pytest.mark.parametrize("kind", sorted(MANY))
def test_many_calls_in_one_delta_copy_the_held_text_a_bounded_number_of_times(kind: str) -> None:
    """A review: each call read copied the rest of the held text (sliced off its front), so an
    output of many calls in one delta (a whole answer, or a burst) cost the square of its length
    (800 kB: 0.6 s of the gateway's loop). The held text is read from an index instead."""
    parser, text = Counted(kind), MANY[kind]
    content, calls = read(parser, [text])
    assert (content, calls) == (CONTENT[kind], CALLS)
    assert parser.copied <= 3 * len(text)  # (it was about N/2 times its length)


@pytest.mark.parametrize("kind", sorted(MANY))
def test_many_calls_read_alike_in_pieces_of_any_length(kind: str) -> None:
    """The index into the held text, and the scans' own (ObjectEnd's relative to its start,
    TagEnd's absolute), move alike when the text read is dropped: a stream cut anywhere answers as
    the whole, with text between the calls too."""
    text = MANY[kind].replace("; {", ";\n<|python_tag|>{").replace("\n<tool_call>", "\n x <tool_call>")
    whole = read(ToolParser(kind), [text])
    assert whole[1] == CALLS
    rng = random.Random(kind)
    for _ in range(10):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, 200)))
        parser = Counted(kind)
        assert read(parser, [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]) == whole
        assert parser.copied <= 3 * len(text)


class CountedPythonic(PythonicReader):
    """pythonic's reader, summing the lengths of the texts it holds (each a copy)."""

    copied: int = 0

    def __setattr__(self, name: str, value: object) -> None:
        if name == "_held" and isinstance(value, str):
            object.__setattr__(self, "copied", self.copied + len(value))
        super().__setattr__(name, value)


@pytest.mark.parametrize("quote", ["'", "'''"])
def test_a_long_pythonic_call_streamed_is_not_copied_at_every_token(quote: str) -> None:
    """A review: the item being read (a call's long argument: a file written by Llama 3.2 or 4)
    was held by ``+=``, a copy of all of it at every token: 40 kB streamed in pieces of 4 copied
    200 M characters. A piece that leaves the item open is kept apart, scanned on its own."""
    text = f"[write(path='a.py', content={quote}" + "x = 1; " * 4000 + f"{quote}), ping()]"
    reader = CountedPythonic()
    content, calls = joined(*(reader.feed(text[i : i + 4]) for i in range(0, len(text), 4)), reader.finish())
    assert (content, [name for _, name, _ in calls]) == ("", ["write", "ping"])
    assert calls[0][2] == arguments_json({"path": "a.py", "content": "x = 1; " * 4000})
    assert reader.copied <= 3 * len(text)
