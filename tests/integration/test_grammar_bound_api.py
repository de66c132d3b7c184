"""A structured output llguidance takes hours to compile, sent to the real stack: a 400 naming the
field from the gateway, a refusal naming it from a worker reached over NATS, within the bound
(``grammar_compilation_timeout_s``), other requests served meanwhile (vLLM #54003's kind)."""

from __future__ import annotations

import asyncio
import json

import msgspec
import nats
from redis.asyncio import Redis

from dlora.common import subjects
from dlora.common.messages import GenerateRequest, SamplingParams, TokenChunk
from dlora.model.make_tiny import TinyOutput
from dlora.services.gateway.replies import ReplyStream
from dlora.services.servers import Server
from tests.integration.conftest import run_stack
from tests.integration.test_gateway import post
from tests.unit.test_grammar_compile_bound import LIVENESS_S, SLOW

BOUND = {"grammar_compilation_timeout_s": 1.0}


async def test_a_schema_too_slow_to_compile_is_refused_naming_its_field(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput
) -> None:
    schema = json.loads(SLOW)
    plain = {"model": "lora-1", "prompt": "kalo", "max_tokens": 3, "temperature": 0}
    async with run_stack(nats_server, redis, tiny_llama, worker=BOUND, **BOUND) as stack:
        for field, value in (
            ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}),
            ("guided_json", schema),
            ("structured_outputs", {"json": schema}),
        ):
            refused = asyncio.create_task(post(stack, "/v1/completions", {**plain, field: value}))
            status, resp = await asyncio.wait_for(post(stack, "/v1/completions", plain), LIVENESS_S)
            assert status == 200, resp  # served beside the compile
            status, resp = await asyncio.wait_for(refused, LIVENESS_S)
            assert status == 400 and resp["error"]["param"] == field, resp
            message = resp["error"]["message"]
            assert message.startswith(field) and "cannot be used: too complex to compile within 1 s" in message, resp
        # a NATS client's request reaches a worker without the gateway's check: refused there alike
        nc = await nats.connect(nats_server.url)
        try:
            chunks: asyncio.Queue[TokenChunk] = asyncio.Queue()

            async def on_chunk(msg: nats.aio.msg.Msg) -> None:
                chunks.put_nowait(msgspec.json.decode(msg.data, type=TokenChunk))

            await nc.subscribe("test.reply.slow", cb=on_chunk)
            params = SamplingParams(max_tokens=8, json_schema=SLOW.replace("k0_", "k0-"))  # not compiled before
            req = GenerateRequest(
                request_id="slow", reply_to="test.reply.slow", prompt_token_ids=[5, 40], params=params
            )
            await nc.publish(subjects.worker_requests(stack.workers[0].s.worker_id), msgspec.json.encode(req))
            stream = ReplyStream("slow")
            while not stream.done:
                stream.accept(await asyncio.wait_for(chunks.get(), LIVENESS_S))
        finally:
            await nc.close()
        assert stream.error_code == "bad_request" and stream.error_param == "json_schema", stream
        assert "too complex to compile within 1 s" in (stream.error or ""), stream.error
