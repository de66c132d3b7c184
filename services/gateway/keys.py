"""API key administration over HTTP, for admins (the ``admin_key`` or a key with the admin scope):
``POST /v1/keys`` makes one and shows it once, ``GET /v1/keys`` lists them (never the key, nor its
digest), ``DELETE /v1/keys/{id}`` revokes one. ``dlora keys create|list|revoke`` does the same
from a shell, straight on Redis and NATS (``services/keys_cli.py``)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Annotated

import msgspec
from aiohttp import web

from dlora.common import apikeys
from dlora.services.gateway import openai
from dlora.services.gateway.auth import Auth
from dlora.services.gateway.openai import APIError, documented

# 0 (no limit) or a rate a refusal's wait can be said for (apikeys.MIN_RATE)
_RATES = {"minimum": apikeys.MIN_RATE, "maximum": apikeys.MAX_LIMIT}


class KeyBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """``POST /v1/keys``: the tenant the key acts for, its scopes, and its own limits (unset: the
    gateway's ``key_rate_per_s`` / ``key_burst`` / ``key_concurrency``; 0: no limit)."""

    # The checks ``apikeys.check_spec`` makes, said in the OpenAPI document too (documentation only:
    # the check says why in its own words): a schema-driven client's valid request was refused.
    tenant: Annotated[str, documented(pattern=f"^{apikeys.TENANT_PATTERN}$")]
    scopes: Annotated[list[Annotated[str, documented(enum=list(apikeys.SCOPES))]], documented(minItems=1)] = (
        msgspec.field(default_factory=lambda: [apikeys.INFERENCE])
    )
    rate_per_s: Annotated[float, documented(anyOf=[{"const": 0}, _RATES])] | None = None
    burst: Annotated[int, documented(minimum=0, maximum=apikeys.MAX_LIMIT)] | None = None
    concurrency: Annotated[int, documented(minimum=0, maximum=apikeys.MAX_LIMIT)] | None = None


ReadBody = Callable[[web.Request], Awaitable[bytes]]


class KeyAdmin:
    """The three handlers, over the gateway's ``Auth``: who may, and its ``KeyRegistry``, where
    (read at each request: the gateway opens the durable one when it starts)."""

    def __init__(self, auth: Auth, read_body: ReadBody) -> None:
        self.auth, self.read_body = auth, read_body

    async def _reachable(self) -> None:
        """Redis answers within the gateway's bound (else its 503 in 2 s, not redis-py's 20)."""
        await self.auth.state_bound.reachable(self.auth.keys.store.r.ping)

    async def create(self, request: web.Request) -> web.Response:
        """201 with the new key (the only time it is shown) and its record.

        Raises (answered): APIError 401/403 (not an admin), 400 (an invalid field, named), 413/415."""
        await self.auth.admin(request)
        body = openai.decode_body(await self.read_body(request), KeyBody)
        try:
            secret, key = apikeys.new_key(
                body.tenant,
                body.scopes,
                time.time(),
                rate_per_s=body.rate_per_s,
                burst=body.burst,
                concurrency=body.concurrency,
            )
        except apikeys.KeySpecError as e:
            raise APIError(400, str(e), param=e.param) from None
        await self._reachable()  # (the write itself stays unbounded: one run late is a key nobody was given)
        await self.auth.keys.add(key)
        return web.json_response({**apikeys.public(key), "key": secret}, status=201)

    async def listing(self, request: web.Request) -> web.Response:
        await self.auth.admin(request)
        await self._reachable()
        keys = await self.auth.keys.all()
        return web.json_response({"object": "list", "data": [apikeys.public(k) for k in keys]})

    async def revoke(self, request: web.Request) -> web.Response:
        """200 with the revoked key's record; 404 for an id no key has."""
        await self.auth.admin(request)
        key_id = request.match_info["id"]
        await self._reachable()
        key = await self.auth.keys.revoke(key_id)
        if key is None:
            raise APIError(404, f"no API key has the id {key_id!r}", param="id")
        return web.json_response(apikeys.public(key))
