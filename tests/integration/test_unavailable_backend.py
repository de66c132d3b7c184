"""The gateway without a working backend: with no dispatcher a request is answered 503 at once
(NATS "no responders") and readiness says so; with a dispatcher whose workers never answer, 503
after the chunk timeout. Each such 503 carries a Retry-After."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
import time
from collections.abc import AsyncIterator

import aiohttp
import msgspec
import nats
from aiohttp import web
from redis.asyncio import Redis

from dlora.common import apikeys, subjects
from dlora.common.messages import AbortRequest, GenerateRequest
from dlora.common.redis_client import redis_client
from dlora.common.state import StateStore
from dlora.model.make_tiny import TinyOutput
from dlora.services.dispatcher.main import Dispatcher
from dlora.services.dispatcher.settings import DispatcherSettings
from dlora.services.gateway.health import dispatcher_problem
from dlora.services.gateway.main import Gateway
from dlora.services.gateway.settings import GatewaySettings
from dlora.services.servers import Server, free_port, start_nats, start_redis
from tests.integration.conftest import Stack, sigstop


@contextlib.asynccontextmanager
async def _gateway(nats_server: Server, redis: Redis, tiny_llama: TinyOutput) -> AsyncIterator[Gateway]:
    """A gateway serving on its settings' port, that waits 0.3 s for a dispatcher to take a request."""
    settings = GatewaySettings(
        nats_url=nats_server.url,
        redis_url="unused",
        model=str(tiny_llama.model),
        port=free_port(),
        chunk_timeout_s=60.0,
        dispatch_timeout_s=0.3,  # waited for one to come up (a restart's), then refused
    )
    nc = await nats.connect(nats_server.url)
    gateway = Gateway(settings, nc, StateStore(redis))
    await gateway.start()
    runner = web.AppRunner(gateway.app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", settings.port).start()
    try:
        yield gateway
    finally:
        await runner.cleanup()
        await nc.drain()


async def _complete(gateway: Gateway, n: int = 1) -> tuple[aiohttp.ClientResponse, dict]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"http://127.0.0.1:{gateway.s.port}/v1/completions",
            json={"model": "model", "prompt": "kalo", "max_tokens": 4, "n": n},
        ) as r,
    ):
        return r, await r.json()


async def test_a_request_with_no_dispatcher_is_refused_at_once(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput
) -> None:
    async with _gateway(nats_server, redis, tiny_llama) as gateway:
        r, body = await _complete(gateway, n=2)
        # By NATS's "no responders", sent again until dispatch_timeout_s: not after the 60 s chunk
        # timeout, nor as a dispatcher's silence ("no dispatcher took the request within").
        assert r.status == 503 and "no dispatcher is running (waited 0.3 s)" in body["error"]["message"], body
        assert gateway.metrics.registry.get_sample_value("dlora_dispatch_waits_total") == 2  # (n = 2)
        assert r.headers["Retry-After"] == "5"  # one heartbeat TTL: try again when the cluster has changed


async def test_a_request_no_dispatcher_took_in_time_is_aborted(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput
) -> None:
    """A dispatcher subscribed but not answering (stopped, or behind a long queue): the gateway
    answers 503 and does not send the request again (``hand_over``), but that dispatcher may still
    take it, and it ran for nobody. The gateway aborts it, so the worker it reaches drops it."""
    nc = await nats.connect(nats_server.url)
    held: asyncio.Queue[str] = asyncio.Queue()
    aborted: asyncio.Queue[str] = asyncio.Queue()

    async def holds(msg: nats.aio.msg.Msg) -> None:  # received, not answered
        await held.put(msgspec.json.decode(msg.data, type=GenerateRequest).request_id)

    async def on_abort(msg: nats.aio.msg.Msg) -> None:
        await aborted.put(msgspec.json.decode(msg.data, type=AbortRequest).request_id)

    await nc.subscribe(subjects.REQUESTS, queue=subjects.DISPATCHERS, cb=holds)
    await nc.subscribe(subjects.ABORT, cb=on_abort)
    await nc.flush()
    try:
        async with _gateway(nats_server, redis, tiny_llama) as gateway:
            r, body = await _complete(gateway)
            assert r.status == 503 and "no dispatcher took the request" in body["error"]["message"], body
            assert await asyncio.wait_for(aborted.get(), 30) == held.get_nowait()
    finally:
        await nc.drain()


