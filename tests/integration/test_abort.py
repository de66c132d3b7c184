"""Work nobody waits for is stopped (issue 16, fault 4, the gateway's part): a request the gateway
gives up on after its chunk timeout, and every request in flight when the gateway stops."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import aiohttp
import msgspec
import pytest
from redis.asyncio import Redis

from dlora.common import bus
from dlora.model.make_tiny import TinyOutput
from dlora.services.gateway import main as gateway_main
from dlora.services.gateway.main import serve
from dlora.services.servers import Server, free_port
from tests.integration.conftest import Stack, run_stack, until_live


def _slow_steps(stack: Stack, monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Every worker's engine step takes ``seconds`` more (it runs in a thread: the loop goes on)."""
    for w in stack.workers:
        step = w.engine.step

        def slow(step=step):  # type: ignore[no-untyped-def]
            time.sleep(seconds)
            return step()

        monkeypatch.setattr(w.engine, "step", slow)


async def _nothing_left(stack: Stack, within_s: float) -> bool:
    """True once no worker holds a request and no in-flight record is left, within ``within_s``."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        records = [rid for w in stack.workers for rid in await stack.store.inflight_on(w.s.worker_id)]
        if not records and not any(w.engine.has_unfinished() for w in stack.workers):
            return True
        await asyncio.sleep(0.05)
    return False


async def test_a_chunk_timeout_aborts_every_choice_the_timed_out_one_too(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stack.gateway, "s", msgspec.structs.replace(stack.gateway.s, chunk_timeout_s=0.3))
    _slow_steps(stack, monkeypatch, 0.5)  # slower than the timeout: no chunk comes in time
    body = {"model": "lora-0", "prompt": "kalo remi", "max_tokens": 300, "ignore_eos": True, "n": 2}
    async with aiohttp.ClientSession() as http, http.post(stack.url + "/v1/completions", json=body) as r:
        assert r.status == 503 and "no worker answered in time" in (await r.json())["error"]["message"]
    steps = sum(w.engine.stats.steps for w in stack.workers)
    # It used to run on for nobody: 300 steps of half a second.
    assert await _nothing_left(stack, within_s=5.0)
    assert sum(w.engine.stats.steps for w in stack.workers) - steps < 10


async def test_a_stopping_gateway_aborts_its_requests_and_tells_their_clients(
    stack: Stack, redis_server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`dlora serve gateway` told to stop (SIGTERM sets the event) with a streamed and a plain
    request running: both are aborted on the workers before NATS drains, the streamed client
    gets an error event, the other a 503, and the gateway stops. Its flush of the aborts is slowed
    so the workers' abort chunks come back during it: the error was queued after them, and the
    plain request was answered 200 with finish_reason "abort" (a CI run under load)."""

    class SlowFlush:  # the gateway's bus alone (the workers read their own module's name)
        def __getattr__(self, name: str) -> object:
            return getattr(bus, name)

        async def flush(self, nc: object, round_trip_s: int = 10) -> None:
            await bus.flush(nc, round_trip_s)  # type: ignore[arg-type]
            await asyncio.sleep(0.5)

    monkeypatch.setattr(gateway_main, "bus", SlowFlush())
    s = msgspec.structs.replace(stack.gateway.s, port=free_port(), redis_url=redis_server.url)
    stop = asyncio.Event()
    gateway = asyncio.create_task(serve(s, stop))
    url = f"http://127.0.0.1:{s.port}"
    body = {"model": "lora-1", "prompt": "kalo remi", "max_tokens": 400, "ignore_eos": True, "temperature": 0}
    async with aiohttp.ClientSession() as http:
        await until_live(http, url)  # (it loads its tokenizer first)
        streamed = await http.post(url + "/v1/completions", json={**body, "stream": True})
        assert streamed.status == 200
        await streamed.content.readline()  # the first event: it is running
        plain = asyncio.create_task(http.post(url + "/v1/completions", json=body))
        while sum(len(w.engine.seqs) for w in stack.workers) < 2:
            await asyncio.sleep(0.01)
        steps = sum(w.engine.stats.steps for w in stack.workers)

        stop.set()
        # (not timed: a request its stop did not answer is cut off at the listener's close, and the
        # answers below fail; a helper saw a 2 s bound fail under load)
        await asyncio.wait_for(gateway, timeout=10)

        rest = (await streamed.read()).decode().split("\n\n")  # the first event's line was read already
        events = [e.strip()[6:] for e in rest if e.strip().startswith("data: ")]
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert "shutting down" in error["message"], events[-2:]
        r = await plain
        assert r.status == 503 and r.headers["Retry-After"] == "5"
        # the event's error is the object a status would carry: type and code too (it said server_error)
        assert error == (await r.json())["error"]
    assert await _nothing_left(stack, within_s=2.0)
    assert sum(w.engine.stats.steps for w in stack.workers) - steps < 50  # not the 400 each asked for


