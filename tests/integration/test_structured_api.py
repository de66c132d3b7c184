"""Structured output through the REST API against the real stack: OpenAI's response_format, vLLM's
structured_outputs and guided_* fields, and tool calls: a named or "required" tool_choice, and
"auto" read by the gateway's tool_call_parser."""

from __future__ import annotations

import asyncio
import json
import re
import threading

import aiohttp
import pytest
from redis.asyncio import Redis

from dlora.common.messages import ErrorCode, SamplingParams
from dlora.model.make_tiny import TinyOutput
from dlora.services.servers import Server
from tests.integration.conftest import Stack, run_stack
from tests.integration.test_gateway import post, stream
from tests.integration.test_structured_schemas import app_generate


async def test_response_format(stack: Stack) -> None:

    schema = {
        "type": "object",
        "properties": {"answer": {"enum": ["yes", "no"]}, "n": {"enum": [1, 2]}},
        "required": ["answer", "n"],
        "additionalProperties": False,
    }
    chat = {"model": "lora-2", "messages": [{"role": "user", "content": "kalo?"}], "max_tokens": 100}
    status, resp = await post(
        stack,
        "/v1/chat/completions",
        {
            **chat,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "reply", "schema": schema, "strict": True},
            },
        },
    )
    assert status == 200, resp
    doc = json.loads(resp["choices"][0]["message"]["content"])
    assert doc["answer"] in ("yes", "no") and doc["n"] in (1, 2) and resp["choices"][0]["finish_reason"] == "stop"
    status, resp = await post(
        stack, "/v1/chat/completions", {**chat, "max_tokens": 5, "response_format": {"type": "json_object"}}
    )
    assert status == 200 and resp["choices"][0]["message"]["content"].startswith("{")
    assert (await post(stack, "/v1/chat/completions", {**chat, "response_format": {"type": "text"}}))[0] == 200
    for bad, fragment in (
        ({"type": "yaml"}, "not one of"),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "needs a 'schema'"),
        (
            {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": 5, "maximum": 1}},
            },
            "cannot be used",
        ),
        # passes the grammar's check and fails at the first mask: refused here, naming the field (it
        # went to a worker and came back without param)
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#"}}}, "cannot be used"),
    ):
        status, resp = await post(stack, "/v1/chat/completions", {**chat, "response_format": bad})
        assert status == 400 and fragment in resp["error"]["message"], resp
        assert resp["error"]["param"] == "response_format", resp
    # vLLM's fields, on completions too: a choice, a regular expression (and its refusal, named)
    body = {"model": "lora-2", "prompt": "kalo", "max_tokens": 20}
    status, resp = await post(stack, "/v1/completions", {**body, "guided_choice": ["yes", "no", "kalo remi"]})
    assert status == 200 and resp["choices"][0]["text"] in ("yes", "no", "kalo remi"), resp
    status, resp = await post(stack, "/v1/chat/completions", {**chat, "structured_outputs": {"regex": "[0-9]{4}"}})
    assert status == 200 and re.fullmatch("[0-9]{4}", resp["choices"][0]["message"]["content"]), resp
    status, resp = await post(stack, "/v1/completions", {**body, "guided_regex": "(unclosed"})
    assert (status, resp["error"]["param"]) == (400, "guided_regex"), resp
    # passes every check and the first mask, and fails as the first token is taken (llguidance's
    # lexer limit): answered 400 with param null and the worker's id in the message; now named as
    # the gateway's own check names it
    status, resp = await post(stack, "/v1/chat/completions", {**chat, "structured_outputs": {"regex": "a{1000000}"}})
    assert (status, resp["error"]["param"]) == (400, "structured_outputs"), resp
    assert resp["error"]["message"].startswith("regex cannot be used: ") and "worker" not in resp["error"]["message"]
    # a named tool_choice: the arguments are a document of the function's parameters, answered as
    # its call, whole and streamed
    params = {
        "type": "object",
        "properties": {"city": {"enum": ["kalo", "remi"]}},
        "required": ["city"],
        "additionalProperties": False,
    }
    tools = [{"type": "function", "function": {"name": "weather", "parameters": params}}]
    forced = {
        **chat,
        "temperature": 0,
        "tools": tools,
        "tool_choice": {"type": "function", "function": {"name": "weather"}},
    }
    status, resp = await post(stack, "/v1/chat/completions", forced)
    assert status == 200, resp
    message, finish = resp["choices"][0]["message"], resp["choices"][0]["finish_reason"]
    [call] = message["tool_calls"]
    assert message["content"] is None and finish == "stop" and call["function"]["name"] == "weather"
    assert json.loads(call["function"]["arguments"])["city"] in ("kalo", "remi")
    events = await stream(stack, "/v1/chat/completions", {**forced, "stream": True})
    deltas = [e["choices"][0]["delta"] for e in events if isinstance(e, dict) and e.get("choices")]
    assert deltas[0]["tool_calls"][0]["function"]["name"] == "weather"  # the call opens once, with its name
    assert not any("id" in d["tool_calls"][0] for d in deltas[1:] if "tool_calls" in d)
    assert [e for e in events if isinstance(e, dict) and e.get("choices")][-1]["choices"][0]["finish_reason"] == "stop"
    arguments = "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas if "tool_calls" in d)
    assert arguments == call["function"]["arguments"]  # greedy: the same call
    status, resp = await post(
        stack, "/v1/chat/completions", {**chat, "max_tokens": 4, "tools": tools, "tool_choice": "none"}
    )
    assert status == 200 and "tool_calls" not in resp["choices"][0]["message"], resp
    status, resp = await post(stack, "/v1/chat/completions", {**chat, "tools": tools})  # "auto": needs a parser
    assert (status, resp["error"]["param"]) == (400, "tool_choice"), resp
    # "required": a list of calls, here of one at most (parallel_tool_calls false), whole and streamed
    ping = {"type": "function", "function": {"name": "ping", "parameters": {"type": "object", "maxProperties": 0}}}
    required = {
        **chat,
        "temperature": 0,
        "tools": [*tools, ping],
        "tool_choice": "required",
        "parallel_tool_calls": False,
    }
    status, resp = await post(stack, "/v1/chat/completions", required)
    assert status == 200, resp
    message, finish = resp["choices"][0]["message"], resp["choices"][0]["finish_reason"]
    [call] = message["tool_calls"]
    assert message["content"] is None and finish == "tool_calls", resp
    assert call["function"]["name"] in ("weather", "ping") and isinstance(
        json.loads(call["function"]["arguments"]), dict
    )
    events = await stream(stack, "/v1/chat/completions", {**required, "stream": True})
    choices = [e["choices"][0] for e in events if isinstance(e, dict) and e.get("choices")]
    streamed = [c for e in choices for c in e["delta"].get("tool_calls", [])]
    assert [c["function"] for c in streamed] == [call["function"]]  # greedy: the same call
    assert streamed[0]["index"] == 0 and streamed[0]["id"] and choices[-1]["finish_reason"] == "tool_calls"


