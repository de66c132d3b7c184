"""OpenAI's background responses (``background: true``, as vLLM's ``serving_responses`` runs them)
against the real stack through the openai package's client: the POST answers ``queued`` at once;
any gateway reads it ``in_progress``, then done; a cancel on another gateway than the one running
it answers ``cancelled`` and aborts its request on the worker; a cancel again, or of one over,
answers it unchanged; ``store`` false with it a 400; streamed, its events resumed on another
gateway after its client left (``starting_after``); its key's concurrency slot held while it runs,
a delete stopping it; a gateway that stops fails those it still runs."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import msgspec
import pytest
from redis.asyncio import Redis

from dlora.model.make_tiny import TinyOutput
from dlora.services.gateway.main import serve
from dlora.services.servers import Server, free_port
from tests.integration.conftest import Stack, until_live
from tests.integration.test_abort import _nothing_left, _slow_steps
from tests.integration.test_keys import make_key
from tests.integration.test_responses_store import ASKED, _client, two_gateways

# Runs until it is cancelled (its steps slowed: ``_slow_steps``)
LONG: dict[str, Any] = {**ASKED, "max_output_tokens": 400, "extra_body": {"ignore_eos": True}}


async def _over(client: Any, response_id: str) -> Any:
    """The response once it is no longer queued or running (as a client polls for it)."""
    for _ in range(600):
        got = await client.responses.retrieve(response_id)
        if got.status not in ("queued", "in_progress"):
            return got
        await asyncio.sleep(0.05)
    raise AssertionError(f"{response_id} still {got.status}")


async def _running(stack: Stack) -> None:
    for _ in range(600):
        if sum(len(w.engine.seqs) for w in stack.workers):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("nothing ran")


async def test_a_background_response_is_read_back_done_and_cancelled_on_another_gateway(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Made on one gateway, read back and cancelled on another (they share Redis and NATS): done,
    it is what the same request answers in the foreground, and a cancel answers it unchanged;
    cancelled while it runs, the cancel answers it ``cancelled``, the worker drops its request,
    and it stays cancelled. A turn chained to it while it runs is a 400."""
    import openai

    async with two_gateways(nats_server, redis, tiny_llama) as (stack, _, one, two):
        made = await one.responses.create(**ASKED, input="kalo", background=True)
        assert (made.status, made.background, made.output, made.store) == ("queued", True, [], True)
        done = await _over(two, made.id)
        foreground = await one.responses.create(**ASKED, input="kalo")
        assert done.status == "incomplete" and done.background is True, done  # (cut at max_output_tokens)
        assert done.output_text == foreground.output_text and done.usage == foreground.usage
        assert [i.type for i in (await two.responses.input_items.list(made.id)).data] == ["message"]
        # over: answered unchanged (OpenAI's; vllm#57999 refused it as "a synchronous response")
        assert (await two.responses.cancel(made.id)).model_dump() == done.model_dump()

        _slow_steps(stack, monkeypatch, 0.02)
        long = await one.responses.create(**LONG, input="kalo", background=True)
        await _running(stack)
        assert (await two.responses.retrieve(long.id)).status == "in_progress"
        with pytest.raises(openai.BadRequestError) as early:  # (its answer, not there yet, was left out)
            await two.responses.create(**ASKED, input="remi", previous_response_id=long.id)
        assert early.value.body["param"] == "previous_response_id", early.value.body
        steps = sum(w.engine.stats.steps for w in stack.workers)
        cancelled = await two.responses.cancel(long.id)
        assert (cancelled.id, cancelled.status, cancelled.background) == (long.id, "cancelled", True)
        assert await _nothing_left(stack, within_s=10.0)  # aborted on its worker, told by NATS
        assert sum(w.engine.stats.steps for w in stack.workers) - steps < 100  # not the 400 it asked for
        while stack.gateway.background.running:  # its run over: it wrote nothing over the cancel
            await asyncio.sleep(0.01)
        assert (await one.responses.retrieve(long.id)).model_dump() == cancelled.model_dump()
        again = await one.responses.cancel(long.id)  # (OpenAI's: idempotent)
        assert again.model_dump() == cancelled.model_dump()


async def test_background_without_store_is_a_400(stack: Stack) -> None:
    async with aiohttp.ClientSession() as http:
        body = {**ASKED, "input": "kalo", "background": True, "store": False}
        async with http.post(stack.url + "/v1/responses", json=body) as r:
            error = (await r.json())["error"]
    assert r.status == 400 and error["param"] == "background", error
    assert error["message"] == "background can only be used when `store` is true"


