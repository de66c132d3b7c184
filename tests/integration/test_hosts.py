"""DNS rebinding: a web page whose name is made to resolve to 127.0.0.1 calls a loopback gateway
as its own origin (no CORS preflight); without API keys, only the Host header tells it apart."""

from __future__ import annotations

import aiohttp

from tests.integration.conftest import Stack

BODY = {"model": "model", "prompt": "hello", "max_tokens": 2}


async def test_a_loopback_gateway_without_keys_refuses_a_host_that_is_not_loopback(stack: Stack) -> None:
    port = stack.url.rsplit(":", 1)[1]
    async with aiohttp.ClientSession() as http:
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions")):
            rebound = {"Host": f"rebound.example:{port}"}
            async with http.request(method, stack.url + path, json=BODY, headers=rebound) as r:
                assert r.status == 403, await r.text()
                error = (await r.json())["error"]
                assert "allowed_hosts" in error["message"] and "rebound.example" in error["message"]
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", "LOCALHOST."):
            async with http.get(stack.url + "/v1/models", headers={"Host": host}) as r:
                assert r.status == 200, (host, await r.text())
        async with http.post(stack.url + "/v1/completions", json=BODY) as r:  # aiohttp's own Host: 127.0.0.1:port
            assert r.status == 200, await r.text()


async def test_a_gateway_taking_keys_leaves_the_host_to_its_keys(keyed_stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(keyed_stack.url + "/v1/models", headers={"Host": "rebound.example"}) as r:
            assert r.status == 401, await r.text()
