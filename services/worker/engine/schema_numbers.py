"""A JSON Schema's numbers as the grammar engine holds them: its bounds (minimum, maximum,
exclusive ones, multipleOf) in 64-bit integers, a const's and an enum's numbers in 64-bit floats.
``too_large`` and ``bound_in_grammar`` find a bound it cannot hold, ``misread_number`` one it
would read as another number; ``served_schema`` refuses either."""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

# A schema's numeric bounds (JSON Schema's keywords). llguidance holds them in 64-bit integers:
# beyond, it clamps them (a 200 whose number broke its schema) or, below -2**63 with a maximum,
# crashed its process (SIGSEGV: the gateway's, and every worker's a request reached).
BOUNDS = {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"}
_BOUND = re.compile(r'"(minimum|maximum|exclusiveMinimum|exclusiveMaximum|multipleOf)"\s*:\s*(-?[0-9][0-9.eE+-]*)')


def too_large(value: int | Decimal) -> bool:
    """Whether ``value``'s magnitude reaches 2**63 (a Decimal's exponent first: abs() of 1e1000000
    raised decimal.Overflow, a 500)."""
    if isinstance(value, Decimal):
        return not value.is_finite() or value.adjusted() >= 19 or abs(value) >= 2**63
    return abs(value) >= 2**63


def bound_in_grammar(text: str) -> tuple[str, str] | None:
    """The first numeric bound in a grammar's %json blocks whose magnitude reaches 2**63, as
    (keyword, its number)."""
    for match in _BOUND.finditer(text):
        with contextlib.suppress(ArithmeticError):
            if too_large(Decimal(match[2])):
                return match[1], match[2]
    return None


# A const's and an enum's numbers, as llguidance reads and writes them: 64-bit floats, an integer
# below 2**63 cast back (saturating). "const": 9007199254740993 (2**53 + 1: an int64 id) was
# written 9007199254740992 and 1.5e-400 as 0, documents a Python client reads as other numbers
# than its schema's; a minimum of 1e-400 allowed 0. Refused, as a bound past 2**63 is.
_I64 = (-(2**63), 2**63 - 1)


def _as_read(value: int | Decimal) -> int | Decimal | None:
    """``value`` as llguidance writes it back (None: past a float's range, which it refuses)."""
    try:
        f = float(value)
    except OverflowError:
        return None
    if math.isinf(f):
        return None
    if isinstance(value, int) and _I64[0] <= value <= _I64[1]:
        return max(_I64[0], min(int(f), _I64[1]))
    return Decimal(repr(f))


def _numbers(data: Any) -> Iterator[int | Decimal]:
    """The numbers in JSON ``data`` (a loop: data thousands deep is served)."""
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, int | Decimal) and not isinstance(item, bool):
            yield item
        elif isinstance(item, list | dict):
            stack.extend(item.values() if isinstance(item, dict) else item)


def misread_number(node: dict[str, Any]) -> tuple[str, str, str] | None:
    """The first number of ``node``'s const or enum the grammar engine writes as another, or bound
    it reads as another integer (a "maximum" of 9007199254740999 allowed 9007199254741000; a
    "minimum" of 2**53 + 1, 2**53) or as zero, as (keyword, the number, as read)."""
    for key in ("const", "enum"):
        for value in _numbers(node.get(key)):
            # An integer written as another (an id), or a decimal as 0. A decimal with more digits
            # than a float holds (pi to 20) is written as the float every float reader makes of
            # the schema's own number: served (refused, it was a 400 xgrammar does not give).
            # llguidance's own writing also moves some floats' last digit (a review: 8 in ~150
            # random ones), which no check short of its reader and writer copied would catch.
            read = _as_read(value)
            if read is not None and read != value and (isinstance(value, int) or read == 0):
                return key, str(value), str(read)
    for key in sorted(BOUNDS & node.keys()):
        value = node[key]
        if type(value) is int and not too_large(value) and (read := _as_read(value)) is not None and read != value:
            return key, str(value), str(read)
        if isinstance(value, Decimal) and value.is_finite() and value != 0 and float(value) == 0:
            return key, str(value), "0"
    return None
