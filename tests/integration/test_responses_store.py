"""OpenAI's stored responses (``store``, ``previous_response_id``, ``GET``/``DELETE
/v1/responses/{id}``, ``input_items``) against the real stack through the openai package's client:
a chain of three turns over two gateways sharing Redis renders as the chat of the whole
conversation, each response read back as its POST answered it; a streamed one stored once over;
another tenant's ids are 404s; ``store`` false keeps nothing."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from dlora.model.make_tiny import TinyOutput
from dlora.services.servers import Server
from tests.integration.conftest import Stack, run_stack, start_gateway
from tests.integration.test_gateway import post
from tests.integration.test_keys import bearer, make_key


def _client(url: str, key: str = "unused") -> Any:
    import openai

    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


@contextlib.asynccontextmanager
async def two_gateways(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput
) -> AsyncIterator[tuple[Stack, str, Any, Any]]:
    """The stack and a second gateway on its NATS and Redis: the stack, the second's URL, and an
    openai client of each gateway."""
    conns: list[Any] = []
    async with run_stack(nats_server, redis, tiny_llama) as stack:
        other_url, runner = await start_gateway(nats_server.url, stack.store, str(tiny_llama.model), conns)
        one, two = _client(stack.url), _client(other_url)
        try:
            yield stack, other_url, one, two
        finally:
            await one.close()
            await two.close()
            await runner.cleanup()
            for nc in conns:
                await nc.drain()


async def _call(url: str, method: str, path: str, key: str | None = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.request(method, url + path, headers=bearer(key) if key else None) as r:
            return r.status, await r.json()


ASKED: dict[str, Any] = {"model": "lora-1", "temperature": 0, "max_output_tokens": 6}


async def test_a_chain_of_three_turns_over_two_gateways_renders_the_whole_conversation(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput
) -> None:
    """Turns 1 and 3 on one gateway, 2 on the other: turn 3 is served as the chat of every turn's
    input and answer, only its own instructions (OpenAI's rule); each response is read back on
    the other gateway as its POST answered it; its input items listed a page at a time."""
    import openai

    async with two_gateways(nats_server, redis, tiny_llama) as (stack, other_url, one, two):
        first = await one.responses.create(**ASKED, instructions="Be brief.", input="kalo")
        assert first.store is True and first.previous_response_id is None
        assert (await two.responses.retrieve(first.id)).model_dump() == first.model_dump()
        second = await two.responses.create(**ASKED, input="remi", previous_response_id=first.id)
        assert second.previous_response_id == first.id and second.instructions is None
        third = await one.responses.create(
            **ASKED,
            instructions="Be kind.",
            input=[{"role": "user", "content": "lumo"}],
            previous_response_id=second.id,
        )
        messages = [
            {"role": "system", "content": "Be kind."},
            {"role": "user", "content": "kalo"},
            {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": "remi"},
            {"role": "assistant", "content": second.output_text},
            {"role": "user", "content": "lumo"},
        ]
        chat = {"model": "lora-1", "messages": messages, "temperature": 0, "max_completion_tokens": 6}
        status, expected = await post(stack, "/v1/chat/completions", chat)
        assert status == 200, expected
        assert third.usage is not None and third.usage.input_tokens == expected["usage"]["prompt_tokens"]
        assert third.output_text == expected["choices"][0]["message"]["content"]
        # its input items: every turn's input and the answers between, newest first by default
        listed = await two.responses.input_items.list(third.id)
        kinds = [(i.type, i.role) for i in listed.data]
        assert kinds[::-1] == [("message", r) for r in ("user", "assistant", "user", "assistant", "user")]
        assert listed.data[1].id == second.output[0].id and listed.data[3].id == first.output[0].id
        paged = [i.id async for i in two.responses.input_items.list(third.id, order="asc", limit=2)]
        assert paged == [i.id for i in listed.data[::-1]] and len(set(paged)) == 5
        status, page = await _call(
            stack.url, "GET", f"/v1/responses/{third.id}/input_items?limit=2&before={paged[3]}&order=asc"
        )
        assert [i["id"] for i in page["data"]] == paged[1:3] and page["has_more"] is True, page
        # deleted: OpenAI's deleted object, then a 404 wherever it is asked; what came after stays whole
        status, deleted = await _call(other_url, "DELETE", f"/v1/responses/{first.id}")
        assert (status, deleted) == (200, {"id": first.id, "object": "response", "deleted": True})
        with pytest.raises(openai.NotFoundError) as gone:
            await one.responses.retrieve(first.id)
        assert gone.value.body["param"] is None and first.id in gone.value.body["message"]
        with pytest.raises(openai.BadRequestError) as refused:  # (OpenAI's 400 previous_response_not_found)
            await one.responses.create(**ASKED, input="kalo", previous_response_id=first.id)
        assert refused.value.body["param"] == "previous_response_id" and first.id in refused.value.body["message"]
        assert (await one.responses.retrieve(third.id)).output_text == third.output_text
        assert len((await one.responses.input_items.list(third.id)).data) == 5


async def test_a_stream_is_stored_once_over_and_store_false_keeps_nothing(stack: Stack) -> None:
    import openai

    client = _client(stack.url)
    try:
        async with client.responses.stream(**ASKED, input="kalo") as s:
            # (cut at max_output_tokens: the package's get_final_response() takes only response.completed)
            [streamed] = [e.response async for e in s if e.type in ("response.completed", "response.incomplete")]
        assert streamed.store is True
        assert (await client.responses.retrieve(streamed.id)).model_dump() == streamed.model_dump()
        after = await client.responses.create(**ASKED, input="remi", previous_response_id=streamed.id)
        assert [i.role for i in (await client.responses.input_items.list(after.id, order="asc")).data] == [
            "user",
            "assistant",
            "user",
        ]
        unkept = await client.responses.create(**ASKED, input="kalo", store=False)
        assert unkept.store is False
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve(unkept.id)
        # an item of the conversation previous_response_id names, by reference or sent again: there
        # twice, OpenAI's 400 (input_items' pages by id went round for ever)
        [answer] = streamed.output
        ref = [{"type": "item_reference", "id": answer.id}, {"role": "user", "content": "lumo"}]
        for given in (ref, [answer.model_dump(exclude_none=True), ref[1]]):
            with pytest.raises(openai.BadRequestError) as twice:
                await client.responses.create(**ASKED, input=given, previous_response_id=streamed.id)
            assert twice.value.body["param"] == "input" and answer.id in twice.value.body["message"]
        # what a retrieve cannot serve is refused by name
        for query, param in (("stream=true", "stream"), ("include[]=file_search_call.results", "include")):
            status, err = await _call(stack.url, "GET", f"/v1/responses/{streamed.id}?{query}")
            assert status == 400 and err["error"]["param"] == param, err
        status, _ = await _call(stack.url, "GET", f"/v1/responses/{streamed.id}?include[]=reasoning.encrypted_content")
        assert status == 200  # taken, as a create takes it: nothing to add
        status, err = await _call(stack.url, "GET", "/v1/responses/resp_nobody")
        assert status == 404 and err["error"]["type"] == "invalid_request_error", err  # (OpenAI's, vLLM's)
        status, served = await post(stack, "/v1/responses", {**ASKED, "input": ref})  # without: the stored item
        assert status == 200 and served["store"] is True, served
        # a refusal names the item as its client counts them, not after the conversation put before them
        for bad, param in (
            ([{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}], "input[0].content[0]"),
            ([{"role": "user", "content": "x", "foo": 1}], "input[0].foo"),
            ([{"role": "user", "content": "x"}, {"type": "web_search_call"}], "input[1].type"),
        ):
            status, err = await post(stack, "/v1/responses", {**ASKED, "input": bad, "previous_response_id": after.id})
            assert status == 400 and err["error"]["param"] == param, err
            assert "input[2]" not in err["error"]["message"] and "input[3]" not in err["error"]["message"], err
        key = f"{stack.store.p}:response::{after.id}"  # kept for responses_ttl_s (no keys: tenant "")
        assert 0 < await stack.store.r.pttl(key) <= 86400 * 1000
    finally:
        await client.close()


async def test_another_tenants_response_is_a_404(keyed_stack: Stack) -> None:
    import openai

    stack = keyed_stack
    (mine, _), (theirs, _) = await make_key(stack, "acme"), await make_key(stack, "other")
    acme, other = _client(stack.url, mine), _client(stack.url, theirs)
    try:
        made = await acme.responses.create(**ASKED, input="kalo")
        for path in (f"/v1/responses/{made.id}", f"/v1/responses/{made.id}/input_items"):
            status, err = await _call(stack.url, "GET", path, theirs)
            assert status == 404 and "kalo" not in str(err) and made.output_text not in str(err), err
        assert (await _call(stack.url, "DELETE", f"/v1/responses/{made.id}", theirs))[0] == 404
        with pytest.raises(openai.BadRequestError):  # (OpenAI's 400 previous_response_not_found)
            await other.responses.create(**ASKED, input="remi", previous_response_id=made.id)
        assert (await acme.responses.retrieve(made.id)).output_text == made.output_text  # still there
        # a response's id is the client's X-Request-Id where it sends one (vLLM's): another tenant
        # naming its own so stores nothing over the first's; the same tenant again (a retry) replaces it
        named = {"extra_headers": {"X-Request-Id": "chosen"}}
        first = await acme.responses.create(**ASKED, input="kalo", **named)
        theirs = await other.responses.create(**ASKED, input="remi", **named)
        assert theirs.id == first.id == "resp_chosen" and theirs.store is True
        assert (await acme.responses.retrieve(first.id)).model_dump() == first.model_dump()
        assert (await other.responses.retrieve(first.id)).model_dump() == theirs.model_dump()
        again = await acme.responses.create(**ASKED, input="lumo", **named)
        assert (await acme.responses.retrieve(first.id)).model_dump() == again.model_dump()
    finally:
        await acme.close()
        await other.close()


async def test_a_tool_calls_turns_chained_by_id_keep_the_call_and_its_output(stack: Stack) -> None:
    """vllm#43244: a function call, then its output sent alone with previous_response_id, then a
    user turn: each served as the chat with the assistant's tool call and the tool message."""
    params = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6}}, "required": ["city"]}
    tools = [{"type": "function", "name": "weather", "parameters": params, "strict": True}]
    client = _client(stack.url)
    asked = {"model": "lora-1", "tools": tools, "temperature": 0}
    try:
        named = {"type": "function", "name": "weather"}
        called = await client.responses.create(**asked, input="kalo?", tool_choice=named, max_output_tokens=60)
        [call] = called.output
        assert call.type == "function_call", called
        output = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}
        told = await client.responses.create(
            **asked, input=[output], previous_response_id=called.id, tool_choice="none", max_output_tokens=6
        )
        then = await client.responses.create(
            **asked, input="remi?", previous_response_id=told.id, tool_choice="none", max_output_tokens=6
        )
        function = {"name": "weather", "arguments": call.arguments}
        messages: list[dict[str, Any]] = [
            {"role": "user", "content": "kalo?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": call.call_id, "type": "function", "function": function}],
            },
            {"role": "tool", "tool_call_id": call.call_id, "content": "sunny"},
        ]
        chat_tools = [{"type": "function", "function": {k: v for k, v in t.items() if k != "type"}} for t in tools]
        chat = {"model": "lora-1", "tools": chat_tools, "tool_choice": "none", "temperature": 0, "max_tokens": 6}
        for answered, more in (
            (told, []),
            (then, [{"role": "assistant", "content": told.output_text}, {"role": "user", "content": "remi?"}]),
        ):
            status, expected = await post(stack, "/v1/chat/completions", chat | {"messages": messages + more})
            assert status == 200, expected
            assert answered.usage is not None and answered.usage.input_tokens == expected["usage"]["prompt_tokens"]
            assert answered.output_text == expected["choices"][0]["message"]["content"]
        kinds = [i.type for i in (await client.responses.input_items.list(then.id, order="asc")).data]
        assert kinds == ["message", "function_call", "function_call_output", "message", "message"]
    finally:
        await client.close()


