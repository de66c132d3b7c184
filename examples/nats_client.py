"""Talk to dlora over NATS directly, with no gateway: publish a GenerateRequest, read TokenChunks.

    python examples/nats_client.py nats://127.0.0.1:4222 lora-0 "kalo remi"

(`dlora up` prints its NATS URL in the DLORA_NATS_URL of its services; set `nats_url` in
dlora.toml to run against your own server.)
"""

from __future__ import annotations

import asyncio
import sys
import urllib.parse
import uuid

import msgspec
import nats

from dlora.common import subjects
from dlora.common.messages import GenerateRequest, SamplingParams, TokenChunk


async def generate(nats_url: str, adapter: str | None, prompt: str, max_tokens: int = 16) -> str:
    nc = await nats.connect(nats_url)
    # Requests go on your NATS user's own subject, and their replies to one under its name: where
    # the server has users (`dlora up`'s is `app`), those are the only ones you may use.
    user = urllib.parse.urlsplit(nats_url).username or "app"
    try:
        request_id = uuid.uuid4().hex
        reply_to = subjects.reply_inbox(request_id, user)
        sub = await nc.subscribe(reply_to)  # subscribe before publishing, so no chunk is missed
        request = GenerateRequest(
            request_id=request_id,
            reply_to=reply_to,
            adapter=adapter,
            prompt=prompt,
            params=SamplingParams(max_tokens=max_tokens),
        )
        await nc.publish(subjects.requests_of(user), msgspec.json.encode(request))
        text = []
        async for msg in sub.messages:
            chunk = msgspec.json.decode(msg.data, type=TokenChunk)
            if chunk.error:
                raise RuntimeError(chunk.error)
            text.append(chunk.text)
            if chunk.finish_reason:
                return "".join(text)
        return "".join(text)
    finally:
        await nc.drain()


if __name__ == "__main__":
    url, adapter, prompt = sys.argv[1], sys.argv[2], sys.argv[3]
    print(asyncio.run(generate(url, None if adapter == "-" else adapter, prompt)))
