"""How a stored response's record (``StateStore.put_response``'s fields) is read back: each field
decoded once, as its readers take it (``read``), a record that does not decode so read as not
there; a route that answers the response's bytes as stored, or judges it by its ``status`` and
``background`` alone, checks its shape without building its items (``Seen``). The store that
writes records is ``responses_store``'s; the routes that read them, ``responses_routes``'s."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from dlora.common import log
from dlora.common.state import StateStore
from dlora.services.gateway.responses_lease import running, settled

logger = log.get("gateway")


class _Judged(msgspec.Struct):
    """The fields of a stored ``response`` (an object) that its readers judge it by, as every
    reader takes them: its ``status``, where it has one, a string (``responses_lease.running``
    reads it as one), and its ``background``, where it has one, a boolean (a streamed retrieve
    and a cancel judge by it). Each read of it (``_Response``, ``_Checked``, ``_Held``) takes its
    ``output`` with them, so that all agree on which records are there."""

    status: str | None = None
    background: bool | None = None


class _Response(_Judged):
    """What every reader of a stored ``response`` takes as given, its other fields read by each
    as it needs: ``_Judged``'s, and its ``output``, where it has one, a list of items, each an
    object (a previous response's are put before a request's input, their ids read)."""

    output: list[dict[str, Any]] = []


class _Checked(_Judged):
    """``_Response``'s shape as a read of it alone checks it (``_decoded``'s ``whole`` False): its
    items left undecoded (``msgspec.Raw``: views of their bytes; msgspec checks the JSON it skips,
    not its strings' UTF-8 or its numbers' range)."""

    output: list[msgspec.Raw] = []


@dataclass(frozen=True)
class Stored:
    """A stored response's object as its readers take it (``read``), decoded whole."""

    raw: bytes  # as stored: a GET answers these bytes, a compare-and-swap compares them
    object: dict[str, Any]  # decoded whole, of ``_Response``'s shape

    @property
    def status(self) -> str | None:
        return self.object.get("status")  # (``_Response``'s: a string where there is one)

    @property
    def background(self) -> bool:
        return self.object.get("background") is True


@dataclass(frozen=True)
class Seen:
    """A stored response over (not running: ``read``'s ``whole`` False), checked of its shape alone:
    what a plain GET, a streamed one, a cancel and input_items judge it by, its items not built
    (its output is read by none of them; a whole decode of an 8 MiB record of short items cost
    50 MB and about a second of the event loop, a check of its shape 2.6 MB and 43 ms)."""

    raw: bytes  # as stored: a GET (and a cancel of one over) answers these bytes
    status: str | None
    background: bool


# The type each field of a stored record is decoded as for its readers (``_decoded``): the
# conversation, items each an object (``input_items`` lists them, ``previous_response_id`` puts
# them before a request's input); the response, an object of ``_Response``'s shape
_SHAPES: dict[str, Any] = {"input": list[dict[str, Any]], "response": dict[str, Any]}


async def read(
    state: StateStore, response_id: str, tenant: str, names: Sequence[str], legacy_s: float, whole: bool = True
) -> list[Any] | None:
    """``names`` of ``tenant``'s stored response ``response_id``, each as its readers take it:
    ``input``, its items (``_SHAPES``); ``response``, a ``Stored``, as it stands (a background one
    whose run was lost ended first: ``settled``, after ``legacy_s`` for an older gateway's); any
    other, as ``StateStore.response_fields`` answers it. None: none such for ``tenant`` (never
    stored, expired, deleted, another tenant's), or one whose fields do not decode whole so (cut
    short, written by hand: each reader raised on it, a 500 on every read until its DELETE).
    Decoded here once, into what its readers use, so that none decodes it again and fails (a
    check of the shape alone, its items skipped, let a string's bad UTF-8 or a number past a
    double's range through to the readers). ``whole`` False (for a reader of its ``status``,
    ``background`` and bytes alone, never of its output): its ``response`` a ``Seen`` where it
    is over, checked of its shape alone, a ``Stored`` where it runs (what ends it, a cancel or
    ``settled``, writes it changed; ``_decoded``). The caller bounds the Redis work.

    Raises:
        ``bus.STATE_OUTAGE``: Redis failed.
    """
    got = await state.response_fields(response_id, tenant, *names)
    if got is None or got[0] != tenant.encode() or any(v is None for v in got):
        return None
    values: list[Any] = [_decoded(name, raw, whole) if name in _SHAPES else raw for name, raw in zip(names, got[1:])]
    if any(v is None for v in values):
        logger.warning("a stored response that is no response's JSON is read as not there", id=response_id)
        return None
    k = names.index("response") if "response" in names else None
    if k is not None and isinstance(stored := values[k], Stored):  # (not a ``Seen``: over)
        if (now := await settled(state, response_id, tenant, stored, legacy_s)) != stored.raw:
            values[k] = _decoded("response", now, whole)  # (failed here, or changed meanwhile: None, gone)
            if values[k] is None:
                return None
    return values