async def test_auto_tool_choice_reads_the_calls_the_model_wrote(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput
) -> None:
    """With tool_call_parser "hermes", tool_choice "auto" (the default with tools) is served: the
    output's <tool_call> blocks are its calls, the text before them its content, whole and
    streamed alike. The random model is led to write a call by a regex (a model trained on the
    format writes it of itself)."""
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    written = r'Sure\. <tool_call>\{"name": "weather", "arguments": \{"city": "(kalo|remi)"\}\}</tool_call>'
    body = {
        "model": "lora-2",
        "messages": [{"role": "user", "content": "kalo?"}],
        "max_tokens": 200,
        "temperature": 0,
        "tools": tools,
        "structured_outputs": {"regex": written},
    }
    async with run_stack(nats_server, redis, tiny_llama, tool_call_parser="hermes") as stack:
        status, resp = await post(stack, "/v1/chat/completions", body)
        assert status == 200, resp
        choice = resp["choices"][0]
        [call] = choice["message"]["tool_calls"]
        assert choice["message"]["content"] == "Sure. " and choice["finish_reason"] == "tool_calls", resp
        assert call["function"]["name"] == "weather" and json.loads(call["function"]["arguments"])["city"] in (
            "kalo",
            "remi",
        )
        events = await stream(stack, "/v1/chat/completions", {**body, "stream": True})
        choices = [e["choices"][0] for e in events if isinstance(e, dict) and e.get("choices")]
        assert "".join(c["delta"].get("content") or "" for c in choices) == "Sure. "
        streamed = [t for c in choices for t in c["delta"].get("tool_calls", [])]
        assert [t["function"] for t in streamed] == [call["function"]] and choices[-1]["finish_reason"] == "tool_calls"
        # a blank line before the call is no content (vLLM's null); an argument quoting the closing
        # tag is the argument's (vLLM PRs #48353/#55848): both came back as content
        quoting = r'\n\n<tool_call>\{"name": "weather", "arguments": \{"city": "</tool_call>"\}\}</tool_call>'
        quoted = {**body, "structured_outputs": {"regex": quoting}}
        status, resp = await post(stack, "/v1/chat/completions", quoted)
        [call] = resp["choices"][0]["message"]["tool_calls"]
        assert resp["choices"][0]["message"]["content"] is None and call["function"]["arguments"] == (
            '{"city": "</tool_call>"}'
        ), resp
        events = await stream(stack, "/v1/chat/completions", {**quoted, "stream": True})
        choices = [e["choices"][0] for e in events if isinstance(e, dict) and e.get("choices")]
        assert "".join(c["delta"].get("content") or "" for c in choices) == ""
        assert [t["function"] for c in choices for t in c["delta"].get("tool_calls", [])] == [call["function"]]
        # free text (no call written): content, as without tools
        status, resp = await post(stack, "/v1/chat/completions", {**body, "structured_outputs": {"regex": "kalo remi"}})
        assert status == 200 and resp["choices"][0]["message"] == {
            "role": "assistant",
            "content": "kalo remi",
            "refusal": None,
        }, resp