async def test_a_response_named_by_any_x_request_id_is_read_back(stack: Stack) -> None:
    """An id its client chose (any printable X-Request-Id, as vLLM takes it) is retrieved, listed
    and deleted by it: aiohttp's ``{id}`` matches no brace, so one with "{" was stored and then
    every route naming it was the router's 404."""
    client = _client(stack.url)
    try:
        for chosen in ("{x}", "a}b", "a:b*"):
            made = await client.responses.create(**ASKED, input="kalo", extra_headers={"X-Request-Id": chosen})
            assert made.id == f"resp_{chosen}"
            assert (await client.responses.retrieve(made.id)).model_dump() == made.model_dump()
            assert len((await client.responses.input_items.list(made.id)).data) == 1
            assert (await client.responses.delete(made.id)) is None  # (the package returns nothing)
    finally:
        await client.close()


async def test_the_stores_reads_and_writes_are_counted_by_what_they_found(stack: Stack) -> None:
    """``dlora_responses_store_total`` by op and outcome (every pair there from the start), and
    the bytes written: a store that misses (a TTL too short for its clients' chains) or fails
    showed nowhere but in its clients' 404s and 503s."""
    import openai

    async def counts() -> dict[str, float]:
        async with aiohttp.ClientSession() as http, http.get(stack.url + "/metrics") as r:
            text = await r.text()
        wanted = ("dlora_responses_store_total{", "dlora_responses_stored_bytes_total ")
        return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in text.splitlines() if line.startswith(wanted))}

    def key(op: str, outcome: str) -> str:
        return f'dlora_responses_store_total{{op="{op}",outcome="{outcome}"}}'

    client = _client(stack.url)
    try:
        before = await counts()
        assert key("write", "failed") in before and key("reference", "miss") in before  # (declared from the start)
        made = await client.responses.create(**ASKED, input="kalo")
        await client.responses.retrieve(made.id)
        await client.responses.create(**ASKED, input="remi", previous_response_id=made.id, store=False)
        for missing in (
            client.responses.retrieve("resp_nobody"),
            client.responses.create(**ASKED, input=[{"type": "item_reference", "id": "msg_nobody"}]),
            client.responses.delete("resp_nobody"),
        ):
            with pytest.raises(openai.NotFoundError):
                await missing
        await client.responses.delete(made.id)
        after = await counts()
        moved = {k: after[k] - before[k] for k in after if after[k] != before[k]}
        written = moved.pop("dlora_responses_stored_bytes_total")
        assert moved == {
            key("write", "stored"): 1,
            key("read", "hit"): 2,
            key("read", "miss"): 1,
            key("reference", "miss"): 1,
            key("delete", "hit"): 1,
            key("delete", "miss"): 1,
        }
        assert written > len(made.output_text)
    finally:
        await client.close()


