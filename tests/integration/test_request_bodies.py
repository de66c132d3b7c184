"""Request bodies as they come over HTTP: their coding (gzip, deflate, none; the rest refused),
bounds and faults, and a dependency's failure answered and counted."""

from __future__ import annotations

import gzip
import json
import zlib

import aiohttp
from redis.exceptions import ConnectionError as RedisConnectionError

from tests.integration.conftest import Stack
from tests.integration.test_gateway import post


async def test_a_body_its_content_encoding_cannot_decode_is_a_400_and_a_dependency_down_is_counted(
    stack: Stack,
) -> None:
    """A body that is not what its Content-Encoding says was a 500 (aiohttp's payload error), and
    the connection was dropped without a word; an unknown coding was read as plain bytes. A
    failure the error middleware answers (Redis down: a 503) was counted nowhere
    (dlora_requests_total only saw refusals raised as such)."""
    body = json.dumps({"model": "model", "prompt": "kalo", "max_tokens": 2}).encode()
    json_type = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession() as http:
        # br and zstd were aiohttp's own plain-text 400 (a user's trial): its parser knows them
        bomb = gzip.compress(b" " * (stack.gateway.s.max_body_bytes + 1))
        for coding, data, status in (
            ("gzip", body, 400),
            ("deflate", body, 400),
            ("gzip", gzip.compress(body)[:-9], 400),  # cut short
            ("gzip", bomb, 413),
            ("gzip", gzip.compress(b"") * 64 + gzip.compress(body), 400),  # members past 64: 50,000 took 1 s
            ("br2", body, 415),
            ("br", body, 415),
            ("zstd", body, 415),
        ):
            headers = {**json_type, "Content-Encoding": coding}
            async with http.post(stack.url + "/v1/completions", data=data, headers=headers) as r:
                assert r.content_type == "application/json", (coding, await r.text())
                error = (await r.json())["error"]
                assert (r.status, error["type"]) == (status, "invalid_request_error"), (coding, error)
        raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)  # deflate without zlib's header (.NET's)
        halves = gzip.compress(body[:10]) + gzip.compress(body[10:])  # two gzip members: one body
        for coding, data in (
            ("gzip", gzip.compress(body)),
            ("deflate", zlib.compress(body)),
            ("deflate", raw.compress(body) + raw.flush()),
            ("gzip", halves),
            ("gzip", gzip.compress(body) + b"\0" * 8),  # zero padding after it, as gzip readers take
        ):
            async with http.post(
                stack.url + "/v1/completions", data=data, headers={**json_type, "Content-Encoding": coding}
            ) as r:
                assert r.status == 200, coding
    lookup = stack.gateway.registry.lookup

    async def down(name: str, bound: object = None) -> None:
        raise RedisConnectionError("injected: Redis is down")

    stack.gateway.registry.lookup = down  # type: ignore[method-assign]
    try:
        status, resp = await post(stack, "/v1/completions", {"model": "lora-1", "prompt": "kalo", "max_tokens": 2})
    finally:
        stack.gateway.registry.lookup = lookup  # type: ignore[method-assign]
    assert status == 503 and "Redis" in resp["error"]["message"]
    async with aiohttp.ClientSession() as http, http.get(stack.url + "/metrics") as r:
        assert 'dlora_requests_total{adapter="?",status="503"}' in await r.text()
