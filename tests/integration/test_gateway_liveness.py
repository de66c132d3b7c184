"""A gateway that dies (SIGKILL: no aborts) leaves no work running for its clients (issue 16,
fault 4): it announces itself and names itself in its requests; once it falls silent the workers
drop what it sent. And requests are checked against what the workers hold, not only the model
(a request beyond it is refused by the dispatcher too: test_fencing)."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import msgspec
import pytest
from redis.asyncio import Redis

from dlora.common import subjects
from dlora.common.messages import ClientAlive
from dlora.model.make_tiny import TinyOutput
from dlora.services.gateway.served_model import served_context
from dlora.services.servers import Server
from tests.integration.conftest import Stack, run_stack
from tests.integration.test_abort import _slow_steps

# The workers' heartbeat TTL: a client silent past it and FAILOVER_S (3 s) is gone, 4 s here, not
# the 8 s of the default 5 s TTL.
TTL_S = 1.0


@pytest.fixture
async def quick_stack(nats_server: Server, redis: Redis, tiny_llama: TinyOutput):  # type: ignore[no-untyped-def]
    ttl = {"heartbeat_ttl_s": TTL_S}
    async with run_stack(nats_server, redis, tiny_llama, worker=ttl, dispatcher=ttl, **ttl) as s:
        yield s


async def test_requests_of_a_gateway_gone_silent_are_dropped(
    quick_stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = quick_stack
    _slow_steps(stack, monkeypatch, 0.05)  # 400 tokens take 20 s: the drop comes long before
    heard: asyncio.Queue[ClientAlive] = asyncio.Queue()

    async def on_alive(msg) -> None:  # type: ignore[no-untyped-def]
        heard.put_nowait(msgspec.json.decode(msg.data, type=ClientAlive))

    await stack.nc.subscribe(subjects.CLIENTS, cb=on_alive)
    assert (await asyncio.wait_for(heard.get(), 60)).client == stack.gateway.gateway_id
    body = {"model": "model", "prompt": "kalo", "max_tokens": 400, "ignore_eos": True, "stream": True}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{stack.url}/v1/completions", json=body) as r:
            assert r.status == 200, await r.text()
            await r.content.readline()  # it runs
            deadline = time.monotonic() + 20
            while not (held := [w for w in stack.workers if w.streams]) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert held and all(s.request.client == stack.gateway.gateway_id for s in held[0].streams.values())
            stack.gateway._stopped.set()  # SIGKILL, as the workers see it: silence, no abort
            deadline = time.monotonic() + 20
            while held[0].streams and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert not held[0].streams and not held[0].engine.has_unfinished()
            assert held[0].engine.stats.tokens_generated < 400  # dropped, not run to its end


def test_the_context_a_request_may_fill_is_the_largest_workers() -> None:
    assert served_context(4096, []) == 4096  # no worker said: the model's
    assert served_context(4096, [128, 512, 0]) == 512  # a KV cache smaller than the model
    assert served_context(256, [128, 512]) == 256  # never more than the model
