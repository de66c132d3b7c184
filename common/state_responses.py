"""The Redis key of the Responses API's stored responses (``{p}:response:{tenant}:{id}``, a hash:
``tenant``, ``response`` (the response object, JSON), ``input`` (the conversation's input items,
JSON)); ``state.py`` lists every key. A part of ``StateStore``.

Under its tenant (its API key's; "" without keys): a response's id is its client's X-Request-Id
where one is sent (vLLM's), so one tenant naming its request as another's response was stored
over that one; each tenant's ids are its own."""

from __future__ import annotations

from typing import cast

from redis.asyncio import Redis


class ResponseKeys:
    """``StateStore``'s operations on stored responses (``gateway/responses_store.py``)."""

    r: Redis
    p: str

    async def put_response(self, response_id: str, tenant: str, response: bytes, items: bytes, ttl_s: float) -> None:
        """Keep a finished response for ``ttl_s`` seconds: its fields and their expiry in one
        transaction, so no record outlives its TTL (a gateway dying between the two). One of the
        tenant's own under the same id (its client sent the same X-Request-Id again, a retry) is
        replaced, as vLLM's store replaces it."""
        key = f"{self.p}:response:{tenant}:{response_id}"
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(key, mapping={"tenant": tenant, "response": response, "input": items})
        pipe.pexpire(key, max(1, int(ttl_s * 1000)))
        await pipe.execute()

    async def response_fields(self, response_id: str, tenant: str, *fields: str) -> list[bytes | None] | None:
        """``fields`` of ``tenant``'s stored response (``tenant`` first), or None: it has none
        under ``response_id`` (never stored, expired or deleted)."""
        key = f"{self.p}:response:{tenant}:{response_id}"
        got = cast(list[bytes | None], await self.r.hmget(key, ["tenant", *fields]))
        return None if got[0] is None else got

    async def delete_response(self, response_id: str, tenant: str) -> bool:
        return bool(await self.r.delete(f"{self.p}:response:{tenant}:{response_id}"))
