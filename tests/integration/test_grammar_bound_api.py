"""A structured output llguidance takes hours to compile, sent to the real stack: a 400 naming the
field from the gateway, a refusal naming it from a worker reached over NATS, within the bound
(``grammar_compilation_timeout_s``), other requests served meanwhile (vLLM #54003's kind)."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import aiohttp
import msgspec
import nats
import pytest
from redis.asyncio import Redis

from dlora.common import subjects
from dlora.common.messages import GenerateRequest, SamplingParams, TokenChunk
from dlora.model.make_tiny import TinyOutput
from dlora.services.gateway.main import serve
from dlora.services.gateway.replies import ReplyStream
from dlora.services.servers import Server, free_port
from dlora.services.worker.engine.structured import Grammars
from tests.integration.conftest import Stack, run_stack, until_live
from tests.integration.test_gateway import post
from tests.unit.test_grammar_compile_bound import LIVENESS_S, ORDINARY, SLOW, UNSTARVED

BOUND = {"grammar_compilation_timeout_s": 1.0}


async def test_a_schema_too_slow_to_compile_is_refused_naming_its_field(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dlora.services.worker.engine import compile_bound

    monkeypatch.setattr(compile_bound, "_WALL_PER_CPU", UNSTARVED)  # (the host's load: not a 503)
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


async def test_a_request_compiling_when_the_gateway_stops_is_answered_503(
    stack: Stack, redis_server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gateway's stop ends each request in flight with a 503; one still compiling its
    structured output was not in flight yet: it held the listener's close for its 5 s grace, then
    its connection was cut with no answer at all (the client saw the server disconnect)."""
    entered, release = threading.Event(), threading.Event()
    verdict = Grammars._verdict  # (the gateway's compile: in the bounded child, none in-process)

    def held(self: Grammars, grammar: str) -> Any:
        if "held-at-stop" in grammar:
            entered.set()
            release.wait(LIVENESS_S)
        return verdict(self, grammar)

    monkeypatch.setattr(Grammars, "_verdict", held)
    s = msgspec.structs.replace(stack.gateway.s, port=free_port(), redis_url=redis_server.url)
    stop = asyncio.Event()
    gateway = asyncio.create_task(serve(s, stop))
    url = f"http://127.0.0.1:{s.port}"
    body = {"model": "lora-1", "prompt": "kalo", "max_tokens": 3, "guided_choice": ["held-at-stop"]}
    try:
        async with aiohttp.ClientSession() as http:
            await until_live(http, url)  # (it loads its tokenizer first)
            compiling = asyncio.create_task(http.post(url + "/v1/completions", json=body))
            assert await asyncio.to_thread(entered.wait, LIVENESS_S)
            stop.set()
            r = await asyncio.wait_for(compiling, LIVENESS_S)
            assert r.status == 503 and "shutting down" in (await r.json())["error"]["message"]
            await asyncio.wait_for(gateway, LIVENESS_S)
    finally:
        release.set()


async def test_a_constraint_past_the_memory_cap_is_refused_naming_its_field(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput
) -> None:
    """A constraint whose compile takes more memory than ``grammar_compilation_memory_mb`` is a 400
    naming its field, as one past the time bound is (vLLM #7332's kind: the compile's process at
    the host's OOM killer), and the same cap serves an ordinary one."""
    from tests.engine.test_grammar_bound import HUNGRY

    capped = {"grammar_compilation_memory_mb": 150}
    plain = {"model": "lora-1", "prompt": "kalo", "max_tokens": 3, "temperature": 0}
    async with run_stack(nats_server, redis, tiny_llama, worker=capped, **capped) as stack:
        for field, value in (("guided_regex", HUNGRY), ("structured_outputs", {"regex": HUNGRY})):
            status, resp = await asyncio.wait_for(post(stack, "/v1/completions", {**plain, field: value}), LIVENESS_S)
            assert status == 400 and resp["error"]["param"] == field, resp
            assert "cannot be used: too large to compile within 150 MiB of memory" in resp["error"]["message"], resp
        status, resp = await post(stack, "/v1/completions", {**plain, "guided_regex": "(kalo|remi)"})
        assert status == 200 and resp["choices"][0]["text"] in ("kalo", "remi"), resp


async def test_a_compile_a_loaded_gateway_starves_is_a_503_saying_so(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gateway's check turned a compile stopped in wall time (its CPU time short of the bound:
    the host's load) into a 400 telling the client to simplify a grammar that was fine; it agrees
    with a worker now: a 503 saying the server was too busy, to retry."""
    from dlora.services.worker.engine import compile_bound

    plain = {"model": "lora-1", "prompt": "kalo", "max_tokens": 3, "temperature": 0}
    schema = json.loads(ORDINARY.replace("x_", "busy_"))
    async with run_stack(nats_server, redis, tiny_llama, worker=BOUND, **BOUND) as stack:
        monkeypatch.setattr(compile_bound, "_cpu_s", lambda pid: 0.0)  # no CPU time spent, the wall time's
        monkeypatch.setattr(compile_bound, "_WALL_PER_CPU", 0.0)  # bound at once
        status, resp = await post(stack, "/v1/completions", {**plain, "guided_json": schema})
        assert status == 503 and resp["error"]["param"] == "guided_json", resp
        assert resp["error"]["message"].startswith("guided_json schema cannot be compiled now: the server was too busy")
