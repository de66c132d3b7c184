"""The ``pythonic`` tool-call format (vLLM's ``--tool-call-parser pythonic``: Llama 3.2, Llama 4,
ToolACE): a Python list of calls with keyword arguments, ``[get_weather(city='SF'), ping()]``.
Pure; ``ToolParser("pythonic")`` runs it, whole and streamed alike.

Read with Python's own parser (``ast``), literals only, never evaluated: strings (any quotes,
triple too), numbers (signed), ``True``/``False``/``None`` (and JSON's ``true``/``false``/``null``,
which models write there), lists, tuples (as lists) and dicts with string keys; what Python
refuses but a model means one way is read as meant (a reserved word as a keyword's name,
``from=``; a line break inside a one-line string: ``tool_pythonic_call.py``). A list begins at
``[name(`` that opens a line (text before it and a line break: vLLM's own plan for Llama 3.2; after
text, its first call names one of the request's tools), or
after Llama 4's ``<|python_start|>`` or ``<|python_tag|>`` (taken off); the text before the
first call is content, what follows it is not (as hermes'). Each call
goes out as its item of the list ends: streamed, before the list has closed. An item that is not
such a call (positional arguments, an expression) makes the list text where it is its first;
after a call it is passed over (``else'x'`` too), and where it turns to prose (a quote after a
word no operator, "see(Python's docs)", "nobody else's"; words side by side, "see the docs": ``_Prose``) the list
ends there and a later list is read. Comments are Python's: a quote in one opens no string. A
list cut short keeps the calls it finished (its last item too where that parses: a model that left
out the ``]``); none, and it is text as written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from keyword import iskeyword

from dlora.services.gateway.tool_base import Call, joined
from dlora.services.gateway.tool_pythonic_call import LINE_BREAK, SPACE, pythonic_call

_TAGS = ("<|python_start|>", "<|python_tag|>")  # Llama 4's and Llama 3's, before a list of calls
_NAME_ROOM = 64  # OpenAI's longest function name: a longer word after "[" is text
_SPACE_ROOM = 16  # whitespace a list's opening may hold (after the tag, "[", the name)
# A whole output is read in pieces of at most this many characters, as a stream's tokens are: the
# reader's looks are bounded by what it holds, and a 200 kB answer read at once (many "[" or short
# lists) took 12 s of the gateway's loop, every look a copy of the rest (a review)
_PIECE = 512
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_YES, _MAYBE, _NO = 0, 1, 2
_STRING_PREFIXES = {"r", "u", "b", "f", "br", "rb", "fr", "rf"}  # Python's (any case), before a quote
_OPERAND_WORDS = {"True", "False", "None"}  # the keywords that are values (the others are operators)


def _skip_space(text: str, j: int) -> int | None:
    """Past the whitespace at ``text[j]``; None where there is more than a list's opening holds."""
    start = j
    while j < len(text) and text[j] in SPACE:
        j += 1
    return j if j - start <= _SPACE_ROOM else None


def _opening(text: str, i: int) -> tuple[int, int]:
    """Whether ``text[i:]`` opens a list of calls (a tag, "[", a name, "("): (_YES, where its "["
    is), (_MAYBE, 0) where the text ends before it can tell, else (_NO, 0)."""
    bracket = i
    if text[i] == "<":
        tag = next((t for t in _TAGS if text.startswith(t, i)), None)
        if tag is None:
            return (_MAYBE, 0) if any(t.startswith(text[i:]) for t in _TAGS) else (_NO, 0)
        after = _skip_space(text, i + len(tag))
        if after is None or after < len(text) and text[after] != "[":
            return _NO, 0
        if after == len(text):
            return _MAYBE, 0
        bracket = after
    if (j := _skip_space(text, bracket + 1)) is None:
        return _NO, 0
    if j == len(text):
        return _MAYBE, 0
    name = _IDENTIFIER.match(text, j, j + _NAME_ROOM + 1)
    if name is None or name.end() - j > _NAME_ROOM or (j := _skip_space(text, name.end())) is None:
        return _NO, 0
    if j == len(text):
        return _MAYBE, 0
    return (_YES, bracket) if text[j] == "(" else (_NO, 0)


