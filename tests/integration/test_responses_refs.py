"""Stored responses' items named again (``item_reference`` to any stored item of its tenant, by
its id alone, as OpenAI's), a conversation too large to store told so from its stream's first
event, and a previous response's function call left without its output refused as OpenAI
refuses it: against the real stack through the openai package's client."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from redis.asyncio import Redis

from dlora.model.make_tiny import TinyOutput
from dlora.services.servers import Server
from tests.integration.conftest import Stack, run_stack
from tests.integration.test_keys import make_key
from tests.integration.test_responses_store import ASKED, _client


def _ref(item_id: str) -> dict[str, str]:
    return {"type": "item_reference", "id": item_id}


async def test_an_item_reference_names_any_stored_item_of_its_tenant(keyed_stack: Stack) -> None:
    """An item of any stored response (its input or its output), referenced without
    previous_response_id or beside one naming another response, is served as that item sent
    again: it had to be in previous_response_id's conversation, where it was then there twice
    (OpenAI's duplicate 400), so a reference was always refused. Another tenant's, or one never
    stored, is OpenAI's 404 naming the input item."""
    import openai

    stack = keyed_stack
    (mine, _), (theirs, _) = await make_key(stack, "acme"), await make_key(stack, "other")
    acme, other = _client(stack.url, mine), _client(stack.url, theirs)
    try:
        first = await acme.responses.create(**ASKED, input="kalo")
        [asked] = (await acme.responses.input_items.list(first.id)).data
        [answer] = first.output
        chained = await acme.responses.create(**ASKED, input="remi", previous_response_id=first.id)
        referenced = await acme.responses.create(
            **ASKED, input=[_ref(asked.id), _ref(answer.id), {"role": "user", "content": "remi"}]
        )
        assert referenced.usage is not None and chained.usage is not None
        assert referenced.usage.input_tokens == chained.usage.input_tokens
        assert referenced.output_text == chained.output_text
        listed = [i.id for i in (await acme.responses.input_items.list(referenced.id, order="asc")).data]
        assert listed[:2] == [asked.id, answer.id]
        # beside a previous_response_id naming another response: put after that one's conversation
        lone = await acme.responses.create(**ASKED, input="lumo")
        after = await acme.responses.create(
            **ASKED, input=[_ref(answer.id), {"role": "user", "content": "remi"}], previous_response_id=lone.id
        )
        kinds = [(i.id, i.role) for i in (await acme.responses.input_items.list(after.id, order="asc")).data]
        assert [k[1] for k in kinds] == ["user", "assistant", "assistant", "user"] and kinds[2][0] == answer.id
        # an item the new response itself stored (the referenced one's output) is referable in its turn
        again = await acme.responses.create(**ASKED, input=[_ref(referenced.output[0].id)])
        assert again.store is True
        for client, ref in ((other, answer.id), (acme, "msg_nobody")):
            with pytest.raises(openai.NotFoundError) as gone:
                await client.responses.create(**ASKED, input=[{"role": "user", "content": "x"}, _ref(ref)])
            assert gone.value.body["param"] == "input[1].id" and ref in gone.value.body["message"], gone.value.body
        # indexed under its tenant, naming every response that holds it (those referencing it too), for its TTL
        key = f"{stack.store.p}:response-holders:acme:{answer.id}"
        holders = await stack.store.r.zrange(key, 0, -1)
        assert after.id.encode() in holders and referenced.id.encode() in holders
        assert 0 < await stack.store.r.pttl(key) <= 86400_000
    finally:
        await acme.close()
        await other.close()


async def test_an_earlier_turns_item_outlives_that_turn_while_a_later_one_holds_it(stack: Stack) -> None:
    """The first turn deleted (or expired: the first to), its answer is still in the second turn's
    conversation and referable through it: it was a 404, its index naming only the first turn.
    The second deleted instead, the first still holds it: the index names the first again."""
    client = _client(stack.url)
    try:
        for deleted in ("first", "second"):
            first = await client.responses.create(**ASKED, input="kalo")
            second = await client.responses.create(**ASKED, input="remi", previous_response_id=first.id)
            await client.responses.delete(first.id if deleted == "first" else second.id)
            [answer] = first.output
            asked = [_ref(answer.id), {"role": "user", "content": "x"}]
            referenced = await client.responses.create(**ASKED, input=asked)
            listed = [i.id for i in (await client.responses.input_items.list(referenced.id, order="asc")).data]
            assert listed[0] == answer.id, deleted
    finally:
        await client.close()


async def test_a_referenced_item_stays_referable_after_the_response_that_referenced_it_is_deleted(
    stack: Stack,
) -> None:
    """A response that referenced an item became the index's newest holder of it; deleted, the
    item was a 404 to the next item_reference, though the response that stored it still held it
    (the index was re-pointed only at the deleted one's previous response, and it had none)."""
    client = _client(stack.url)
    try:
        first = await client.responses.create(**ASKED, input="kalo")
        [answer] = first.output
        referencing = await client.responses.create(**ASKED, input=[_ref(answer.id), {"role": "user", "content": "x"}])
        await client.responses.delete(referencing.id)
        again = await client.responses.create(**ASKED, input=[_ref(answer.id), {"role": "user", "content": "y"}])
        listed = [i.id for i in (await client.responses.input_items.list(again.id, order="asc")).data]
        assert listed[0] == answer.id
        await client.responses.delete(again.id)  # (held by the first alone again, for the first's TTL)
        key, held = f"{stack.store.p}:response-holders::{answer.id}", f"{stack.store.p}:response::{first.id}"
        assert await stack.store.r.zrange(key, 0, -1) == [first.id.encode()]
        expires = await stack.store.r.pttl(held)  # (read first: the entry's, read after, is no later)
        assert 0 < await stack.store.r.pttl(key) <= expires
    finally:
        await client.close()


async def test_a_chains_first_item_stays_referable_when_its_later_turns_are_deleted_middle_first(
    stack: Stack,
) -> None:
    """A chain of three, its middle turn deleted, then its last: the first's answer was a 404,
    though the first still held it (the index named the last; its previous was gone, and which
    response came before that one was lost with it)."""
    client = _client(stack.url)
    try:
        first = await client.responses.create(**ASKED, input="kalo")
        second = await client.responses.create(**ASKED, input="remi", previous_response_id=first.id)
        third = await client.responses.create(**ASKED, input="lumo", previous_response_id=second.id)
        for deleted in (second, third):
            await client.responses.delete(deleted.id)
        [answer] = first.output
        again = await client.responses.create(**ASKED, input=[_ref(answer.id), {"role": "user", "content": "y"}])
        assert [i.id for i in (await client.responses.input_items.list(again.id, order="asc")).data][0] == answer.id
    finally:
        await client.close()


async def test_a_forks_items_stay_referable_while_any_fork_holds_them_and_go_with_the_last(stack: Stack) -> None:
    """Two forks of one response (A, then B and B' each with previous_response_id A): A deleted,
    then B', its items (A's question and answer) were 404s though B still held them (the index
    named one holder, B', re-pointed only at what B' drew from: A, gone). They stay referable,
    B's conversation whole, while B lives; deleted too, their index is gone with it."""
    import openai

    client, r = _client(stack.url), stack.store.r
    try:
        first = await client.responses.create(**ASKED, input="kalo")
        fork = await client.responses.create(**ASKED, input="remi", previous_response_id=first.id)
        other = await client.responses.create(**ASKED, input="lumo", previous_response_id=first.id)
        [answer] = first.output
        for deleted in (first, other):
            await client.responses.delete(deleted.id)
        listed = [i.id for i in (await client.responses.input_items.list(fork.id, order="asc")).data]
        assert listed[1] == answer.id and len(listed) == 3  # (the fork's conversation, whole)
        again = await client.responses.create(**ASKED, input=[_ref(answer.id), {"role": "user", "content": "y"}])
        assert [i.id for i in (await client.responses.input_items.list(again.id, order="asc")).data][0] == answer.id
        for deleted in (fork, again):
            await client.responses.delete(deleted.id)
        with pytest.raises(openai.NotFoundError):
            await client.responses.create(**ASKED, input=[_ref(answer.id)])
        assert not await r.exists(f"{stack.store.p}:response-holders::{answer.id}")  # (no holder left)
    finally:
        await client.close()


async def test_a_conversation_already_too_large_to_store_says_so_from_its_first_event(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput
) -> None:
    """A previous response's conversation and the new input over responses_max_bytes: its stream
    said "store": true in response.created and every event until the last, which said false."""
    import openai

    async with run_stack(nats_server, redis, tiny_llama, responses_max_bytes=8000) as stack:
        client = _client(stack.url)
        try:
            first = await client.responses.create(**ASKED, input="kalo")
            assert first.store is True
            # (bytes past the bound, not tokens past the context: an id the prompt does not hold)
            big = [{"role": "user", "content": "remi", "id": "msg_" + "a" * 8000}]
            async with client.responses.stream(**ASKED, input=big, previous_response_id=first.id) as s:
                events = [e async for e in s]
            responses = [e.response for e in events if hasattr(e, "response")]
            assert responses[0].store is False and all(r.store is False for r in responses), responses
            with pytest.raises(openai.NotFoundError):
                await client.responses.retrieve(responses[-1].id)
        finally:
            await client.close()


async def test_a_function_call_left_without_its_output_is_refused(stack: Stack) -> None:
    """A previous response that called a function, then input with no function_call_output for
    that call: OpenAI's 400 "No tool output found for function call call_..." (param input,
    openai-agents-python#673), not a chat the template renders with a call never answered."""
    import openai

    params = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6}}, "required": ["city"]}
    tools = [{"type": "function", "name": "weather", "parameters": params, "strict": True}]
    asked: dict[str, Any] = {"model": "lora-1", "tools": tools, "temperature": 0, "max_output_tokens": 60}
    client = _client(stack.url)
    try:
        named = {"type": "function", "name": "weather"}
        called = await client.responses.create(**asked, input="kalo?", tool_choice=named)
        [call] = called.output
        assert call.type == "function_call", called
        other = {"type": "function_call_output", "call_id": "call_other", "output": "sunny"}
        for given in ("remi?", [other]):
            with pytest.raises(openai.BadRequestError) as refused:
                await client.responses.create(**asked, input=given, previous_response_id=called.id, tool_choice="none")
            expected = {
                "message": f"No tool output found for function call {call.call_id}.",
                "type": "invalid_request_error",
                "param": "input",
                "code": None,
            }
            assert refused.value.body == expected, refused.value.body
    finally:
        await client.close()


