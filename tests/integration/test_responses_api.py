"""OpenAI's Responses API (``POST /v1/responses``) against the real stack, through the openai
package's own ``client.responses.create`` and ``responses.stream``: served as the chat it renders
(the same greedy request answers the same text), streamed as the events the package reads, its
structured outputs, a tool-use turn there and back, an answer cut short, and the bodies refused."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import jsonschema_rs
from redis.asyncio import Redis

from dlora.model.make_tiny import TinyOutput
from dlora.services.servers import Server
from tests.integration.conftest import Stack, run_stack
from tests.integration.test_gateway import post


def _client(stack: Stack) -> Any:
    import openai

    return openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0)


async def _events(stack: Stack, body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """A streamed response's events as sent: each ``event:`` line's name and its data."""
    out: list[tuple[str, dict[str, Any]]] = []
    async with aiohttp.ClientSession() as http, http.post(f"{stack.url}/v1/responses", json=body) as r:
        assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        name = ""
        async for raw in r.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                out.append((name, json.loads(line[6:])))
    return out


async def test_a_response_answers_as_the_same_chat_whole_and_streamed(stack: Stack) -> None:
    client = _client(stack)
    asked = {"model": "lora-1", "instructions": "Be brief.", "input": "kalo remi?", "temperature": 0}
    chat = {
        "model": "lora-1",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "kalo remi?"}],
        "temperature": 0,
        "max_completion_tokens": 12,
        "ignore_eos": True,
    }
    try:
        status, expected = await post(stack, "/v1/chat/completions", chat)
        assert status == 200, expected
        text = expected["choices"][0]["message"]["content"]
        resp = await client.responses.create(**asked, max_output_tokens=12, extra_body={"ignore_eos": True})
        assert resp.id.startswith("resp_") and resp.object == "response" and resp.model == "lora-1"
        assert resp.output_text == text and resp.status == "incomplete"  # (ignore_eos: it ran to its limit)
        assert resp.incomplete_details is not None and resp.incomplete_details.reason == "max_output_tokens"
        [message] = resp.output
        assert message.type == "message" and message.role == "assistant"
        assert [(c.type, c.annotations) for c in message.content] == [("output_text", [])]
        assert resp.usage is not None and resp.usage.input_tokens == expected["usage"]["prompt_tokens"]
        assert resp.usage.output_tokens == 12 and resp.usage.total_tokens == resp.usage.input_tokens + 12
        assert resp.usage.input_tokens_details.cached_tokens >= 0
        assert resp.usage.output_tokens_details.reasoning_tokens == 0
        # ended by the model (no ignore_eos): completed, the same text as the chat's
        status, expected = await post(stack, "/v1/chat/completions", {**chat, "ignore_eos": False})
        free = await client.responses.create(**asked, max_output_tokens=12)
        assert free.output_text == expected["choices"][0]["message"]["content"], free
        assert free.status == ("incomplete" if expected["choices"][0]["finish_reason"] == "length" else "completed")
        # streamed: the openai package's reader takes every event; the deltas joined are the text
        async with client.responses.stream(**asked, max_output_tokens=12, extra_body={"ignore_eos": True}) as s:
            deltas = [e.delta async for e in s if e.type == "response.output_text.delta"]
        assert "".join(deltas) == text and len(deltas) > 1
        events = await _events(stack, {**asked, "max_output_tokens": 12, "ignore_eos": True, "stream": True})
        assert all(name == data["type"] for name, data in events)
        assert [d["sequence_number"] for _, d in events] == list(range(len(events)))
        kinds = [name for name, _ in events]
        assert kinds[:5] == [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
        ]
        assert kinds[-4:] == [
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.incomplete",  # cut at max_output_tokens; response.completed when the model ended
        ]
        delta, added = events[4][1], events[2][1]["item"]
        assert (delta["item_id"], delta["output_index"], delta["content_index"]) == (added["id"], 0, 0)
        last = events[-1][1]["response"]
        assert last["status"] == "incomplete" and last["output"][0]["content"][0]["text"] == text
        assert last["usage"]["output_tokens"] == 12
        # ended by the model (a format it completes): the package's final response, response.completed's
        fmt = {"format": {"type": "json_schema", "name": "yes", "schema": {"enum": ["kalo", "remi"]}}}
        whole = await client.responses.create(**asked, max_output_tokens=12, text=fmt)
        async with client.responses.stream(**asked, max_output_tokens=12, text=fmt) as s:
            final = await s.get_final_response()
        assert final.status == whole.status == "completed" and final.output_text == whole.output_text, final
        assert whole.output_text in ('"kalo"', '"remi"') and final.usage == whole.usage
    finally:
        await client.close()


async def test_a_response_in_a_json_schema_format(stack: Stack) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 6}, "days": {"enum": [1, 2, 3]}},
        "required": ["city", "days"],
        "additionalProperties": False,
    }
    client = _client(stack)
    try:
        fmt = {"format": {"type": "json_schema", "name": "forecast", "schema": schema, "strict": True}}
        resp = await client.responses.create(model="lora-2", input="kalo?", text=fmt, max_output_tokens=100)
        assert resp.status == "completed", resp
        jsonschema_rs.validate(schema, json.loads(resp.output_text))
        assert resp.text is not None and resp.text.format is not None and resp.text.format.type == "json_schema"
        # the package's parse() helper: a pydantic model as a strict json_schema, its output parsed
        from pydantic import BaseModel, Field

        class Forecast(BaseModel):
            city: str = Field(max_length=6)
            sunny: bool

        parsed = await client.responses.parse(model="lora-2", input="kalo?", text_format=Forecast)
        assert isinstance(parsed.output_parsed, Forecast), parsed
        # json_object: the chat's response_format of that type, greedy the same text
        obj = {"model": "lora-2", "temperature": 0, "max_output_tokens": 16}
        resp = await client.responses.create(**obj, input="kalo?", text={"format": {"type": "json_object"}})
        chat = {"model": "lora-2", "messages": [{"role": "user", "content": "kalo?"}], "temperature": 0}
        chat |= {"max_tokens": 16, "response_format": {"type": "json_object"}}
        status, expected = await post(stack, "/v1/chat/completions", chat)
        assert status == 200 and resp.output_text == expected["choices"][0]["message"]["content"], resp
        assert resp.output_text.startswith("{") and resp.text.format.type == "json_object"  # type: ignore[union-attr]
    finally:
        await client.close()


async def test_a_function_call_and_its_output_make_a_round_trip(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput
) -> None:
    """tool_choice names the function (the random model writes only its arguments); its call sent
    back with the function's output renders as the chat with the call and a tool message does;
    tool_choice "auto" reads the calls the model wrote by the gateway's tool_call_parser (the
    random model led to write one by vLLM's structured_outputs), whole and streamed."""
    params = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6}}, "required": ["city"]}
    tools = [{"type": "function", "name": "weather", "description": "Weather", "parameters": params, "strict": True}]
    asked: dict[str, Any] = {"model": "lora-3", "input": [{"role": "user", "content": "kalo?"}], "tools": tools}
    async with run_stack(nats_server, redis, tiny_llama, tool_call_parser="hermes") as stack:
        client = _client(stack)
        try:
            await _round_trip(stack, client, asked)
            await _auto(stack, client, asked)
        finally:
            await client.close()


