"""A stream whose chunks came with a gap in their numbers, against a real gateway and NATS: a
dispatcher stand-in takes the request and publishes its chunks out of order."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import msgspec
import nats
import pytest
from aiohttp import web
from redis.asyncio import Redis

from dlora.common import subjects
from dlora.common.messages import GenerateRequest, TokenChunk
from dlora.common.state import StateStore
from dlora.model.make_tiny import TinyOutput
from dlora.services.gateway import replies
from dlora.services.gateway.main import Gateway
from dlora.services.gateway.settings import GatewaySettings
from dlora.services.servers import free_port, start_nats


async def test_chunks_a_late_chunk_released_go_out_before_the_gap_after_them_fails_the_stream(
    redis: Redis, tiny_llama: TinyOutput, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunk 1 comes last, after 2 and 4: it releases 1 and 2 in order, while the gap at 3 has
    been open past its wait and fails the stream. Its text was the client's, and was dropped:
    the client saw "a" then the error, not "abc" (the closing notes' left item)."""
    monkeypatch.setattr(replies, "GAP_WAIT_S", 0.2)
    server = start_nats()
    nc = await nats.connect(server.url)
    try:
        settings = GatewaySettings(nats_url=server.url, model=str(tiny_llama.model), port=free_port())
        gateway = Gateway(settings, nc, StateStore(redis))
        await gateway.start()

        async def out_of_order(msg) -> None:  # type: ignore[no-untyped-def]
            await msg.respond(b"")
            req = msgspec.json.decode(msg.data, type=GenerateRequest)

            async def send(seq: int, text: str) -> None:
                chunk = TokenChunk(request_id=req.request_id, seq=seq, token_ids=[5], text=text, worker="w0")
                await nc.publish(req.reply_to, msgspec.json.encode(chunk))

            for seq, text in ((0, "a"), (2, "c"), (4, "e")):
                await send(seq, text)
            await nc.flush()
            await asyncio.sleep(0.5)  # the gap at 1 (and so at 3) open past GAP_WAIT_S
            await send(1, "b")

        await nc.subscribe(subjects.REQUESTS, queue=subjects.DISPATCHERS, cb=out_of_order)
        runner = web.AppRunner(gateway.app())
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", settings.port).start()
        try:
            async with (
                aiohttp.ClientSession() as http,
                http.post(
                    f"http://127.0.0.1:{settings.port}/v1/completions",
                    json={"model": "model", "prompt": "kalo", "max_tokens": 8, "stream": True},
                ) as r,
            ):
                lines = (await r.text()).splitlines()
            events = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: {")]
        finally:
            await runner.cleanup()
        text = "".join(c["text"] for e in events if "choices" in e for c in e["choices"])
        assert text == "abc", events
        assert "lost in transit" in events[-1]["error"]["message"], events
    finally:
        await nc.drain()
        server.stop()
