"""A chat's ``tool_choice: "auto"``: the model's own text read for tool calls in the format its chat
template taught it, as vLLM's ``--tool-call-parser`` does (the gateway's ``tool_call_parser``).
Pure. One reading serves both a whole output and a stream (``feed`` its pieces, then ``finish``),
so the two answer alike: text outside the calls is content, each call goes out whole as it ends,
and a call that does not parse (cut short, or not JSON) goes back as text. A stream says nothing
for a call while it is open: one the output ends inside (hermes, mistral, granite-20b-fc: a quote
left unescaped, a brace left open) may close at any later token, so it goes out as text only at
the end. vLLM's stream sends such a call's name and argument text as they come (its hermes diffs
the arguments read so far), a tool call its whole answer then gives as text; here the two agree.

- ``hermes`` (Hermes 2 Pro, Qwen2.5): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``,
  any number; the text before the first is content, what comes after it is not (vLLM's). A
  ``</tool_call>`` inside an argument's string is the argument's (vLLM PRs #48353/#55848).
- ``llama3_json`` (Llama 3.1/3.2 JSON tool calling): the whole output is one or more objects
  ``{"name": ..., "parameters": {...}}`` (or ``"arguments"``), separated by ``;`` (or ``,``,
  which vLLM's reading passes over too), optionally after ``<|python_tag|>`` (Llama 4's
  ``<|python_start|>``... ``<|python_end|>`` too); an output that does not begin so is text, and
  an object without ``"parameters"`` or ``"arguments"`` is none (vLLM's). Text after the calls is content
  as written (the whitespace after the last separator too: "\\n\\nDone." keeps its line breaks).
- ``mistral`` (Mistral 7B Instruct v0.3, Nemo, Small 3.x): ``[TOOL_CALLS]`` then a JSON array of
  ``{"name": ..., "arguments": {...}}`` (tokenizers before v11), or ``name{...}`` / ``name[ARGS]{...}``
  per call, each after its own ``[TOOL_CALLS]`` (v11 on); the text before the first is content, as
  vLLM's. An empty array, ``[TOOL_CALLS] []``, makes no call: the text as written (``tools_called``),
  but none of the content before a call (held: vLLM's content ends at the first tag).
  A ``[TOOL_CALLS]`` read inside a call's string ends the call where its quotes are unsound, as
  hermes' ``</tool_call>`` does (``tool_scan.NextTag``: a quote the model left unescaped), and
  where the output ends inside a call (``_finish``).
  Mistral's templates take only 9-character alphanumeric call ids (``completion_shape.Shape``).
- ``pythonic`` (Llama 3.2, Llama 4): a Python list of calls, ``[get_weather(city='SF'), ping()]``
  (``tool_pythonic.py``).
- ``granite`` (Granite 3.0, 3.1): a JSON array of calls after ``<|tool_call|>``; ``granite-20b-fc``
  (Granite 20B FunctionCalling): ``<function_call> {...}`` per call (``tool_granite.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dlora.services.gateway.tool_base import Call, decoded_call, joined, partial_tag
from dlora.services.gateway.tool_granite import FunctionCallReader, GraniteReader
from dlora.services.gateway.tool_json import arguments_json, loads
from dlora.services.gateway.tool_pythonic import PythonicReader
from dlora.services.gateway.tool_scan import NextTag, ObjectEnd, QuotedTag, TagEnd

PARSERS = ("hermes", "llama3_json", "mistral", "pythonic", "granite", "granite-20b-fc")
_OPEN, _CLOSE = "<tool_call>", "</tool_call>"  # hermes' (here: fields' defaults read them)
_TOOL_CALLS, _ARGS, _CALL_ID = "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"  # mistral's


@dataclass
class ToolParser:
    """Reads one choice's output (``feed`` each piece as it comes, then ``finish``): each returns
    the content to send now and the calls that completed."""

    kind: str
    calls: list[tuple[str, str]] = field(default_factory=list)
    _held: str = ""  # text not yet given out (from _at): a possible start of a call, or a call not yet whole
    # where _held's text not yet read begins: a call read moves it, not a copy of the rest (one
    # delta of 400 calls copied the rest per call, quadratic: 800 kB took 0.6 s; a review)
    _at: int = 0
    # what follows _held, kept apart while a call stays open: joined to it at every token, a 200 kB
    # call copied all of itself per token (0.5 s of the gateway's loop; a review)
    _pieces: list[str] = field(default_factory=list)
    # hermes: within <tool_call> ...; mistral: after [TOOL_CALLS]; llama3_json: the output is calls
    _inside: bool = False
    _decided: bool = False  # llama3_json: whether the output's start was seen
    # llama3_json: the output until its first call (what an output of none gives out), in pieces
    _written: list[str] = field(default_factory=list)
    # hermes: where the closing tag was looked for to (a token costs its own characters); mistral:
    # where the whitespace after [TOOL_CALLS] was read to. An index into _held (not from _at): it
    # moves with _at when the text read is dropped (_drop), as ObjectEnd's start does
    _read: int = 0
    _body: bool = False  # hermes: within a call whose body began as a JSON object
    _scan: ObjectEnd = field(default_factory=ObjectEnd)  # llama3_json: the call's braces
    _close: TagEnd = field(
        default_factory=lambda: TagEnd(_CLOSE, literal=True)
    )  # hermes, within a call: where it closes
    _literal: bool = False  # hermes, at the end: calls close at their first tag, strings or not (_finish)
    _quoted: QuotedTag = field(default_factory=QuotedTag)  # hermes, within a call: whether a quoted tag closes it
    # mistral, within a call: where its object ends (its braces; a tag its unsound quotes took in, as hermes')
    _next: NextTag = field(default_factory=lambda: NextTag(_TOOL_CALLS))
    # pythonic, granite: its reader (tool_pythonic.PythonicReader, tool_granite.GraniteReader), sharing ``calls``
    _reader: PythonicReader | GraniteReader | FunctionCallReader | None = None
    names: frozenset[str] | None = None  # the request's tools (pythonic: PythonicReader.names)
    # content so far, whitespace alone, before any call (_shown); None: other text went out
    _blank: list[str] | None = field(default_factory=list)
    # mistral: an empty array's block ("[TOOL_CALLS] []") and the whitespace after it, before any
    # call: none beside a later call (vLLM's content ends at the first tag), else text as written
    _void: str = ""

    def __post_init__(self) -> None:
        if self.kind == "pythonic":
            self._reader = PythonicReader(self.calls, self.names)
        elif self.kind == "granite":
            self._reader = GraniteReader(self.calls)
        elif self.kind == "granite-20b-fc":
            self._reader = FunctionCallReader(self.calls)

    @property
    def tools_called(self) -> bool:
        """Whether the output was read as calls: some were. One that parses to none (Granite's
        ``<|tool_call|>[]``, Mistral's ``[TOOL_CALLS] []``) is a text answer, the output as
        written: vLLM's ``tools_called == bool(tool_calls)``, which its parsers' test harness
        asserts and PR #53297 restores where a parser broke it (granite's empty array answered
        null content, an empty turn)."""
        return bool(self.calls)

    def finish(self) -> tuple[str, list[Call]]:
        """The end of the output (``_finish``); whitespace held that no call followed goes out."""
        content, calls = self._shown(self._finish())
        blank = "".join(self._blank or []) if not self.tools_called else ""
        return blank + content, calls

    def _shown(self, read: tuple[str, list[Call]]) -> tuple[str, list[Call]]:
        """Content before any call that is whitespace alone is held until text or a call follows:
        beside calls it is none, as vLLM's null (Qwen3's blank line after </think> was content)."""
        content, calls = read
        if self._blank is None or not (content or calls):
            return read
        if content.strip():
            blank, self._blank = "".join(self._blank), None
            return blank + content, calls
        self._blank.append(content)
        if calls or self.calls:
            self._blank.clear()
        return "", calls

    def feed(self, text: str) -> tuple[str, list[Call]]:
        if self._reader is not None:
            return self._shown(self._reader.feed(text))
        if not text:  # a token that completes no character, or a stop string holds: nothing new to read
            return "", []  # (read, it joined an open call's pieces: copied again at every such token; a review)
        return self._shown(self._take(text))

    def _take(self, text: str) -> tuple[str, list[Call]]:
        if self.kind == "llama3_json" and not self.calls and (self._inside or not self._decided):
            self._written.append(text)  # (not a text answer's: copied at every token, it cost 0.9 s per 200 kB)
        if text and self._goes_on(text):
            self._pieces.append(text)
            return "", []
        self._drop()  # (before the join, which would copy it again)
        self._held = "".join([self._held, *self._pieces, text])
        self._pieces.clear()
        if self.kind == "hermes":
            read = self._hermes()
        else:
            read = self._mistral() if self.kind == "mistral" else self._llama3_json()
        if 2 * self._at > len(self._held):  # (what is copied is less than what is dropped: linear in all)
            self._drop()
        return read

    def _drop(self) -> None:
        """The text read leaves _held (a copy of the rest); the indices into it move alike."""
        if self._at:
            self._held, self._read, self._at = self._held[self._at :], max(self._read - self._at, 0), 0

    def _finish(self) -> tuple[str, list[Call]]:
        """The end of the output: what was held back goes out as text (an unfinished call too),
        unless calls came before it (llama3_json's: unless it is an unfinished call)."""
        if self._reader is not None:
            return self._reader.finish()
        content, calls = self._take("")  # (what is held, its pieces joined, read to its end)
        while self.kind == "hermes" and self._inside:  # a last call left open (a stop at </tool_call>, or EOS)
            try:  # is one where it is whole, as vLLM's <tool_call>(.*) and SGLang read it
                parsed = loads(self._held[self._at :])
            except ValueError:
                parsed = None
            if self._add(decoded_call(parsed, ("arguments", "parameters")), calls):
                self._held, self._at, self._inside = "", 0, False
            elif self._body and self._close.in_string and (end := self._held.find(_CLOSE, self._at)) >= 0:
                # The output ended inside a string: a quote the model left unescaped ("5" inches")
                # made the rest one, the calls after it none. Its quotes untrustworthy, its calls
                # close at their first tag, as vLLM's hermes before #55848 read them (once: each
                # call's rest scanned again to its end, 100 kB of '<tool_call>{"\"</tool_call>'
                # took 9 s). A tag in a string whose quotes are escaped makes no call after it (a
                # call's keys need a quote): none quoted is made one.
                self._literal = True
                content += self._closed(end, calls)
                content, calls = joined((content, calls), self._hermes())
                continue
            break
        while self.kind == "mistral" and self._inside and self._next.output_ended():
            content, calls = joined((content, calls), self._mistral())  # (its next [TOOL_CALLS] ends the call)
        if self.kind == "mistral" and self._inside:  # an array of calls cut short: the calls it finished
            found = [
                self._add(decoded_call(item, ("arguments",)), calls) for item in _whole_items(self._held[self._at :])
            ]
            if any(found):
                self._held, self._at, self._inside = "", 0, False
        content, self._void = content + ("" if self.calls else self._void), ""  # (no call followed it)
        rest, self._held, self._at = self._held[self._at :], "", 0
        if self.kind == "llama3_json" and (self._inside or not self._decided) and not self.calls:
            return "".join(self._written), calls  # no call: the text as written, its leading space and tag too
        if self.kind == "llama3_json" and self.calls and self._inside and (self._scan.read or not rest.strip()):
            rest = ""  # a call cut short (max_tokens) after whole ones, or whitespace: none, as hermes' and mistral's
        tag = _TAGS.get(self.kind)
        if self._inside and tag:
            rest = tag + rest
        return content + (rest if tag is None or not self.calls else ""), calls

    def _goes_on(self, text: str) -> bool:
        """Whether ``text`` continues an open call and does not end it: what a reading of the
        joined text would answer then is nothing, so it is only kept, each character looked at once."""
        if self.kind == "hermes":
            if self._inside and not self._body and text.isspace():  # (after <tool_call>: call or text, not known yet)
                self._read += len(text)
                return True
            if not self._body or not self._close.open_through(text):
                return False
            self._read += len(text)
            return True
        scan = self._next.scan if self.kind == "mistral" else self._scan
        if self.kind in ("mistral", "llama3_json") and self._inside and not scan.read and text.isspace():
            # whitespace after [TOOL_CALLS], or between llama3_json's calls, all read (nothing else
            # held, or only such pieces): joined, all of it was copied again at every token
            # (hermes' was so; a review)
            if self._pieces or self._read == len(self._held):
                self._read += len(text)
                return True
        if not self._inside or not scan.read:
            return False
        return self._next.open_through(text) if self.kind == "mistral" else scan.open_through(text)

    def _add(self, call: tuple[str, str] | None, out: list[Call]) -> bool:
        if call is None:
            return False
        out.append((len(self.calls), *call))
        self.calls.append(call)
        return True

    def _text_to(self, tag: str) -> tuple[str, bool]:
        """The held text before ``tag`` (content only before the first call), and whether the tag
        came: then what follows it is held; else all of it goes but an end that may begin the tag."""
        at = self._held.find(tag, self._at)
        found = at >= 0
        if not found:
            at = max(self._at, len(self._held) - partial_tag(self._held, tag))
        text = self._held[self._at : at] if not self.calls else ""
        self._at = self._read = at + len(tag) if found else at
        return text, found

    def _hermes(self) -> tuple[str, list[Call]]:
        # Text after the first call is not content (vLLM's hermes keeps what comes before it).
        content, out = "", list[Call]()
        while True:
            if not self._inside:
                text, self._inside = self._text_to(_OPEN)
                content += text
                if not self._inside:
                    return content, out
            if not self._body:  # a call's body is a JSON object: else the tag was text (a reply quoting
                # it), given out as it comes; it held the rest of the reply until the end
                at = self._read
                while at < len(self._held) and self._held[at].isspace():
                    at += 1
                self._read = at
                if at == len(self._held):
                    return content, out
                if self._held[at] != "{":
                    content, self._inside = content + (_OPEN if not self.calls else ""), False
                    continue
                self._body = True
            end = self._close.find(self._held, self._read)  # (not one inside an argument's string, unless _literal)
            if end is None:
                self._read = len(self._held)
                return content, out
            if self._close.quoted and not self._quoted.closes(self._held, self._at, end):
                self._read = end + len(_CLOSE)  # a tag an argument quotes
                continue
            content += self._closed(end, out)

    def _closed(self, end: int, out: list[Call]) -> str:
        """The hermes call held, closed at ``end``: read (into ``out``), or the text as written
        where it is none and no call came before."""
        body = self._held[self._at : end]
        try:
            parsed = loads(body)
        except ValueError:
            parsed = None
        call = decoded_call(parsed, ("arguments", "parameters"))
        if parsed is None and not self._literal and (first := body.find(_CLOSE)) >= 0:
            # No JSON, closed past a tag taken as in a string: a quote left unescaped flipped them,
            # a later escaped one flipped them back (the output ended outside one, _finish's fall
            # back not taken), the calls between lost. Read from that tag as _finish reads, once.
            self._literal = True
            return self._closed(self._at + first, out)
        self._at = self._read = end + len(_CLOSE)
        self._quoted = QuotedTag()
        self._inside, self._body, self._close = False, False, TagEnd(_CLOSE, quotes=not self._literal, literal=True)
        if not self._add(call, out) and not self.calls:
            return _OPEN + body + _CLOSE  # not a call: the text as written
        return ""

    def _mistral(self) -> tuple[str, list[Call]]:
        content, out = "", list[Call]()
        while True:
            if not self._inside:
                text, self._inside = self._text_to(_TOOL_CALLS)
                content += self._unvoid(text)
                if not self._inside:
                    return content, out
            # The calls: a JSON array (before v11), or a name and its arguments' object. Each
            # character is looked at once across tokens (a 140 kB call took a minute so in hermes;
            # whitespace after the tag, rescanned per token, took 9 s for 16k: a review).
            first = self._read
            while first < len(self._held) and self._held[first].isspace():
                first += 1
            self._read = first
            head = self._held[first : first + len(_ARGS)]
            if len(head) < len(_ARGS) and _ARGS.startswith(head):  # nothing yet, or "[AR": which is it?
                return content, out
            array = head[0] == "[" and head != _ARGS
            # (a name ends before the next call's tag: "x y[TOOL_CALLS]ping[ARGS]{}" took ping's
            # object as x y's, a name with spaces, so ping was lost)
            room = self._held.find(_TOOL_CALLS, first, first + _NAME_ROOM)
            room = first + _NAME_ROOM if room < 0 else room
            start = first if array else self._held.find("{", first, room)
            if start < 0 and len(self._held) >= room:  # no name and object: text
                content += self._unvoid(_TOOL_CALLS + self._held[self._at : room]) if not self.calls else ""
                self._at, self._inside = room, False
                continue
            if start < 0:
                return content, out  # not whole yet
            if (end := self._next.end(self._held, start)) is None:
                return content, out  # not whole yet
            begin, self._at, self._inside = self._at, end, False
            try:
                parsed = loads(self._held[start:end])
            except ValueError:
                parsed = None
            calls: list[tuple[str, str] | None]
            if array:
                calls = [decoded_call(c, ("arguments",)) for c in parsed] if isinstance(parsed, list) else [None]
            else:
                # mistral-common's v11 writes the call's id between: name[CALL_ID]id[ARGS]{...}
                name = self._held[begin:start].removesuffix(_ARGS).split(_CALL_ID, 1)[0].strip()
                named = 0 < len(name) <= 64 and not any(c.isspace() for c in name)  # OpenAI's names: no prose
                calls = [(name, arguments_json(parsed))] if named and isinstance(parsed, dict) else [None]
            for call in calls:
                self._add(call, out)
            if self.calls:
                self._void = ""
            elif array and parsed == []:
                self._void += _TOOL_CALLS + self._held[begin:end]
            else:
                content += self._unvoid(_TOOL_CALLS + self._held[begin:end])  # not calls: the text as written

    def _unvoid(self, text: str) -> str:
        """``text``, content before any call, after the held empty arrays (``_void``) where it is
        more than whitespace (which is held with them)."""
        if not self._void or not text:
            return text
        if text.isspace():
            self._void += text
            return ""
        text, self._void = self._void + text, ""
        return text

    def _llama3_json(self) -> tuple[str, list[Call]]:
        if not self._decided:  # (leading whitespace leaves _held, not stripped again per token; _written keeps it)
            self._held = start = self._held.lstrip()
            if not start or any(tag.startswith(start) and tag != start for tag in _LLAMA_OPENERS):
                return "", []  # not decided yet
            self._decided = True
            self._inside = start.startswith(("{", *_LLAMA_OPENERS))
            if not self._inside:
                self._held, self._written = "".join(self._written), []
        if not self._inside:
            content, self._held, self._at = self._held[self._at :], "", 0
            return content, []
        out: list[Call] = []
        held = self._held
        while self._inside:
            if self._scan.read == 0:  # between objects: the separators go, and Llama's call tag
                # in any order: a tag after "; " was text unstreamed and a call streamed, where
                # the tag (a special token) came as a piece of its own. Whitespace after the last
                # of them stays (_at) for text that may follow ("\n\nDone." lost its line breaks);
                # _read: how far they are read, each character once across tokens
                at = self._read
                while at < len(held) and (step := 1 if held[at] in " \t\r\n;," else _llama_tag(held, at)):
                    at += step
                    self._at = self._at if held[at - 1] in " \t\r\n" else at
                self._read = at
                if at == len(held) or held[at] != "{":
                    # (the start of a tag waits for its end, unstreamed alike)
                    if not any(tag.startswith(held[at:]) for tag in _LLAMA_TAGS):
                        return self._not_calls(), out
                    break
            if (end := self._scan.find(held, self._read)) is None:  # (_read: where the object begins)
                break  # not whole yet
            try:
                obj = loads(held[self._read : end])
            except ValueError:
                obj = None
            # An object with no arguments is no call (vLLM's reading needs one, as Llama's template
            # writes one): a JSON answer, {"name": "Alice", "age": 30}, was a call of Alice
            keys = ("parameters", "arguments")
            if (
                not isinstance(obj, dict)
                or not any(k in obj for k in keys)
                or not self._add(decoded_call(obj, keys), out)
            ):
                return self._not_calls(), out  # not a call (or not JSON)
            self._at = self._read = end
        return "", out

    def _not_calls(self) -> str:
        """llama3_json's text where the calls end (or the output is none): given out now, the rest
        as it comes (held to the end, a reply that began as a JSON answer streamed nothing until
        then): the output as written where it made no call, else what follows the calls."""
        text = "".join(self._written) if not self.calls else self._held[self._at :]
        self._held, self._at, self._inside, self._written = "", 0, False, []
        return text


# Llama's call tags: 3.1's before its calls, 4's around them (vLLM #16214: Llama 4's JSON calls
# in <|python_start|>...<|python_end|> came back as text)
_LLAMA_OPENERS = ("<|python_tag|>", "<|python_start|>")
_LLAMA_TAGS = (*_LLAMA_OPENERS, "<|python_end|>")
# Where a mistral call's "{" must come by: a name of at most 64 characters, then v11's [CALL_ID]
# and its id (9 characters from mistral-common; room for 64), [ARGS]
_NAME_ROOM = 64 + len(_CALL_ID) + 64 + len(_ARGS) + 1
_TAGS = {"hermes": _OPEN, "mistral": _TOOL_CALLS}  # what a parser's calls begin with, given back as text


def _whole_items(text: str) -> list[Any]:
    """The items of the JSON array ``text`` begins with (after whitespace) that are whole, read
    until one is not (the array cut short: a Mistral reply that max_tokens ended mid-list, whose
    whole calls came back as text with it)."""
    items: list[Any] = []
    pos = len(text) - len(text.lstrip())
    if not text.startswith("[", pos):
        return items
    pos += 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if not text.startswith("{", pos) or (end := ObjectEnd().find(text, pos)) is None:
            return items
        try:
            items.append(loads(text[pos:end]))
        except ValueError:
            return items
        pos = end


def _llama_tag(text: str, at: int) -> int:
    """The length of the Llama call tag at ``text[at]``; 0 where none is."""
    return next((len(tag) for tag in _LLAMA_TAGS if text.startswith(tag, at)), 0)