async def test_a_silent_worker_fails_the_request_instead_of_hanging(redis, tiny_llama) -> None:
    """A dispatcher takes the request but no worker ever answers: the gateway gives up after
    chunk_timeout_s. (With no dispatcher at all it answers at once: the test above.)"""
    server = start_nats()
    nc = await nats.connect(server.url)
    try:
        settings = GatewaySettings(
            nats_url=server.url, model=str(tiny_llama.model), port=free_port(), chunk_timeout_s=0.3
        )
        gateway = Gateway(settings, nc, StateStore(redis))
        await gateway.start()

        async def take_and_drop(msg) -> None:  # a dispatcher whose workers are gone
            await msg.respond(b"")

        await nc.subscribe(subjects.REQUESTS, queue=subjects.DISPATCHERS, cb=take_and_drop)
        await nc.subscribe(subjects.DISPATCHER_PING, queue=subjects.DISPATCHERS, cb=take_and_drop)
        runner = web.AppRunner(gateway.app())
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", settings.port).start()
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"http://127.0.0.1:{settings.port}/v1/completions",
                json={"model": "model", "prompt": "kalo", "max_tokens": 2},
            ) as r:
                assert r.status == 503 and "no worker" in (await r.json())["error"]["message"]
                assert r.headers["Retry-After"] == "5"
            async with http.post(
                f"http://127.0.0.1:{settings.port}/v1/chat/completions",
                json={
                    "model": "model",
                    "messages": [{"role": "user", "content": "kalo"}],
                    "max_tokens": 2,
                    "stream": True,
                    "n": 2,
                },
            ) as r:
                # streamed too: an error before the first token is a status, not an event after a 200
                assert r.status == 503 and "no worker" in (await r.json())["error"]["message"]
            # not ready with no live worker, and says why; alive all the same
            for path in ("/healthz", "/readyz"):
                async with http.get(f"http://127.0.0.1:{settings.port}{path}") as r:
                    body = await r.json()
                    assert r.status == 503 and body["status"] == "unavailable" and body["workers"] == 0, body
                    assert body["reason"] == "no worker is live" and body["dispatcher"] is True
                    assert r.headers["Retry-After"] == "5"
            async with http.get(f"http://127.0.0.1:{settings.port}/livez") as r:
                assert r.status == 200
        await runner.cleanup()
    finally:
        await nc.drain()
        server.stop()


async def test_readiness_holds_while_one_of_two_dispatchers_hangs(redis: Redis) -> None:
    """A helper's finding: a SIGSTOPped dispatcher got its share of the queue group's pings, and
    every gateway's readiness flapped to 503 while the other dispatcher was fine. Every dispatcher
    answers the ping now; the first answer counts."""
    server = start_nats()
    nc = await nats.connect(server.url)
    stop = asyncio.Event()
    try:
        settings = DispatcherSettings(nats_url=server.url, redis_url="unused", heartbeat_ttl_s=5.0)
        running = asyncio.create_task(Dispatcher(settings, await nats.connect(server.url), StateStore(redis)).run(stop))

        async def hangs(msg) -> None:  # type: ignore[no-untyped-def]  # a stopped process: never answers
            pass

        await nc.subscribe(subjects.DISPATCHER_PING, queue=subjects.DISPATCHERS, cb=hangs)
        for _ in range(100):  # the live one subscribed
            if await dispatcher_problem(nc) is None:
                break
            await asyncio.sleep(0.05)
        assert [await dispatcher_problem(nc) for _ in range(8)] == [None] * 8
    finally:
        stop.set()
        await asyncio.wait_for(running, 10)
        await nc.drain()
        server.stop()


async def _until_no_dispatcher_subscribes(nc: nats.NATS) -> None:
    """The server drops a closed connection's interest a moment after the close returns; a ping
    sent in that moment goes to the dead subscription and times out instead of "no responders"."""
    for _ in range(100):
        try:
            await nc.request(subjects.DISPATCHER_PING, b"", timeout=0.2)
        except nats.errors.NoRespondersError:
            return
        except nats.errors.TimeoutError:
            pass
        await asyncio.sleep(0.02)
    raise AssertionError("the closed dispatcher's subscription outlived 2 s")