@dataclass
class _Prose:
    """Whether an item of a list after its first call turned to prose, read a character at a time
    outside strings and comments: a quote right after a word that is no string's prefix
    ("see(Python's docs)"), or a word right after a value where Python takes only an operator
    ("see the docs", "ping() now"): no Python writes either. Such an item after a call was passed
    over at its end, but its end may never come: a quote opened a string that took in the rest, an
    unclosed bracket held it, so a later list's calls came at the end of the output or not at all.
    It ends the list where it turns (``_scan``). (The first item has its own check, ``_fits``.)"""

    word: str = ""  # the word being read, its first 10 characters (no keyword is longer); "": none
    operand: bool = False  # what came last (whitespace passed) ends a value: a name, a number, a string, ")]}"
    juxtaposed: bool = False  # the word being read began right after a value
    # the "if"s not yet matched by an "else" at each bracket depth of the item (innermost last):
    # "else" is Python's only there (1 if t else'x'), an "if" only after a value, a "," or the
    # bracket's end closes them, as a conditional expression is one operand (ast reads it so)
    ifs: tuple[int, ...] = (0,)

    def quote(self) -> bool:
        """Whether a quote now (outside strings) makes prose: one right after a word that is
        neither a string's prefix nor an operator Python reads a string after (``else'x'``,
        ``not'x'``: an expression, passed over as ``else 'x'`` is, not the list's end). "else"
        is one only after a value and an open "if" ("x if t else'y'"): "nobody else's" opened a
        string that took in the rest, and so did it after "what if, " or "1 if t else 2, "."""
        word = self.word
        conditional = self.juxtaposed and self.ifs[-1] > 0
        operator = iskeyword(word) and word not in _OPERAND_WORDS and (word != "else" or conditional)
        return bool(word) and word.lower() not in _STRING_PREFIXES and not operator

    def step(self, char: str) -> bool:
        """Read ``char`` (outside strings and comments): whether the item turned to prose at it."""
        if char.isalnum() or char == "_":
            if not self.word:
                self.juxtaposed = self.operand
            self.word = (self.word + char)[:10]
            return False
        if self.word:
            word, self.word = self.word, ""
            if word in ("if", "else") and self.juxtaposed:  # (an "else" with no "if" open is prose's: no match)
                self.ifs = (*self.ifs[:-1], max(self.ifs[-1] + (1 if word == "if" else -1), 0))
            if char in "'\"":  # a string's prefix (``quote`` passed it), as strings side by side are joined
                self.operand = True
                return False
            operator = iskeyword(word) and word not in _OPERAND_WORDS  # (and, or, not, in, is, if, ...)
            if self.juxtaposed and not operator:
                return True
            self.operand = not operator
        if char not in SPACE:
            self.operand = char in ")]}'\""
        if char in "([{":
            self.ifs = (*self.ifs, 0)
        elif char in ")]}" or char == ",":
            self.ifs = (*self.ifs[:-1], 0) if char == "," or len(self.ifs) == 1 else self.ifs[:-1]
        return False