async def test_a_streamed_background_response_is_resumed_after_its_client_left_from_another_gateway(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput
) -> None:
    """OpenAI's resumable stream: its client reads a few events and leaves (the response runs on);
    ``GET ?stream=true&starting_after=N`` on another gateway gives every event after the N-th, to
    its end: the whole text is the foreground response's."""
    async with two_gateways(nats_server, redis, tiny_llama) as (stack, _, one, two):
        foreground = await one.responses.create(**ASKED, input="kalo")
        seen: list[Any] = []
        stream = await one.responses.create(**ASKED, input="kalo", background=True, stream=True)
        async for event in stream:
            seen.append(event)
            if event.type == "response.output_text.delta":
                break
        await stream.close()
        made = seen[0].response
        assert seen[0].type == "response.created" and made.background is True
        rest = [
            e async for e in await two.responses.retrieve(made.id, stream=True, starting_after=seen[-1].sequence_number)
        ]
        numbers = [e.sequence_number for e in [*seen, *rest]]
        assert numbers == list(range(len(numbers))), numbers
        assert rest[-1].type == "response.incomplete" and rest[-1].response.output_text == foreground.output_text
        text = "".join(e.delta for e in [*seen, *rest] if e.type == "response.output_text.delta")
        assert text == foreground.output_text
        again = [e async for e in await one.responses.retrieve(made.id, stream=True)]  # (from the start)
        assert [e.sequence_number for e in again] == numbers
        assert (await two.responses.retrieve(made.id)).status == "incomplete"


