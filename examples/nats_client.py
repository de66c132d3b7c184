"""Talk to dlora over NATS directly, with no gateway: publish a GenerateRequest, read TokenChunks.

    .venv/bin/python examples/nats_client.py 'nats://app:PASSWORD@127.0.0.1:4222' lora-0 "kalo remi"

with the venv's Python (`make run` made it; the system's has neither dlora nor nats-py) and
with the URL `dlora up` prints as "NATS (applications)": its NATS server has users, and an
application connects as `app` (an unnamed connection is refused: "Authorization Violation").
Against your own NATS server (`nats_url` in dlora.toml), the URL and user your deployment gives
applications (deploy/README.md). It never waits for ever: with no dispatcher running (stopped,
restarting, or NATS itself just restarted) it says so at once, and it gives up on a request whose
chunks stop coming.
"""

from __future__ import annotations

import asyncio
import sys
import urllib.parse
import uuid

import msgspec
import nats

from dlora.common import subjects
from dlora.common.messages import AbortRequest, GenerateRequest, SamplingParams, TokenChunk

# What the gateway waits, by default, for a dispatcher to take a request (``dispatch_timeout_s``)
# and for each chunk (``chunk_timeout_s``): a published request no dispatcher received, or one
# whose worker died with no other to resume it, is otherwise waited for for ever.
DISPATCH_TIMEOUT_S = 5.0
CHUNK_TIMEOUT_S = 60.0


async def generate(nats_url: str, adapter: str | None, prompt: str, max_tokens: int = 16) -> str:
    """The text generated for ``prompt`` by ``adapter`` (None: the base model).

    Raises:
        RuntimeError: no connection (the server's word for why), no dispatcher took the request
            within ``DISPATCH_TIMEOUT_S`` (none running: at once), the request was refused (the
            error chunk's text), or no chunk came for ``CHUNK_TIMEOUT_S``.
    """
    # Requests go on your NATS user's own subject, and their replies to one under its name: where
    # the server has users (`dlora up`'s is `app`), those are the only ones you may use; so are
    # the inboxes of NATS request/reply, hence the inbox prefix (a dispatcher answers no other).
    user = urllib.parse.urlsplit(nats_url).username or "app"
    # A refused login or no server is raised from connect(), with the server's own word for it
    # (nats-py would retry and print each, then say only "no servers available")
    errors: list[Exception] = []

    async def kept(e: Exception) -> None:
        errors.append(e)

    try:
        nc = await nats.connect(nats_url, max_reconnect_attempts=2, error_cb=kept, inbox_prefix=f"_INBOX.{user}")
    except nats.errors.NoServersError:
        # every distinct reason, the server's word first (a reset can follow its refusal)
        why = "; ".join(dict.fromkeys(str(e) for e in errors)) or "no server"
        raise RuntimeError(f"cannot connect to {nats_url.rpartition('@')[2]}: {why}") from None
    sub = None
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
        # A request, not a publish: a dispatcher answers once it has taken it (empty), or with an
        # error chunk where it refuses it at once; a publish nobody received (no dispatcher
        # subscribed) is lost without a word. Sent again, under the same id and reply subject, a
        # request already taken joins its stream.
        try:
            taken = await nc.request(
                subjects.requests_of(user), msgspec.json.encode(request), timeout=DISPATCH_TIMEOUT_S
            )
        except nats.errors.NoRespondersError:
            raise RuntimeError("no dispatcher is running (or NATS has just restarted); try again shortly") from None
        except nats.errors.TimeoutError:
            raise RuntimeError(f"no dispatcher took the request within {DISPATCH_TIMEOUT_S:g} s; try again") from None
        if taken.data:
            raise RuntimeError(msgspec.json.decode(taken.data, type=TokenChunk).error)
        text = []
        while True:
            try:
                msg = await sub.next_msg(timeout=CHUNK_TIMEOUT_S)
            except nats.errors.TimeoutError:
                # stopped, as the gateway stops one it gives up on: it may still hold a worker
                await nc.publish(subjects.aborts_of(user), msgspec.json.encode(AbortRequest(request_id=request_id)))
                raise RuntimeError(f"no chunk came for {CHUNK_TIMEOUT_S:g} s; the request is aborted") from None
            chunk = msgspec.json.decode(msg.data, type=TokenChunk)
            if chunk.error:
                raise RuntimeError(chunk.error)
            text.append(chunk.text)
            if chunk.finish_reason:
                return "".join(text)
    finally:
        # Unread chunks held drain() for its whole timeout (30 s: nats-py waits for every
        # subscription's queue to be read): an at-once refusal comes on reply_to too, and an aborted
        # request's last chunk after we stopped reading.
        if sub is not None:
            await sub.unsubscribe()
        await nc.drain()


if __name__ == "__main__":
    if len(sys.argv) != 4:  # (an IndexError's traceback said nothing of what to give)
        sys.exit(f"usage: {sys.argv[0]} NATS_URL ADAPTER PROMPT  ('-' for the base model; the URL `dlora up` prints)")
    url, adapter, prompt = sys.argv[1], sys.argv[2], sys.argv[3]
    try:
        print(asyncio.run(generate(url, None if adapter == "-" else adapter, prompt)))
    except (nats.errors.Error, OSError, RuntimeError) as e:  # a refused login, no server or dispatcher, a refusal
        sys.exit(f"nats_client: {e}")
