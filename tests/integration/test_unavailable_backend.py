"""The gateway without a working backend: with no dispatcher a request is answered 503 at once
(NATS "no responders"); with a dispatcher whose workers never answer, 503 after the chunk timeout."""

from __future__ import annotations

import time

import aiohttp
import nats
from aiohttp import web
from redis.asyncio import Redis

from dlora.common import subjects
from dlora.common.state import StateStore
from dlora.model.make_tiny import TinyOutput
from dlora.services.gateway.main import Gateway
from dlora.services.gateway.settings import GatewaySettings
from dlora.services.servers import Server, free_port, start_nats


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


async def test_a_silent_worker_fails_the_request_instead_of_hanging(redis, tiny_llama) -> None:
    """A dispatcher takes the request but no worker ever answers: the gateway gives up after
    chunk_timeout_s. (With no dispatcher at all it answers at once: the test above.)"""
    server = start_nats()
    nc = await nats.connect(server.url)
    try:
        settings = GatewaySettings(
            nats_url=server.url, model=str(tiny_llama.model), port=free_port(), chunk_timeout_s=0.3
        )
        gateway = Gateway(settings, nc, StateStore(redis))
        await gateway.start()

        async def take_and_drop(msg) -> None:  # a dispatcher whose workers are gone
            await msg.respond(b"")

        await nc.subscribe(subjects.REQUESTS, queue=subjects.DISPATCHERS, cb=take_and_drop)
        runner = web.AppRunner(gateway.app())
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", settings.port).start()
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"http://127.0.0.1:{settings.port}/v1/completions",
                json={"model": "model", "prompt": "kalo", "max_tokens": 2},
            ) as r:
                assert r.status == 503 and "no worker" in (await r.json())["error"]["message"]
            async with http.post(
                f"http://127.0.0.1:{settings.port}/v1/chat/completions",
                json={
                    "model": "model",
                    "messages": [{"role": "user", "content": "kalo"}],
                    "max_tokens": 2,
                    "stream": True,
                    "n": 2,
                },
            ) as r:
                # streamed too: an error before the first token is a status, not an event after a 200
                assert r.status == 503 and "no worker" in (await r.json())["error"]["message"]
            # not ready with no live worker, and says why; alive all the same
            for path in ("/healthz", "/readyz"):
                async with http.get(f"http://127.0.0.1:{settings.port}{path}") as r:
                    body = await r.json()
                    assert r.status == 503 and body["status"] == "unavailable" and body["workers"] == 0, body
                    assert body["reason"] == "no worker is live"
            async with http.get(f"http://127.0.0.1:{settings.port}/livez") as r:
                assert r.status == 200
        await runner.cleanup()
    finally:
        await nc.drain()
        server.stop()
