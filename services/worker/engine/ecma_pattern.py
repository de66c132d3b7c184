"""A JSON Schema pattern's "." as ECMA-262 (JSON Schema's regex dialect) reads it, written for
the grammar engine's Rust-like regexes."""

from __future__ import annotations

import re

# ECMA-262's "." (JSON Schema's pattern dialect) matches any character but a line terminator:
# \n, \r, U+2028 and U+2029 (json-schema-org/json-schema-spec #1469). llguidance's patterns
# (Rust's regex) leave out \n alone, and "^.{3}$" answered "a\rb", a string a JavaScript
# client's validator (ajv) refuses. Written as the class ECMA-262 means.
_ECMA_DOT = "[^\\n\\r\u2028\u2029]"


# A group's flags, ECMA-262's modifiers (ES2025: "(?s:.)" is any character) and Rust's, which
# llguidance reads: "(?s)" sets its group's rest, "(?s:...)" its own, "(?-s:...)" unsets.
_FLAGS = re.compile(r"\(\?([a-zA-Z]*)(?:-([a-zA-Z]*))?([:)])")


def ecma_dots(pattern: str) -> str:
    """``pattern`` with each "." outside an escape, a character class and a dotAll ("s") group
    written as ``_ECMA_DOT`` ("a.b" is "a", the class, "b"; "\\.", "[.]" and "(?s:.)" stay)."""
    out, saved, dotall, in_class, at = [], [], False, False, 0
    while at < len(pattern):
        char = piece = pattern[at]
        if char == "\\":
            piece = pattern[at : at + 2]
        elif in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
        elif char == "(":
            saved.append(dotall)
            if (flags := _FLAGS.match(pattern, at)) is not None:
                dotall = (dotall or "s" in flags[1]) and "s" not in (flags[2] or "")
                if flags[3] == ")":  # no group of its own: the enclosing one's restores it
                    saved.pop()
                piece = flags[0]
        elif char == ")" and saved:
            dotall = saved.pop()
        at += len(piece)
        out.append(_ECMA_DOT if char == "." and not dotall and not in_class else piece)
    return "".join(out)
