"""A stopping gateway's ``shutdown_timeout_s`` (vLLM's ``--shutdown-timeout``, PR #36666, RFC
#24885): the requests it took before the stop finish for up to that long while new ones get 503
and /healthz says 503; what still runs then ends as at 0 (the default): at once, a 503 or a
stream's error event (test_abort.py has the default's whole test)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import msgspec
import pytest

from dlora.services.gateway.main import serve
from dlora.services.run import Stop
from dlora.services.servers import Server, free_port
from tests.integration.conftest import Stack, until_live
from tests.integration.test_abort import _nothing_left, _slow_steps

BODY = {"model": "lora-1", "prompt": "kalo remi", "ignore_eos": True, "temperature": 0}


def _gateway(stack: Stack, redis_server: Server, shutdown_timeout_s: float) -> tuple[asyncio.Task[None], str, Stop]:
    """A gateway of its own in front of ``stack``'s workers, as ``dlora serve gateway`` runs (its
    ``Stop`` is what SIGTERM sets, and a second one hurries)."""
    s = msgspec.structs.replace(
        stack.gateway.s, port=free_port(), redis_url=redis_server.url, shutdown_timeout_s=shutdown_timeout_s
    )
    stop = Stop()
    return asyncio.create_task(serve(s, stop)), f"http://127.0.0.1:{s.port}", stop


def _events(raw: bytes) -> list[str]:
    return [e.strip()[6:] for e in raw.decode().split("\n\n") if e.strip().startswith("data: ")]


async def _running(stack: Stack, n: int) -> None:
    while sum(len(w.engine.seqs) for w in stack.workers) < n:
        await asyncio.sleep(0.01)


async def test_a_request_in_flight_at_the_stop_finishes_whole_within_the_shutdown_timeout(
    stack: Stack, redis_server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A streamed and a plain request running when the gateway is told to stop, with 600 s to
    finish: both end whole (the text the same request gets from a gateway not stopping), a new
    request meanwhile gets 503 and /healthz 503, and the gateway stops once they are done rather
    than at the timeout."""
    body = {**BODY, "max_tokens": 40}
    async with aiohttp.ClientSession() as http:
        async with http.post(stack.url + "/v1/completions", json=body) as r:
            whole = (await r.json())["choices"][0]["text"]
        _slow_steps(stack, monkeypatch, 0.05)  # ~2 s a request: the stop comes in the middle
        gateway, url, stop = _gateway(stack, redis_server, 600.0)
        await until_live(http, url)
        streamed = await http.post(url + "/v1/completions", json={**body, "stream": True})
        assert streamed.status == 200
        first = await streamed.content.readline()  # the first event: it is running
        plain = asyncio.create_task(http.post(url + "/v1/completions", json=body))
        await _running(stack, 2)

        stop.set()
        async with http.post(url + "/v1/completions", json=body) as r:
            assert r.status == 503 and "shutting down" in (await r.json())["error"]["message"]
        async with http.get(url + "/healthz") as r:
            assert r.status == 503 and "shutting down" in (await r.json())["reason"]

        events = _events(first + await streamed.read())
        assert events[-1] == "[DONE]", events[-3:]
        chunks: list[dict[str, Any]] = [json.loads(e) for e in events[:-1]]
        assert not any("error" in c for c in chunks), chunks[-1]
        assert "".join(c["choices"][0]["text"] for c in chunks) == whole
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        r = await plain
        assert r.status == 200, await r.text()
        assert (await r.json())["choices"][0]["text"] == whole
        # Stopped once they were done (~2 s): at all within 120 s, its timeout being 600 s.
        await asyncio.wait_for(gateway, timeout=120)


@pytest.mark.parametrize("shutdown_timeout_s", [0.0, 1.5])
async def test_a_request_still_running_at_the_shutdown_timeout_ends_with_the_error(
    stack: Stack, redis_server: Server, monkeypatch: pytest.MonkeyPatch, shutdown_timeout_s: float
) -> None:
    """A request that needs ~20 s more: at 0 it ends at once, as before the setting; at 1.5 s it
    runs on for that long and then ends the same way (an error event, its work aborted on the
    worker), and the gateway's stop is bounded by the timeout."""
    _slow_steps(stack, monkeypatch, 0.05)
    async with aiohttp.ClientSession() as http:
        gateway, url, stop = _gateway(stack, redis_server, shutdown_timeout_s)
        await until_live(http, url)
        streamed = await http.post(url + "/v1/completions", json={**BODY, "max_tokens": 400, "stream": True})
        first = await streamed.content.readline()
        await _running(stack, 1)

        stop.set()
        stopped = time.monotonic()
        events = _events(first + await streamed.read())
        ended = time.monotonic() - stopped
        await asyncio.wait_for(gateway, timeout=shutdown_timeout_s + 60)
    assert events[-1] == "[DONE]"
    assert "shutting down" in json.loads(events[-2])["error"]["message"], events[-2:]
    assert len(events) > 3 if shutdown_timeout_s else True  # it went on streaming meanwhile
    # Not before the timeout; and cut by it, not run to its end: the 399 steps left take 20 s
    # however idle the machine (each sleeps 0.05 s), so 15 s leaves a loaded one 13 s of slack.
    assert shutdown_timeout_s <= ended < 15
    assert await _nothing_left(stack, within_s=2.0)