@dataclass
class PythonicReader:
    """One choice's output read for lists of calls (``feed`` each piece, then ``finish``), each
    character scanned once across pieces; ``calls`` is the parser's, shared."""

    calls: list[tuple[str, str]] = field(default_factory=list)
    # The request's tools: a list after text (no tag) is calls only where its first names one; a
    # code answer's "[Point(x=1, y=2)]" line was read as a call of Point, the rest of the answer
    # dropped (vLLM reads only an output that is the list). None: any name.
    names: frozenset[str] | None = None
    _said: bool = False  # text other than whitespace was read past
    _tagged: bool = False  # the list being read follows Llama's tag
    _held: str = ""  # outside a list: a possible opening; inside: the list from its "["
    _inside: bool = False
    _read: int = 0  # inside: how far the list is scanned
    _item: int = 1  # inside: where the item being read begins
    _depth: int = 0  # brackets open, the list's own counted
    _quote: str = ""  # the string being read: its quote, ' " ''' or """
    _escaped: bool = False
    _found: int = 0  # calls the list being read gave
    # The first item's shape so far, outside its strings and nested values (``_fits``): "" where
    # it is not checked (a comment, a line joined: Python's, left to ast at the item's end)
    _shape: str = ""
    _last: str = ""  # the character before, outside a string, within the first item's value
    _prefix: bool = True  # the value's word so far could be a string's prefix (r'...', u'...')
    _broken: bool = False  # the first item turned out no call before its end (``_scan`` stopped there)
    _prose: _Prose = field(default_factory=_Prose)  # after a call: whether the item turned to prose
    _comment: bool = False  # within a comment (its quotes are no strings)
    _blank: bool = True  # the text read past leaves its last line blank (where a list may open)
    # inside: what follows _held while the item being read stays open through it, scanned (joined
    # at every token, a call's 40 kB argument streamed copied 200 M characters; a review)
    _pieces: list[str] = field(default_factory=list)

    def feed(self, text: str) -> tuple[str, list[Call]]:
        if len(text) > _PIECE:
            return joined(*(self.feed(text[i : i + _PIECE]) for i in range(0, len(text), _PIECE)))
        if self._goes_on(text):
            self._pieces.append(text)
            return "", []
        self._held = "".join([self._held, *self._pieces, text])
        self._pieces.clear()
        content, out = "", list[Call]()
        while True:
            if not self._inside:
                content += self._to_opening()
                if not self._inside:
                    return content, out
            end = self._scan()
            if end is None:
                return content, out
            if self._broken:  # the first item can no longer be a call: text, read on from there
                self._broken = False
                content += self._given(self._held[:end])
                self._held, self._inside = self._held[end:], False
                continue
            closed = self._depth == 0
            # (a list closed by ")" or "}" is no list: that item is read with it, and fails)
            item = self._held[self._item : end + (self._held[end] not in ",]")]
            self._item = end + 1
            call = pythonic_call(item) if item.strip(SPACE) else None
            if call and not self._found and self._said and not self._tagged and self.names is not None:
                call = call if call[0] in self.names else None
            if item.strip(SPACE) and not self._add(call, out) and not self._found:
                # its first item is no call: the list is text, read on after that item
                content += self._given(self._held[: end + 1])
                self._held, self._inside = self._held[end + 1 :], False
            elif closed:
                self._held, self._inside, self._blank = self._held[end + 1 :], False, False
            elif self._found:  # the list is calls: only the item being read is held (a list held
                # whole was copied at every token: 1.8 s for a 200 kB list streamed)
                self._held, self._read, self._item, self._prose = self._held[self._item :], 0, 0, _Prose()

    def finish(self) -> tuple[str, list[Call]]:
        content, out = self.feed("")
        rest, self._held = self._held, ""
        if self._inside:  # a list left open: its last item is a call where it is whole
            self._add(pythonic_call(rest[self._item :]), out)
            if self._found:
                rest = ""
            self._inside = False
        return content + ("" if self.calls else rest), out

    def _add(self, call: tuple[str, str] | None, out: list[Call]) -> bool:
        if call is None:
            return False
        out.append((len(self.calls), *call))
        self.calls.append(call)
        self._found += 1
        return True

    def _to_opening(self) -> str:
        """The held text up to where a list of calls opens, or may (held), given out (content
        only before the first call); found, the list's reading begins."""
        text, i = self._held, 0
        while (i := _next_candidate(text, i)) < len(text):
            # a list opens a line (or follows a tag): "x = d[key(a=1)]" in an answer's code is no call
            seen, bracket = _opening(text, i) if text[i] == "<" or self._line_start(text[:i]) else (_NO, 0)
            if seen == _NO:
                i += 1
                continue
            if seen == _YES:  # (held from its tag: a list that turns out text gives the tag back too)
                self._held, first = text[i:], bracket - i + 1
                self._inside, self._read, self._item, self._depth, self._found = True, first, first, 1, 0
                self._tagged = text[i] == "<"
                self._quote, self._escaped, self._shape, self._comment = "", False, "name", False
                self._prose = _Prose()
            else:
                self._held = text[i:]
            return self._given(text[:i])
        self._held = ""
        return self._given(text)

    def _line_start(self, before: str) -> bool:
        """Whether what came before, ending in ``before``, leaves a line blank so far."""
        line = before.rsplit("\n", 1)
        return not line[-1].strip(SPACE) and (len(line) > 1 or self._blank)

    def _given(self, text: str) -> str:
        """``text`` read past: content before the first call."""
        self._blank = self._line_start(text)
        self._said = self._said or bool(text.strip(SPACE))
        return text if not self.calls else ""

    def _fits(self, char: str) -> bool:
        """Whether the first item, ``char`` added (outside a string, at the list's depth or its
        call's), can still be a call ``name(key=literal, ...)``. A list that opened ``[name(`` and
        went on as prose ("[see(Python's docs) for more") was held to the end of the stream, as
        vLLM's holds it (silent while its text does not parse): decided here at the first character
        no call can hold, it goes out as the text it is. Its end, a call or not, is ast's word."""
        shape, depth, space = self._shape, self._depth, char in SPACE
        word = char.isalnum() or char == "_"
        if char in "#\\":  # (a comment, a line joined: valid Python, which ast reads at the end)
            self._shape = ""
            return True
        if depth == 1:
            if shape == "name":
                if char == "(":
                    self._shape = "key"
                return space or word or char in "(,])}"
            return space or char in ",])}"  # after the call's ")": the item's end
        if shape == "key":
            if word and not char.isdigit():
                self._shape = "keyword"
            elif char == ")":
                self._shape = "after"
            return space or word and not char.isdigit() or char == ")"
        if shape in ("keyword", "equals"):
            if char == "=":
                self._shape = "value"
            elif space:
                self._shape = "equals"
            return char == "=" or space or shape == "keyword" and word
        if shape == "value":  # (after "=", a sign, whitespace)
            if word or char == ".":
                self._shape, self._prefix = "word", char in "rRuU"
            elif char in "'\"([{":  # (the string or the nested value read past, by _scan)
                self._shape = "string" if char in "'\"" else "next"
            self._last = char
            return space or word or char in ".+-'\"([{"
        if shape == "word":  # a number, True, None, ...; or a string's prefix
            if word or char == "." or char in "+-" and self._last in "eE":
                self._prefix, self._last = self._prefix and char in "rRuUbB", char
                return True
            if char in "'\"":  # a string's prefix (r'a'); else a word no Python writes a quote after (O'Brien')
                self._shape = "string"
                return self._prefix
        if shape == "string" and char in "rRuU":  # a prefixed string beside it: 'a' r'b' is one string
            self._shape = "prefix"
            return True
        if shape == "prefix":  # (a word after a string is no Python: 'O'Reilly')
            self._shape = "string"
            return char in "'\""
        # after a value (or a word's end): more of it (strings side by side), the next key, the end
        if char in "'\"":
            self._shape = "string"
        elif space:
            self._shape = "string" if shape == "string" else "next"
        elif char == ",":
            self._shape = "key"
        elif char == ")":
            self._shape = "after"
        return space or char in ",)'\""

    def _goes_on(self, text: str) -> bool:
        """Whether the item being read stays open through ``text``, all of it scanned on its own
        (where the held text was scanned to its end): then it is read; else nothing is, and the
        scan goes on over the joined text."""
        if not text or not self._inside or not (self._pieces or self._read == len(self._held)):
            return False
        before = self._read, self._depth, self._quote, self._escaped, self._shape, self._last, self._prefix
        comment, prose = self._comment, replace(self._prose)
        if self._scan(text, 0) is None and self._read == len(text):
            self._read = before[0] + len(text)
            return True
        self._read, self._depth, self._quote, self._escaped, self._shape, self._last, self._prefix = before
        self._comment, self._prose = comment, prose
        self._broken = False
        return False

    def _scan(self, text: str | None = None, i: int | None = None) -> int | None:
        """Where the list's item being read ends (its "," or the list's "]"), or None: not yet.
        Read from ``_read`` in the held text, or from ``i`` in ``text``."""
        text = self._held if text is None else text
        i = self._read if i is None else i
        while i < len(text):
            char, outside = text[i], not self._quote
            if self._quote:
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == self._quote[0]:
                    if len(self._quote) == 1:
                        self._quote = ""
                    elif len(text) - i < 3 and self._quote.startswith(text[i:]):
                        break  # a triple quote's end may be coming
                    elif text.startswith(self._quote, i):
                        self._quote, i = "", i + 2
            elif self._shape and not self._found and self._depth <= 2 and not self._fits(char):
                self._shape, self._broken, self._read = "", True, i
                return i
            elif self._comment or char == "#":  # to the line's end: a comment's quote ("don't") opens no string
                if (found := LINE_BREAK.search(text, i)) is None:
                    self._comment, i = True, len(text)
                    break
                self._comment, i = False, found.start()
                continue
            elif char in "'\"":
                if self._found and self._prose.quote():
                    self._broken, self._read = True, i
                    return i
                if len(text) - i < 3 and (char * 3).startswith(text[i:]):
                    break  # '' or ''' : which, the next character says
                triple = text.startswith(char * 3, i)
                self._quote, i = (char * 3, i + 2) if triple else (char, i)
            elif char in "([{":
                self._depth += 1
            elif char in ")]}":
                self._depth -= 1
                if self._depth == 0:
                    self._read = i + 1
                    return i
            elif char == "," and self._depth == 1:
                self._read = i + 1
                return i
            if outside and self._found and self._prose.step(char):
                self._broken, self._read = True, i
                return i
            i += 1
        self._read = i
        return None


def _next_candidate(text: str, i: int) -> int:
    """The next place at or after ``i`` where a list (or its tag) may open; len(text) if none."""
    found = [at for at in (text.find("[", i), text.find("<|", i)) if at >= 0]
    if not found and text.endswith("<") and len(text) > i:
        return len(text) - 1
    return min(found, default=len(text))
