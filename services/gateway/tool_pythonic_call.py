"""One item of a ``pythonic`` list of calls (``tool_pythonic.py``) read as a call,
``name(key=literal, ...)``: with Python's own parser (``ast``), literals only, never evaluated, as
vLLM's pythonic parser reads them; what Python refuses but a model means one way is read as meant
(``_repaired``). Pure."""

from __future__ import annotations

import ast
import math
import re
from keyword import iskeyword
from typing import Any

from dlora.services.gateway.tool_json import Number, arguments_json

SPACE = " \t\r\n\f"  # Python's whitespace between tokens
LINE_BREAK = re.compile(r"\r\n|\r|\n")  # Python's (ast's line numbers), not str.splitlines' (\f, \v, ...)
_JSON_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_JSON_NAMES = {"true": True, "false": False, "null": None}
_WORD = re.compile(r"\w+")
_KEYWORD = "dlora_keyword_"  # a reserved word's stand-in as a keyword's name (``_repaired``)


class _NotLiteral(ValueError):
    pass


def _value(node: ast.expr, source: list[bytes]) -> Any:
    """The JSON value a literal argument is; ``source``: the item's lines, UTF-8 (ast's columns
    count bytes)."""
    if isinstance(node, ast.Constant) and (node.value is None or isinstance(node.value, (str, bool, int))):
        return node.value
    if isinstance(node, ast.Constant) and isinstance(node.value, float):
        if math.isfinite(node.value):
            return node.value
        # 1e400: kept as written, as JSON's. (ast.get_source_segment split the whole item into lines
        # for each: 4,000 of them in a 28 kB item took 26 s of the gateway's loop, a review found)
        line = source[node.lineno - 1] if node.lineno == node.end_lineno else b""
        written = line[node.col_offset : node.end_col_offset].decode(errors="replace")
        if _JSON_NUMBER.fullmatch(written):
            return Number(written)
        raise _NotLiteral(written)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        operand = node.operand
        if isinstance(operand, ast.Constant) and type(operand.value) in (int, float):
            value = _value(operand, source)
            if not isinstance(node.op, ast.USub):
                return value
            return Number("-" + value.text) if isinstance(value, Number) else -value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_value(item, source) for item in node.elts]
    if isinstance(node, ast.Dict):
        out: dict[str, Any] = {}
        for key, item in zip(node.keys, node.values):
            if not isinstance(key, ast.Constant) or not isinstance(key.value, str):  # (None: **mapping)
                raise _NotLiteral("a key that is not a string")
            out[key.value] = _value(item, source)
        return out
    if isinstance(node, ast.Name) and node.id in _JSON_NAMES:
        return _JSON_NAMES[node.id]
    raise _NotLiteral(type(node).__name__)


def pythonic_call(item: str) -> tuple[str, str] | None:
    """(name, arguments as JSON) of one item of a list, ``name(key=literal, ...)``, or None where it
    is not one (positional arguments, a repeated keyword, a value that is not a literal). What
    Python refuses but a model means one way is read as meant (``_repaired``)."""
    source, names = item.strip(SPACE), dict[str, str]()
    while source.startswith("#"):  # a comment before the call, after the "," (Python's eval takes none there)
        source = (LINE_BREAK.split(source, maxsplit=1) + [""])[1].strip(SPACE)
    try:
        node = ast.parse(source, mode="eval").body
    except SyntaxError:
        source, names = _repaired(source)
        node = None
    except (ValueError, RecursionError, MemoryError):  # (too deep: the parser's own bound)
        return None
    if node is None:
        try:
            node = ast.parse(source, mode="eval").body
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            return None
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
        return None
    arguments: dict[str, Any] = {}
    lines = [line.encode() for line in LINE_BREAK.split(source)]
    for keyword in node.keywords:
        name = names.get(keyword.arg, keyword.arg) if keyword.arg is not None else None
        if name is None or name in arguments:  # **mapping; a keyword given twice
            return None
        try:
            arguments[name] = _value(keyword.value, lines)
        except (_NotLiteral, RecursionError):
            return None
    return node.func.id, arguments_json(arguments)


def _repaired(source: str) -> tuple[str, dict[str, str]]:
    """A call Python refuses, written as Python reads what the model meant (vLLM's lfm2 parser
    reads both, PR #48171; its pythonic one gives the call back as text): a reserved word as a
    keyword's name (``memory_get(from=1)``, a tool's parameter "from"), renamed (returned: each
    stand-in and the name it stands for); a line break in a one-line quoted string (a shell
    command's lines), escaped. Strings are read past as written (any quote, triple, prefixed)."""
    out: list[str] = []
    names: dict[str, str] = {}
    i, n, last = 0, len(source), ""  # last: the last word or character outside strings and whitespace
    while i < n:
        char = source[i]
        if char in "'\"":
            quote = char * 3 if source.startswith(char * 3, i) else char
            end = i + len(quote)
            while end < n and not source.startswith(quote, end):
                end += 2 if source[end] == "\\" else 1
            body = source[i + len(quote) : end]
            raw = i > 0 and (source[i - 1].isalnum() or source[i - 1] == "_") and "r" in last.lower()
            if len(quote) == 1 and not raw:  # (in a raw string an escape stays two characters)
                body = body.replace("\r", "\\r").replace("\n", "\\n")
            out.append(quote + body + source[end : end + len(quote)])
            i, last = end + len(quote), char
        elif char == "#":  # a comment, to its line's end, as written
            end = match.start() if (match := LINE_BREAK.search(source, i)) else n
            out.append(source[i:end])
            i = end
        elif char.isalnum() or char == "_":
            word = match[0] if (match := _WORD.match(source, i)) else char  # (\w: isalnum's characters and "_")
            after = i + len(word)
            while after < n and source[after] in SPACE:
                after += 1
            named = last in ("(", ",") and source.startswith("=", after) and not source.startswith("==", after)
            if named and iskeyword(word):
                names[_KEYWORD + word] = word
            out.append(_KEYWORD + word if named and iskeyword(word) else word)
            i, last = i + len(word), word
        else:
            out.append(char)
            i, last = i + 1, last if char in SPACE else char
    return "".join(out), names
