"""The ``granite`` tool-call format (vLLM's ``--tool-call-parser granite``: Granite 3.0 and 3.1):
an output that is a JSON array of calls ``{"name": ..., "arguments": {...}}``, after Granite 3.0's
``<|tool_call|>`` or 3.1's ``<tool_call>`` (either, both in that order, or neither; whitespace
around). Pure; ``ToolParser("granite")`` runs it, whole and streamed alike. Also Granite 20B
FunctionCalling's ``<function_call> {...}`` per call (``FunctionCallReader``, "granite-20b-fc").

As vLLM's: an output that does not begin so is text (given out as it comes once its start says
so), and what follows the array is not content. Each call goes out as its item of the array ends,
before the array closes; an array whose first item is no call is text as written (vLLM's is text
where any item is none: here an item after a call is passed over, as the other parsers do). An
array cut short keeps the calls it finished; none, and it is the text as written. An empty array
(``<|tool_call|>[]``) makes no call: text as written, as vLLM PR #53297 answers it (it was null
content, an empty turn). No quotes check (``tool_scan.NextTag``): no tag comes between items for a
string to take in, and an item whose quotes are unsound (``"5" inches"``) makes the rest a string
with no tag to end it at: text, as vLLM's ``json.loads`` reads it, the calls before it kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dlora.services.gateway.tool_base import Call, decoded_call, joined, partial_tag
from dlora.services.gateway.tool_json import loads
from dlora.services.gateway.tool_scan import NextTag, ObjectEnd

_TAGS = ("<|tool_call|>", "<tool_call>")  # in this order, each at most once


@dataclass
class GraniteReader:
    """One choice's output (``feed`` each piece, then ``finish``); ``calls`` is the parser's, shared."""

    calls: list[tuple[str, str]] = field(default_factory=list)
    _written: list[str] = field(default_factory=list)  # the output as written, while it may be text
    _head: str = ""  # undecided: the start read so far, less whitespace and the tags passed
    _tags: int = 0  # how many of _TAGS the start may still hold (from the last)
    _plain: bool = False  # the output is text: each piece goes out as it comes
    _inside: bool = False  # within the array
    _closed: bool = False  # the array ended: what follows is no content
    _text: str = ""  # within the array: from the item being read (or the space before it)
    _pieces: list[str] = field(default_factory=list)  # what follows _text while an item stays open
    _scan: ObjectEnd = field(default_factory=ObjectEnd)  # the item being read

    def feed(self, text: str) -> tuple[str, list[Call]]:
        if self._plain:
            return text, []
        if self._closed or not text:
            return "", []
        if not self.calls:
            self._written.append(text)  # (kept in pieces: joined only where it turns out text)
        if not self._inside:
            if not self._opened(text):
                return self._text_as_written() if self._plain else "", []
        elif self._scan.read and self._scan.open_through(text):
            self._pieces.append(text)  # (an open item is not joined again at every token)
            return "", []
        else:
            self._text = "".join([self._text, *self._pieces, text])
            self._pieces.clear()
        return self._items()

    def finish(self) -> tuple[str, list[Call]]:
        if self._plain or self._closed or self.calls:
            return "", []
        return self._text_as_written(), []  # undecided, or an array cut short before any call

    def _opened(self, text: str) -> bool:
        """Whether the output's start, ``text`` added, opens the array (then _text holds it from
        its "["); else undecided, or text (``_plain``)."""
        head = self._head + text
        while True:
            head = head.lstrip()
            tag = next((t for t in _TAGS[self._tags :] if head.startswith(t)), None)
            if tag is None:
                break
            head, self._tags = head[len(tag) :], _TAGS.index(tag) + 1
        if not head or any(t.startswith(head) for t in _TAGS[self._tags :]):
            self._head = head  # (short: a tag's start at most)
            return False
        self._head, self._plain = "", not head.startswith("[")
        if self._plain:
            return False
        self._inside, self._text = True, head[1:]
        return True

    def _items(self) -> tuple[str, list[Call]]:
        """The calls whose items ended in _text; text where the first item is no call. Read by
        an index: a burst of calls in one piece is not copied per call."""
        out: list[Call] = []
        text, at = self._text, 0
        while True:
            while at < len(text) and text[at] in " \t\r\n,":
                at += 1
            if at == len(text):
                self._text = ""
                return "", out
            if text[at] != "{":  # the array's end, or an item that is no object
                if not self.calls:
                    return self._text_as_written(), out
                self._closed, self._text = True, ""
                return "", out
            if (end := self._scan.find(text, at)) is None:
                self._text = text[at:]  # (the scan's place counts from the item's start)
                return "", out
            try:
                call = decoded_call(loads(text[at:end]), ("arguments",))
            except ValueError:
                call = None
            if call is None and not self.calls:
                return self._text_as_written(), out
            if call is not None:
                out.append((len(self.calls), *call))
                self.calls.append(call)
            at = end

    def _text_as_written(self) -> str:
        """The output so far, as written: from now on each piece goes out as it comes."""
        self._plain, self._inside = True, False
        text, self._written = "".join(self._written), []
        return text


_FUNCTION_CALL = "<function_call>"  # granite-20b-fc's, before each call
_SPACE_ROOM = 64  # whitespace a call may hold between its tag and its object (more: the tag is text)


@dataclass
class FunctionCallReader:
    """The ``granite-20b-fc`` format (vLLM's ``--tool-call-parser granite-20b-fc``: Granite 20B
    FunctionCalling): ``<function_call> {"name": ..., "arguments": {...}}``, once per call. The
    text before the first tag is content, what follows a call is not (vLLM's whole reading); a
    tag not followed by a call is text where no call came before. A call cut short is none. A tag
    read inside a call's string ends the call where its quotes are unsound (``tool_scan.NextTag``),
    or where the output ends inside the call.
    ``calls`` is the parser's, shared."""

    calls: list[tuple[str, str]] = field(default_factory=list)
    _held: str = ""  # text not yet given out: a tag's possible start, or a call from its tag
    _inside: bool = False  # _held begins with a tag
    _pieces: list[str] = field(default_factory=list)  # what follows _held while a call's object stays open
    # where the call's object ends: its braces, or a tag its unsound quotes made a string's
    _next: NextTag = field(default_factory=lambda: NextTag(_FUNCTION_CALL))

    def feed(self, text: str) -> tuple[str, list[Call]]:
        if not text:
            return "", []
        if self._inside and self._next.open and self._next.open_through(text):
            self._pieces.append(text)  # (an open call is not joined again at every token)
            return "", []
        self._held = "".join([self._held, *self._pieces, text])
        self._pieces.clear()
        return self._read()

    def finish(self) -> tuple[str, list[Call]]:
        content, out = self._read_joined() if self._pieces else ("", list[Call]())
        while self._inside and self._next.output_ended():  # (as mistral's end)
            content, out = joined((content, out), self._read())
        rest, self._held, self._inside = self._held, "", False
        return content + ("" if self.calls else rest), out

    def _read_joined(self) -> tuple[str, list[Call]]:
        self._held = "".join([self._held, *self._pieces])
        self._pieces.clear()
        return self._read()

    def _read(self) -> tuple[str, list[Call]]:
        content, out, held, at = "", list[Call](), self._held, 0
        while True:
            if not self._inside:
                tag = held.find(_FUNCTION_CALL, at)
                end = tag if tag >= 0 else len(held) - partial_tag(held, _FUNCTION_CALL, at)
                content += held[at:end] if not self.calls else ""
                if tag < 0:
                    self._held = held[end:]
                    return content, out
                at, self._inside = tag, True
            start = at + len(_FUNCTION_CALL)
            window = held[start : start + _SPACE_ROOM + 1]
            first = start + len(window) - len(window.lstrip(" \t\r\n"))
            if first == len(held):
                self._held = held[at:]  # (only whitespace after the tag yet)
                return content, out
            if first - start > _SPACE_ROOM or held[first] != "{":  # no call: the tag is text
                content += _FUNCTION_CALL if not self.calls else ""
                at, self._inside = start, False
                continue
            if (close := self._next.end(held, first)) is None:
                self._held = held[at:]  # (the scan's place counts from the object's start, which keeps its offset)
                return content, out
            try:
                call = decoded_call(loads(held[first:close]), ("arguments",))
            except ValueError:
                call = None
            if call is not None:
                out.append((len(self.calls), *call))
                self.calls.append(call)
            elif not self.calls:
                content += held[at:close]  # not a call: the text as written
            at, self._inside = close, False