async def test_a_request_queued_behind_others_waits_its_turn_past_the_chunk_timeout(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput, monkeypatch: pytest.MonkeyPatch
) -> None:
    """llama.cpp #9215's kind: a request the cluster holds is not failed for waiting its turn.
    One sequence per step on each worker and ~3 s per request: the third and fourth wait ~3 s
    for a first chunk, half as long again as the 2 s chunk timeout (they were answered 503); the
    timeout still ends a request whose worker stops stepping, though its heartbeat goes on."""
    # checks every 0.6 s: the 2 s timeout leaves three checks before it (the first compares against
    # the steps seen as the wait began; it used to only take a baseline). At 1 s it left one, and a
    # loaded machine's late stats made it miss once (CI, three xdist workers).
    settings = {"chunk_timeout_s": 2.0, "heartbeat_ttl_s": 0.3}
    async with run_stack(nats_server, redis, tiny_llama, engine={"max_num_seqs": 1}, **settings) as stack:
        _slow_steps(stack, monkeypatch, 0.06)
        body = {"model": "model", "prompt": "kalo", "max_tokens": 45, "ignore_eos": True}
        async with aiohttp.ClientSession() as http:

            async def complete() -> tuple[int, str]:
                async with http.post(stack.url + "/v1/completions", json=body) as r:
                    return r.status, (await r.json()).get("error", {}).get("message", "")

            assert [s for s, _ in await asyncio.gather(*(complete() for _ in range(4)))] == [200] * 4
            released = threading.Event()
            for w in stack.workers:  # wedged until released: no step ends (the loop, and its heartbeat, go on)
                monkeypatch.setattr(w.engine, "step", lambda step=w.engine.step: (released.wait(600), step())[1])
            try:
                # Ended by the chunk timeout (its answer says so), not waited on for the wedge: a
                # request the timeout did not end would wait until the release below (the 120 s).
                status, message = await asyncio.wait_for(complete(), 120)
                assert status == 503 and "no worker answered in time" in message, message
            finally:
                released.set()


async def test_readiness_fails_as_soon_as_the_gateway_begins_to_stop(
    stack: Stack, redis_server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gateway told to stop refuses new requests (503) at once but its /healthz said 200 until its
    listener closed (its aborts flushed first: up to 2 s), so a load balancer kept sending it
    requests that could only fail. Kubernetes' readiness, vLLM's /health: 503 from the stop's start."""
    s = msgspec.structs.replace(stack.gateway.s, port=free_port(), redis_url=redis_server.url)
    stop, flushing, release = asyncio.Event(), asyncio.Event(), asyncio.Event()

    class HeldFlush:  # the gateway's bus, its stop's flush held (a slow NATS round trip)
        def __getattr__(self, name: str) -> object:
            return getattr(bus, name)

        async def flush(self, nc: object, **kw: float) -> None:
            flushing.set()
            await release.wait()

    gateway = asyncio.create_task(serve(s, stop))
    url = f"http://127.0.0.1:{s.port}"
    async with aiohttp.ClientSession() as http:
        await until_live(http, url)
        async with http.get(url + "/healthz") as r:
            assert r.status == 200, await r.text()
        monkeypatch.setattr("dlora.services.gateway.main.bus", HeldFlush())
        stop.set()
        try:
            await asyncio.wait_for(flushing.wait(), timeout=10)
            async with http.get(url + "/healthz") as r:
                body = await r.json()
                assert r.status == 503 and "shutting down" in body.get("reason", ""), body
                assert r.headers["Retry-After"]
            async with http.get(url + "/livez") as r:
                assert r.status == 200  # alive all the same: nothing to restart
        finally:
            release.set()
            await asyncio.wait_for(gateway, timeout=10)


async def test_the_choices_taken_of_a_request_partly_refused_are_aborted_and_counted(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An n = 3 request whose second choice no dispatcher took (503): the choices taken were
    aborted but counted nowhere in vllm:request_success_total, though a worker ran them (vLLM
    counts each of n it ran, an aborted one as "abort"). Every hand-over is waited for now (the
    abort went out while the third's was still under way), and the choices taken are aborted
    and counted."""
    from dlora.services.gateway.main import Gateway
    from dlora.services.gateway.openai import APIError

    submit, calls = Gateway._submit, []

    async def second_refused(gw: Gateway, request) -> None:  # type: ignore[no-untyped-def]
        calls.append(request.request_id)
        if len(calls) == 2:
            raise APIError(503, "no dispatcher took the request")
        if len(calls) == 3:
            await asyncio.sleep(0.3)  # a slow hand-over, still under way at the refusal
        await submit(gw, request)

    monkeypatch.setattr(Gateway, "_submit", second_refused)
    counter = stack.gateway.metrics.success

    def aborts() -> float:
        return sum(s.value for f in counter.collect() for s in f.samples if s.labels.get("finished_reason") == "abort")

    before = aborts()
    body = {"model": "lora-1", "prompt": "kalo", "max_tokens": 300, "ignore_eos": True, "n": 3, "temperature": 1.0}
    async with aiohttp.ClientSession() as http, http.post(stack.url + "/v1/completions", json=body) as r:
        assert r.status == 503, await r.text()
    assert aborts() == before + 2
    for _ in range(500):
        if not any(w.engine.has_unfinished() for w in stack.workers):
            break
        await asyncio.sleep(0.01)
    assert not any(w.engine.has_unfinished() for w in stack.workers)
