"""The gateway's access log and request ids (services/gateway/access.py), on a real aiohttp server:
each response names its request's id, each request ends in one line, a request whose client went
away included."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestServer

from dlora.common import log
from dlora.services.gateway import access

Capture = Callable[[], list[dict]]


def app(enabled: bool, ended: asyncio.Event) -> web.Application:
    async def ok(request: web.Request) -> web.Response:
        log.get("gateway").warning("something said while answering")
        return web.json_response({"ours": access.ours(request)})

    async def slow(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        try:
            await asyncio.sleep(30)
        finally:
            ended.set()
        return response

    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPPermanentRedirect("/v1/ok")

    async def unhealthy(request: web.Request) -> web.Response:
        return web.json_response({}, status=503)

    async def refuse(request: web.Request) -> None:  # a route's Expect: 100-continue check
        raise web.HTTPRequestEntityTooLarge(1, 2)

    async def post(request: web.Request) -> web.Response:
        access.note(request, model="m" * 10_000)
        return web.json_response({})

    logged = access.AccessLog(enabled)
    app = web.Application(middlewares=[logged.middleware])
    app.on_response_prepare.append(logged.on_prepare)
    app.router.add_get("/v1/ok", ok)
    app.router.add_get("/v1/slow", slow)
    app.router.add_get("/v1/moved", moved)
    app.router.add_get("/healthz", ok)
    app.router.add_get("/readyz", unhealthy)
    app.router.add_post("/v1/completions", post, expect_handler=refuse)
    return app


@pytest.fixture
async def served() -> AsyncIterator[Callable[[bool], TestServer]]:
    servers: list[TestServer] = []

    def serve(enabled: bool = True) -> TestServer:
        servers.append(server := TestServer(app(enabled, ended)))
        return server

    ended = asyncio.Event()
    yield serve
    for server in servers:
        await server.close()


async def test_a_response_names_the_clients_request_id_and_its_line_says_it(served) -> None:  # type: ignore[no-untyped-def]
    server = served()
    await server.start_server()
    with structlog.testing.capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        async with aiohttp.ClientSession() as http:
            async with http.get(server.make_url("/v1/ok?secret=1"), headers={"X-Request-Id": "trace-7"}) as r:
                assert r.status == 200 and r.headers["X-Request-Id"] == "trace-7"
                ours = (await r.json())["ours"]
    said = next(line for line in logs if line["event"] == "something said while answering")
    assert said["request_id"] == "trace-7"  # every line written while answering names it
    (line,) = [line for line in logs if line["event"] == "http request"]
    assert line["log_level"] == "info" and line["method"] == "GET" and line["path"] == "/v1/ok"
    assert line["status"] == 200 and line["request_id"] == "trace-7" and line["duration_s"] >= 0
    assert ours != "trace-7" and len(ours) == 32  # a client's id need not be unique: ours is


async def test_without_a_usable_id_the_gateway_draws_one(served) -> None:  # type: ignore[no-untyped-def]
    server = served()
    await server.start_server()
    async with aiohttp.ClientSession() as http:
        for given in ({}, {"X-Request-Id": "x" * 300}):  # none, and one too long to name a response
            async with http.get(server.make_url("/v1/ok"), headers=given) as r:
                assert r.headers["X-Request-Id"] == (await r.json())["ours"]
        async with http.get(server.make_url("/v1/none")) as r:  # an error names it too
            assert r.status == 404 and len(r.headers["X-Request-Id"]) == 32


async def test_a_request_whose_client_went_away_is_logged_499(served) -> None:  # type: ignore[no-untyped-def]
    server = served()
    await server.start_server()
    with structlog.testing.capture_logs() as logs:
        async with aiohttp.ClientSession() as http:
            r = await http.get(server.make_url("/v1/slow"))
            assert r.status == 200
            r.close()  # gone mid-answer: the handler is cancelled
        for _ in range(100):
            if any(line["event"] == "http request" for line in logs):
                break
            await asyncio.sleep(0.05)
    (line,) = [line for line in logs if line["event"] == "http request"]
    assert line["status"] == access.CLIENT_GONE and line["path"] == "/v1/slow"


async def test_health_checks_go_at_debug_and_a_disabled_log_writes_nothing(served) -> None:  # type: ignore[no-untyped-def]
    quiet, off = served(), served(enabled=False)
    for server in (quiet, off):
        await server.start_server()
    with structlog.testing.capture_logs() as logs:
        async with aiohttp.ClientSession() as http:
            async with http.get(quiet.make_url("/healthz")) as r:
                assert r.status == 200
            async with http.get(off.make_url("/v1/ok")) as r:
                assert r.status == 200 and r.headers["X-Request-Id"]
    # (at debug: not written at the default level, captured only where that is set lower)
    assert [line["log_level"] for line in logs if line["event"] == "http request"] in ([], ["debug"])


async def test_redirects_refusals_before_any_handler_and_long_names_are_logged_as_they_are(served) -> None:  # type: ignore[no-untyped-def]
    """A review: a redirect was logged 499 (client gone); a route's Expect: 100-continue refusal
    (curl sends the header for a large body) had neither the header nor a line; a body's 1 MB
    model name made a 1 MB line; a failing health check was left at debug."""
    server = served()
    await server.start_server()
    with structlog.testing.capture_logs() as logs:
        async with aiohttp.ClientSession() as http:
            async with http.get(server.make_url("/v1/moved"), allow_redirects=False) as r:
                assert r.status == 308
            refused = {"Expect": "100-continue", "X-Request-Id": "big-1"}
            async with http.post(server.make_url("/v1/completions"), data=b"x", headers=refused) as r:
                assert r.status == 413 and r.headers["X-Request-Id"] == "big-1"
            async with http.post(server.make_url("/v1/completions"), data=b"x") as r:
                assert r.status == 200
            async with http.get(server.make_url("/readyz")) as r:
                assert r.status == 503
    moved, too_large, named, unhealthy = [line for line in logs if line["event"] == "http request"]
    assert moved["status"] == 308 and too_large["status"] == 413 and too_large["request_id"] == "big-1"
    assert named["model"] == "m" * 128
    assert unhealthy["status"] == 503 and unhealthy["log_level"] == "info"


def test_a_failing_poll_is_said_as_it_begins_failing_not_at_every_poll() -> None:
    """A new user's try-out: ``dlora up``'s readiness poll (every 0.2 s while its workers load)
    wrote a line at info for each 503, 16-19 of them before its banner."""
    logged = access.AccessLog(True)
    said = [logged._said("/healthz", status) for status in (503, 503, 401, 503, 200, 200, 503, 500, 500)]
    assert said == [True, False, True, False, True, False, True, True, False]  # (a 4xx each time, the end once)
    assert logged._said("/readyz", 503)  # (each path its own)
    assert logged._said("/v1/status", 403) and logged._said("/v1/status", 403)  # (a refused key, each time)
    assert logged._said("/v1/ok", 200) and logged._said("/v1/ok", 200)  # any other path: every one