async def test_cancelling_a_stored_response_is_vllms_400_and_an_unknown_one_a_404(stack: Stack) -> None:
    """Only a background response can be cancelled (``test_responses_background``): the openai
    package's ``responses.cancel`` got aiohttp's 404 for the path (its error naming no response),
    where vLLM answers a foreground response's cancel with its 400."""
    import openai

    client = _client(stack.url)
    try:
        made = await client.responses.create(**ASKED, input="kalo")
        with pytest.raises(openai.BadRequestError) as refused:
            await client.responses.cancel(made.id)
        # (vLLM's and SGLang's body: no param, as the id is the path's, not a field of a body)
        said = {"message": "Cannot cancel a synchronous response.", "type": "invalid_request_error"}
        assert refused.value.body == said | {"param": None, "code": None}, refused.value.body
        with pytest.raises(openai.NotFoundError) as gone:
            await client.responses.cancel("resp_nobody")
        assert "resp_nobody" in gone.value.body["message"], gone.value.body
        assert gone.value.body["type"] == "invalid_request_error", gone.value.body  # (OpenAI's and vLLM's)
        assert (await client.responses.retrieve(made.id)).model_dump() == made.model_dump()  # (untouched)
    finally:
        await client.close()


async def test_a_holder_deleted_between_the_lookup_and_its_read_leaves_the_item_to_another(redis: Redis) -> None:
    """A fork's DELETE landing between an item_reference's lookup (which picked that fork, the
    holder that expires last) and the read of its conversation made the item a 404, though the
    other fork still held it. Its holder gone, the item is looked up once more."""
    import contextlib
    from collections.abc import AsyncIterator, Sequence

    from dlora.common.state import StateStore
    from dlora.services.gateway.responses_store import ResponsesStore

    class DeletedAfterLookup(StateStore):  # (the race made to happen: the real store, a DELETE after its first lookup)
        async def responses_of_items(self, item_ids: Sequence[str], tenant: str) -> list[str | None]:
            found = await super().responses_of_items(item_ids, tenant)
            if await self.delete_response("resp_c", tenant, lambda *_: ["msg_a"]):
                assert found == ["resp_c"]
            return found

    @contextlib.asynccontextmanager
    async def unbound() -> AsyncIterator[None]:
        yield

    state, item = DeletedAfterLookup(redis), {"type": "message", "id": "msg_a", "role": "user", "content": "kalo"}
    for fork, ttl_s in (("resp_b", 60.0), ("resp_c", 120.0)):  # (resp_c expires last: the one looked up)
        await state.put_response(fork, "t", b'{"output": []}', msgspec.json.encode([item]), ttl_s, ["msg_a"])
    store = ResponsesStore(state, unbound, 60.0, 1 << 20)
    assert await store.referenced([_ref("msg_a")], [], "t") == {"msg_a": item}
