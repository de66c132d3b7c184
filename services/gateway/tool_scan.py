"""Where a JSON call ends in a growing text, each character read once across looks (a call decoded
or searched again at every token took a minute of the gateway's loop for a 140 kB call): the
object's closing brace (``ObjectEnd``), or a closing tag outside its strings (``TagEnd``); and the
check the parsers share for a tag inside a call's strings where its quotes are unsound
(``QuotesCheck``, ``QuotedTag``, ``NextTag``). Pure."""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass
class ObjectEnd:
    """Where the JSON object (or array) a growing text begins with closes, each character read
    once across looks: a call decoded again at every token took a minute of the gateway's loop for
    a 140 kB call. Braces and brackets are counted outside strings (a backslash escapes one
    character); what is between is left to the decoder."""

    read: int = 0  # characters of the object read so far (0: between objects)
    depth: int = 0
    in_string: bool = False
    escaped: bool = False

    def find(self, text: str, start: int = 0) -> int | None:
        """The index after the close of the object at ``text[start]``, or None (not yet). Found,
        the next look starts a new object."""
        if (end := self._walk(text, start + self.read)) is not None:
            self.read = 0
            return end
        self.read = len(text) - start
        return None

    def open_through(self, piece: str) -> bool:
        """Whether the object stays open through ``piece``, the text that follows what was read:
        then it is read (kept by the caller as a piece, not joined to the rest to be looked at);
        else nothing is, and ``find`` looks at it in the joined text."""
        before = self.depth, self.in_string, self.escaped
        if self._walk(piece, 0) is None:
            self.read += len(piece)
            return True
        self.depth, self.in_string, self.escaped = before
        return False

    def _walk(self, text: str, begin: int) -> int | None:
        for i in range(begin, len(text)):
            char = text[i]
            if self.in_string:
                self.escaped, self.in_string = not self.escaped and char == "\\", self.escaped or char != '"'
            elif char == '"':
                self.in_string = True
            elif char in "{[":
                self.depth += 1
            elif char in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return i + 1
        return None


@dataclass
class TagEnd:
    """Where a tag (``</tool_call>``) comes outside the JSON strings of a growing text, each
    character read once across looks: an argument quoting it (a file-editing tool, a RAG passage)
    was cut there, the call given out as text (vLLM #45167; PRs #48353/#55848). The tag's first
    character occurs in it once: a mismatch restarts the match at that character alone. A look
    jumps (a regex's search, in C) to the characters that matter, as vLLM #55848's does: a quote, a
    backslash in a string, the tag's first character outside one. Walked one by one in Python, a
    1 MB argument took 0.24 s of the gateway's loop whole (0.003 s before strings were minded) and
    0.86 s streamed (a review)."""

    tag: str
    in_string: bool = False
    escaped: bool = False
    matched: int = 0  # the tag's characters matched at the end of what was read
    quotes: bool = True  # False: the tag wherever it comes, strings or not (a text whose quotes are untrustworthy)
    # True: a tag inside a string stops a look too (``quoted`` says so), for the caller to judge
    literal: bool = False
    quoted: bool = False  # the tag the last look found is inside a string
    # where a look stops outside a string: a quote, or where the tag may begin
    _stops: re.Pattern[str] = field(init=False, repr=False, compare=False)

    _in_string_stops: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._stops = re.compile("[" + re.escape('"' * self.quotes + self.tag[0]) + "]")
        # in a string: its end, an escape; literal, the tag too, or its start where the text ends
        starts = "|".join(re.escape(self.tag[:k]) for k in range(len(self.tag) - 1, 0, -1))
        literal = ("|" + re.escape(self.tag) + (f"|(?:{starts})\\Z" if starts else "")) * self.literal
        self._in_string_stops = re.compile('["\\\\]' + literal)

    def find(self, text: str, begin: int) -> int | None:
        """Where the tag starts in ``text`` read from ``begin`` (where the last look ended), or None."""
        tag, n, end, i = self.tag, len(self.tag), len(text), begin
        self.quoted = False
        while i < end:
            if self.escaped:  # (the character after a backslash, whatever it is)
                self.escaped, i = False, i + 1
            elif self.in_string and self.matched:  # (literal: within a possible tag in a string)
                if text[i] != tag[self.matched]:
                    self.matched = 0  # (that character read again as the string's)
                    continue
                self.matched, i = self.matched + 1, i + 1
                if self.matched == n:
                    self.matched, self.quoted = 0, True
                    return i - n
            elif self.in_string:
                if (stop := self._in_string_stops.search(text, i)) is None:
                    return None
                at, i = stop.span()
                if text[at] not in '"\\':  # (literal) the tag, or its start at the text's end
                    if i - at == n:
                        self.quoted = True
                        return at
                    self.matched = i - at
                    return None
                self.escaped = self.in_string = text[at] == "\\"
            elif self.matched:  # within a possible tag: its characters one by one (at most its length)
                char, i = text[i], i + 1
                if char == '"' and self.quotes:
                    self.in_string, self.matched = True, 0
                elif char == tag[self.matched]:
                    self.matched += 1
                    if self.matched == n:
                        self.matched = 0
                        return i - n
                else:
                    self.matched = 1 if char == tag[0] else 0
            elif (stop := self._stops.search(text, i)) is None:
                return None
            else:
                i = stop.end()
                self.in_string = text[i - 1] == '"'
                self.matched = 0 if self.in_string else 1
                if self.matched == n:  # (a tag of one character)
                    self.matched = 0
                    return i - n
        return None

    def open_through(self, piece: str) -> bool:
        """Whether no tag ends in ``piece`` (what follows the text read): read then, else left to ``find``."""
        before = self.in_string, self.escaped, self.matched
        if self.find(piece, 0) is None:
            return True
        self.in_string, self.escaped, self.matched = before
        self.quoted = False
        return False


