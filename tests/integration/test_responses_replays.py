"""Public vLLM and SGLang bug reports about the Responses API replayed through the gateway against
the real stack (the openai package's client, Redis's store): each test names the report and checks
the answer OpenAI's reference gives. Those of the answer's shape alone are unit tests
(tests/unit/test_responses_replays.py)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.integration.conftest import Stack
from tests.integration.test_gateway import post
from tests.integration.test_responses_store import ASKED, _client


async def test_a_codex_history_of_responses_items_is_served(stack: Stack) -> None:
    """vllm-project/vllm#45273 (PR #45276; #33089): Codex sends its history back as Responses
    items: an assistant message of output_text parts without ``id`` or ``status`` was a 400
    (``Field required: status``), one with empty content a 500 (IndexError), a function call whose
    arguments are not one JSON object a 500 (JSONDecodeError), beside ``tools: []``. Each is
    served, as OpenAI serves it."""
    history: list[dict[str, Any]] = [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "kalo"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "remi"}]},
        {"role": "user", "content": [{"type": "input_text", "text": "lumo"}]},
        {"role": "assistant", "content": []},
        {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": '{"a": 1}{"b": 2}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
        {"role": "user", "content": [{"type": "input_text", "text": "kalo?"}]},
    ]
    client = _client(stack.url)
    try:
        answer = await client.responses.create(**ASKED, input=history, tools=[], store=False)
        assert answer.status in ("completed", "incomplete") and answer.usage is not None
    finally:
        await client.close()


async def test_a_response_is_read_back_by_the_request_id_its_client_chose(stack: Stack) -> None:
    """vllm-project/vllm PR #25428: a response created with the client's own ``request_id``
    ("hello") could not be retrieved or cancelled by it (a runtime error: the routes expected a
    "resp_" id). Its id here is "resp_" and the client's; every route takes the client's id as it
    chose it too: retrieved, listed, its cancel vLLM's 400 for a foreground one, deleted; gone,
    each route's 404 names it as its client sent it ("hello": the 404 named "resp_hello")."""
    import openai

    client = _client(stack.url)
    try:
        made = await client.responses.create(**ASKED, input="kalo", extra_body={"request_id": "hello"})
        assert made.id == "resp_hello"
        assert (await client.responses.retrieve("hello")).model_dump() == made.model_dump()
        assert len((await client.responses.input_items.list("hello")).data) == 1
        later = await client.responses.create(**ASKED, input="remi", previous_response_id="hello")
        assert later.previous_response_id == "hello"
        with pytest.raises(openai.BadRequestError):
            await client.responses.cancel("hello")
        await client.responses.delete("hello")
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve(made.id)
        # each 404 (and previous_response_id's 400) names the id as its client sent it, not "resp_hello"
        for call in (client.responses.retrieve, client.responses.delete, client.responses.input_items.list):
            with pytest.raises(openai.NotFoundError) as gone:
                await call("hello")
            assert gone.value.body["message"] == "Response with id 'hello' not found.", gone.value.body
        with pytest.raises(openai.BadRequestError) as refused:
            await client.responses.create(**ASKED, input="remi", previous_response_id="hello")
        assert refused.value.body["message"] == "Previous response with id 'hello' not found.", refused.value.body
    finally:
        await client.close()


async def test_a_previous_response_id_carries_the_answer_and_only_the_new_instructions(stack: Stack) -> None:
    """sgl-project/sglang PR #25302: a turn with ``previous_response_id`` was served with the
    previous turn's instructions as a system message in place of its answer (and usage 0); and
    vllm-project/vllm#37697 (PR #37727): the previous instructions leaked into the next turn
    beside its own. The turn is served as the chat of the previous input, its answer and the new
    input under the new instructions alone (OpenAI's rule), its usage that chat's."""
    client = _client(stack.url)
    try:
        first = await client.responses.create(**ASKED, instructions="You are helpful.", input="kalo")
        second = await client.responses.create(
            **ASKED, instructions="One word only.", input="remi", previous_response_id=first.id
        )
        messages = [
            {"role": "system", "content": "One word only."},
            {"role": "user", "content": "kalo"},
            {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": "remi"},
        ]
        chat = {"model": ASKED["model"], "messages": messages, "temperature": 0, "max_tokens": 6}
        status, expected = await post(stack, "/v1/chat/completions", chat)
        assert status == 200, expected
        assert second.usage is not None and second.usage.input_tokens == expected["usage"]["prompt_tokens"] > 0
        assert second.output_text == expected["choices"][0]["message"]["content"]
    finally:
        await client.close()


async def test_a_response_not_stored_is_no_previous_response(stack: Stack) -> None:
    """smg-project/smg#916 (SGLang's model gateway): a ``store: false`` response was stored all
    the same when not streamed, and served as a ``previous_response_id``. Neither streamed nor not
    is it kept: a retrieve is a 404, and naming it as the previous response is OpenAI's 400
    ``previous_response_not_found`` (param ``previous_response_id``; the report's table gives
    OpenAI's status, 400, where dlora answered vLLM's 404)."""
    import openai

    client = _client(stack.url)
    try:
        whole = await client.responses.create(**ASKED, input="kalo", store=False)
        async with client.responses.stream(**ASKED, input="kalo", store=False) as s:
            streamed = [e async for e in s][-1].response  # (incomplete: cut at max_output_tokens)
        for made in (whole, streamed):
            assert made.store is False
            with pytest.raises(openai.NotFoundError):
                await client.responses.retrieve(made.id)
            with pytest.raises(openai.BadRequestError) as refused:
                await client.responses.create(**ASKED, input="remi", previous_response_id=made.id)
            assert refused.value.body["code"] == "previous_response_not_found", refused.value.body
            assert refused.value.body["param"] == "previous_response_id", refused.value.body
    finally:
        await client.close()