async def test_a_schema_slow_to_compile_holds_no_other_requests_shaping(stack: Stack, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Shaping (one thread) compiled the structured output too: a schema llguidance takes long over
    (400 patternProperties, a 20 KB body: 12 s; 1,000: hours) held every other request, plain ones
    too, until it was done. Compiled first on threads of its own, it holds no one else."""
    import threading

    from dlora.services.worker.engine.structured import Grammars

    entered, release = threading.Event(), threading.Event()
    verdict = Grammars._verdict  # (the gateway's compile: in the bounded child, none in-process)

    def slow(self: Grammars, grammar: str):  # type: ignore[no-untyped-def]
        if "slow-to-compile" in grammar:
            entered.set()
            release.wait(600)  # (until the test sets it, at its end if it fails: nothing else ends the hold)
        return verdict(self, grammar)

    monkeypatch.setattr(Grammars, "_verdict", slow)
    body = {"model": "lora-2", "prompt": "kalo", "max_tokens": 3, "temperature": 0}
    slow_body = {**body, "max_tokens": 20, "guided_choice": ["slow-to-compile"]}
    held = asyncio.create_task(post(stack, "/v1/completions", slow_body))
    try:
        assert await asyncio.to_thread(entered.wait, 120)
        # Answered while the compile is held (until the test releases it): held behind it, it
        # would never be, which 120 s catches on any machine.
        status, resp = await asyncio.wait_for(post(stack, "/v1/completions", body), 120)
        assert status == 200, resp
    finally:
        release.set()
    status, resp = await held
    assert status == 200 and resp["choices"][0]["text"] == "slow-to-compile", resp


async def test_schemas_slow_to_compile_on_a_worker_leave_its_steps_running(stack: Stack, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A worker's admission, in its command loop, waited on the compile of a request's structured
    output: a schema llguidance takes long over (400 patternProperties: 12 s; 1,000: hours) held
    every step, so every stream on the worker stopped until it was done."""
    import threading

    from dlora.services.worker.engine.structured import Grammars

    entered, release = threading.Event(), threading.Event()
    compile_ = Grammars._compile
    gateway = stack.gateway.served.grammars

    def slow(self: Grammars, grammar: str):  # type: ignore[no-untyped-def]
        if self is not gateway and "slow-on-a-worker" in grammar:
            entered.set()
            release.wait(600)  # (until the test sets it, at its end if it fails: nothing else ends the hold)
        return compile_(self, grammar)

    monkeypatch.setattr(Grammars, "_compile", slow)
    body = {"model": "lora-2", "prompt": "kalo", "max_tokens": 3, "temperature": 0}
    running = [
        asyncio.create_task(post(stack, "/v1/completions", {**body, "max_tokens": 400, "ignore_eos": True}))
        for _ in range(4)
    ]
    async with asyncio.timeout(60):  # streaming on the workers before the slow ones come
        while sum(len(w.streams) for w in stack.workers) < 4:
            await asyncio.sleep(0.05)
    held = [
        asyncio.create_task(post(stack, "/v1/completions", {**body, "guided_choice": [f"slow-on-a-worker {i}"]}))
        for i in range(4)
    ]
    try:
        assert await asyncio.to_thread(entered.wait, 120)
        # They end while the compile is held (until the test releases it): held behind it, they
        # would never end, which 120 s catches (20 s failed a loaded machine's 4 x 400 tokens).
        assert all(status == 200 for status, _ in await asyncio.wait_for(asyncio.gather(*running), 120))
        assert not release.is_set() and not any(h.done() for h in held)  # they ran on meanwhile
    finally:
        release.set()
    assert all(status == 200 for status, _ in await asyncio.gather(*held))


def _no_large_compile_stacks(monkeypatch: pytest.MonkeyPatch) -> None:
    """A compile thread whose stack is over 64 MiB fails to start, as under ``ulimit -v`` (the
    unit test replays the limit itself)."""
    start = threading.Thread.start

    def limited(self: threading.Thread) -> None:
        if self.name == "grammar-compile" and threading.stack_size() > 64 << 20:
            raise RuntimeError("can't start new thread")
        start(self)

    monkeypatch.setattr(threading.Thread, "start", limited)


BIG_REGEX = "(kalo|remi)" + " ?" * 30_000  # 60 KB: a 75 MiB compile stack


async def test_a_compile_that_cannot_get_its_thread_is_a_503_saying_why(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It was a 500 ("RuntimeError: can't start new thread") at the gateway, and an internal error
    from a worker a NATS client sent it to; a retry or a smaller constraint may pass, and every
    other request is served meanwhile."""
    _no_large_compile_stacks(monkeypatch)
    chat = {"model": "lora-2", "messages": [{"role": "user", "content": "kalo?"}], "max_tokens": 6}
    async with aiohttp.ClientSession() as http:
        body = {**chat, "structured_outputs": {"regex": BIG_REGEX}}
        async with http.post(stack.url + "/v1/chat/completions", json=body) as r:
            status, resp, retry = r.status, await r.json(), r.headers.get("Retry-After")
    assert status == 503 and retry is not None, resp
    assert resp["error"]["message"].startswith("regex cannot be compiled now: "), resp
    assert resp["error"]["param"] == "structured_outputs", resp
    status, resp = await post(stack, "/v1/chat/completions", {**chat, "structured_outputs": {"regex": "(kalo|remi)"}})
    assert status == 200 and resp["choices"][0]["message"]["content"] in ("kalo", "remi"), resp
    assert (await post(stack, "/v1/chat/completions", chat))[0] == 200
    # sent to the workers directly (an application's request): compiled there, answered the same way
    chunk = (await app_generate(stack, SamplingParams(max_tokens=6, regex=BIG_REGEX)))[-1]
    assert chunk.error_code is ErrorCode.UNAVAILABLE, chunk
    assert chunk.error is not None and chunk.error.startswith("regex cannot be compiled now: "), chunk


async def test_a_request_refused_for_a_field_checked_cheaply_compiles_nothing(stack: Stack, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The gateway compiled a request's structured output before shaping's checks: a request with a
    bad temperature, an unknown model or a prompt past the context spent a compile (seconds for a
    large schema, on the gateway's 4 compile threads) before its 400. Shaping's checks come first."""
    from dlora.services.worker.engine.structured import Grammars

    compiled: list[str] = []
    verdict = Grammars._verdict  # (the gateway's compile: in the bounded child, none in-process)
    gateway = stack.gateway.served.grammars

    def counting(self: Grammars, grammar: str):  # type: ignore[no-untyped-def]
        if self is gateway and "compiled-here" in grammar:
            compiled.append(grammar)
        return verdict(self, grammar)

    monkeypatch.setattr(Grammars, "_verdict", counting)
    body = {"model": "lora-2", "prompt": "kalo", "max_tokens": 3}
    chat = {"model": "lora-2", "messages": [{"role": "user", "content": "kalo"}], "max_tokens": 3}
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"const": "compiled-here 1"}}}
    for path, bad, param in (
        ("/v1/completions", {**body, "temperature": 3}, "temperature"),
        ("/v1/completions", {**body, "model": "no-such-adapter"}, "model"),
        ("/v1/completions", {**body, "prompt": "kalo " * 5000}, "prompt"),
        ("/v1/completions", {**body, "n": 2, "best_of": 3}, "best_of"),
        ("/v1/completions", {**body, "logit_bias": {"x": 1}}, "logit_bias"),
        ("/v1/chat/completions", {**chat, "stream_options": {"include_usage": True}}, "stream_options"),
        ("/v1/chat/completions", {**chat, "messages": [{"role": "nobody", "content": "x"}]}, "messages"),
    ):
        for field in ({"guided_choice": ["compiled-here 0"]}, {"response_format": schema}):
            status, resp = await post(stack, path, {**bad, **field})
            assert status in (400, 404) and resp["error"]["param"] == param, (bad, resp)
    assert compiled == []
    served = {**body, "max_tokens": 20, "guided_choice": ["compiled-here 0"]}
    status, resp = await post(stack, "/v1/completions", served)
    assert status == 200 and resp["choices"][0]["text"] == "compiled-here 0" and len(compiled) == 1, resp
    # a structured output that cannot be used is still refused by the gateway, naming its field
    status, resp = await post(stack, "/v1/completions", {**body, "guided_regex": "compiled-here (unclosed"})
    assert (status, resp["error"]["param"]) == (400, "guided_regex"), resp