# A JSON string's characters up to its closing quote (or the text's end, or a backslash it ends at)
_STRING_BODY = re.compile(r'[^"\\]*(?:\\.[^"\\]*)*', re.S)


# The brackets between a JSON text's strings (what a look at them needs, found in C)
_BRACKETS = re.compile(r"[{}\[\]]")


@dataclass
class QuotesCheck:
    """Whether a growing JSON text's quotes are unsound: a string closed where JSON lets none close,
    what follows it not what its place needs (``{"q": "5" inches"}``, a quote the model left
    unescaped; a value's string followed by ":", ``{"t": "a ":"}}``, as a key's is), or opened
    where JSON lets none open, what comes before it not "{", "[", ":" or "," (``{"q": 5"}``, a
    stray quote after a value). A key (a string opened right after an object's "{" or ",") must be
    followed by ":", a value by ",", "}" or "]". A tag read inside a string of a text whose quotes
    are sound is the string's (an argument quoting it); of one whose quotes are not, it may close
    the call. Each character is read once across looks; strings are skipped by a regex (in C)."""

    read: int = 0  # characters of the text read so far
    in_string: bool = False
    after_string: bool = False  # a string closed: what comes next (whitespace passed) is checked
    last: str = ""  # the last character outside strings and whitespace ("": none yet)
    broken: bool = False
    key: bool = False  # the string being read (or just closed) is an object's key
    # the objects and arrays open around what is read, innermost last: "{" or "["
    open: list[str] = field(default_factory=list)

    def look(self, text: str, start: int, end: int) -> bool:
        """Whether ``text[start:end]`` (the text from its start; ``read`` of it already looked at)
        has shown unsound quotes."""
        i = start + self.read
        while not self.broken and i < end:
            if self.in_string:
                i = match.end() if (match := _STRING_BODY.match(text, i, end)) else i
                if i == end or text[i] != '"':  # (its end not come; or a backslash the look ends after)
                    break
                self.in_string, self.after_string, i = False, True, i + 1
            elif self.after_string and text[i] in " \t\r\n":
                i += 1
            elif self.after_string:  # (the character is then read as any outside a string)
                self.broken, self.after_string = text[i] != ":" if self.key else text[i] not in ",}]", False
            else:
                quote = text.find('"', i, end)
                stop = end if quote < 0 else quote
                for bracket in _BRACKETS.finditer(text, i, stop):
                    if bracket[0] in "{[":
                        self.open.append(bracket[0])
                    elif self.open:
                        self.open.pop()
                self.last = text[i:stop].rstrip(" \t\r\n")[-1:] or self.last
                if quote < 0:
                    i = end
                else:
                    self.broken, self.in_string, i = self.last not in ("", "{", "[", ":", ","), True, quote + 1
                    self.key = bool(self.open) and self.open[-1] == "{" and self.last in "{,"
        self.read = i - start
        return self.broken


def brace_balance(text: str, start: int, end: int) -> int:
    """The "{" less the "}" in ``text[start:end]`` (no copy of it)."""
    return text.count("{", start, end) - text.count("}", start, end)