async def _round_trip(stack: Stack, client: Any, asked: dict[str, Any]) -> None:
    named = {**asked, "tool_choice": {"type": "function", "name": "weather"}, "temperature": 0}
    resp = await client.responses.create(**named, max_output_tokens=60)
    [call] = resp.output
    assert call.type == "function_call" and call.name == "weather" and call.status == "completed", resp
    assert isinstance(json.loads(call.arguments)["city"], str) and call.call_id
    events = await _events(stack, {**named, "max_output_tokens": 60, "stream": True})
    pieces = [d["delta"] for n, d in events if n == "response.function_call_arguments.delta"]
    assert "".join(pieces) == call.arguments and events[-1][0] == "response.completed"
    [added] = [d["item"] for n, d in events if n == "response.output_item.added"]
    [done] = [d["item"] for n, d in events if n == "response.output_item.done"]
    assert (added["type"], added["name"], added["arguments"]) == ("function_call", "weather", "")
    assert done["call_id"] == added["call_id"] and done["arguments"] == call.arguments, done
    # the next turn: the call and its output as input, rendered as the chat with both renders them
    turn = [*asked["input"], call]  # the answer's item as it came (the package sends it back whole)
    turn.append({"type": "function_call_output", "call_id": call.call_id, "output": "sunny"})
    answered = await client.responses.create(
        model="lora-3", input=turn, tools=asked["tools"], tool_choice="none", temperature=0, max_output_tokens=8
    )
    function = {"name": "weather", "arguments": call.arguments}
    messages = [
        {"role": "user", "content": "kalo?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": call.call_id, "type": "function", "function": function}],
        },
        {"role": "tool", "tool_call_id": call.call_id, "content": "sunny"},
    ]
    tools = [{"type": "function", "function": {k: v for k, v in t.items() if k != "type"}} for t in asked["tools"]]
    chat = {"model": "lora-3", "messages": messages, "tools": tools, "tool_choice": "none"}
    status, expected = await post(stack, "/v1/chat/completions", chat | {"temperature": 0, "max_tokens": 8})
    assert status == 200, expected
    assert answered.output_text == expected["choices"][0]["message"]["content"]
    assert answered.usage is not None and answered.usage.input_tokens == expected["usage"]["prompt_tokens"]
    # the answers' items as model_dump() writes them (every field, null where unset), a message too
    again = [*asked["input"], call.model_dump(), *[i.model_dump() for i in answered.output]]
    again.append({"role": "user", "content": [{"type": "input_text", "text": "remi?"}]})
    resp = await client.responses.create(model="lora-3", input=again, tools=asked["tools"], tool_choice="none")
    assert resp.status in ("completed", "incomplete") and resp.output[0].type == "message", resp


