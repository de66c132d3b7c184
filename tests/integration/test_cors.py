"""CORS, vLLM's --allowed-origins and its three companions: a page of an allowed origin has its
preflight answered and reads every answer, an error's too; another origin gets no CORS header; a
gateway with none set sends no CORS header at all (opt-in, where vLLM allows any origin)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import aiohttp
import nats
from redis.asyncio import Redis

from dlora.common.state import StateStore
from dlora.model.make_tiny import TinyOutput
from dlora.services.servers import Server
from tests.integration.conftest import start_gateway

PAGE = "https://app.example.com"
PREFLIGHT = {
    "Origin": PAGE,
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization, content-type",
}


def _gateway(nats_server: Server, redis: Redis, tiny: TinyOutput) -> Callable[..., AbstractAsyncContextManager[str]]:
    @asynccontextmanager
    async def started(**fields: Any) -> AsyncIterator[str]:
        """A gateway alone (no dispatcher: a completion is a 503 once it waited 0.1 s for one) with
        these settings: its URL."""
        conns: list[nats.NATS] = []
        fields = {"dispatch_timeout_s": 0.1} | fields
        url, runner = await start_gateway(nats_server.url, StateStore(redis), str(tiny.model), conns, **fields)
        try:
            yield url
        finally:
            await runner.cleanup()
            await conns[0].drain()

    return started


async def test_an_allowed_origin_has_its_preflight_answered_and_reads_every_answer(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput
) -> None:
    started = _gateway(nats_server, redis, tiny_llama)
    async with started(allowed_origins=[PAGE], allow_credentials=True) as url, aiohttp.ClientSession() as http:
        async with http.options(url + "/v1/chat/completions", headers=PREFLIGHT) as r:
            assert r.status == 200, await r.text()
            assert r.headers["Access-Control-Allow-Origin"] == PAGE
            assert r.headers["Access-Control-Allow-Methods"] == "POST"
            allowed = {h.strip().lower() for h in r.headers["Access-Control-Allow-Headers"].split(",")}
            assert allowed == {"authorization", "content-type"}
            assert r.headers["Access-Control-Allow-Credentials"] == "true"
            assert r.headers["Access-Control-Max-Age"] == "600"
        async with http.get(url + "/v1/models", headers={"Origin": PAGE}) as r:
            assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == PAGE
        body = {"model": "model", "prompt": "kalo", "max_tokens": 2}
        async with http.post(url + "/v1/completions", json=body, headers={"Origin": PAGE}) as r:
            assert r.status == 503 and r.headers["Access-Control-Allow-Origin"] == PAGE  # a page reads why
            assert r.headers["Vary"] == "Origin"
        async with http.get(url + "/v1/models", headers={"Origin": "https://evil.example"}) as r:
            assert r.status == 200 and "Access-Control-Allow-Origin" not in r.headers
            assert r.headers["Vary"] == "Origin"  # else a cache could hand this answer to the page, or its to others
        other = PREFLIGHT | {"Origin": "https://evil.example"}
        async with http.options(url + "/v1/chat/completions", headers=other) as r:
            assert r.status == 403 and "Access-Control-Allow-Origin" not in r.headers
            assert "'https://evil.example'" in (await r.json())["error"]["message"]  # named, not "Forbidden"
    async with (
        started(allowed_origins=[PAGE], allowed_methods=["GET"], allowed_headers=["content-type"]) as url,
        aiohttp.ClientSession() as http,
    ):
        async with http.options(url + "/v1/completions", headers=PREFLIGHT) as r:
            assert r.status == 403 and "Access-Control-Allow-Origin" not in r.headers  # neither POST nor authorization
        # the method alone refused: a route's own method was taken as allowed, whatever allowed_methods said
        post_only = PREFLIGHT | {"Access-Control-Request-Headers": "content-type"}
        async with http.options(url + "/v1/completions", headers=post_only) as r:
            assert r.status == 403 and "Access-Control-Allow-Origin" not in r.headers, r.headers
            assert "method 'POST' is not allowed" in (await r.json())["error"]["message"]
        async with http.options(url + "/v1/models", headers=post_only | {"Access-Control-Request-Method": "GET"}) as r:
            assert r.status == 200 and r.headers["Access-Control-Allow-Methods"] == "GET"


async def test_without_allowed_origins_no_cors_header_is_sent(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput
) -> None:
    async with _gateway(nats_server, redis, tiny_llama)() as url, aiohttp.ClientSession() as http:
        async with http.options(url + "/v1/chat/completions", headers=PREFLIGHT) as r:
            assert r.status == 405 and not any(h.startswith("Access-Control-") for h in r.headers)
        async with http.get(url + "/v1/models", headers={"Origin": PAGE}) as r:
            assert r.status == 200 and not any(h.startswith("Access-Control-") for h in r.headers)