async def test_a_response_kept_with_its_logprobs_is_retrieved_with_the_include_that_asked(stack: Stack) -> None:
    """``include: ["message.output_text.logprobs"]`` is served on create: the openai package's
    ``retrieve(id, include=...)`` of that response (its natural read back) was a 400 "not
    supported"; the stored object, its logprobs as kept, is the answer (vLLM's retrieve's)."""
    include = ["message.output_text.logprobs"]
    client = _client(stack.url)
    try:
        made = await client.responses.create(**ASKED, input="kalo", include=include, top_logprobs=1)
        assert made.output[0].content[0].logprobs
        assert (await client.responses.retrieve(made.id, include=include)).model_dump() == made.model_dump()
        status, listed = await _call(stack.url, "GET", f"/v1/responses/{made.id}/input_items?include[]={include[0]}")
        assert status == 200, listed
    finally:
        await client.close()


async def test_a_record_whose_items_no_reader_decodes_is_not_there_for_the_routes_that_read_them(stack: Stack) -> None:
    """A record written by hand whose conversation or output holds a string of bad UTF-8, a number
    past a float's range or an item that is no object passed the read's check of its shape (its
    items' bytes skipped, not decoded) and was a 500 for good on input_items and as a
    previous_response_id: each handler's decode raised. Each route that reads those items reads
    it as one not there (OpenAI's 404; previous_response_id's 400), as it reads a record of
    another shape. The routes that read a response's bytes, status and background alone (a GET,
    streamed or not, and a cancel) check its shape alone, its items not built (a whole decode
    cost them 20-35 times the memory: the unit test of ``fields``'s ``whole``), so answer each of
    these as a record of its shape: a plain GET as stored, a streamed one's and a cancel's 400s
    for a response not background (or not made streamed), a cancel of one over as stored."""
    fine_input, fine = b'[{"type": "message", "role": "user", "content": "kalo"}]', b'{"output": []}'
    odd = (b'"\xff"', b"1e400", b"-1e999", b'{"n": [1e400]}')
    records = [(fine, b"[1]")] + [(fine, b'[{"type": "message", "content": ' + v + b"}]") for v in odd]
    records += [(b'{"output": [1]}', fine_input)]
    records += [(b'{"background": true, "output": [{"type": "message", "id": ' + v + b"}]}", fine_input) for v in odd]
    for k, (response, items) in enumerate(records):
        await stack.store.put_response(f"resp_odd{k}", "", response, items, 60.0)
        if items != fine_input:
            status, got = await _call(stack.url, "GET", f"/v1/responses/resp_odd{k}/input_items")
            assert status == 404, (k, got)
        background = b'"background": true' in response
        for method, path, answer in (
            ("GET", "", 200),
            ("GET", "?stream=true", 400),
            ("POST", "/cancel", 200 if background else 400),
        ):
            async with (
                aiohttp.ClientSession() as http,
                http.request(method, f"{stack.url}/v1/responses/resp_odd{k}{path}") as r,
            ):
                assert r.status == answer, (k, path, await r.read())
                if answer == 200:
                    assert await r.read() == response, (k, path)
        chained = {**ASKED, "input": "remi", "previous_response_id": f"resp_odd{k}"}
        status, got = await post(stack, "/v1/responses", chained)
        assert (status, got["error"]["code"]) == (400, "previous_response_not_found"), (k, got)


