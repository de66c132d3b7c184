"""The JSON of a tool call's arguments, as the tool parsers read and write it: numbers no float
holds kept as written, NaN and Infinity refused, lone surrogates escaped. Pure."""

from __future__ import annotations

import json
import math
import re
import sys
import uuid
from dataclasses import dataclass
from typing import Any


def _not_json(constant: str) -> float:
    raise ValueError(f"{constant} is not JSON")


@dataclass(frozen=True)
class Number:
    """A JSON number kept as written: one no float or int holds (1e400 overflows to inf, 1e-400
    rounds to 0.0, an integer of over 4,300 digits is past what int() reads)."""

    text: str


def _float(text: str) -> float | Number:
    value = float(text)
    if math.isfinite(value) and (value != 0.0 or not any(c in "123456789" for c in text.lower().partition("e")[0])):
        return value
    return Number(text)


def _int(text: str) -> int | Number:
    if (limit := sys.get_int_max_str_digits()) and len(text.lstrip("-")) > limit:
        return Number(text)
    return int(text)


def loads(text: str) -> Any:
    """JSON ``text`` as a call's arguments may be: NaN and Infinity are refused (read, they came
    back as arguments that are not JSON: a JS client's JSON.parse threw); a number no float or int
    holds is a ``Number`` (refused, a "required" call a schema had the model write went missing;
    read as a float, 1e400 was written back as Infinity).

    Raises:
        ValueError: it is not JSON, or holds NaN or Infinity.
    """
    return json.loads(text, parse_constant=_not_json, parse_float=_float, parse_int=_int)


def arguments_json(args: object) -> str:
    """A call's arguments as JSON text, laid out as json.dumps lays them out, non-ASCII as written
    and ``Number``s as written; escaped where a string holds a lone surrogate (a model may write
    "\\ud83d"), which no UTF-8 stream can carry."""
    try:
        text = _dumps(args, ensure_ascii=False)
        text.encode()
    except UnicodeEncodeError:
        return _dumps(args, ensure_ascii=True)
    return text


def _dumps(value: object, ensure_ascii: bool) -> str:
    """json.dumps of ``value``, each ``Number`` in it written as its text (through a string no
    model could have written: a fresh nonce's)."""
    numbers: list[str] = []
    nonce = uuid.uuid4().hex

    def number(o: object) -> str:
        if not isinstance(o, Number):
            raise TypeError(f"{type(o).__name__} is not JSON")
        numbers.append(o.text)
        return f"{nonce}{len(numbers) - 1}"

    text = json.dumps(value, ensure_ascii=ensure_ascii, default=number)
    if not numbers:
        return text
    return re.sub(f'"{nonce}([0-9]+)"', lambda m: numbers[int(m[1])], text)
