"""Today's stream surfaces under the cluster's failure handling, against the real stack: a Responses
stream, a chat stream beside a reasoning parser (its reasoning_tokens in every event's usage and
the last) and a streamed tool call come out the same, event for event, whether or not their request
was moved to the other worker mid-stream (a migrator's plan, sent by hand) or handed over by a
worker whose device failed; the metrics count such a request once; and a client gone mid-Responses
stream has its request aborted on the worker."""

from __future__ import annotations

import asyncio
import functools
import json
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from redis.asyncio import Redis

from dlora.common import bus, subjects
from dlora.common.messages import MovePlan, MoveRequest
from dlora.model.make_tiny import TinyOutput
from dlora.services.servers import Server
from tests.integration.conftest import Stack, run_stack, spawn_worker
from tests.integration.test_abort import _nothing_left
from tests.integration.test_drain import lose_the_device
from tests.integration.test_nats_restart import CuttableLink
from tests.integration.test_reasoning_api import _one_token_tag

N = 60  # tokens a request writes: the move comes after MOVE_AT tokens, with most of it still to go
MOVE_AT = 8

Event = tuple[str, Any]  # an event's name ("" for a chat's) and its data


def _holder(stack: Stack) -> int:
    """The index of the one worker running a request now."""
    [k] = [k for k, w in enumerate(stack.workers) if w.streams]
    return k


async def _move(stack: Stack) -> None:
    """A migrator's plan, sent by hand: the running request to the other worker."""
    k = _holder(stack)
    [rid] = stack.workers[k].streams
    to = stack.workers[1 - k].s.worker_id
    epoch = max(w.plan_epoch for w in stack.workers) + 1
    plan = MovePlan(
        plan_id=f"p{epoch}",
        epoch=epoch,
        created=time.time(),
        moves=[MoveRequest(request_id=rid, adapter=None, to_worker=to)],
    )
    await stack.nc.publish(subjects.MOVES, msgspec.json.encode(plan))
    await bus.flush(stack.nc)


async def _lose_device(stack: Stack) -> None:
    """The running request's worker loses its device: it hands its requests over and exits."""
    lose_the_device(stack.workers[_holder(stack)])


async def _events(
    stack: Stack, path: str, body: dict[str, Any], fault: Callable[[Stack], Awaitable[None]] | None
) -> list[Event]:
    """The stream's events as sent (``fault`` done mid-run: ``_mid_run``); the closing [DONE] left
    out. Its prompt cached apart from every other's (a cache_salt of its own): the same prompt sent
    again would report its prefix cached."""
    out: list[Event] = []
    body = {**body, "stream": True, "cache_salt": uuid.uuid4().hex}
    struck = asyncio.create_task(_mid_run(stack, fault, out)) if fault is not None else None
    try:
        async with aiohttp.ClientSession() as http, http.post(stack.url + path, json=body) as r:
            assert r.status == 200, await r.text()
            name = ""
            async for raw in r.content:
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: ") and line != "data: [DONE]":
                    out.append((name, json.loads(line[6:])))
    finally:
        if struck is not None and not struck.done():
            struck.cancel()
    assert struck is None or (struck.done() and not struck.cancelled() and struck.result() is None), "not struck"
    return out


async def _mid_run(stack: Stack, fault: Callable[[Stack], Awaitable[None]], events: list[Event]) -> None:
    """``fault`` once MOVE_AT ``events`` came, or the request has written MOVE_AT tokens here (a tool
    call held back until it ends shows no event meanwhile; a worker process's are not seen here)."""
    while len(events) < MOVE_AT and not any(
        len(s.output_ids) >= MOVE_AT for w in stack.workers for s in list(w.engine.seqs.values())
    ):
        await asyncio.sleep(0.005)
    await fault(stack)