async def test_a_dispatcher_restart_is_waited_out_and_readiness_says_so(stack: Stack) -> None:
    """Workers live but the dispatcher gone: not ready, and says why (it used to say ok), with a
    Retry-After; ready again once a dispatcher is back. A request that came meanwhile was a 503
    at once (an operator's drill: one dispatcher's restart was a window of 503s): no dispatcher had
    received it, so it is sent again until one takes it (within ``dispatch_timeout_s``)."""

    async def health(http: aiohttp.ClientSession) -> tuple[int, dict, str | None]:
        async with http.get(stack.url + "/healthz") as r:
            return r.status, await r.json(), r.headers.get("Retry-After")

    async def complete(http: aiohttp.ClientSession) -> tuple[int, dict]:
        body = {"model": "lora-0", "prompt": "kalo", "max_tokens": 2}
        async with http.post(stack.url + "/v1/completions", json=body) as r:
            return r.status, await r.json()

    waits = functools.partial(stack.gateway.metrics.registry.get_sample_value, "dlora_dispatch_waits_total")
    async with aiohttp.ClientSession() as http:
        status, body, _ = await health(http)
        assert status == 200 and body["dispatcher"] is True and body["workers"] == 2, body
        await stack.dispatcher_nc.close()  # the dispatcher's subscriptions go with its connection
        await _until_no_dispatcher_subscribes(stack.nc)
        status, body, retry_after = await health(http)
        # NATS's "no responders", at once (a ping that timed out says "no dispatcher answered within")
        assert status == 503 and body["reason"] == "no dispatcher is running", body
        assert body["dispatcher"] is False and body["workers"] == 2 and retry_after == "5"
        request = asyncio.create_task(complete(http))
        for _ in range(200):  # until the request has found no dispatcher (then its restart)
            if waits() or request.done():
                break
            await asyncio.sleep(0.01)
        assert waits() == 1 and not request.done()
        nc = await nats.connect(stack.nc.connected_url.geturl())
        try:
            dispatcher = Dispatcher(DispatcherSettings(nats_url="unused", redis_url="unused"), nc, stack.store)
            stop = asyncio.Event()
            task = asyncio.create_task(dispatcher.run(stop))
            status, body = await request
            assert status == 200 and body["usage"]["completion_tokens"] == 2, body
            status, body, retry_after = await health(http)
            assert status == 200 and body["status"] == "ok" and retry_after is None, body
            stop.set()
            await task
        finally:
            await nc.drain()


async def test_an_unreachable_state_store_is_a_503_with_retry_after_not_a_500(
    nats_server: Server, tiny_llama: TinyOutput
) -> None:
    settings = GatewaySettings(nats_url=nats_server.url, model=str(tiny_llama.model), port=free_port())
    nc = await nats.connect(nats_server.url)
    down = Redis.from_url(f"redis://127.0.0.1:{free_port()}")  # nothing listens there
    gateway = Gateway(settings, nc, StateStore(down))
    await gateway.start()
    runner = web.AppRunner(gateway.app())
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", settings.port).start()
    url = f"http://127.0.0.1:{settings.port}"
    try:
        async with aiohttp.ClientSession() as http:
            requests = [
                http.post(f"{url}/v1/completions", json={"model": "lora-0", "prompt": "kalo", "max_tokens": 2}),
                http.get(f"{url}/v1/models"),
                http.get(f"{url}/healthz"),
            ]
            for request in requests:
                async with request as r:
                    body = await r.json()
                    assert r.status == 503 and r.headers["Retry-After"] == "5", body
                    text = body["error"]["message"] if "error" in body else body["reason"]
                    assert "the state store (Redis) is unreachable" in text, body
    finally:
        await runner.cleanup()
        await down.aclose()
        await nc.drain()


