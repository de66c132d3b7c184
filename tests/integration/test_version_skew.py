"""A worker older than the service that sends it a request (a rolling upgrade): a request with a
field it lacks does not decode there. It was dropped (counted as rejected) and its client waited
for its timeout; now the sender is told why, at once, and the request's record ends."""

from __future__ import annotations

import asyncio
import json

import msgspec

from dlora.common import subjects
from dlora.common.messages import GenerateRequest, SamplingParams, TokenChunk
from tests.integration.conftest import Stack


async def test_a_request_a_worker_cannot_read_is_answered_503_and_its_record_ended(stack: Stack) -> None:
    worker = stack.workers[0].s.worker_id
    chunks: asyncio.Queue[TokenChunk] = asyncio.Queue()

    async def on_chunk(msg) -> None:  # type: ignore[no-untyped-def]
        chunks.put_nowait(msgspec.json.decode(msg.data, type=TokenChunk))

    await stack.nc.subscribe("test.reply.>", cb=on_chunk)
    req = GenerateRequest(
        request_id="newer",
        reply_to="test.reply.newer",
        prompt_token_ids=[5, 6, 7],
        params=SamplingParams(max_tokens=4),
        next_seq=3,  # resumed: the answer continues its numbering
    )
    assert await stack.store.put_inflight(req, worker, new=True)  # as a (newer) dispatcher records it
    raw = json.loads(msgspec.json.encode(req))
    raw["params"]["a_field_of_a_newer_version"] = True
    await stack.nc.publish(subjects.worker_requests(worker), json.dumps(raw).encode())
    told = await asyncio.wait_for(chunks.get(), 10)
    assert (told.request_id, told.seq, told.error_code, told.finish_reason) == ("newer", 3, "unavailable", "error")
    assert worker in (told.error or "") and "a_field_of_a_newer_version" in (told.error or "")
    for _ in range(100):  # ended just after the answer went out
        if await stack.store.get_inflight("newer") is None:
            break
        await asyncio.sleep(0.05)
    assert await stack.store.get_inflight("newer") is None

    # the worker serves on: the same request without the field runs to its end
    fine = msgspec.structs.replace(req, request_id="fine", reply_to="test.reply.fine", next_seq=0)
    await stack.nc.publish(subjects.worker_requests(worker), msgspec.json.encode(fine))
    while not (chunk := await asyncio.wait_for(chunks.get(), 30)).finish_reason:
        pass
    assert chunk.request_id == "fine" and chunk.error is None

    # nothing to answer on: counted as rejected and dropped, as before
    await stack.nc.publish(subjects.worker_requests(worker), b'{"request_id": 1}')
    await stack.nc.flush()
    await asyncio.sleep(0.2)
    assert chunks.empty()