def _samples(stack: Stack) -> dict[str, float]:
    """The gateway's vLLM-named counts: requests by how they ended, and each histogram's _count."""
    out: dict[str, float] = {}
    for family in stack.gateway.metrics.registry.collect():
        for s in family.samples:
            if s.name.startswith("vllm:") and (s.name.endswith("_count") or "request_success" in s.name):
                key = s.name + str(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))
                out[key] = out.get(key, 0.0) + s.value
    return out


def _counted(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}


def _without_ids(events: list[Event]) -> list[Event]:
    """The events less what differs between two requests by design (ids, creation times)."""

    def strip(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in ("id", "item_id", "created", "created_at", "call_id")}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x

    return [(name, strip(data)) for name, data in events]


async def _same_moved_or_not(
    stack: Stack, path: str, body: dict[str, Any], fault: Callable[[Stack], Awaitable[None]]
) -> list[Event]:
    """The stream as it comes unmoved, checked equal to the one ``fault`` struck, each counted once."""
    before = _samples(stack)
    plain = await _events(stack, path, body, None)
    between = _samples(stack)
    struck = await _events(stack, path, body, fault)
    assert _without_ids(struck) == _without_ids(plain)
    counted = _counted(between, _samples(stack))
    finished = {k: v for k, v in counted.items() if "request_success" in k}
    assert list(finished.values()) == [1.0], counted
    # once each, but the inter-token latency (once per output after the first): as unmoved
    assert all(v == 1.0 for k, v in counted.items() if "inter_token" not in k), counted
    assert counted == _counted(before, between)
    return plain


FAULTS = {"moved": _move, "device-lost": _lose_device}


@pytest.mark.parametrize("fault", list(FAULTS))
@pytest.mark.parametrize("parser", ["", "qwen3"])  # qwen3: the random model's output all a reasoning item
async def test_a_responses_stream_is_the_same_moved_or_not(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput, fault: str, parser: str
) -> None:
    body = {"model": "lora-1", "input": "kalo remi?", "temperature": 0, "max_output_tokens": N, "ignore_eos": True}
    async with run_stack(nats_server, redis, tiny_llama, reasoning_parser=parser) as stack:
        events = await _same_moved_or_not(stack, "/v1/responses", body, FAULTS[fault])
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    assert (
        events[-1][0] == "response.incomplete" and (usage := events[-1][1]["response"]["usage"])["output_tokens"] == N
    )
    assert usage["output_tokens_details"]["reasoning_tokens"] == (N if parser else 0)
    kinds = {name: data["item"]["type"] for name, data in events if name == "response.output_item.done"}
    assert kinds == {"response.output_item.done": "reasoning" if parser else "message"}