@dataclass
class QuotedTag:
    """Whether a call's tag read inside one of its JSON strings closes the call all the same: the
    call's object closed before it (its braces, strings not minded, balanced; a "}" last before
    the tag, whitespace passed) and its quotes unsound (``QuotesCheck``). A quote the model left
    unescaped ("5" inches") made the rest of the output one string, so a stream held it all,
    silent, to its end. An argument that quotes the tag right after closing braces
    ('{"s": "}}</tool_call>"}') balances them there too: its quotes are sound, the tag stays the
    argument's (vLLM's hermes before #55848 cut every quoted tag). One per call; each character is
    counted once across looks. The check hermes, mistral and granite-20b-fc share."""

    _braces: int = 0  # the "{" less the "}" counted so far (strings not minded)
    _counted: int = 0  # how far from the call's start they are counted
    _quotes: QuotesCheck = field(default_factory=QuotesCheck)

    def closes(self, text: str, start: int, end: int) -> bool:
        """Whether the tag at ``text[end]`` closes the call whose object begins at ``text[start]``
        (``start`` the same at every look, or moved with the text's start)."""
        return self.balanced(text, start, end) and self.unsound(text, start, end)

    def unsound(self, text: str, start: int, end: int) -> bool:
        """Whether the call's quotes before ``text[end]`` are unsound (``QuotesCheck``)."""
        return self._quotes.look(text, start, end)

    def balanced(self, text: str, start: int, end: int) -> bool:
        """Whether the call's object may have closed before the tag at ``text[end]``: its braces
        balanced, a "}" last (its quotes not asked)."""
        self._braces += brace_balance(text, start + self._counted, end)
        self._counted = end - start
        last = end
        while last > start and text[last - 1] in " \t\r\n":  # (back over the space since the last tag at most)
            last -= 1
        return self._braces == 0 and last > start and text[last - 1] == "}"


@dataclass
class NextTag:
    """Where a call's JSON object ends in a growing text: where it closes (``scan``), or, where it
    has not, at the next call's tag read inside what its quotes made a string (``QuotedTag``):
    mistral's ``[TOOL_CALLS]``, granite-20b-fc's ``<function_call>``, as hermes' ``</tool_call>``.
    The call is then no call (its text is not JSON) and the next one is read from its tag, whole
    and streamed alike: else the rest of the output, its calls too, was the broken call's, the
    stream silent to its end. It ends at the first tag its object may have closed before
    (``QuotedTag.balanced``), not at the one where its quotes showed unsound: an escaped closing
    quote ("C:\\") shows only at a later tag, the calls between were taken into it. One per
    reader: each call's object restarts it (``end``); each character is read once across looks.
    ``literal``: the first tag ends the call, the check not asked (the output ended inside its
    object, which a later tag cannot belong to whole: ``output_ended``, as hermes' end reads it,
    ``ToolParser._finish``)."""

    tag: str
    literal: bool = field(default=False, init=False)  # the look is literal (``output_ended``)
    read: int = 0  # characters from the object's start looked at for the tag
    first: int | None = None  # where the first tag its object may have closed before is, from its start
    scan: ObjectEnd = field(default_factory=ObjectEnd)  # the call's object: where it closes
    _find: TagEnd = field(init=False)
    _check: QuotedTag = field(default_factory=QuotedTag)

    def __post_init__(self) -> None:
        self._restart(False)

    def _restart(self, literal: bool) -> None:
        """A new look for the tag from the object's start (its scan kept)."""
        self.literal, self.read, self.first, self._check = literal, 0, None, QuotedTag()
        self._find = TagEnd(self.tag, quotes=False)  # (the tag wherever it comes: strings are the check's)

    @property
    def open(self) -> bool:
        """Whether a call's object is being read: begun, neither closed nor cut."""
        return self.scan.read > 0

    def end(self, text: str, start: int) -> int | None:
        """Where the call whose object begins at ``text[start]`` ends: its object's close, or the
        next call's tag its unsound quotes took in (``find``); None: not yet (``start`` the same
        at every look, or moved with the text's start). Found, the next look begins a new call."""
        if not self.scan.read:  # (a call's object begins: a tag inside it is looked at from there)
            self._restart(False)
        close = self.scan.find(text, start)
        if (cut := self.find(text, start, close)) is None:
            return close
        self.scan = ObjectEnd()  # its quotes unsound: it ends at the next call's tag
        return cut

    def output_ended(self) -> bool:
        """The output ended inside a call's object: a quote or backslash left unescaped ("C:\\")
        made the rest a string, or a brace was left open, the calls after it none. From now on its
        first tag ends it (True: the caller reads the text again, as hermes' end reads its first
        tag); False where no object is open, or its first tag already ends it."""
        if not self.open or self.literal:
            return False
        self._restart(True)
        return True

    def find(self, text: str, start: int, close: int | None) -> int | None:
        """Where the call whose object begins at ``text[start]`` ends at a tag before ``close``
        (where its object closes; None: not yet), or None."""
        limit = len(text) if close is None else close
        while (at := self._find.find(text, start + self.read)) is not None and at < limit:
            self.read = at + len(self.tag) - start
            if self.literal:
                return at
            if self._check.balanced(text, start, at):
                self.first = at - start if self.first is None else self.first
                if self._check.unsound(text, start, at):
                    return start + self.first
        self.read = len(text) - start
        return None

    def open_through(self, piece: str) -> bool:
        """Whether the call stays open through ``piece`` (what follows the text read): no tag ends
        in it and its object does not close; then both looks have read it (the caller keeps it as
        a piece), else neither has."""
        matched = self._find.matched  # (a literal look's one state)
        if not self._find.open_through(piece):
            return False
        if not self.scan.open_through(piece):
            self._find.matched = matched
            return False
        self.read += len(piece)
        return True
