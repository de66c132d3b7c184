"""OpenAI's stored responses (``store``, OpenAI's default), kept in Redis (``StateStore.put_response``)
so that every gateway sharing it serves them and a restart loses none: a finished response's object
and its conversation's input items, for ``ttl_s`` seconds (``GatewaySettings.responses_ttl_s``),
each at most ``max_bytes``. A later request's ``previous_response_id`` puts that conversation (its
input items, then its output) before its own input, ``instructions`` not carried over (OpenAI's
rule); an ``item_reference`` names any item a response of its tenant stored (its input or output,
OpenAI's): each response's whole conversation indexed by id with it, read from a response that
holds the item, so a chain's earlier items (and a fork's shared ones) stay referable while any
response holding them lives. Each is its API key's tenant's alone: another tenant's id is a 404,
as one never stored. As vLLM with VLLM_ENABLE_RESPONSES_API_STORE, its conversation stored whole
with each response (``msg_store``): a response stays readable when the one before it expired or
was deleted. The HTTP routes that read them back are ``responses_routes``'s."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any

import msgspec

from dlora.common import bus, log
from dlora.common.state import StateStore
from dlora.services.gateway.openai import APIError
from dlora.services.gateway.responses_api import ResponsesBody
from dlora.services.gateway.responses_lease import running
from dlora.services.gateway.responses_metrics import StoreCounts
from dlora.services.gateway.responses_read import held, read

logger = log.get("gateway")

# An item's id, where its client sent none, begins as OpenAI's do (``input_items`` lists every item by id)
_PREFIX = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}
# The most stored responses one request's item_references read (each read whole, up to
# responses_max_bytes): references to items of more are refused, not read at any cost
MAX_REFERENCED = 16


def stored_id(given: str) -> str:
    """The stored response a client's id names: every id stored here is "resp_" and the base its
    response was made of (``ResponsesShape.base``: a client's own request_id or X-Request-Id,
    less a "resp_" of its own), so the id its client chose ("hello") names "resp_hello", as
    vLLM's routes take a client's request_id as its response's id (vllm PR #25428); no other
    stored id is meant by it."""
    return given if given.startswith("resp_") else f"resp_{given}"


def not_found(response_id: str, param: str | None = None) -> APIError:
    """OpenAI's 404 for a response that is not there (never stored, expired, deleted or another
    tenant's: told apart by nobody); named by a request's ``previous_response_id``, OpenAI's 400
    ``previous_response_not_found`` (a field of the request is what is wrong; vLLM answers a 404,
    which the openai package raised as NotFoundError where a client of OpenAI's catches
    BadRequestError: smg#916 lists OpenAI's 400)."""
    if param == "previous_response_id":
        why = f"Previous response with id {response_id!r} not found."
        return APIError(400, why, param=param, code="previous_response_not_found")
    return APIError(404, f"Response with id {response_id!r} not found.", param=param)


def _items(given: str | list[Any]) -> list[Any]:
    """A request's input as items: a string, the one user message it stands for."""
    return [{"type": "message", "role": "user", "content": given}] if isinstance(given, str) else list(given)


def conversation(
    prior: list[dict[str, Any]], given: str | list[Any], stored: dict[str, Any] | None = None
) -> str | list[Any]:
    """The items a request is served with: the conversation ``prior`` (its previous response's
    input items and output; empty without one), then its own input, each ``item_reference`` the
    item it names: one of ``prior``'s (there twice, refused) or of ``stored`` (items of other
    stored responses of its tenant, by id: ``ResponsesStore.referenced``).

    Raises:
        APIError(400): an item_reference with no id; an item's id twice (OpenAI's "Duplicate item
            found": one named by item_reference is there already).
        APIError(404): an item_reference naming no stored item.
    """
    if not _references(given):
        _unique(items := [*prior, *_items(given)])
        return items if prior else given  # (a string as it came: the prompt unchanged)
    by_id = {i.get("id"): i for i in prior} | (stored or {})
    out: list[Any] = list(prior)
    for k, item in enumerate(_items(given)):
        if isinstance(item, dict) and item.get("type") == "item_reference":
            where, ref = f"input[{k}]", item.get("id")
            if not isinstance(ref, str):
                raise APIError(400, f"{where}: an item_reference names an item by its id (a string)", f"{where}.id")
            if (item := by_id.get(ref)) is None:
                raise APIError(404, f"Item with id {ref!r} not found.", param=f"{where}.id")
        out.append(item)
    _unique(out)
    return out


def answered(output: list[Any], after: list[Any]) -> None:
    """OpenAI's 400 for a previous response's function call (of its ``output``) whose output is
    not among the items ``after`` it: a template rendered a call never answered, and the model
    went on as if it had been (openai-agents-python#673 shows OpenAI's words).

    Raises:
        APIError(400): "No tool output found for function call call_...", param input.
    """
    outputs = {i.get("call_id") for i in after if isinstance(i, dict) and i.get("type") == "function_call_output"}
    for item in output:
        if isinstance(item, dict) and item.get("type") == "function_call" and item.get("call_id") not in outputs:
            raise APIError(400, f"No tool output found for function call {item.get('call_id')}.", param="input")


def _unique(items: list[Any]) -> None:
    """OpenAI's 400 for an item id twice in the conversation (its client sent the previous
    response's items again beside previous_response_id, or referenced one of them): input_items
    pages by id, and a cursor naming an id twice sent the openai package's pager round for ever."""
    seen: set[str] = set()
    for item in items:
        if isinstance(item, dict) and isinstance(i := item.get("id"), str):
            if i in seen:
                why = f"Duplicate item found with id {i}. Remove duplicate items from your input and try again."
                raise APIError(400, why, param="input")
            seen.add(i)


@dataclass
class Keeping:
    """One request's response, to be stored once it is over (``ResponsesShape.keep`` decides it
    with its final object; ``finishing`` writes it, before its last bytes go out, so that the
    client's next turn, sent the moment it reads them, finds it on any gateway)."""

    store: ResponsesStore
    tenant: str
    items: list[Any]  # the conversation served: ``conversation``'s
    # A background response's: its record as last written (``background``), which its next write
    # replaces only if it is still there (a cancel or a delete in between wins); None: written whole
    expect: bytes | None = None
    # A streamed background response's run token, written with its first record: only its run's
    # events are appended to its stream (``StateStore.append_events``)
    stream: str | None = None
    # A background response's whose run holds a lease (``responses_lease``), written with its first
    # record: a reader tells an older gateway's record, which has none, by its absence
    leased: bool = False
    # Its id named by its client (request_id, X-Request-Id; ``Responses.answer`` tells): a stored
    # response may be under it, which its write replaces after reading the items that one held
    # (``StateStore.put_response``'s ``held``). An id the gateway drew names none: written in one
    # MULTI/EXEC, nothing read. True where nobody tells: a read too many, never a set left naming it
    named: bool = True
    written: bytes | None = field(default=None, init=False)  # what ``finishing`` wrote (None: nothing)
    # Counted too large once: a background one's failed object, and that shrunk, are tries of the
    # same response (``ResponsesShape.final``), each of which counted it again
    _refused: bool = field(default=False, init=False)
    _record: tuple[str, bytes, dict[str, Any], list[str]] | None = field(default=None, init=False)

    def keep(self, response: dict[str, Any]) -> bool:
        """Whether ``response`` (its final object: completed, incomplete or failed) is stored: the
        new items given ids of it, the whole within ``max_bytes`` (else answered, not kept)."""
        base = response["id"].removeprefix("resp_")
        for k, item in enumerate(self.items):
            if isinstance(item, dict) and not item.get("id") and (prefix := _PREFIX.get(item.get("type", "message"))):
                self.items[k] = {**item, "id": f"{prefix}_{base}_in{k}"}
        items = msgspec.json.encode(self.items)
        size = len(items) + len(msgspec.json.encode(response))
        if size > self.store.max_bytes:
            if not self._refused:
                logger.warning("a response over responses_max_bytes is not stored", id=response["id"], bytes=size)
                self.store.count("write", "too_large")
            self._refused = True
            self._record = None  # (a background response's queued object, kept before, is not written again)
            return False
        # Every item of the conversation, not only its own: indexed by the response that first stored
        # it alone, an earlier turn's item was a 404 once that turn expired or was deleted, though
        # each later turn of its chain still held it (``StateStore.put_response``: one more holder of each)
        self._record = (response["id"], items, response, _ids([*self.items, *response["output"]]))
        return True

    async def finishing(self, events: Sequence[bytes] = ()) -> bool:
        """Stores what ``keep`` took; False: Redis failed, its response's ``store`` made false.
        That loses only the store: the answer still goes out, saying so (a stream's last event is
        framed again: ``Responses.answer``). ``events``: a streamed background response's last,
        appended with its final object in one step (``background.EventLog``)."""
        if self._record is None:
            return True
        response_id, items, response, ids = self._record
        encoded = msgspec.json.encode(response)
        try:
            async with self.store.bound():
                put = await self.store.state.put_response(
                    response_id,
                    self.tenant,
                    encoded,
                    items,
                    self.store.ttl_s,
                    ids,
                    expect=self.expect,
                    stream=self.stream,
                    events=events,
                    leased=self.leased,
                    held=held if self.named else None,
                )
            self.written = encoded if put else None
        except bus.STATE_OUTAGE as e:
            response["store"] = False
            logger.warning("a response could not be stored", id=response_id, error=type(e).__name__)
            self.store.count("write", "failed")
            return False
        self.store.count("write", "stored")
        if self.store.counts is not None:
            self.store.counts.written.inc(len(encoded) + len(items))
        return True


@dataclass
class ResponsesStore:
    """Stored responses in Redis, as the gateway's settings bound them."""

    state: StateStore
    bound: Callable[[], AbstractAsyncContextManager[None]]  # a request's Redis work (``Gateway.state_bound``)
    ttl_s: float
    max_bytes: int
    counts: StoreCounts | None = None  # (the gateway's metrics; None: uncounted)
    # Seconds after a reader first found an older gateway's background response (which holds no
    # lease) running before one judges it lost (``settled``, on Redis's clock): a lease's span
    # (``Background.lease_s``)
    legacy_s: float = 0.0

    @property
    def on(self) -> bool:
        return self.ttl_s > 0

    def count(self, op: str, outcome: str, n: int = 1) -> None:
        if self.counts is not None:
            self.counts.count(op, outcome, n)

    async def fields(
        self, given: str, tenant: str, *names: str, param: str | None = None, whole: bool = True
    ) -> list[Any]:
        """``names`` of ``tenant``'s response its client names ``given`` (``stored_id``), each as
        its readers take it (``read``; ``whole`` False: for a reader of its ``response``'s bytes,
        ``status`` and ``background`` alone, a ``Seen`` where it is over, its items not built).

        Raises:
            APIError(404): none such for ``tenant``, named as its client named it ("hello", not
                "resp_hello": the id it sent is the one it looks for); named by ``param``
                "previous_response_id", a 400 (``not_found``).
        """
        try:
            async with self.bound():
                got = await read(self.state, stored_id(given), tenant, names, self.legacy_s, whole)
        except bus.STATE_OUTAGE:
            self.count("read", "failed")
            raise
        if got is None:
            self.count("read", "miss")
            raise not_found(given, param)
        self.count("read", "hit")
        return got

    async def delete(self, response_id: str, tenant: str) -> bool:
        """Whether ``tenant``'s response ``response_id`` was there to delete (another tenant's: not).
        Its items stay referable while another response holds them (a later turn, a fork of the
        same previous response, one whose item_reference read them: each stored the whole
        conversation), their index gone with the last holder (``StateStore.delete_response``)."""
        try:
            async with self.bound():
                deleted = await self.state.delete_response(response_id, tenant, held)
        except bus.STATE_OUTAGE:
            self.count("delete", "failed")
            raise
        self.count("delete", "hit" if deleted else "miss")
        return deleted

    async def prepared(self, body: ResponsesBody, tenant: str) -> tuple[ResponsesBody, Keeping | None]:
        """``body`` with the conversation its previous_response_id names put before its input, and
        what keeps its response (None: not stored, ``store`` false, the store off, or the
        conversation already over ``max_bytes``).

        Raises:
            APIError(400): previous_response_id not a string, or not there (OpenAI's code
                ``previous_response_not_found``), or the store off, or naming a background
                response not over (its answer would be left out of the conversation); a function
                call of the previous response's left without its output (``answered``).
            APIError(404): ``conversation``'s.
        """
        previous = body.previous_response_id
        if previous is not None and not isinstance(previous, str) or previous == "":
            raise APIError(400, "previous_response_id must be a response's id (a string)", "previous_response_id")
        if not self.on and (previous is not None or _references(body.input)):
            param = "previous_response_id" if previous is not None else "input"
            raise APIError(400, f"{param}: responses are not stored here (responses_ttl_s is 0)", param=param)
        prior: list[dict[str, Any]] = []
        output: list[Any] = []  # the previous response's
        if previous is not None:
            items, record = await self.fields(previous, tenant, "input", "response", param="previous_response_id")
            if running(record.status):  # a background one not over: no answer yet
                why = f"Previous response with id {previous!r} is still {record.status}: wait until it is over."
                raise APIError(400, why, param="previous_response_id")
            output = record.object.get("output", [])  # (``_Response``'s: items, each an object)
            prior = [*items, *output]
        stored = await self.referenced(body.input, prior, tenant)
        given = conversation(prior, body.input, stored)
        answered(output, _items(given)[len(prior) :])
        body = msgspec.structs.replace(body, input=given)
        if not self.on or body.store is False:
            return body, None
        if (size := len(msgspec.json.encode(kept := _items(given)))) > self.max_bytes:
            # over the bound before a token is made: not stored, said from the stream's first event
            logger.warning("a conversation over responses_max_bytes is not stored", bytes=size)
            self.count("write", "too_large")
            return body, None
        return body, Keeping(self, tenant, kept)

    async def referenced(self, given: str | list[Any], prior: list[dict[str, Any]], tenant: str) -> dict[str, Any]:
        """The stored items ``given``'s item_references name (by id; those of ``prior`` aside),
        each read from the conversation of a response that holds it (``StateStore.put_response``
        indexes them); one not found (never stored, expired, another tenant's) left out.

        Raises:
            APIError(400): items of more than ``MAX_REFERENCED`` responses named at once.
        """
        known = {i.get("id") for i in prior}
        wanted = [r for r in _referenced_ids(given) if r not in known]
        if not wanted:
            return {}
        try:
            stored = await self._items_of(wanted, tenant)
        except bus.STATE_OUTAGE:
            self.count("reference", "failed", len(wanted))
            raise
        except APIError:  # (more responses than MAX_REFERENCED: none read)
            self.count("reference", "refused", len(wanted))
            raise
        self.count("reference", "hit", len(stored))
        self.count("reference", "miss", len(wanted) - len(stored))  # (each a 404: the first ends the request)
        return stored

    async def _items_of(self, wanted: list[str], tenant: str) -> dict[str, Any]:
        stored: dict[str, Any] = {}
        async with self.bound():
            # Looked up once more for those whose holder was gone when read: a DELETE between the
            # lookup and the read (of a fork, a later turn) left the item held by another, a 404
            for _ in range(2):
                missing = [w for w in wanted if w not in stored]
                holders = await self.state.responses_of_items(missing, tenant)
                if len(responses := {h for h in holders if h is not None}) > MAX_REFERENCED:
                    why = f"item_references name items of {len(responses)} responses, at most {MAX_REFERENCED} at once"
                    raise APIError(400, why, param="input")
                gone = False
                for response_id in responses:
                    # (read as every route reads it: one they read as not there holds none)
                    got = await read(self.state, response_id, tenant, ("input", "response"), self.legacy_s)
                    if got is None:
                        gone = True  # (deleted since, or replaced)
                        continue
                    for item in [*got[0], *got[1].object.get("output", [])]:
                        if isinstance(item, dict) and item.get("id") in missing and item["id"] not in stored:
                            stored[item["id"]] = item
                if not gone:
                    break
        return stored


def _referenced_ids(given: str | list[Any]) -> list[str]:
    refs = (i.get("id") for i in _items(given) if isinstance(i, dict) and i.get("type") == "item_reference")
    return list(dict.fromkeys(r for r in refs if isinstance(r, str)))


_INDEX = re.compile(r"\binput\[(\d+)\]")


def counted_as_sent(e: APIError, served: str | list[Any], given: str | list[Any]) -> APIError:
    """``e``, a refusal of the items ``served`` (``conversation``'s), naming an item by its index
    in ``given``, as its client counts them: the conversation put before them had each named
    past the previous response's items (input[4] for the client's first)."""
    prior = len(served) - len(_items(given)) if isinstance(served, list) else 0
    if prior <= 0:
        return e

    def sent(m: re.Match[str]) -> str:
        return f"input[{int(m[1]) - prior}]" if int(m[1]) >= prior else m[0]

    param = _INDEX.sub(sent, e.param) if e.param else e.param
    return APIError(e.status, _INDEX.sub(sent, e.message), param=param, kind=e.kind, code=e.code, headers=e.headers)


def _references(given: str | list[Any]) -> bool:
    return any(isinstance(i, dict) and i.get("type") == "item_reference" for i in _items(given))


def _ids(items: list[Any]) -> list[str]:
    """The ids of ``items`` (a response's conversation and its output), unique."""
    return list(dict.fromkeys(i["id"] for i in items if isinstance(i, dict) and isinstance(i.get("id"), str)))