def _reasoning_chat(tiny: TinyOutput) -> dict[str, Any]:
    """A chat whose output the reasoning parser splits (the random model kept to the tags' characters)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny.model)
    allowed = sorted(set(tok.encode("<think></think>ok", add_special_tokens=False)))
    return {
        "model": "lora-4",
        "messages": [{"role": "user", "content": "kalo?"}],
        "max_tokens": N,
        "temperature": 0,
        "ignore_eos": True,
        "allowed_token_ids": allowed,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }


def _check_reasoning(events: list[Event]) -> None:
    usage = events[-1][1]["usage"]
    assert usage["completion_tokens"] == N and usage["completion_tokens_details"]["reasoning_tokens"] > 0
    assert any(d["choices"] and d["choices"][0]["delta"].get("reasoning") for _, d in events)


@pytest.mark.parametrize("fault", list(FAULTS))
async def test_a_reasoning_chat_stream_and_its_usage_are_the_same_moved_or_not(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput, fault: str
) -> None:
    async with run_stack(nats_server, redis, tiny_llama, reasoning_parser="qwen3") as stack:
        _check_reasoning(
            await _same_moved_or_not(stack, "/v1/chat/completions", _reasoning_chat(tiny_llama), FAULTS[fault])
        )


@pytest.mark.parametrize("fault", list(FAULTS))
async def test_a_structured_output_after_the_reasoning_is_the_same_moved_or_not(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput, tmp_path: Path, fault: str
) -> None:
    """Moved while it reasons, before its </think>: the grammar binds from the tag on at its new
    worker too (its output unconstrained until then)."""
    from transformers import AutoTokenizer

    tiny = _one_token_tag(tiny_llama, tmp_path)
    tok = AutoTokenizer.from_pretrained(tiny.model)
    [tag] = tok.encode("</think>", add_special_tokens=False)
    body = {
        "model": "lora-4",
        "messages": [{"role": "user", "content": "kalo?"}],
        "max_tokens": N,
        "temperature": 1.0,
        "seed": 17,  # (its free output writes the tag at its 15th token, past MOVE_AT)
        "allowed_token_ids": sorted(set(tok.encode(" nole</think>ok", add_special_tokens=False))),
        "logit_bias": {str(tag): 1},
        "guided_regex": "ok",
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    async with run_stack(nats_server, redis, tiny, reasoning_parser="qwen3") as stack:
        events = await _same_moved_or_not(stack, "/v1/chat/completions", body, FAULTS[fault])
    deltas = [d["choices"][0]["delta"] for _, d in events if d["choices"]]
    assert "".join(d.get("content") or "" for d in deltas) == "ok" and len(deltas) > MOVE_AT + 2
    assert events[-1][1]["usage"]["completion_tokens_details"]["reasoning_tokens"] >= MOVE_AT


async def test_a_reasoning_chat_stream_is_the_same_when_its_worker_is_killed(
    nats_server: Server, redis_server: Server, redis: Redis, tiny_llama: TinyOutput
) -> None:
    """SIGKILL: no hand-over; the dispatcher resumes it from its record once the heartbeat lapses,
    the record behind what the client has (its chunks sent again, to be dropped as duplicates)."""
    victim = spawn_worker(
        nats_server.url, redis_server.url, str(tiny_llama.model), "a-victim", DLORA_HEARTBEAT_TTL_S="2.0"
    )
    try:
        dispatcher = {"heartbeat_ttl_s": 1.0}
        async with run_stack(nats_server, redis, tiny_llama, dispatcher=dispatcher, reasoning_parser="qwen3") as stack:
            # Both runs go to the victim: the in-process workers say they drain (given nothing new)
            # until it is killed. Priced by the dispatcher, a loaded CI host made the victim's
            # process slower than the in-process workers, and the kill found the stream elsewhere.
            for w in stack.workers:
                w.draining = True
            async with asyncio.timeout(120):  # (a worker process's start: about 17 s)
                while {w.worker for w in stack.dispatcher.live()} != {"a-victim"}:
                    await asyncio.sleep(0.1)

            async def kill(stack: Stack) -> None:
                assert not any(w.streams for w in stack.workers)
                victim.send_signal(signal.SIGKILL)
                # its request waits for a live worker (the heartbeat lapses first): these, from now
                for w in stack.workers:
                    w.draining = False

            _check_reasoning(await _same_moved_or_not(stack, "/v1/chat/completions", _reasoning_chat(tiny_llama), kill))
            assert victim.poll() is not None and any(w.engine.stats.steps for w in stack.workers)  # resumed here
    finally:
        victim.kill()
        victim.wait()


@pytest.mark.parametrize("fault", list(FAULTS))
async def test_a_streamed_tool_call_is_the_same_moved_or_not(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput, fault: str
) -> None:
    params = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    body = {
        "model": "lora-3",
        "input": "weather?",
        "tools": [{"type": "function", "name": "weather", "parameters": params}],
        "tool_choice": {"type": "function", "name": "weather"},  # its arguments streamed as they come
        "temperature": 0,
        "max_output_tokens": N,
    }
    async with run_stack(nats_server, redis, tiny_llama, tool_call_parser="hermes") as stack:
        events = await _same_moved_or_not(stack, "/v1/responses", body, FAULTS[fault])
    assert any(name == "response.function_call_arguments.delta" for name, _ in events)


async def test_a_client_gone_mid_responses_stream_has_its_request_aborted(stack: Stack) -> None:
    body = {"model": "lora-1", "input": "kalo remi?", "max_output_tokens": 400, "ignore_eos": True, "stream": True}
    before = _samples(stack)
    async with aiohttp.ClientSession() as http:
        r = await http.post(stack.url + "/v1/responses", json=body)
        deltas = 0
        async for raw in r.content:
            deltas += raw.startswith(b"event: response.output_text.delta")
            if deltas == 3:
                break
        assert any(w.engine.has_unfinished() for w in stack.workers)
        r.close()  # the connection dropped mid-stream, as a client killed or a tab closed
    # It used to run on for nobody to its 400th token.
    assert await _nothing_left(stack, within_s=10.0)
    aborted = {"vllm:request_success_total[('finished_reason', 'abort')]": 1.0}
    async with asyncio.timeout(60):  # (counted as the handler leaves, after the abort went out)
        while {k: v for k, v in _counted(before, _samples(stack)).items() if "request_success" in k} != aborted:
            await asyncio.sleep(0.05)
    assert stack.gateway.metrics.registry.get_sample_value(
        "dlora_requests_total", {"adapter": "lora-1", "status": "aborted"}
    )


@pytest.mark.parametrize("fault", list(FAULTS))
async def test_a_pythonic_tool_call_read_from_the_text_is_the_same_moved_or_not(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput, fault: str
) -> None:
    """The pythonic parser holds a call back until it ends (no event meanwhile): moved while it is
    written, the stream still says the text before it, then the call whole."""
    params = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    body = {
        "model": "lora-3",
        "messages": [{"role": "user", "content": "weather?"}],
        "tools": [{"type": "function", "function": {"name": "weather", "parameters": params}}],
        "temperature": 0,
        "max_tokens": N,
        "guided_regex": "ok\n\\[weather\\(city='[a-z]{20,30}'\\)\\]",  # (the random model kept to a call)
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    async with run_stack(nats_server, redis, tiny_llama, tool_call_parser="pythonic") as stack:
        events = await _same_moved_or_not(stack, "/v1/chat/completions", body, FAULTS[fault])
    [call] = [c for _, d in events if d["choices"] for c in d["choices"][0]["delta"].get("tool_calls", [])]
    assert call["function"]["name"] == "weather" and events[-2][1]["choices"][0]["finish_reason"] == "tool_calls"


def _slowly(step: Callable[[], Any]) -> Any:
    time.sleep(0.02)  # (in the step's thread)
    return step()


async def test_each_events_usage_counts_its_tokens_across_a_gateway_reconnect(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput
) -> None:
    """The gateway's link to NATS fails for a second mid-stream: the chunks published meanwhile
    come again once it reconnects, after later ones (a gap, then filled: several chunks go out
    together). Each event's continuous usage said the tokens of all of them (c056acb's fault)."""
    link = CuttableLink(nats_server.url)
    body = {"model": "lora-0", "messages": [{"role": "user", "content": "kalo?"}], "temperature": 0}
    body |= {
        "max_tokens": 200,
        "ignore_eos": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }

    async def cut(stack: Stack) -> None:
        link.cut()
        await asyncio.sleep(1.0)
        link.up = True

    async with run_stack(nats_server, redis, tiny_llama, gateway_nats_url=await link.start()) as stack:
        for w in stack.workers:  # steps slow enough that chunks come after the cut, before the re-send
            w.engine.step = functools.partial(_slowly, w.engine.step)  # type: ignore[method-assign]
        events = await _events(stack, "/v1/chat/completions", body, cut)
    await link.close()
    said = [d["usage"]["completion_tokens"] for _, d in events if d["choices"]]  # (its role's first: 0)
    assert said == list(range(201)) and events[-1][1]["usage"]["completion_tokens"] == 200