def held(items: bytes | None, response: bytes | None) -> list[str]:
    """The ids of the items a stored record holds (its ``input`` and its ``response``'s output),
    each field read for its items' ids alone (``_Held``): built whole, the DELETE of an 8 MiB
    record of short items (and a retry written over one) held the event loop 1.4 s and took
    84 MB, where its ids alone cost 78 ms and 16 MB. A field that is no such JSON (a record cut
    short, or written by hand) holds none: its DELETE (or a retry written over it) goes on, where
    it was a 500 that left the record there for good; the sets it was in pass over it once it is
    gone (``StateStore.responses_of_items``). (An item whose other fields do not decode, a
    string of bad UTF-8, a number past a double's range, is not built here: its id is read.)"""
    conversation, stored = _ided(items, list[_Item]), _ided(response, _Held)
    found = [*(conversation or []), *(stored.output if stored is not None else [])]
    return list(dict.fromkeys(i.id for i in found if isinstance(i.id, str)))


class _Item(msgspec.Struct):
    """An item (an object) as ``held`` reads it: its ``id`` alone, of any JSON type (one that is
    no string names none), its other fields checked as JSON, not built."""

    id: Any = None


class _Held(_Judged):
    """``_Response``'s shape as ``held`` reads it: its output's items' ids alone (``_Item``)."""

    output: list[_Item] = []


# What a record that does not decode (or check) as its shape raises: ValidationError is a DecodeError;
# RecursionError, msgspec's bound on nesting
_UNREAD = (msgspec.DecodeError, RecursionError)


def _ided(raw: bytes | None, shape: Any) -> Any:
    """``raw`` decoded as ``shape``; None where it is none, or does not decode so."""
    if raw is None:
        return None
    try:
        return msgspec.json.decode(raw, type=shape)
    except _UNREAD:
        return None


def _decoded(name: str, raw: bytes | None, whole: bool = True) -> Any:
    """``raw`` decoded whole as a record's field ``name`` (``_SHAPES``; a ``response``, a ``Stored``
    of ``_Response``'s shape); None where it is none, or does not decode so. ``whole`` False: a
    ``response`` not running checked of its shape alone (``_Checked``), a ``Seen``: its readers
    want its bytes, ``status`` or ``background`` alone, and a whole decode, for a 404 in place of
    a record no gateway writes, cost them 2-30 times the time and 20-35 times the memory (an
    8 MiB record of short items: 1.3 s of the event loop, every stream on the gateway stalled,
    not 43 ms; 50 MB, not 2.6 MB)."""
    if raw is None:  # (_ided says so too; here for the raw kept in a Seen or Stored)
        return None
    if name == "response" and not whole:
        if (shape := _ided(raw, _Checked)) is None:
            return None
        if not running(shape.status):
            return Seen(raw, shape.status, shape.background is True)
    if (value := _ided(raw, _SHAPES[name])) is None or name != "response":
        return value
    try:
        msgspec.convert(value, _Response)  # (its shape: a check of what was just decoded, not parsed again)
    except _UNREAD:
        return None
    return Stored(raw, value)
