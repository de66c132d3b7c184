"""A request's integer fields as vLLM's OpenAI server reads them: an integral float (``40.0``,
``1e3``) is the integer it writes. vLLM's bodies are pydantic models in lax mode, which takes a
float without a fractional part for an int; msgspec, strict, refused it, and a client whose JSON
encoder writes a computed or float-typed count as ``16.0`` (a spreadsheet's export, a config read
as floats) was answered 400 where vLLM served it. A fraction stays refused, naming the field (as
vLLM's server refuses it). Strings and bools stay refused too: msgspec's strict mode, OpenAI's
types. Pure: no I/O."""

from __future__ import annotations

import functools
from typing import Any, TypeVar

import msgspec

T = TypeVar("T", bound=msgspec.Struct)


class NotWhole(ValueError):
    """A value of an integer field that is no integer (a fraction, an infinity, NaN, a bool, no
    number): ``field`` names it."""

    def __init__(self, field: str, value: object) -> None:
        super().__init__(f"{field} must be an integer, got {value!r}")
        self.field = field


def whole(name: str, value: object) -> int:
    """``value`` of the integer field ``name`` as an int (an integral float as its integer).

    Raises:
        NotWhole: anything else, in the words "top_k must be an integer, got 40.5".
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():  # (False for infinities and NaN)
        return int(value)
    raise NotWhole(name, value)


@functools.cache
def integer_fields(kind: type[msgspec.Struct]) -> frozenset[str]:
    """The names (as JSON spells them) of ``kind``'s fields typed ``int`` or ``int | None``."""
    return frozenset(f.encode_name for f in msgspec.structs.fields(kind) if f.type in (int, int | None))


def with_whole_numbers(decoded: Any, kind: type[msgspec.Struct]) -> dict[str, Any] | None:
    """``decoded`` (a JSON body as plain objects) with each float in an integer field of ``kind``
    as its integer; None where it holds no such float (or is no object).

    Raises:
        NotWhole: such a float is not integral.
    """
    if not isinstance(decoded, dict):
        return None
    floats = [name for name in integer_fields(kind) if isinstance(decoded.get(name), float)]
    return {**decoded, **{name: whole(name, decoded[name]) for name in floats}} if floats else None


def decode(raw: bytes, kind: type[T]) -> T:
    """``raw`` JSON as a ``kind``, as ``msgspec.json.decode`` reads it but for an integral float in
    an integer field of ``kind``'s, read as its integer. A body that decodes strictly is read once;
    only one that does not is read again, as plain objects.

    Raises:
        msgspec.ValidationError: as ``msgspec.json.decode``, and for a float in an integer field
            that is not integral (before any other refusal), in msgspec's shape: "top_k must be an
            integer, got 40.5 - at `$.top_k`".
        msgspec.DecodeError, RecursionError: as ``msgspec.json.decode``.
    """
    try:
        return msgspec.json.decode(raw, type=kind)
    except msgspec.ValidationError:
        try:
            lifted = with_whole_numbers(msgspec.json.decode(raw), kind)
        except NotWhole as e:
            raise msgspec.ValidationError(f"{e} - at `$.{e.field}`") from None
        if lifted is None:
            raise
    return msgspec.convert(lifted, kind)