async def test_a_streamed_background_response_over_is_replayed_and_cancelled_without_its_items_built(
    stack: Stack,
) -> None:
    """A streamed retrieve and a cancel decoded the whole record (every item of its output built:
    an 8 MiB record of short items, ~1 s of the event loop and 50 MB) to read its status, whether
    it is background and its bytes. They check its shape alone now: one whose output holds a
    string of bad UTF-8 (no item of it decodes, so none is built) is replayed from its events,
    from the first or after ``starting_after``, and its cancel answers it as stored (over:
    cancelling is idempotent), where both were a 404."""
    response = b'{"id": "resp_over", "status": "completed", "background": true, "output": [{"id": "\xff"}]}'
    events = [b'event: response.created\ndata: {"sequence_number":0}\n\n']
    events.append(b'event: response.completed\ndata: {"sequence_number":1}\n\n')
    await stack.store.put_response("resp_over", "", response, b"[]", 60.0, stream="run-a", leased=True)
    assert await stack.store.append_events("resp_over", "", "run-a", events, 60.0)
    async with aiohttp.ClientSession() as http:
        for after, replayed in (("", events), ("&starting_after=0", events[1:])):
            async with http.get(f"{stack.url}/v1/responses/resp_over?stream=true{after}") as r:
                assert (r.status, await r.read()) == (200, b"".join(replayed)), after
        async with http.post(f"{stack.url}/v1/responses/resp_over/cancel") as r:
            assert (r.status, await r.read()) == (200, response)


