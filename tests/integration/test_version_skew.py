"""A worker older than the service that sends it a request (a rolling upgrade): a request with a
field it lacks does not decode there. It is handed back at once for another worker (a newer one)
to take; back again, its sender is told why (503) and its record ends, instead of waiting for its
timeout."""

from __future__ import annotations

import asyncio
import json

import msgspec

from dlora.common import bus, subjects
from dlora.common.messages import GenerateRequest, SamplingParams, TokenChunk
from tests.integration.conftest import Stack


async def test_a_request_a_worker_cannot_read_goes_to_another_and_else_is_answered_503(stack: Stack) -> None:
    first, other = (w.s.worker_id for w in stack.workers)
    chunks: asyncio.Queue[TokenChunk] = asyncio.Queue()

    async def on_chunk(msg) -> None:  # type: ignore[no-untyped-def]
        chunks.put_nowait(msgspec.json.decode(msg.data, type=TokenChunk))

    await stack.nc.subscribe("test.reply.>", cb=on_chunk)

    def newer(req: GenerateRequest) -> bytes:
        raw = json.loads(msgspec.json.encode(req))
        raw["params"]["a_field_of_a_newer_version"] = True
        return json.dumps(raw).encode()

    # Recorded as the (newer) dispatcher recorded it; the record's copy is what a re-dispatch sends,
    # which the other worker reads here, as a newer worker would read the field.
    req = GenerateRequest(
        request_id="newer",
        reply_to="test.reply.newer",
        prompt_token_ids=[5, 6, 7],
        params=SamplingParams(max_tokens=4, ignore_eos=True),
        next_seq=3,  # resumed: the answer continues its numbering
    )
    assert await stack.store.put_inflight(req, first, new=True)
    await stack.nc.publish(subjects.worker_requests(first), newer(req))
    served = []
    while not (chunk := await asyncio.wait_for(chunks.get(), 30)).finish_reason:
        served.append(chunk)
    assert chunk.error is None and chunk.worker == other and [c.seq for c in served] == [3, 4, 5]
    assert len([t for c in [*served, chunk] for t in c.token_ids]) == 4

    # Back at the same worker (no other took it): answered, 503, saying why
    lone = msgspec.structs.replace(req, request_id="lone", reply_to="test.reply.lone", next_seq=0)
    for _ in range(2):
        await stack.nc.publish(subjects.worker_requests(first), newer(lone))
    told = await asyncio.wait_for(chunks.get(), 10)
    assert (told.request_id, told.seq, told.error_code, told.finish_reason) == ("lone", 0, "unavailable", "error")
    assert first in (told.error or "") and "a_field_of_a_newer_version" in (told.error or "")

    # nothing to answer on: counted as rejected and dropped, as before
    await stack.nc.publish(subjects.worker_requests(first), b'{"request_id": 1}')
    await bus.flush(stack.nc)
    await asyncio.sleep(0.2)
    assert chunks.empty()
