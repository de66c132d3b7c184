"""``GET /v1/models`` and ``GET /v1/models/{model}``: the base model and every adapter the caller
may use, as OpenAI's model cards (``models.model_cards``, from the live workers and the registry)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from dlora.services.gateway.models import model_cards
from dlora.services.gateway.openai import model_not_found

if TYPE_CHECKING:
    from dlora.services.gateway.main import Gateway


class ModelRoutes:
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw

    async def models(self, request: web.Request) -> web.Response:
        """``GET /v1/models``: the base model and every adapter the caller may use."""
        return web.json_response({"object": "list", "data": await self._cards(request)})

    async def model(self, request: web.Request) -> web.Response:
        """``GET /v1/models/{model}``: one of those cards; 404 for a model the caller may not use."""
        name = request.match_info["model"]
        card = next((c for c in await self._cards(request) if c["id"] == name), None)
        if card is None:
            raise model_not_found(name, self.gw.base_name)
        return web.json_response(card)

    async def _cards(self, request: web.Request) -> list[dict[str, Any]]:
        gw = self.gw
        who = await gw.auth.lister(request)
        async with gw.state_bound():
            workers, adapters = await gw.store.live_workers(), await gw.store.list_adapters()
        s = gw.served
        return model_cards(gw.base_name, workers, adapters, who, int(time.time()), s.context, s.model_digest)
