"""A chat's ``tool_choice: "required"``: the output constrained to a JSON list of calls of the given
tools, and that list read back into OpenAI's ``tool_calls``, whole or as it streams (the same
reading: the items that completed; an output cut short keeps the calls it finished). Pure.

The list's schema is vLLM's (``_get_json_schema_from_tools``): an array of at least one object
``{"name": <one of the tools>, "parameters": <that tool's arguments>}``, every tool's ``$defs``
lifted to the top, where its ``#/$defs/...`` references point; its other references into itself
(``#``, ``#/definitions/...``, ``#/properties/...``) point where it now sits, inside the list.
``parallel_tool_calls: false`` (OpenAI's: at most one call) makes it at most one item.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from dlora.services.gateway.tool_json import arguments_json, loads
from dlora.services.gateway.tool_scan import ObjectEnd
from dlora.services.worker.engine.served_schema import DATA_KEYWORDS, SCHEMA_MAPS

# A function's arguments where it gives no parameters: OpenAI's "empty parameter list" (vLLM's
# "required" schema alike), {} once an object naming none takes no others (structured.py)
NO_ARGUMENTS: dict[str, Any] = {"type": "object", "properties": {}}


class ConflictingDefs(ValueError):
    """Two tools define the same ``$defs`` name differently: one list schema cannot hold both."""


def arguments_schema(parameters: dict[str, Any] | None) -> dict[str, Any]:
    """The schema a function's arguments follow: its ``parameters``, an object where they say no
    type (OpenAI's parameters describe an object; ``{}`` as a schema would take any JSON value,
    and a model led by it wrote a bare number); none (or ``{}``): no arguments, ``{}`` (any
    object was allowed, and a model wrote keys into a parameterless call until max_tokens)."""
    if not parameters:
        return dict(NO_ARGUMENTS)
    return parameters if "type" in parameters else {"type": "object", **parameters}


def calls_schema(tools: list[tuple[str, dict[str, Any] | None]], parallel: bool = True) -> dict[str, Any]:
    """The JSON Schema of a list of calls of ``tools`` ((name, parameters schema; None: any
    object)); at most one call unless ``parallel``. The tools' schemas are copied, not changed.

    Raises:
        ConflictingDefs: a ``$defs`` name two tools define differently.
    """
    defs: dict[str, Any] = {}
    items = []
    for i, (name, parameters) in enumerate(tools):
        params = _rebased(arguments_schema(parameters), f"#/items/anyOf/{i}/properties/parameters")
        lifted = (  # (a $defs not a dict: llguidance refuses it); a resource's own are its references' place
            params.pop("$defs") if isinstance(params.get("$defs"), dict) and not _resource(params) else {}
        )
        for key, definition in lifted.items():
            if defs.setdefault(key, definition) != definition:
                raise ConflictingDefs(f"tools define $defs {key!r} differently; one list of calls cannot hold both")
        items.append(
            {
                "properties": {"name": {"type": "string", "enum": [name]}, "parameters": params},
                "required": ["name", "parameters"],
                # a call holds those two alone, as vLLM's default backend (xgrammar, strict) reads
                # vLLM's schema; llguidance's lenient default let a model add keys without end
                "additionalProperties": False,
            }
        )
    listed: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": items}}
    if not parallel:
        listed["maxItems"] = 1
    if defs:
        listed["$defs"] = defs
    return listed


def _rebased(schema: dict[str, Any], base: str) -> dict[str, Any]:
    """A copy of ``schema`` whose local references (``#``, ``#/...``) point into it where it sits in
    a larger schema, at ``base``; those into ``$defs`` stay (lifted to the top). A tool's
    ``#/definitions/...`` (zod-to-json-schema's, pydantic v1's) or ``#/properties/...`` (a shared
    subschema) pointed at the list's root under "required": refused, where a named choice of the
    same tool was served; a recursive ``#`` was read as the list, and the model led to write lists
    of calls as the tool's arguments. One with an ``$id`` of its own, or holding one, is kept as
    written there. A loop, not recursion: schemas 2,000 deep are taken."""
    if _resource(schema):
        return dict(schema)
    out: dict[str, Any] = {}
    todo: list[tuple[Any, Any, bool]] = [(schema, out, False)]  # (source, its copy, a map of names to schemas)
    while todo:
        source, copied, names = todo.pop()
        pairs = enumerate(source) if isinstance(source, list) else source.items()
        for key, value in pairs:
            if isinstance(source, dict) and not names and key in DATA_KEYWORDS:
                pass  # data, kept as written
            elif key == "$ref" and not names and isinstance(value, str) and value.split("/")[0] == "#":
                # (a URI fragment: "#/%24defs/..." is one into $defs too)
                value = value if unquote(value).startswith("#/$defs/") else base + value[1:]
            elif isinstance(value, dict) and _resource(value):
                pass  # its own references resolve within it, wherever it sits: kept as written
            elif isinstance(value, (dict, list)):
                inner: Any = {} if isinstance(value, dict) else [None] * len(value)
                todo.append((value, inner, isinstance(source, dict) and not names and key in SCHEMA_MAPS))
                value = inner
            copied[key] = value
    return out


def _resource(schema: dict[str, Any]) -> bool:
    """Whether ``schema`` has an ``$id`` of its own (not an anchor, "#name"): its ``#`` references
    resolve against it wherever it sits (TypeBox's tools, a spec's published schema)."""
    return isinstance(given := schema.get("$id"), str) and not given.startswith("#")


def _call(item: object) -> tuple[str, str] | None:
    """One list item as (function name, arguments as JSON text), as vLLM writes them."""
    if not isinstance(item, dict) or not isinstance(name := item.get("name"), str) or "parameters" not in item:
        return None
    return name, arguments_json(item["parameters"])


@dataclass
class CallStream:
    """A streamed output read into calls as each item of the list completes: its name and its
    whole arguments go out in one delta (a call's arguments are not split across events)."""

    text: str = ""  # the output from where the last look began (the item being read, or what came before)
    pos: int = 0  # where the next item (or the list's opening) may begin
    opened: bool = False
    ended: bool = False  # the list's end was read: what follows is not read
    calls: list[tuple[str, str]] = field(default_factory=list)  # read so far: (name, arguments)
    _scan: ObjectEnd = field(default_factory=ObjectEnd)  # the item being read
    # what follows text while an item stays open, kept apart: joined to it at every token, a 200 kB
    # item copied all of itself per token (0.8 s of the gateway's loop; a review)
    _pieces: list[str] = field(default_factory=list)

    def feed(self, text: str) -> list[tuple[int, str, str]]:
        """The calls ``text`` completes, added to what came before: (its place in the list, name,
        arguments)."""
        if self.ended or not text:  # (an empty piece, a token that completes no character: nothing new;
            return []  # read, it joined an open item's pieces, copied again at every such token: a review)
        if text and self._scan.read and self._scan.open_through(text):
            self._pieces.append(text)
            return []
        self.text, self.pos = "".join([self.text[self.pos :], *self._pieces, text]), 0  # (what was read goes)
        self._pieces.clear()
        out: list[tuple[int, str, str]] = []
        while True:
            start, blank = self.pos, " \t\r\n," if self.opened else " \t\r\n"
            while start < len(self.text) and self.text[start] in blank:  # (no copy of the rest per item)
                start += 1
            if start == len(self.text):  # blanks read are passed: joined and stepped over again per token,
                self.pos = start  # 8,000 newlines took 2.7 s of the gateway's loop (a review)
                return out
            if not self.opened:
                if not self.text.startswith("[", start):
                    return out
                self.opened, self.pos = True, start + 1
                continue
            if self.text[start] == "]":
                self.ended = True
                return out
            if (end := self._scan.find(self.text, start)) is None:
                return out  # not whole yet
            try:
                item = loads(self.text[start:end])
            except ValueError:
                item = None  # constrained output is JSON; not a call, skipped
            self.pos = end
            if (call := _call(item)) is not None:
                out.append((len(self.calls), *call))
                self.calls.append(call)

    @property
    def closed(self) -> bool:
        """Whether the output is a whole list of calls (finish_reason "tool_calls"): its end read and
        one call in it at least. A list of none (``[]``, items that are no calls) is no tool-call
        answer: "tool_calls" beside no call sent a client's agent loop to run nothing (vLLM #53255)."""
        return self.ended and bool(self.calls)
