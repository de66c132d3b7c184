"""A worker older than the service that sends it a request (a rolling upgrade): a request with a
field it lacks does not decode there. It is handed back at once for another worker (a newer one)
to take; back again, its sender is told why (503) and its record ends, instead of waiting for its
timeout."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import msgspec

from dlora.common import bus, subjects
from dlora.common.messages import GenerateRequest, SamplingParams, TokenChunk
from tests.integration.conftest import ADMIN_KEY, Stack


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
    told = await asyncio.wait_for(chunks.get(), 60)
    assert (told.request_id, told.seq, told.error_code, told.finish_reason) == ("lone", 0, "unavailable", "error")
    assert first in (told.error or "") and "a_field_of_a_newer_version" in (told.error or "")

    # nothing to answer on: counted as rejected and dropped, as before
    await stack.nc.publish(subjects.worker_requests(first), b'{"request_id": 1}')
    await bus.flush(stack.nc)
    await asyncio.sleep(0.2)
    assert chunks.empty()


async def test_a_request_tokenized_for_another_model_runs_on_no_worker_of_this_one(stack: Stack) -> None:
    """Services started apart (`dlora serve`, several hosts) named the same model path, one host
    holding another revision: the gateway's token ids ran under another tokenizer, without a word.
    Each request says which model its ids are for; the dispatcher sends it only to workers of that
    model, and a worker refuses one sent to it directly."""
    chunks: asyncio.Queue[TokenChunk] = asyncio.Queue()

    async def on_chunk(msg) -> None:  # type: ignore[no-untyped-def]
        chunks.put_nowait(msgspec.json.decode(msg.data, type=TokenChunk))

    await stack.nc.subscribe("test.reply.>", cb=on_chunk)
    await bus.flush(stack.nc)
    ours = stack.gateway.served.model_digest
    assert ours and all(w.engine.model_digest == ours for w in stack.workers)
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    req = GenerateRequest(
        request_id="other", reply_to="test.reply.other", prompt_token_ids=[5, 6], params=params, model_digest="0" * 16
    )
    await stack.nc.publish(subjects.REQUESTS, msgspec.json.encode(req))
    told = await asyncio.wait_for(chunks.get(), 60)
    assert (told.request_id, told.error_code, told.finish_reason) == ("other", "unavailable", "error")
    assert "no live worker serves the base model" in (told.error or "") and ours in (told.error or "")
    direct = msgspec.structs.replace(req, request_id="direct", reply_to="test.reply.direct")
    await stack.nc.publish(subjects.worker_requests(stack.workers[0].s.worker_id), msgspec.json.encode(direct))
    told = await asyncio.wait_for(chunks.get(), 60)
    assert (told.request_id, told.error_code) == ("direct", "internal") and "mixes models" in (told.error or "")
    same = msgspec.structs.replace(req, request_id="same", reply_to="test.reply.same", model_digest=ours)
    await stack.nc.publish(subjects.REQUESTS, msgspec.json.encode(same))
    while not (chunk := await asyncio.wait_for(chunks.get(), 30)).finish_reason:
        pass
    assert chunk.request_id == "same" and chunk.error is None
    for w in stack.workers:  # as if both ran another revision: not ready, saying why
        w.engine.model_digest = "f" * 16
    async with aiohttp.ClientSession() as http, asyncio.timeout(60):
        while True:
            async with http.get(f"{stack.url}/healthz") as r:
                if r.status == 503:
                    assert "every live worker serves another base model" in (await r.json())["reason"]
                    break
            await asyncio.sleep(0.1)
        # nor named as serving it, and marked on the status page (a helper: listed as normal workers)
        async with http.get(f"{stack.url}/v1/models/model") as r:
            assert (await r.json())["served_by"] == []
        async with http.get(f"{stack.url}/v1/status", headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as r:
            doc = await r.json()
        assert doc["model_digest"] == ours and {w["model_digest"] for w in doc["workers"]} == {"f" * 16}