async def test_a_background_response_holds_its_keys_concurrency_slot_while_it_runs(
    keyed_stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key of concurrency 1: its background response running, its next request is a 429; once
    it is deleted (which stops it: its end has nowhere to go), the slot is free again."""
    import openai

    stack = keyed_stack
    key, _ = await make_key(stack, "acme", concurrency=1)
    client = _client(stack.url, key)
    _slow_steps(stack, monkeypatch, 0.02)
    try:
        long = await client.responses.create(**LONG, input="kalo", background=True)
        await _running(stack)
        with pytest.raises(openai.RateLimitError):
            await client.responses.create(**ASKED, input="kalo")
        steps = sum(w.engine.stats.steps for w in stack.workers)
        await client.responses.delete(long.id)
        while stack.gateway.background.running:
            await asyncio.sleep(0.01)
        assert await _nothing_left(stack, within_s=10.0)
        assert sum(w.engine.stats.steps for w in stack.workers) - steps < 100  # stopped, not run to its end
        assert (await client.responses.create(**ASKED, input="kalo")).status == "incomplete"
    finally:
        await client.close()


@pytest.mark.parametrize(("drain_s", "tokens", "status"), [(0.0, 400, "failed"), (60.0, 8, "incomplete")])
async def test_a_stopping_gateway_finishes_its_background_responses_within_its_drain_then_fails_them(
    stack: Stack, redis_server: Server, monkeypatch: pytest.MonkeyPatch, drain_s: float, tokens: int, status: str
) -> None:
    """`dlora serve gateway` told to stop while its background response runs: within its drain
    (``shutdown_timeout_s``) it is finished, as a request whose client waits (it went unwaited
    for); with none left it is ``failed`` (readable on another gateway) and aborted on the worker."""
    _slow_steps(stack, monkeypatch, 0.02)
    s = msgspec.structs.replace(
        stack.gateway.s, port=free_port(), redis_url=redis_server.url, shutdown_timeout_s=drain_s
    )
    stop = asyncio.Event()
    gateway = asyncio.create_task(serve(s, stop))
    url = f"http://127.0.0.1:{s.port}"
    async with aiohttp.ClientSession() as http:
        await until_live(http, url)
        body = {**ASKED, "max_output_tokens": tokens, "ignore_eos": True, "input": "kalo", "background": True}
        async with http.post(url + "/v1/responses", json=body) as r:
            made = await r.json()
        assert r.status == 200 and made["status"] == "queued", made
        await _running(stack)
        stop.set()
        await asyncio.wait_for(gateway, timeout=30)
    client = _client(stack.url)
    try:
        ended = await client.responses.retrieve(made["id"])
    finally:
        await client.close()
    assert ended.status == status, ended
    if status == "failed":
        assert ended.error is not None and "shutting down" in ended.error.message
    else:
        assert ended.usage is not None and ended.usage.output_tokens == tokens
    assert await _nothing_left(stack, within_s=10.0)


async def test_the_stream_of_a_cancelled_background_response_ends_with_its_closing_event_last(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader of a streamed background response cancelled meanwhile: its stream ends with the
    cancelled object's ``response.failed``, and nothing after it once its run has stopped. It ended
    with no closing event (a client waiting for one had none), and the run, whose token the cancel
    left, still appended a few events after the record said cancelled."""
    _slow_steps(stack, monkeypatch, 0.02)
    client = _client(stack.url)
    try:
        stream = await client.responses.create(**LONG, input="kalo", background=True, stream=True)
        first = await stream.__anext__()  # response.created: its id
        await stream.close()
        response_id = first.response.id
        await _running(stack)

        async def read() -> list[Any]:
            return [e async for e in await client.responses.retrieve(response_id, stream=True)]

        reader = asyncio.create_task(read())
        cancelled = await client.responses.cancel(response_id)
        assert cancelled.status == "cancelled"
        events = await asyncio.wait_for(reader, timeout=60)  # (a bound on a hang, not a timing)
        assert events[0].type == "response.created"
        assert events[-1].type == "response.failed" and events[-1].response.model_dump() == cancelled.model_dump()
        while stack.gateway.background.running:  # (its run stopped: any late append of its made)
            await asyncio.sleep(0.01)
        kept = await stack.store.response_events(response_id, "", 0)  # (all of them: a reader stops at the last)
        assert len(kept) == events[-1].sequence_number + 1 and kept[-1].startswith(b"event: response.failed\n")
        assert (await client.responses.retrieve(response_id)).status == "cancelled"
    finally:
        await client.close()


async def test_a_streamed_background_response_stored_again_or_deleted_leaves_no_events_behind(
    stack: Stack, redis: Redis
) -> None:
    """Its id is its client's X-Request-Id: sent again (a retry, vLLM's and dlora's store replace
    the response), the new stream is the new response's alone, not the old one's events replayed
    (that ended at the old response.incomplete before the new one ran); deleted, its events (its
    whole text) go with it, as its record does."""
    client = _client(stack.url)
    headers = {"X-Request-Id": "resp_again"}
    try:

        async def streamed(text: str) -> list[Any]:
            made = await client.responses.create(
                **ASKED, input=text, background=True, stream=True, extra_headers=headers
            )
            return [e async for e in made]

        first, second = await streamed("kalo"), await streamed("remi")
        foreground = await client.responses.create(**ASKED, input="remi")
        for events in (second, [e async for e in await client.responses.retrieve("resp_again", stream=True)]):
            assert [e.sequence_number for e in events] == list(range(len(events)))
            assert [e.type for e in events].count("response.created") == 1
            assert events[-1].response.output_text == foreground.output_text != first[-1].response.output_text
        await client.responses.delete("resp_again")
        assert await redis.keys("*response-events*") == []
    finally:
        await client.close()


async def test_a_background_response_sent_again_under_its_id_stops_the_run_it_replaces(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A retry under the same X-Request-Id while the first run goes: the store replaces the record,
    so the first run's writes all failed their compare-and-swap and no cancel reached it; it ran
    its 400 tokens for nobody, holding its key's slot. It is stopped now; the second runs to its
    end (the sending gateway ignores its own cancel's echo, which had cancelled the new run)."""
    _slow_steps(stack, monkeypatch, 0.02)
    client = _client(stack.url)
    headers = {"X-Request-Id": "resp_retried"}
    try:
        await client.responses.create(**LONG, input="kalo", background=True, extra_headers=headers)
        await _running(stack)
        steps = sum(w.engine.stats.steps for w in stack.workers)
        await client.responses.create(**ASKED, input="remi", background=True, extra_headers=headers)
        done = await _over(client, "resp_retried")
        assert (
            done.status == "incomplete"
            and done.output_text == (await client.responses.create(**ASKED, input="remi")).output_text
        )
        assert await _nothing_left(stack, within_s=10.0)
        assert sum(w.engine.stats.steps for w in stack.workers) - steps < 100  # not the first's 400
        assert not stack.gateway.background.running
    finally:
        await client.close()
