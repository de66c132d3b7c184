"""How a stored response's record (``StateStore.put_response``'s fields) is read back: each field
decoded once, as its readers take it (``read``), a record that does not decode so read as not
there. The store that writes records is ``responses_store``'s; the routes that read them,
``responses_routes``'s."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from dlora.common import log
from dlora.common.state import StateStore
from dlora.services.gateway.responses_lease import running, settled

logger = log.get("gateway")


def held(items: bytes | None, response: bytes | None) -> list[str]:
    """The ids of the items a stored record holds (its ``input`` and its ``response``'s output).
    A field that is no such JSON (a record cut short, or written by hand) holds none: its DELETE
    (or a retry written over it) goes on, where it was a 500 that left the record there for good;
    the sets it was in pass over it once it is gone (``StateStore.responses_of_items``)."""
    return item_ids(_record_items(items, response))


class _Response(msgspec.Struct):
    """What every reader of a stored ``response`` (an object) takes as given, its other fields
    read by each as it needs: its ``output``, where it has one, a list of items, each an object
    (a previous response's are put before a request's input, their ids read), and its
    ``status``, where it has one, a string (``responses_lease.running`` reads it as one)."""

    output: list[dict[str, Any]] = []
    status: str | None = None


class _Checked(msgspec.Struct):
    """``_Response``'s shape as a plain GET checks it (``_decoded``'s ``whole`` False): its items
    left undecoded (``msgspec.Raw``: views of their bytes; msgspec checks the JSON it skips, not
    its strings' UTF-8 or its numbers' range), its ``status`` a string where it has one."""

    output: list[msgspec.Raw] = []
    status: str | None = None


@dataclass(frozen=True)
class Stored:
    """A stored response's object as its readers take it (``read``)."""

    raw: bytes  # as stored: a GET answers these bytes, a compare-and-swap compares them
    object: dict[str, Any]  # decoded whole, of ``_Response``'s shape


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
    double's range through to the readers). ``whole`` False (a plain GET, which answers the
    bytes as stored): its ``response`` as those bytes, checked of its shape alone where it is not
    running (``_decoded``). The caller bounds the Redis work.

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
    if k is not None and isinstance(stored := values[k], Stored):  # (not: a plain GET's, over)
        if (now := await settled(state, response_id, tenant, stored, legacy_s)) != stored.raw:
            values[k] = _decoded("response", now, whole)  # (failed here, or changed meanwhile: None, gone)
            if values[k] is None:
                return None
        if not whole and isinstance(values[k], Stored):
            values[k] = values[k].raw
    return values


def _record_items(items: bytes | None, response: bytes | None) -> list[Any]:
    """A stored record's conversation (``input``) and its ``response``'s output; a field that is
    none, or does not decode as its readers take it (``_decoded``), holds none."""
    conversation, stored = _decoded("input", items), _decoded("response", response)
    return [*(conversation or []), *(stored.object.get("output", []) if stored is not None else [])]


def _decoded(name: str, raw: bytes | None, whole: bool = True) -> Any:
    """``raw`` decoded whole as a record's field ``name`` (``_SHAPES``; a ``response``, a ``Stored``
    of ``_Response``'s shape); None where it is none, or does not decode so. ``whole`` False: a
    ``response`` not running checked of its shape alone (``_Checked``) and given as ``raw``: a plain
    GET answers its bytes, and a whole decode, for a 404 in place of a record no gateway writes,
    cost it 2-30 times the time and 20-35 times the memory (an 8 MiB record of short items: 1.3 s
    of the event loop, every stream on the gateway stalled, not 43 ms; 50 MB, not 2.6 MB)."""
    if raw is None:
        return None
    try:
        if name == "response" and not whole and not running({"status": msgspec.json.decode(raw, type=_Checked).status}):
            return raw
        value = msgspec.json.decode(raw, type=_SHAPES[name])
        if name == "response":
            msgspec.convert(value, _Response)  # (its shape: a check of what was just decoded, not parsed again)
            return Stored(raw, value)
        return value
    except (msgspec.DecodeError, RecursionError):  # (ValidationError is one; msgspec's bound on nesting)
        return None


def item_ids(items: list[Any]) -> list[str]:
    """The ids of ``items`` (a response's conversation and its output), unique."""
    return list(dict.fromkeys(i["id"] for i in items if isinstance(i, dict) and isinstance(i.get("id"), str)))