async def _auto(stack: Stack, client: Any, asked: dict[str, Any]) -> None:
    written = r'Sure\. <tool_call>\{"name": "weather", "arguments": \{"city": "(kalo|remi)"\}\}</tool_call>'
    led = {**asked, "max_output_tokens": 200, "temperature": 0}
    resp = await client.responses.create(**led, extra_body={"structured_outputs": {"regex": written}})
    message, call = resp.output
    assert message.type == "message" and resp.output_text == "Sure. ", resp
    assert call.type == "function_call" and json.loads(call.arguments)["city"] in ("kalo", "remi")
    events = await _events(stack, {**led, "structured_outputs": {"regex": written}, "stream": True})
    text = "".join(d["delta"] for n, d in events if n == "response.output_text.delta")
    items = [d["item"] for n, d in events if n == "response.output_item.done"]
    assert text == "Sure. " and [i["type"] for i in items] == ["message", "function_call"], events
    assert (items[1]["name"], items[1]["arguments"]) == ("weather", call.arguments)
    assert events[-1][1]["response"]["output"] == items


async def test_a_reasoning_parsers_split_is_a_reasoning_item_and_its_tokens_counted(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput
) -> None:
    """With reasoning_parser qwen3 the random model, which never writes </think>, is cut short while
    thinking: its whole output the reasoning item (the chat's reasoning), every token a reasoning
    token, whole and streamed (the events of a reasoning item; the split itself is fuzzed in
    tests/unit/test_reasoning.py and its Responses events in tests/unit/test_responses_shape.py)."""
    asked = {"model": "lora-1", "input": "kalo?", "temperature": 0, "max_output_tokens": 6, "ignore_eos": True}
    chat = {"model": "lora-1", "messages": [{"role": "user", "content": "kalo?"}], "temperature": 0}
    async with run_stack(nats_server, redis, tiny_llama, reasoning_parser="qwen3") as stack:
        status, expected = await post(stack, "/v1/chat/completions", chat | {"max_tokens": 6, "ignore_eos": True})
        assert status == 200, expected
        status, resp = await post(stack, "/v1/responses", asked)
        assert status == 200 and resp["status"] == "incomplete", resp
        [item] = resp["output"]
        assert (
            item["type"] == "reasoning" and item["content"][0]["text"] == expected["choices"][0]["message"]["reasoning"]
        )
        assert resp["usage"]["output_tokens_details"]["reasoning_tokens"] == resp["usage"]["output_tokens"] == 6
        events = await _events(stack, asked | {"stream": True})
        text = "".join(d["delta"] for n, d in events if n == "response.reasoning_text.delta")
        assert text == item["content"][0]["text"] and events[-1][1]["response"]["usage"] == resp["usage"]


