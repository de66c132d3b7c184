"""Schema-driven fuzz (issue 16, item 5): schemathesis generates requests from the gateway's own
``/openapi.json``, valid and invalid, against the real stack (NATS, Redis, dispatcher, two
workers, gateway taking API keys only). No answer may be a 5xx, no service may die, and a normal completion is still
exact afterwards. The budget is fixed (``MAX_EXAMPLES`` per operation and mode, derandomized, so
every run sends the same requests and takes the same time)."""

from __future__ import annotations

import asyncio
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import aiohttp
from schemathesis import GenerationMode

from tests.integration.conftest import ADMIN_KEY, Stack
from tests.integration.fuzz_cases import MAX_EXAMPLES, fuzz
from tests.integration.test_gateway import PROMPTS, offline, post


async def test_fuzzing_every_operation_from_the_schema_gets_no_5xx(keyed_stack: Stack) -> None:
    stack = keyed_stack
    # The document covers every route a client uses (/metrics, /readyz, /health and /ping, the status page's
    # HTML and itself aside).
    async with aiohttp.ClientSession() as http, http.get(stack.url + "/openapi.json") as r:
        document = await r.json()
    routes = {
        (route.method.lower(), route.resource.canonical)
        for route in stack.gateway.app().router.routes()
        if route.method != "HEAD"  # aiohttp adds one to each GET
        and route.resource is not None
        and route.resource.canonical not in ("/metrics", "/readyz", "/health", "/ping", "/openapi.json")
        and not route.resource.canonical.startswith("/dashboard")
    }
    assert {(method, path) for path, ops in document["paths"].items() for method in ops} == routes

    status, made = await post(stack, "/v1/keys", {"tenant": "fuzz"}, {"Authorization": f"Bearer {ADMIN_KEY}"})
    assert status == 201, made
    # In a process of its own (spawned: this one holds threads), not a thread beside the stack
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as fuzzer:
        answered, failures = await asyncio.get_running_loop().run_in_executor(
            fuzzer, fuzz, stack.url, made["key"], ADMIN_KEY
        )
    assert not failures, "\n".join(failures)
    reached = {mode: {label for label, m in answered if m is mode} for mode in GenerationMode}
    assert len(reached[GenerationMode.POSITIVE]) == len(routes), answered  # every operation of the document
    assert len(reached[GenerationMode.NEGATIVE]) >= 6, answered  # the six with inputs, invalid too
    assert sum(answered.values()) >= 6 * 2 * MAX_EXAMPLES * 0.9, answered
    # Nothing died: the dispatcher and both workers still run, and the gateway is ready.
    assert not any(t.done() for t in stack.services), [t for t in stack.services if t.done()]
    async with aiohttp.ClientSession() as http, http.get(stack.url + "/healthz") as r:
        health: dict[str, Any] = await r.json()
    assert r.status == 200 and health["workers"] == 2, health
    # And a normal request is still answered exactly, on an adapter and on the base model.
    bodies = [
        {"model": "lora-1", "prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0},
        {"model": "model", "prompt": PROMPTS[1], "max_tokens": 6, "temperature": 0},
    ]
    results = [await post(stack, "/v1/completions", b, {"Authorization": f"Bearer {made['key']}"}) for b in bodies]
    expected = offline(
        stack.tiny,
        [
            {"id": "0", "adapter": "lora-1", "prompt": PROMPTS[0], "max_tokens": 6},
            {"id": "1", "adapter": None, "prompt": PROMPTS[1], "max_tokens": 6},
        ],
    )
    assert [(s, r["choices"][0]["text"]) for s, r in results] == [(200, e["text"]) for e in expected]
