"""The gateway's access lines and request ids end to end (services/gateway/access.py): a
completion's response, header and line name one another, and a line says who asked, never what."""

from __future__ import annotations

import aiohttp
import structlog

from tests.integration.conftest import ADMIN_KEY, Stack


async def completion(stack: Stack, headers: dict[str, str], status: int = 200, **more: str) -> tuple[str, dict]:
    body = {"model": stack.gateway.base_name, "prompt": "kalo remi suta", "max_tokens": 3, **more}
    async with (
        aiohttp.ClientSession() as http,
        http.post(stack.url + "/v1/completions", json=body, headers=headers) as r,
    ):
        assert r.status == status
        return r.headers["X-Request-Id"], await r.json()


async def test_a_completion_its_header_and_its_line_name_one_another(stack: Stack) -> None:
    with structlog.testing.capture_logs() as logs:
        drawn, answered = await completion(stack, {})
        given, traced = await completion(stack, {"X-Request-Id": "trace-9"})
        async with aiohttp.ClientSession() as http:  # an admin's call: a line says so
            auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
            async with http.delete(stack.url + "/v1/adapters/never-registered", headers=auth) as r:
                assert r.status == 404 and r.headers["X-Request-Id"]
    lines = [line for line in logs if line["event"] == "http request"]
    first, second, admin = lines
    # no id given: the response's id is the one drawn, and the id the dispatcher and workers log
    assert answered["id"] == f"cmpl-{drawn}" == first["request"] and first["request_id"] == drawn
    assert first["model"] == stack.gateway.base_name and first["status"] == 200 and first["path"] == "/v1/completions"
    assert first["workers"] in (["w0"], ["w1"])  # which of the stack's two served it
    # the client's: its response is named after it (vLLM's), its internal id still unique
    assert given == "trace-9" == second["request_id"] and traced["id"] == "cmpl-trace-9"
    assert second["request"].startswith("cmpl-") and second["request"] != traced["id"]
    assert admin["admin"] is True and admin["status"] == 404 and admin["method"] == "DELETE"
    said = repr(logs)
    assert "kalo" not in said and ADMIN_KEY not in said  # neither the prompt nor a secret


async def test_a_request_named_in_its_body_is_logged_and_answered_under_that_name(stack: Stack) -> None:
    """A new user's walk through the README: vLLM's body field request_id named the response but
    no header and no log line; a client could not find its request by its own name."""
    with structlog.testing.capture_logs() as logs:
        named, answered = await completion(stack, {}, request_id="body-2")
        drawn, _ = await completion(stack, {}, status=400, request_id="two\nlines")  # refused: not a name
    assert named == "body-2" and answered["id"] == "cmpl-body-2"
    first, refused = [line for line in logs if line["event"] == "http request"]
    assert first["request_id"] == "body-2" and refused["request_id"] == drawn and refused["status"] == 400


async def test_a_response_its_header_and_its_line_name_one_another(stack: Stack) -> None:
    """A review: a Responses request's line said request=chatcmpl-<hex> (the chat that serves it),
    an id its client never saw (resp_<hex>): an operator could not find it by the response's id."""
    body = {"model": stack.gateway.base_name, "input": "kalo remi suta", "max_output_tokens": 3}
    with structlog.testing.capture_logs() as logs:
        async with aiohttp.ClientSession() as http, http.post(stack.url + "/v1/responses", json=body) as r:
            assert r.status == 200
            drawn, answered = r.headers["X-Request-Id"], await r.json()
    [line] = [line for line in logs if line["event"] == "http request"]
    assert answered["id"] == f"resp_{drawn}" == line["request"] and line["request_id"] == drawn