async def test_a_record_whose_response_is_of_no_responses_shape_is_not_there_for_any_route(stack: Stack) -> None:
    """A record whose ``response`` is no response's JSON (cut short, written by hand) beside a good
    ``input`` was a 404 for a GET (streamed or not) and a cancel and previous_response_not_found
    for a previous_response_id, while input_items, which read its input alone, listed its items.
    It is not there for input_items either (its response's shape read with them, its items not
    built); one whose response is of a response's shape is listed, as before."""
    fine_input = b'[{"type": "message", "role": "user", "content": "kalo", "id": "msg_in0"}]'
    shapes = (b'{"cut', b"[1]", b'{"status": 1}', b'{"output": {}}', b'{"background": "yes"}')
    for k, response in enumerate(shapes):
        await stack.store.put_response(f"resp_shape{k}", "", response, fine_input, 60.0)
        for method, path in (("GET", "/input_items"), ("GET", ""), ("GET", "?stream=true"), ("POST", "/cancel")):
            status, got = await _call(stack.url, method, f"/v1/responses/resp_shape{k}{path}")
            assert status == 404, (response, path, got)
        chained = {**ASKED, "input": "remi", "previous_response_id": f"resp_shape{k}"}
        status, got = await post(stack, "/v1/responses", chained)
        assert (status, got["error"]["code"]) == (400, "previous_response_not_found"), (response, got)
    await stack.store.put_response("resp_shaped", "", b'{"status": "completed"}', fine_input, 60.0)
    status, got = await _call(stack.url, "GET", "/v1/responses/resp_shaped/input_items")
    assert (status, [i["id"] for i in got["data"]]) == (200, ["msg_in0"]), got
