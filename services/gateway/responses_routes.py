"""The routes that read stored responses back (``responses_store``), as OpenAI serves them:
``GET /v1/responses/{id}`` (the object its POST answered), ``DELETE /v1/responses/{id}`` and
``GET /v1/responses/{id}/input_items`` (its conversation's input items, a page at a time), and
``POST /v1/responses/{id}/cancel`` (a background response's: ``background``). Each
answers only its API key's tenant: another's id is a 404, as one never stored."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from dlora.common.state_responses import STREAMED
from dlora.services.gateway.auth import Auth
from dlora.services.gateway.background import Background
from dlora.services.gateway.openai import APIError
from dlora.services.gateway.responses_api import refuse_include
from dlora.services.gateway.responses_lease import running
from dlora.services.gateway.responses_store import ResponsesStore, not_found, stored_id

# input_items' page size: OpenAI's default and bound
DEFAULT_LIMIT, MAX_LIMIT = 20, 100


def _refuse_include(query: Any) -> None:
    """``include`` asks for what a stored response keeps not at all (hosted tools' results): a 400
    naming the first, as a create's unserved ``include`` is refused (``refuse_include``). Those a
    create takes are taken: the response is given as kept, its output's logprobs there where its
    create asked for them (vLLM's retrieve gives it as kept whatever the include)."""
    for name in ("include", "include[]"):
        for value in query.getall(name, []):
            if value:
                refuse_include(value)


def listed(item: dict[str, Any]) -> dict[str, Any]:
    """An input item as input_items lists it: a message's string content as its one text part
    (kept as sent, so that a chain's prompt is the one its client sent)."""
    if item.get("type", "message") != "message" or not isinstance(item.get("content"), str):
        return item
    part: dict[str, Any] = {"type": "output_text" if item.get("role") == "assistant" else "input_text"}
    part["text"] = item["content"]
    if part["type"] == "output_text":
        part["annotations"] = []
    return {"type": "message", "status": "completed"} | item | {"content": [part]}


def page(items: list[dict[str, Any]], order: str, limit: int, after: str | None, before: str | None) -> dict[str, Any]:
    """OpenAI's list object of ``items`` (oldest first) in ``order``, ``limit`` of them after the
    item ``after`` and before the item ``before`` (ids; each in that order): the first ``limit``,
    or with ``before`` alone the last (the page before it).

    Raises:
        APIError(400): an ``after`` or ``before`` naming no item of the list.
    """
    ordered = items if order == "asc" else items[::-1]
    ids = [i.get("id") for i in ordered]
    start, end = 0, len(ordered)
    for param, cursor in (("after", after), ("before", before)):
        if cursor is None:
            continue
        if cursor not in ids:
            raise APIError(400, f"{param} {cursor!r} names no input item of this response", param=param)
        if param == "after":
            start = ids.index(cursor) + 1
        else:
            end = ids.index(cursor)
    # paging back (``before`` alone): the page just before it, has_more saying more lie before that
    within = ordered[start:end]
    data = [listed(i) for i in (within[-limit:] if before is not None and after is None else within[:limit])]
    first, last = (data[0].get("id"), data[-1].get("id")) if data else (None, None)
    return {"object": "list", "data": data, "first_id": first, "last_id": last, "has_more": len(within) > limit}


def _limit(query: Any) -> int:
    raw = query.get("limit", str(DEFAULT_LIMIT))
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_LIMIT:
        raise APIError(400, f"limit must be an integer from 1 to {MAX_LIMIT}, got {raw!r}", param="limit")
    return limit


class ResponsesRoutes:
    def __init__(self, auth: Auth, store: ResponsesStore, background: Background) -> None:
        self.auth, self.store, self.background = auth, store, background

    async def _tenant(self, request: web.Request) -> str:
        return (await self.auth.inference(request)).tenant or ""

    async def retrieve(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/responses/{id}``: the object its POST answered. ``stream=true`` replays the
        events of a background response created streamed (``starting_after``: from the one after
        that sequence_number; ``Background.replay``); any other's (a foreground response's, a
        background one made unstreamed) are not kept: a 400."""
        tenant, query, given = await self._tenant(request), request.query, request.match_info["id"]
        _refuse_include(query)
        streamed = query.get("stream", "false").lower() not in ("false", "0")
        if "starting_after" in query and not streamed:
            raise APIError(400, "starting_after is only for stream", param="starting_after")
        # Its bytes as stored, judged by their shape alone (``ResponsesStore.fields``'s ``whole``:
        # its items not built); whether it was made streamed read with it, in one round trip
        if not streamed:
            [stored] = await self.store.fields(given, tenant, "response", whole=False)
            return web.Response(body=stored.raw, content_type="application/json")
        stored, made = await self.store.fields(given, tenant, "response", STREAMED, whole=False)
        if not stored.background:
            why = "stream is not supported: a stored response is retrieved whole (its events are not kept)"
            raise APIError(400, why, param="stream")
        if made != b"1":  # (OpenAI's 400: not an empty stream)
            why = "stream is only for a background response created with stream true: this one's events are not kept"
            raise APIError(400, why, param="stream")
        try:
            after = int(query.get("starting_after", "-1"))
        except ValueError:
            after = -2
        if after < -1:
            raise APIError(400, "starting_after must be a sequence_number (an integer >= 0)", param="starting_after")
        return await self.background.replay(request, stored_id(given), tenant, after)

    async def delete(self, request: web.Request) -> web.Response:
        """``DELETE /v1/responses/{id}``: OpenAI's deleted object; a later retrieve is a 404. A
        background response still running is stopped too (its end has nowhere to go)."""
        tenant, given = await self._tenant(request), request.match_info["id"]
        if not await self.store.delete(response_id := stored_id(given), tenant):  # (another tenant's: none such)
            raise not_found(given)  # (deleted meanwhile, or expired)
        await self.background.stop(response_id, tenant)
        return web.json_response({"id": response_id, "object": "response", "deleted": True})

    async def cancel(self, request: web.Request) -> web.Response:
        """``POST /v1/responses/{id}/cancel``: a background response queued or running, made
        ``cancelled`` and its request aborted wherever it runs (``Background.cancel``); one over
        (cancelled, or ended by itself) answered as it is, unchanged (OpenAI's: cancelling is
        idempotent; vllm#57999 refused a finished one as "synchronous"). A foreground response is
        vLLM's 400; one not there the 404."""
        tenant, given = await self._tenant(request), request.match_info["id"]
        response_id = stored_id(given)
        for _ in range(2):  # (it ended between the read and the swap: read again)
            # (one over read of its shape alone, its items not built: answered as stored)
            [stored] = await self.store.fields(given, tenant, "response", whole=False)
            if (cancelled := await self.background.cancel(response_id, tenant, stored)) is not None:
                return web.json_response(cancelled)
            if not running(stored.status):
                break
        if not stored.background:
            raise APIError(400, "Cannot cancel a synchronous response.")  # (vLLM's: no param)
        return web.Response(body=stored.raw, content_type="application/json")

    async def input_items(self, request: web.Request) -> web.Response:
        """``GET /v1/responses/{id}/input_items``: its conversation's input items (a previous
        response's items and output first), OpenAI's list object; ``order`` desc by default. Its
        ``response`` is read with them, of its shape alone (a ``Seen``: its items not built): a
        record whose response is of no response's shape is not there here either, as for every
        other route (its input alone read, its items were listed where a GET of it was a 404)."""
        tenant, query = await self._tenant(request), request.query
        _refuse_include(query)
        if (order := query.get("order", "desc")) not in ("asc", "desc"):
            raise APIError(400, f'order must be "asc" or "desc", got {order!r}', param="order")
        limit = _limit(query)
        items, _ = await self.store.fields(request.match_info["id"], tenant, "input", "response", whole=False)
        listing = page(items, order, limit, query.get("after"), query.get("before"))
        return web.json_response(listing)