async def test_text_parts_render_as_the_chats_joined_by_newlines(stack: Stack) -> None:
    """A message of several input_text parts (a function's output of several too) is the prompt the
    chat renders of the same text parts, as vLLM's Responses API renders it (joined by newlines:
    they ran together, one token short); a part without its text refused, as the chat refuses it."""
    parts = [{"type": "input_text", "text": "kalo"}, {"type": "input_text", "text": "remi"}]
    asked = {"model": "lora-1", "input": [{"role": "user", "content": parts}], "max_output_tokens": 4}
    chat = {"model": "lora-1", "messages": [{"role": "user", "content": [{**p, "type": "text"} for p in parts]}]}
    status, expected = await post(stack, "/v1/chat/completions", chat | {"max_tokens": 4})
    assert status == 200, expected
    status, resp = await post(stack, "/v1/responses", asked)
    assert status == 200 and resp["usage"]["input_tokens"] == expected["usage"]["prompt_tokens"], resp
    untold = [{"role": "user", "content": [{"type": "input_text"}]}]
    status, resp = await post(stack, "/v1/responses", asked | {"input": untold})
    assert status == 400 and resp["error"]["param"] == "input" and "messages" not in resp["error"]["message"], resp


# (body, status, param): the Responses field each refusal names, never the chat's that serves it
_REFUSED: list[tuple[dict[str, Any], int, str | None]] = [
    ({"input": "kalo", "frequency": 1}, 400, "frequency"),  # not a Responses field
    ({"input": "kalo", "previous_response_id": "resp_1"}, 400, "previous_response_id"),  # none stored so (OpenAI's 400)
    ({"input": "kalo", "previous_response_id": 0}, 400, "previous_response_id"),  # (0 == False: it was taken)
    ({"input": "kalo", "background": 0}, 400, "background"),
    ({"input": "kalo", "tools": [{"type": "web_search"}]}, 400, "tools[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, 400, "input[0].content[0]"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, 404, "input[0].id"),  # (no item stored of that id)
    ({"input": "kalo", "stream_options": {"include_obfuscation": False}}, 400, "stream_options"),  # no stream
    ({"input": "kalo", "max_output_tokens": 0}, 400, "max_output_tokens"),
    ({"input": "kalo", "text": {"format": {"type": "json_schema", "name": "x"}}}, 400, "text.format"),
    ({"input": "kalo", "tool_choice": "required"}, 400, "tool_choice"),
    ({"input": "kalo", "temperature": 3}, 400, "temperature"),
    ({"input": "kalo", "include": ["file_search_call.results"]}, 400, "include"),
    ({"input": 3}, 400, "input"),
    ({"input": []}, 400, "input"),  # the chat's check of its messages, in the Responses words
    ({"input": [{"type": "message", "role": "user", "content": "x", "foo": 1}]}, 400, "input[0].foo"),
    ({"input": "kalo", "tools": [{"type": "function", "name": "x", "extra": 1}]}, 400, "tools[0].extra"),
    ({"input": "kalo", "max_output_tokens": 100000}, 400, "max_output_tokens"),  # past the context
    ({"model": "nobody", "input": "kalo"}, 404, "model"),
]


async def test_bad_responses_bodies_are_refused_by_their_field(stack: Stack) -> None:
    for body, status, param in _REFUSED:
        got, resp = await post(stack, "/v1/responses", {"model": "model"} | body)
        assert got == status, (body, resp)
        assert param is None or resp["error"]["param"] == param, (body, resp)
        said = resp["error"]["message"]
        assert not any(chat in said for chat in ("max_completion_tokens", "response_format", "messages")), resp
