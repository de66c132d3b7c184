"""JSON Schemas as clients write them, through the real stack: a boolean schema, OpenAPI's
``nullable``, date and time formats a pydantic model reads back, numbers a client parses; and
how a refusal names the field its client sent."""

from __future__ import annotations

import asyncio
import json
import re
import uuid

import msgspec
from nats.aio.msg import Msg

from dlora.common import subjects
from dlora.common.messages import ErrorCode, GenerateRequest, SamplingParams, TokenChunk
from dlora.common.sampling import RANGES
from tests.integration.conftest import Stack
from tests.integration.test_gateway import post


async def app_generate(stack: Stack, params: SamplingParams) -> list[TokenChunk]:
    """An application's request over NATS (no gateway), its chunks until the last."""
    rid, owner = uuid.uuid4().hex, uuid.uuid4().hex[:8]
    got: asyncio.Queue[TokenChunk] = asyncio.Queue()

    async def on_chunk(msg: Msg) -> None:
        await got.put(msgspec.json.decode(msg.data, type=TokenChunk))

    sub = await stack.nc.subscribe(subjects.replies_of(owner), cb=on_chunk)
    req = GenerateRequest(
        request_id=rid, reply_to=subjects.reply_inbox(rid, owner), prompt_token_ids=[5, 40, 41], params=params
    )
    await stack.nc.publish(subjects.REQUESTS, msgspec.json.encode(req))
    chunks: list[TokenChunk] = []
    async with asyncio.timeout(60):
        while not chunks or not (chunks[-1].finish_reason or chunks[-1].error is not None):
            chunks.append(await got.get())
    await sub.unsubscribe()
    return chunks


async def test_a_boolean_schema_is_any_value_or_none(stack: Stack) -> None:
    """An application's ``json_schema`` "true" (any JSON value, as JSON Schema and vLLM's default
    backend read it) was refused "is not a JSON object: Expecting object schema to apply options";
    "false" accepts no document and says so."""
    chunks = await app_generate(stack, SamplingParams(max_tokens=40, temperature=0, json_schema="true"))
    assert chunks[-1].error is None, chunks[-1]
    if chunks[-1].finish_reason == "stop":  # a whole document: any JSON value
        json.loads("".join(c.text for c in chunks))
    chunks = await app_generate(stack, SamplingParams(max_tokens=4, json_schema="false"))
    assert chunks[-1].error_code is ErrorCode.BAD_REQUEST and chunks[-1].param == "json_schema", chunks[-1]
    assert "accepts no document" in (chunks[-1].error or ""), chunks[-1]
    body = {"model": "lora-2", "prompt": "kalo", "max_tokens": 40, "temperature": 0}
    status, resp = await post(stack, "/v1/completions", {**body, "guided_json": "true"})
    assert status == 200, resp
    if resp["choices"][0]["finish_reason"] == "stop":  # a whole document: any JSON value
        json.loads(resp["choices"][0]["text"])
    status, resp = await post(stack, "/v1/completions", {**body, "guided_json": "false"})
    assert (status, resp["error"]["param"]) == (400, "guided_json"), resp
    assert "accepts no document" in resp["error"]["message"], resp


async def test_a_regex_digit_is_an_ascii_digit(stack: Stack) -> None:
    """A guided_regex "\\d{3}-\\w" answered "۸९߂-ﬀ" (a random model takes any digit llguidance's
    Unicode classes allow), where vLLM's default backend writes ASCII: checked over seeds."""
    body = {"model": "lora-2", "prompt": "kalo", "max_tokens": 12, "temperature": 1.0}
    for seed in range(6):
        for field, value in (("guided_regex", r"\d{3}-\w"), ("structured_outputs", {"regex": r"\d{3}-\w"})):
            status, resp = await post(stack, "/v1/completions", {**body, "seed": seed, field: value})
            assert status == 200, resp
            assert re.fullmatch("[0-9]{3}-[0-9a-zA-Z_]", resp["choices"][0]["text"]), resp


async def test_a_refusal_names_the_field_its_client_sent(stack: Stack) -> None:
    """A NATS application sends ``json_schema`` and was told "response_format schema cannot be
    used", a field it never sent; a REST client's ``guided_json`` that failed as the output grew
    (past llguidance's lexer limit, on the worker) read "response_format schema" too. A value out
    of its range is refused by the gateway and over NATS in one sentence, the table's
    (``common.sampling.RANGES``; ``tests/unit/test_sampling_ranges.py``: loadgen says it too): the
    engine took temperature up to 100 where the gateway stopped at 2."""
    for name, value in (("temperature", 2.5), ("top_k", -2)):
        said = RANGES[name].problem(name, value)
        status, resp = await post(stack, "/v1/completions", {"model": "lora-0", "prompt": "kalo", name: value})
        assert (status, resp["error"]["message"], resp["error"]["param"]) == (400, said, name)
        last = (await app_generate(stack, SamplingParams(max_tokens=2, **{name: value})))[-1]
        assert (last.error_code, last.error, last.param) == (ErrorCode.BAD_REQUEST, said, name)
    schema = json.dumps({"type": "string", "pattern": "^a{1000000}$"})  # fails as the first token is taken
    chunks = await app_generate(stack, SamplingParams(max_tokens=4, json_schema=schema))
    assert chunks[-1].error_code is ErrorCode.BAD_REQUEST and chunks[-1].param == "json_schema", chunks[-1]
    assert (chunks[-1].error or "").startswith("json_schema cannot be used: "), chunks[-1]
    chunks = await app_generate(stack, SamplingParams(max_tokens=4, json_schema='{"$ref": "#"}'))  # at admission
    assert (chunks[-1].error or "").startswith("json_schema cannot be used: "), chunks[-1]
    body = {"model": "lora-2", "prompt": "kalo", "max_tokens": 4}
    for field, value in (("guided_json", json.loads(schema)), ("structured_outputs", {"json": json.loads(schema)})):
        status, resp = await post(stack, "/v1/completions", {**body, field: value})
        assert (status, resp["error"]["param"]) == (400, field), resp
        assert resp["error"]["message"].startswith(f"{field} schema cannot be used: "), resp


async def test_a_lark_strings_json_text_is_no_block(stack: Stack) -> None:
    """'%json {' in a guided_grammar's comment (not JSON) stopped the layout's scan: the real block
    answered "[\n\r]"; one in its string literal had the layout's options spliced in (a 400)."""
    grammar = '// obj: %json {schema}\nstart: "%json {}" obj\nobj: %json {"type": "array", "maxItems": 0}\n'
    body = {"model": "lora-2", "prompt": "kalo", "max_tokens": 16, "temperature": 1.0}
    for field, value in (("guided_grammar", grammar), ("structured_outputs", {"grammar": grammar})):
        status, resp = await post(stack, "/v1/completions", {**body, field: value})
        assert status == 200, resp
        assert resp["choices"][0]["text"] == "%json {}[]", resp
