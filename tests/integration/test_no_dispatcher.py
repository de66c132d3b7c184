"""With no dispatcher running, a request is answered 503 at once (NATS "no responders"), not after
the chunk timeout (issue 16, fault 2)."""

from __future__ import annotations

import time

import aiohttp
import nats
from aiohttp import web
from redis.asyncio import Redis

from dlora.common.state import StateStore
from dlora.model.make_tiny import TinyOutput
from dlora.services.gateway.main import Gateway
from dlora.services.gateway.settings import GatewaySettings
from dlora.services.servers import Server, free_port


async def test_a_request_with_no_dispatcher_is_refused_at_once(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput
) -> None:
    settings = GatewaySettings(
        nats_url=nats_server.url,
        redis_url="unused",
        model=str(tiny_llama.model),
        port=free_port(),
        chunk_timeout_s=60.0,
    )
    nc = await nats.connect(nats_server.url)
    gateway = Gateway(settings, nc, StateStore(redis))
    await gateway.start()
    runner = web.AppRunner(gateway.app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", settings.port).start()
    try:
        start = time.monotonic()
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"http://127.0.0.1:{settings.port}/v1/completions",
                json={"model": "model", "prompt": "kalo", "max_tokens": 4, "n": 2},
            ) as r,
        ):
            body = await r.json()
        assert r.status == 503 and "no dispatcher" in body["error"]["message"], body
        assert time.monotonic() - start < 5.0  # not the 60 s chunk timeout
    finally:
        await runner.cleanup()
        await nc.drain()
