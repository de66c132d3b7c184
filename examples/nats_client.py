"""Talk to dlora over NATS directly, with no gateway: publish a GenerateRequest, read TokenChunks.

    python examples/nats_client.py 'nats://app:PASSWORD@127.0.0.1:4222' lora-0 "kalo remi"

with the URL `dlora up` prints as "NATS (applications)": its NATS server has users, and an
application connects as `app` (an unnamed connection is refused: "Authorization Violation").
Against your own NATS server (`nats_url` in dlora.toml), the URL and user your deployment gives
applications (deploy/README.md).
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
    # A refused login or no server is raised from connect(), with the server's own word for it
    # (nats-py would retry and print each, then say only "no servers available")
    errors: list[Exception] = []

    async def kept(e: Exception) -> None:
        errors.append(e)

    try:
        nc = await nats.connect(nats_url, max_reconnect_attempts=2, error_cb=kept)
    except nats.errors.NoServersError:
        # every distinct reason, the server's word first (a reset can follow its refusal)
        why = "; ".join(dict.fromkeys(str(e) for e in errors)) or "no server"
        raise RuntimeError(f"cannot connect to {nats_url.rpartition('@')[2]}: {why}") from None
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
            # a long-running app sets `client` (f"{user}.<name>") and announces it every second
            # (common.clients.announce on subjects.clients_of(user)), so its requests stop if it
            # goes away (README, NATS-native API)
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
    try:
        print(asyncio.run(generate(url, None if adapter == "-" else adapter, prompt)))
    except (nats.errors.Error, OSError, RuntimeError) as e:  # a refused login, no server, a refused request
        sys.exit(f"nats_client: {e}")
