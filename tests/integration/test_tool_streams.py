"""Tool calls read from a model's text through the real stack (gateway, NATS, a worker): the random
model kept to a format by guided_regex, its reply streamed as server-sent events."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
from redis.asyncio import Redis

from dlora.model.make_tiny import TinyOutput
from dlora.services.servers import Server
from tests.integration.conftest import Stack, run_stack

PARAMS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": PARAMS}}]


def _body(regex: str, stream: bool) -> dict[str, Any]:
    return {
        "model": "lora-1",
        "messages": [{"role": "user", "content": "weather?"}],
        "tools": TOOLS,
        "temperature": 0,
        "max_tokens": 120,
        "guided_regex": regex,
        "stream": stream,
    }


async def _events(stack: Stack, body: dict[str, Any]) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.post(stack.url + "/v1/chat/completions", json=body) as r:
        assert r.status == 200, await r.text()
        lines = (await r.text()).splitlines()
    return [json.loads(line[6:]) for line in lines if line.startswith("data: {")]


async def test_granite_calls_stream_as_calls_and_answer_alike_unstreamed(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput
) -> None:
    regex = '<\\|tool_call\\|>\\[\\{"name": "weather", "arguments": \\{"city": "[a-z]{5,9}"\\}\\}\\]'
    async with run_stack(nats_server, redis, tiny_llama, tool_call_parser="granite") as stack:
        events = await _events(stack, _body(regex, stream=True))
        async with aiohttp.ClientSession() as http:
            r = await http.post(stack.url + "/v1/chat/completions", json=_body(regex, stream=False))
            whole = (await r.json())["choices"][0]
    [call] = [c for e in events for c in e["choices"][0]["delta"].get("tool_calls", [])]
    assert call["function"]["name"] == "weather" and set(json.loads(call["function"]["arguments"])) == {"city"}
    assert not any(e["choices"][0]["delta"].get("content") for e in events)
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert whole["finish_reason"] == "tool_calls" and whole["message"]["content"] is None
    assert [c["function"] for c in whole["message"]["tool_calls"]] == [call["function"]]


async def test_a_pythonic_list_that_turns_to_prose_streams_its_text_as_it_comes(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput
) -> None:
    """ "[note(Python's ..." is held until the apostrophe says it is no call, then streams: not
    one event at the end of the reply with all of it."""
    async with run_stack(nats_server, redis, tiny_llama, tool_call_parser="pythonic") as stack:
        events = await _events(stack, _body("\\[note\\(Python's [a-z]{40,60}", stream=True))
    said = [d["content"] for e in events if (d := e["choices"][0]["delta"]).get("content")]
    assert "".join(said).startswith("[note(Python's ") and len(said) > 10, said
    assert not any("tool_calls" in e["choices"][0]["delta"] for e in events)
