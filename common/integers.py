"""A request's integer fields as vLLM's OpenAI server reads them: an integral float (``40.0``,
``1e3``) is the integer it writes. vLLM's bodies are pydantic models in lax mode, which takes a
float without a fractional part for an int; msgspec, strict, refused it, and a client whose JSON
encoder writes a computed or float-typed count as ``16.0`` (a spreadsheet's export, a config read
as floats) was answered 400 where vLLM served it. That holds wherever the type asks for an int:
a field, a list's items (``stop_token_ids``, ``tokens``), a nested object's fields, a constrained
``Annotated[int, ...]``. A fraction stays refused, naming the field (as vLLM's server refuses
it). Strings and bools stay refused too: msgspec's strict mode, OpenAI's types. Pure: no I/O."""

from __future__ import annotations

import functools
from typing import Any, TypeVar

import msgspec
from msgspec import inspect as mi

T = TypeVar("T", bound=msgspec.Struct)

_LISTS = (mi.ListType, mi.SetType, mi.FrozenSetType, mi.VarTupleType)


class NotWhole(ValueError):
    """A value of an integer field that is no integer (a fraction, an infinity, NaN, a bool, no
    number): ``field`` names it, ``path`` is where it is (msgspec's ``$.stop_token_ids[0]``)."""

    def __init__(self, field: str, value: object, path: str | None = None) -> None:
        super().__init__(f"{field} must be an integer, got {value!r}")
        self.field = field
        self.path = f"$.{field}" if path is None else path


def integral(value: object) -> object:
    """``value``, an integral float as its int, anything else as it is (for a check after it to
    refuse in its own words)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value  # (not inf, NaN)


def whole(name: str, value: object) -> int:
    """``value`` of the integer field ``name`` as an int (an integral float as its integer).

    Raises:
        NotWhole: anything else, in the words "top_k must be an integer, got 40.5".
    """
    if isinstance(number := integral(value), int) and not isinstance(number, bool):
        return number
    raise NotWhole(name, value)


def _members(t: mi.Type) -> tuple[mi.Type, ...]:
    """``t``'s alternatives, each with its ``Annotated`` constraints taken off."""
    alternatives = t.types if isinstance(t, mi.UnionType) else (t,)
    return tuple(a.type if isinstance(a, mi.Metadata) else a for a in alternatives)


def _wants_int(t: mi.Type) -> bool:
    """Whether a float in a place typed ``t`` can only be meant as an int: ``t`` takes an int and no float."""
    kinds = _members(t)
    return any(isinstance(k, mi.IntType) for k in kinds) and not any(isinstance(k, mi.FloatType) for k in kinds)


def _lifted(value: Any, t: mi.Type, path: str, name: str) -> Any:
    """``value`` (JSON as plain objects, at ``path`` in field ``name``) with each float where ``t``
    wants an int as that int; the same object where none is. Raises NotWhole for a fraction."""
    if isinstance(value, float):
        if not _wants_int(t):
            return value
        if not value.is_integer():  # (False for infinities and NaN)
            raise NotWhole(name, value, path)
        return int(value)
    kinds = _members(t)
    if isinstance(value, list):
        items = [k.item_type for k in kinds if isinstance(k, _LISTS)]
        if len(items) != 1:  # no list, or several (then which one a float was meant for is unsaid)
            return value
        new = [_lifted(v, items[0], f"{path}[{i}]", name) for i, v in enumerate(value)]
        return value if all(a is b for a, b in zip(new, value, strict=True)) else new
    if isinstance(value, dict):
        objects = [k for k in kinds if isinstance(k, (mi.StructType, mi.DictType))]
        if len(objects) != 1:
            return value
        shape = objects[0]
        if isinstance(shape, mi.DictType):
            new_items = {k: _lifted(v, shape.value_type, f"{path}.{k}", name) for k, v in value.items()}
        else:
            fields = {f.encode_name: f.type for f in shape.fields}
            new_items = {
                k: _lifted(v, fields[k], f"{path}.{k}", name or k) if k in fields else v for k, v in value.items()
            }
        return value if all(new_items[k] is v for k, v in value.items()) else new_items
    return value


@functools.cache
def _shape(kind: type[msgspec.Struct]) -> mi.Type:
    return mi.type_info(kind)


def integer_fields(kind: type[msgspec.Struct]) -> frozenset[str]:
    """The names (as JSON spells them) of ``kind``'s fields that take an int and no float."""
    shape = _shape(kind)
    assert isinstance(shape, mi.StructType)
    return frozenset(f.encode_name for f in shape.fields if _wants_int(f.type))


def with_whole_numbers(decoded: Any, kind: type[msgspec.Struct]) -> Any | None:
    """``decoded`` (a JSON body as plain objects) with each float where ``kind`` wants an int as
    its integer, however deep; None where it holds no such float.

    Raises:
        NotWhole: such a float is not integral; ``field`` names the body's top-level field.
    """
    lifted = _lifted(decoded, _shape(kind), "$", "")
    return None if lifted is decoded else lifted


def decode(raw: bytes, kind: type[T]) -> T:
    """``raw`` JSON as a ``kind``, as ``msgspec.json.decode`` reads it but for an integral float
    where ``kind`` wants an int, read as its integer. A body that decodes strictly is read once;
    only one that does not is read again, as plain objects.

    Raises:
        msgspec.ValidationError: as ``msgspec.json.decode``, and for a float where an int is
            wanted that is not integral (before any other refusal), in msgspec's shape: "top_k
            must be an integer, got 40.5 - at `$.top_k`" (a list's item: "... - at `$.tokens[1]`").
        msgspec.DecodeError, RecursionError: as ``msgspec.json.decode``.
    """
    try:
        return msgspec.json.decode(raw, type=kind)
    except msgspec.ValidationError as refused:
        try:
            lifted = with_whole_numbers(msgspec.json.decode(raw), kind)
        except NotWhole as e:
            raise msgspec.ValidationError(f"{e} - at `{e.path}`") from None
        except RecursionError:  # nested past what the plain read follows (the typed one skipped it): its reason stands
            raise refused from None
        if lifted is None:
            raise
    return msgspec.convert(lifted, kind)
