"""GBNF (llama.cpp's grammar form) converted to Lark as llguidance reads it.

llguidance's converter writes a GBNF ``\\u0041`` as ``\\u41`` and ``\\U0001F600`` as ``\\U1F600``
(leading zeros stripped, no braces), which its Lark lexer refuses ("lexer error"): a 400 for a
grammar vLLM's default backend (xgrammar) serves, as llama.cpp does. Each such escape is written
first as one the converter keeps: ``\\xNN`` below U+0080 (quotes, brackets, controls: kept
escaped), else the character itself, which no GBNF syntax uses.
"""

from __future__ import annotations

import re

from llguidance.gbnf_to_lark import gbnf_to_lark as _llguidance_gbnf_to_lark

# An escaped backslash first, so that "\\u0041" stays a backslash and the text "u0041".
_ESCAPE = re.compile(r"\\\\|\\u([0-9a-fA-F]{4})|\\U([0-9a-fA-F]{8})")


def _kept(match: re.Match[str]) -> str:
    digits = match[1] or match[2]
    if digits is None:
        return match[0]
    code = int(digits, 16)
    if code < 0x80:
        return f"\\x{code:02x}"
    if code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
        return match[0]  # (no character: the converter says why)
    return chr(code)


def gbnf_to_lark(grammar: str) -> str:
    """llguidance's ``gbnf_to_lark`` of ``grammar``, its ``\\u``/``\\U`` escapes read."""
    return _llguidance_gbnf_to_lark(_ESCAPE.sub(_kept, grammar))