async def test_the_gateway_takes_the_bounded_compiles_verdict_not_a_second_compile(stack: Stack, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The gateway compiled each new grammar twice: in the bounded child process, then again
    in-process for a matcher it only checked and dropped (a 400 KB schema's first request took its
    compile twice over, on the gateway's few compile threads). The child's verdict is taken: nothing
    is compiled in-process, and what fails only at its first mask is still a 400 naming the field."""
    from dlora.services.worker.engine.structured import Grammars

    compiled: list[str] = []
    compile_ = Grammars._compile
    gateway = stack.gateway.served.grammars

    def counting(self: Grammars, grammar: str):  # type: ignore[no-untyped-def]
        if self is gateway:
            compiled.append(grammar)
        return compile_(self, grammar)

    monkeypatch.setattr(Grammars, "_compile", counting)
    body = {"model": "lora-2", "prompt": "kalo", "max_tokens": 20, "temperature": 0}
    status, resp = await post(stack, "/v1/completions", {**body, "guided_choice": ["verdict-taken"]})
    assert status == 200 and resp["choices"][0]["text"] == "verdict-taken", resp
    for field, value in (("guided_json", {"$ref": "#"}), ("guided_regex", "verdict (unclosed")):
        status, resp = await post(stack, "/v1/completions", {**body, field: value})
        assert (status, resp["error"]["param"]) == (400, field), resp
        message = resp["error"]["message"]
        assert " cannot be used: " in message, resp
    assert compiled == []


CALL_TWICE = {  # each parser's format, two calls written (a regex leads the random model)
    "hermes": r'<tool_call>\{"name": "weather", "arguments": \{"city": "kalo"\}\}</tool_call>'
    r'<tool_call>\{"name": "ping", "arguments": \{"to": "remi remi remi"\}\}</tool_call>',
    "llama3_json": r'\{"name": "weather", "parameters": \{"city": "kalo"\}\}; '
    r'\{"name": "ping", "parameters": \{"to": "remi remi remi"\}\}',
    "mistral": r'\[TOOL_CALLS\] \[\{"name": "weather", "arguments": \{"city": "kalo"\}\}, '
    r'\{"name": "ping", "arguments": \{"to": "remi remi remi"\}\}\]',
    "pythonic": r"\[weather\(city='kalo'\), ping\(to='remi remi remi'\)\]",
}


@pytest.mark.parametrize("parser", sorted(CALL_TWICE))
async def test_calls_cut_by_max_tokens_answer_length_and_the_whole_calls_whole_and_streamed(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput, parser: str
) -> None:
    """max_tokens ending the reply inside its second call: finish_reason "length" (OpenAI's, calls
    or not), the first call whole, no fragment of the second as content; streamed the same. Each
    parser's whole reply first, for its length: "tool_calls" and both calls."""
    tools = [
        {"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}
        for name in ("weather", "ping")
    ]
    body = {
        "model": "lora-2",
        "messages": [{"role": "user", "content": "kalo?"}],
        "max_tokens": 200,
        "temperature": 0,
        "tools": tools,
        "structured_outputs": {"regex": CALL_TWICE[parser]},
    }
    async with run_stack(nats_server, redis, tiny_llama, tool_call_parser=parser) as stack:
        status, resp = await post(stack, "/v1/chat/completions", body)
        assert status == 200 and resp["choices"][0]["finish_reason"] == "tool_calls", resp
        both = [c["function"] for c in resp["choices"][0]["message"]["tool_calls"]]
        assert [f["name"] for f in both] == ["weather", "ping"], resp
        cut = {**body, "max_tokens": resp["usage"]["completion_tokens"] - 4}  # within "remi remi remi"
        status, resp = await post(stack, "/v1/chat/completions", cut)
        [choice] = resp["choices"]
        assert choice["finish_reason"] == "length" and not choice["message"]["content"], resp
        assert [c["function"] for c in choice["message"]["tool_calls"]] == both[:1], resp
        events = await stream(stack, "/v1/chat/completions", {**cut, "stream": True})
        choices = [e["choices"][0] for e in events if isinstance(e, dict) and e.get("choices")]
        assert not "".join(c["delta"].get("content") or "" for c in choices)
        assert [t["function"] for c in choices for t in c["delta"].get("tool_calls", [])] == both[:1]
        assert choices[-1]["finish_reason"] == "length"


async def test_a_oneof_whose_branches_overlap_is_served_in_response_format_and_tools(stack: Stack) -> None:
    """OpenAPI-generated tools and pydantic unions write oneOf of branches that overlap (an integer
    is a number too): the gateway answered 400 "oneOf constraints are not supported", where vLLM's
    default backend serves them as anyOf."""
    amount = {"oneOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "number", "maximum": -1}]}
    schema = {"type": "object", "properties": {"amount": amount}, "required": ["amount"]}
    chat = {"model": "lora-2", "messages": [{"role": "user", "content": "kalo?"}], "max_tokens": 60}
    response_format = {"type": "json_schema", "json_schema": {"name": "pay", "schema": schema}}
    status, resp = await post(stack, "/v1/chat/completions", {**chat, "response_format": response_format})
    assert status == 200, resp
    amount_of = json.loads(resp["choices"][0]["message"]["content"])["amount"]
    assert isinstance(amount_of, int | float) and (0 <= amount_of <= 9 or amount_of <= -1), resp
    tool = {"type": "function", "function": {"name": "pay", "parameters": schema}}
    forced = {**chat, "tools": [tool], "tool_choice": {"type": "function", "function": {"name": "pay"}}}
    for choice in (forced, {**forced, "tool_choice": "required"}):
        status, resp = await post(stack, "/v1/chat/completions", choice)
        assert status == 200, resp
        [call] = resp["choices"][0]["message"]["tool_calls"]
        assert set(json.loads(call["function"]["arguments"])) == {"amount"}, resp