async def test_a_second_signal_ends_the_wait_for_the_requests_at_once(
    stack: Stack, redis_server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C twice (or a second SIGTERM) stops the gateway now, as it hurries a draining worker:
    a 60 s timeout does not hold it."""
    _slow_steps(stack, monkeypatch, 0.05)
    async with aiohttp.ClientSession() as http:
        gateway, url, stop = _gateway(stack, redis_server, 60.0)
        await until_live(http, url)
        streamed = await http.post(url + "/v1/completions", json={**BODY, "max_tokens": 400, "stream": True})
        first = await streamed.content.readline()
        await _running(stack, 1)
        stop.set()
        await asyncio.sleep(0.5)
        assert not gateway.done()  # it waits for the request
        stop.hurried = True  # as run.Stop's signal handler sets it
        await asyncio.wait_for(gateway, timeout=40)  # (at once; the 60 s timeout's end would be past it)
        events = _events(first + await streamed.read())
    assert "shutting down" in json.loads(events[-2])["error"]["message"], events[-2:]
    assert await _nothing_left(stack, within_s=2.0)


async def test_a_gateway_whose_nats_closed_for_good_does_not_wait_out_the_shutdown_timeout(
    stack: Stack, redis_server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review's finding: NATS closing the gateway's connection for good sets its stop (to be
    started again, ``ConnectionLost``), and with a 30 s timeout it waited all of it for requests
    whose answers could no longer reach it, its restart held off meanwhile. (Its timeout is 600 s
    here: a stop that waits it out fails the 120 s wait, however loaded the machine.)"""
    from dlora.common.bus import ConnectionLost
    from dlora.services.gateway.main import Gateway

    gateways: list[Gateway] = []
    start = Gateway.start

    async def started(gw: Gateway) -> None:
        gateways.append(gw)
        await start(gw)

    monkeypatch.setattr(Gateway, "start", started)
    _slow_steps(stack, monkeypatch, 0.05)
    async with aiohttp.ClientSession() as http:
        gateway, url, stop = _gateway(stack, redis_server, 600.0)
        await until_live(http, url)
        streamed = await http.post(url + "/v1/completions", json={**BODY, "max_tokens": 400, "stream": True})
        first = await streamed.content.readline()
        await _running(stack, 1)
        await gateways[0].nc.publish("x" * 5000, b"")  # past the control line: NATS closes it for good
        async with asyncio.timeout(60):
            await stop.wait()
        with pytest.raises(ConnectionLost):  # within its own bounds (the aborts' flush, the answers' writing)
            await asyncio.wait_for(gateway, timeout=120)
        streamed.close()
    assert first.startswith(b"data: ")


async def test_a_request_cut_by_the_gateways_stop_counts_as_an_abort_not_an_error(
    stack: Stack, redis_server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vLLM's shutdown timeout aborts what still runs (its engine sends them finished "abort"),
    and vllm:request_success_total counts them so. The gateway counted each choice its stop cut
    as "error": every rolling restart of gateways raised a dashboard's error rate (and its alert)
    for requests nothing failed. Counted "abort" now; the client still gets its 503 error event,
    and dlora_requests_total still says what the client got."""
    from dlora.services.gateway.main import Gateway

    gateways: list[Gateway] = []
    start = Gateway.start

    async def started(gw: Gateway) -> None:
        gateways.append(gw)
        await start(gw)

    monkeypatch.setattr(Gateway, "start", started)
    _slow_steps(stack, monkeypatch, 0.05)
    async with aiohttp.ClientSession() as http:
        gateway, url, stop = _gateway(stack, redis_server, 0.0)
        await until_live(http, url)
        body = {**BODY, "max_tokens": 400, "stream": True, "n": 2, "temperature": 1.0}
        streamed = await http.post(url + "/v1/completions", json=body)
        first = await streamed.content.readline()
        await _running(stack, 2)
        stop.set()
        events = _events(first + await streamed.read())
        await asyncio.wait_for(gateway, timeout=10)
    assert "shutting down" in json.loads(events[-2])["error"]["message"], events[-2:]
    success = gateways[0].metrics.success
    samples = [s for f in success.collect() for s in f.samples if s.name.endswith("_total")]
    by_reason = {s.labels["finished_reason"]: s.value for s in samples}
    assert by_reason == {"stop": 0, "length": 0, "abort": 2, "error": 0}, by_reason
    assert await _nothing_left(stack, within_s=2.0)
