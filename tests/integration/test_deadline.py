"""A request's deadline (``GenerateRequest.deadline``, Unix seconds), set by an application on NATS:
a worker does not start a request past it, and stops one it runs once it passes; the stream ends
with an error chunk saying so, and the request's record with it."""

from __future__ import annotations

import asyncio
import time

import msgspec

from dlora.common import subjects
from dlora.common.messages import GenerateRequest, SamplingParams, TokenChunk
from tests.integration.conftest import Stack


async def test_a_request_is_not_started_past_its_deadline_and_stopped_when_it_passes(stack: Stack) -> None:
    chunks: dict[str, asyncio.Queue[TokenChunk]] = {"late": asyncio.Queue(), "long": asyncio.Queue()}

    async def on_chunk(msg) -> None:  # type: ignore[no-untyped-def]
        chunk = msgspec.json.decode(msg.data, type=TokenChunk)
        chunks[chunk.request_id].put_nowait(chunk)

    await stack.nc.subscribe("test.reply.>", cb=on_chunk)

    async def send(request_id: str, deadline: float) -> None:
        req = GenerateRequest(
            request_id=request_id,
            reply_to=f"test.reply.{request_id}",
            prompt_token_ids=[5, 6, 7],
            params=SamplingParams(max_tokens=500, ignore_eos=True),  # ~3 s here: well past the deadline
            deadline=deadline,
        )
        await stack.nc.request(subjects.REQUESTS, msgspec.json.encode(req), timeout=60)

    await send("late", time.time() - 1)
    told = await asyncio.wait_for(chunks["late"].get(), 60)
    assert (told.seq, told.token_ids, told.error_code) == (0, [], "unavailable") and "deadline" in (told.error or "")

    await send("long", time.time() + 0.5)
    tokens, seq = 0, -1
    while not (chunk := await asyncio.wait_for(chunks["long"].get(), 60)).finish_reason:
        tokens, seq = tokens + len(chunk.token_ids), chunk.seq
    assert chunk.error_code == "unavailable" and "deadline passed" in (chunk.error or ""), chunk
    assert 0 < tokens < 500 and chunk.seq == seq + 1  # what ran was sent, then the reason, in order
    for _ in range(100):
        if await stack.store.get_inflight("long") is None:
            break
        await asyncio.sleep(0.05)
    assert await stack.store.get_inflight("long") is None
    assert all("long" not in w.streams for w in stack.workers) and not any(
        w.engine.has_unfinished() for w in stack.workers
    )