async def test_a_hung_state_store_is_a_503_within_seconds_on_every_route_that_reads_it(
    nats_server: Server, tiny_llama: TinyOutput
) -> None:
    """With Redis hung (SIGSTOP) each of the gateway's reads waited out redis-py's four tries of its
    5 s socket timeout: an adapter's request, a key's lookup, /v1/models and /healthz each took 20 s
    to say 503 (a load balancer's probe gave up first); and every admin route."""
    redis = start_redis()
    settings = GatewaySettings(
        nats_url=nats_server.url, model=str(tiny_llama.model), port=free_port(), auth="keys", admin_key="adm"
    )
    nc = await nats.connect(nats_server.url)
    store = StateStore(redis_client(redis.url))
    gateway = Gateway(settings, nc, store)
    await gateway.start()
    runner = web.AppRunner(gateway.app())
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", settings.port).start()
    url = f"http://127.0.0.1:{settings.port}"
    admin, key = {"Authorization": "Bearer adm"}, {"Authorization": f"Bearer {apikeys.PREFIX}unknown"}
    try:
        sigstop(redis.proc)
        async with aiohttp.ClientSession() as http, asyncio.timeout(150):
            requests = [
                http.post(f"{url}/v1/completions", json={"model": "lora-0", "prompt": "kalo"}, headers=admin),
                http.post(f"{url}/v1/completions", json={"model": "model", "prompt": "kalo"}, headers=key),
                http.get(f"{url}/v1/models", headers=admin),
                http.get(f"{url}/healthz"),
                # the admin routes (a helper: 20 s each): their writes stay unbounded, Redis asked first
                http.get(f"{url}/v1/keys", headers=admin),
                http.post(f"{url}/v1/keys", json={"tenant": "acme"}, headers=admin),
                http.delete(f"{url}/v1/keys/k1", headers=admin),
                http.post(f"{url}/v1/adapters", json={"name": "new", "path": "/nowhere"}, headers=admin),
                http.delete(f"{url}/v1/adapters/lora-0", headers=admin),
                http.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "lora-0"}, headers=admin),
            ]
            for request in requests:
                started = time.monotonic()
                async with request as r:
                    body = await r.json()
                    assert r.status == 503 and r.headers["Retry-After"] == "5", body
                    text = body["error"]["message"] if "error" in body else body["reason"]
                    assert "the state store (Redis) is unreachable" in text, body
                # Within the 2 s bound, not redis-py's 4 x 5 s socket timeouts: those are 20 s of
                # wall clock however idle the machine, so 15 s leaves a loaded one 13 s over the bound.
                assert time.monotonic() - started < 15, (str(r.url), time.monotonic() - started)
    finally:
        redis.proc.send_signal(signal.SIGCONT)
        await runner.cleanup()
        await store.r.aclose()
        await nc.drain()
        redis.stop()


async def test_readiness_fails_while_every_live_worker_is_draining(stack: Stack) -> None:
    """Every worker stopping (a rolling restart of the only worker, a scale-in): the dispatcher
    sends them nothing new and each request is a 503 "no worker is available", so a load balancer
    must stop sending here; /healthz said 200 "ok" for the whole drain (drain_timeout_s: 10 s by
    default), counting the stopping workers live. Ready again once one takes requests."""

    async def health(http: aiohttp.ClientSession) -> tuple[int, dict]:
        async with http.get(stack.url + "/healthz") as r:
            return r.status, await r.json()

    async def until(http: aiohttp.ClientSession, status: int) -> dict:
        for _ in range(100):  # the workers' next heartbeat says so (stats_interval_s 0.1 here)
            got, body = await health(http)
            if got == status:
                return body
            await asyncio.sleep(0.05)
        raise AssertionError(f"/healthz stayed {got}: {body}")

    async with aiohttp.ClientSession() as http:
        for w in stack.workers:
            w.draining = True  # as drain.start marks a worker told to stop
        for _ in range(100):  # the dispatcher heard both say so
            if not stack.dispatcher.state.live(time.monotonic()):
                break
            await asyncio.sleep(0.05)
        async with http.post(
            stack.url + "/v1/completions", json={"model": "lora-0", "prompt": "kalo", "max_tokens": 2}
        ) as r:
            assert r.status == 503, await r.text()  # what a request gets meanwhile
        body = await until(http, 503)
        assert body["status"] == "unavailable" and "draining" in body["reason"], body
        assert body["workers"] == 2 and body["draining"] == 2, body
        stack.workers[0].draining = False
        body = await until(http, 200)
        assert body["status"] == "ok" and body["draining"] == 1, body
