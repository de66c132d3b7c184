"""Other servers' public bug reports about tool-call answers (ids, indices, finish_reason, content
null, parallel_tool_calls, named, "required" and "none" tool_choice, reasoning beside calls),
replayed against dlora's answer shape: each output answered whole and streamed in pieces, the
stream assembled as an OpenAI client does (by each call's ``index``), both answering the same
content, calls and finish_reason. The reports' numbers name where the input came from."""

from __future__ import annotations

import json
from typing import Any

import pytest

from dlora.services.gateway.completion_shape import Choice, Shape
from dlora.services.gateway.openai import ChatBody, Tool, ToolFunction
from dlora.services.gateway.sampling import auto_tools
from tests.unit.tool_cases import splits


def _shape(**kwargs: Any) -> Shape:
    return Shape(chat=True, request_id="chatcmpl-abc", model="m", created=0, call_ids="r1", **kwargs)


def _whole(text: str, finish_reason: str = "stop", **kwargs: Any) -> dict[str, Any]:
    [choice] = _shape(**kwargs).full([Choice(0, text=text, finish_reason=finish_reason)], 3, 9)["choices"]
    message = choice["message"]
    calls = [
        {"id": c["id"], "name": c["function"]["name"], "arguments": c["function"]["arguments"]}
        for c in message.get("tool_calls", [])
    ]
    return {"content": message["content"] or None, "calls": calls, "finish_reason": choice["finish_reason"]}


def _streamed(pieces: list[str], finish_reason: str = "stop", **kwargs: Any) -> dict[str, Any]:
    """The stream's events assembled as the openai package's helpers do: content appended, each
    call's id and name taken where they come, its arguments appended, by its index."""
    shape = _shape(**kwargs)
    events = [shape.chunk(pieces[0], None, first=True)] + [shape.chunk(p, None) for p in pieces[1:]]
    events.append(shape.chunk("", finish_reason))
    content, calls, finish = "", dict[int, dict[str, Any]](), None
    for event in events:
        [choice] = event["choices"]
        delta, finish = choice["delta"], choice["finish_reason"] or finish
        content += delta.get("content") or ""
        for call in delta.get("tool_calls", []):
            got = calls.setdefault(call["index"], {"id": None, "name": None, "arguments": ""})
            if call.get("id"):
                assert got["id"] in (None, call["id"]), "a call's id changed mid-stream"
                got["id"] = call["id"]
            got["name"] = call.get("function", {}).get("name") or got["name"]
            got["arguments"] += call.get("function", {}).get("arguments") or ""
    assert sorted(calls) == list(range(len(calls)))  # (indices 0, 1, ... by call, not by tool)
    return {"content": content or None, "calls": [calls[k] for k in sorted(calls)], "finish_reason": finish}


def _answers_alike(text: str, **kwargs: Any) -> dict[str, Any]:
    whole = _whole(text, **kwargs)
    for pieces in splits(text, len(text)):
        assert _streamed(pieces, **kwargs) == whole, pieces
    return whole


def _hermes(*calls: dict[str, object]) -> str:
    return "\n".join("<tool_call>\n" + json.dumps(c) + "\n</tool_call>" for c in calls)


TWO = _hermes({"name": "multiply", "arguments": {"a": 3, "b": 12}}, {"name": "add", "arguments": {"a": 11, "b": 49}})


def test_streamed_calls_carry_the_ids_names_and_arguments_of_the_whole_answer() -> None:
    """vLLM #18412: tool_calls.id missing in streamed responses but present unstreamed; vLLM #9693:
    streamed arguments None where unstreamed had them; llama.cpp #27966: two streamed parallel
    calls shared one id. Each streamed call has its id (distinct), name and whole arguments."""
    whole = _answers_alike(TWO, tool_parser="hermes")
    assert [c["name"] for c in whole["calls"]] == ["multiply", "add"]
    assert [json.loads(c["arguments"]) for c in whole["calls"]] == [{"a": 3, "b": 12}, {"a": 11, "b": 49}]
    assert all(c["id"] for c in whole["calls"]) and len({c["id"] for c in whole["calls"]}) == 2


def test_parallel_calls_are_indexed_by_their_place_not_by_their_tool() -> None:
    """SGLang #6310 (and dynamo PR #4723): streamed tool_calls' index was the tool's place in the
    request's tools for the first call, or 0 for every call: a client merged them into one."""
    text = _hermes(
        {"name": "get_weather", "arguments": {"city": "SF"}}, {"name": "get_weather", "arguments": {"city": "NY"}}
    )
    whole = _answers_alike(text, tool_parser="hermes", tool_names=frozenset({"add", "get_weather"}))
    assert [json.loads(c["arguments"])["city"] for c in whole["calls"]] == ["SF", "NY"]


@pytest.mark.parametrize("kind", ["hermes", "mistral", "llama3_json", "pythonic", "granite"])
def test_an_answer_with_calls_finishes_tool_calls(kind: str) -> None:
    """SGLang #2877: finish_reason "stop" when Qwen called a tool (an agent loop read the turn as
    done); OpenAI's is "tool_calls", whole and streamed; "length" stays where max_tokens ended it."""
    text = {
        "hermes": _hermes({"name": "f", "arguments": {}}),
        "mistral": '[TOOL_CALLS][{"name": "f", "arguments": {}}]',
        "llama3_json": '{"name": "f", "parameters": {}}',
        "pythonic": "[f()]",
        "granite": '<|tool_call|>[{"name": "f", "arguments": {}}]',
    }[kind]
    assert _answers_alike(text, tool_parser=kind)["finish_reason"] == "tool_calls"
    assert _answers_alike(text, tool_parser=kind, finish_reason="length")["finish_reason"] == "length"


def test_whitespace_after_a_call_is_no_content() -> None:
    """vLLM PR #28331: the whitespace a model leaves after its call went to the user as content."""
    whole = _answers_alike(_hermes({"name": "f", "arguments": {}}) + "\n\n", tool_parser="hermes")
    assert whole["content"] is None and len(whole["calls"]) == 1


@pytest.mark.parametrize(
    ("kwargs", "text"),
    [
        ({"tools_required": True}, '[{"name": "add", "parameters": {"a": 1}}, {"name": "ping", "parameters": {}}]'),
        ({"tool": "add"}, '{"a": 1}'),
    ],
)
def test_required_and_named_tool_choice_stream_calls_not_content(kwargs: dict[str, Any], text: str) -> None:
    """sglang-jax #1275: streamed with tool_choice "required" or a named function, the constrained
    JSON came back as content deltas (unstreamed, as tool_calls)."""
    whole = _answers_alike(text, **kwargs)
    assert whole["content"] is None and whole["calls"] and whole["calls"][0]["name"] == "add"


def test_mistral_ids_under_required_are_nine_alphanumeric_characters() -> None:
    """vLLM #47734: Mistral with tool_choice "required" streamed made ids its templates refuse
    (9 alphanumeric characters), so the next turn, which sends them back, failed."""
    text = '[{"name": "add", "parameters": {"a": 1}}, {"name": "add", "parameters": {"a": 2}}]'
    ids = [c["id"] for c in _answers_alike(text, tools_required=True, call_id_length=9)["calls"]]
    assert all(len(i) == 9 and i.isalnum() and i.isascii() for i in ids) and len(set(ids)) == 2


@pytest.mark.parametrize("kind", ["hermes", "llama3_json", "mistral"])
def test_without_parallel_calls_one_call_is_answered_whole_and_streamed(kind: str) -> None:
    """SGLang #9696: parallel_tool_calls false was not enforced: two calls came back. OpenAI
    answers one at most: the first, alike whole and streamed."""
    text = {
        "hermes": TWO,
        "llama3_json": '{"name": "multiply", "parameters": {"a": 3}}; {"name": "add", "parameters": {"a": 11}}',
        "mistral": '[TOOL_CALLS]multiply[ARGS]{"a": 3}[TOOL_CALLS]add[ARGS]{"a": 11}',
    }[kind]
    whole = _answers_alike(text, tool_parser=kind, parallel_calls=False)
    assert [c["name"] for c in whole["calls"]] == ["multiply"] and whole["finish_reason"] == "tool_calls"


def test_a_named_call_whose_output_is_all_reasoning_answers_no_call() -> None:
    """vLLM PR #40148 (#40147): with a named tool_choice, a reasoning parser that took the whole
    output (no end of thinking) left content None, and the server failed (500). Here: no call and
    no content, whole and streamed alike (the arguments never began)."""
    whole = _answers_alike("<think>Which tool? Let me think", tool="add", reasoning_parser="qwen3")
    assert whole == {"content": None, "calls": [], "finish_reason": "stop"}


def _reasoning(text: str, **kwargs: Any) -> tuple[str | None, str]:
    """The reasoning of ``text`` answered whole, and streamed a character at a time."""
    shape = _shape(**kwargs)
    [choice] = shape.full([Choice(0, text=text, finish_reason="stop")], 3, 9)["choices"]
    shape = _shape(**kwargs)
    events = [shape.chunk(text[0], None, first=True)] + [shape.chunk(t, None) for t in text[1:]]
    events.append(shape.chunk("", "stop"))
    return choice["message"]["reasoning"], "".join(e["choices"][0]["delta"].get("reasoning") or "" for e in events)


@pytest.mark.parametrize("text", ["[]", '[{"x": 1}]'])
def test_a_required_list_of_no_calls_does_not_finish_tool_calls(text: str) -> None:
    """vLLM #53255 (PR #53256): tool_choice "required" whose output made no call answered
    finish_reason "tool_calls" beside an empty tool_calls, sending an agent loop to run nothing."""
    assert _answers_alike(text, tools_required=True) == {"content": None, "calls": [], "finish_reason": "stop"}


def test_tool_choice_none_answers_a_call_shaped_output_as_its_text() -> None:
    """vLLM #55080: with tool_choice "none" the parser still ran and deleted the call-shaped text
    (content null). "none" reads no calls (``auto_tools``): the output is the answer as written."""
    body = ChatBody(
        model="m", messages=[], tools=[Tool(type="function", function=ToolFunction(name="f"))], tool_choice="none"
    )
    assert not auto_tools(body, "hermes")
    text = _hermes({"name": "f", "arguments": {}})
    assert _answers_alike(text) == {"content": text, "calls": [], "finish_reason": "stop"}


def test_a_call_drafted_while_thinking_stays_reasoning_and_the_real_one_is_answered_once() -> None:
    """vLLM #39056 (PR #55759 open) and renderers #80: a <tool_call> written inside <think> was
    lost, or answered beside the real call as a phantom duplicate. As vLLM's main reads it (calls
    from the content alone): the draft is reasoning, the call after </think> the one answer."""
    draft = "<think>I could write " + _hermes({"name": "f", "arguments": {"a": 0}}) + "</think>"
    text = draft + _hermes({"name": "f", "arguments": {"a": 1}})
    whole = _answers_alike(text, tool_parser="hermes", reasoning_parser="qwen3")
    assert [json.loads(c["arguments"]) for c in whole["calls"]] == [{"a": 1}] and whole["content"] is None
    assert _reasoning(text, tool_parser="hermes", reasoning_parser="qwen3") == (draft[7:-8], draft[7:-8])


def test_calls_are_read_where_thinking_is_off() -> None:
    """vLLM #19017: with thinking disabled (enable_thinking false) the reasoning parser took the
    whole output, the call in it never read. Thinking off, all of it is content, read for calls."""
    whole = _answers_alike(TWO, tool_parser="hermes", reasoning_parser="qwen3", thinking=False)
    assert [c["name"] for c in whole["calls"]] == ["multiply", "add"] and whole["finish_reason"] == "tool_calls"


def test_a_named_call_streams_where_thinking_is_off() -> None:
    """vLLM #21565 (PR #21573): a named tool_choice streamed with thinking disabled failed (the
    call waited for an end of thinking that never came). Here it opens at once, as answered whole."""
    whole = _answers_alike('{"a": 1}', tool="add", reasoning_parser="qwen3", thinking=False)
    assert whole["calls"][0]["name"] == "add" and json.loads(whole["calls"][0]["arguments"]) == {"a": 1}


@pytest.mark.parametrize("kwargs", [{"tool": "add"}, {"tool_parser": "hermes"}, {"tools_required": True}])
def test_a_streamed_calls_id_name_and_type_come_once_in_its_first_delta(kwargs: dict[str, Any]) -> None:
    """vLLM #14951: a streamed call's name came in every delta, so an OpenAI adaptor, which appends
    what each delta holds, built one long name. OpenAI sends id, type and name once, in a call's
    first delta; its later deltas hold arguments alone."""
    text = {"tool": '{"a": 1}', "tool_parser": TWO, "tools_required": '[{"name": "add", "parameters": {"a": 1}}]'}
    shape = _shape(**kwargs)
    pieces = list(text[next(iter(kwargs))])
    events = [shape.chunk(pieces[0], None, first=True)] + [shape.chunk(p, None) for p in pieces[1:]]
    deltas = [c for e in [*events, shape.chunk("", "stop")] for c in e["choices"][0]["delta"].get("tool_calls", [])]
    assert len({d["index"] for d in deltas}) == (2 if "tool_parser" in kwargs else 1)  # each call streamed
    for index in {d["index"] for d in deltas}:
        [first, *later] = [d for d in deltas if d["index"] == index]
        assert first["id"] and first["type"] == "function" and first["function"]["name"]
        assert all(set(d) == {"index", "function"} and set(d["function"]) == {"arguments"} for d in later)


def test_reasoning_then_a_call_answers_no_content_whole_and_streamed() -> None:
    """Qwen3 #1755 (vLLM's qwen3 parser): a thinking model's stream gave the blank line between
    </think> and <tool_call> as content beside the call. Here: reasoning, the call, content null."""
    text = "<think>Need the weather.</think>\n\n" + _hermes({"name": "weather", "arguments": {"city": "SF"}})
    whole = _answers_alike(text, tool_parser="hermes", reasoning_parser="qwen3")
    assert whole["content"] is None and [c["name"] for c in whole["calls"]] == ["weather"]
    assert _reasoning(text, tool_parser="hermes", reasoning_parser="qwen3") == ("Need the weather.",) * 2


def test_calls_streamed_in_chunks_of_many_tokens_keep_their_last_brace() -> None:
    """vLLM #32152: with MTP (several tokens per step) hermes' stream dropped a call's final "}",
    its arguments no JSON. Pieces of any size give the whole answer's arguments (``splits``)."""
    text = _hermes({"name": "f", "arguments": {"a": {"b": [1, {"c": "}"}]}}}) + "\n"
    whole = _answers_alike(text, tool_parser="hermes")
    assert json.loads(whole["calls"][0]["arguments"]) == {"a": {"b": [1, {"c": "}"}]}}


@pytest.mark.parametrize("finish_reason", ["stop", "length"])
def test_a_named_call_whose_output_is_empty_answers_empty_arguments(finish_reason: str) -> None:
    """A named tool_choice whose output is empty (a stop string at its start, or max_tokens cut
    it there): the call, arguments "", whole and streamed, as vLLM answers it (PR #40148 reads
    its content None as ""). OpenAI's arguments are "as generated by the model", valid JSON or
    not (its API reference: validate them before calling); "{}" would claim arguments the model
    never wrote (a tool's required ones missing), and a refusal is OpenAI's model's, not its API's."""
    whole = _whole("", tool="add", finish_reason=finish_reason)
    assert _streamed([""], tool="add", finish_reason=finish_reason) == whole
    assert whole["calls"] == [{"id": whole["calls"][0]["id"], "name": "add", "arguments": ""}]
    assert whole["content"] is None and whole["finish_reason"] == finish_reason


@pytest.mark.parametrize(
    "kwargs, text, finish_reason",
    [
        ({"tools_required": True}, '[{"name": "f", "parameters": {"a": ', "length"),  # cut inside its first call
        ({"tools_required": True}, "[]", "stop"),
        ({"tool": "add", "reasoning_parser": "qwen3"}, "<think>Which tool? Let me", "length"),  # all reasoning
    ],
)
def test_a_forced_choice_that_made_no_call_answers_empty_content_not_null(
    kwargs: dict[str, Any], text: str, finish_reason: str
) -> None:
    """tool_choice "required" (or a named one) whose output made no call answered content null and
    no tool_calls: a turn OpenAI's API refuses when the client sends it back (an assistant's content
    is required without tool_calls). Its content is "" now, as vLLM's; whole and streamed alike."""
    [choice] = _shape(**kwargs).full([Choice(0, text=text, finish_reason=finish_reason)], 3, 9)["choices"]
    assert (choice["message"]["content"], "tool_calls" in choice["message"]) == ("", False)
    shape = _shape(**kwargs)
    events = [shape.chunk(text[:5], None, first=True), shape.chunk(text[5:], None), shape.chunk("", finish_reason)]
    content = None  # (appended as the openai package's stream helpers append it: None, then "" is "")
    for event in events:
        if (said := event["choices"][0]["delta"].get("content")) is not None:
            content = (content or "") + said
    assert content == ""
    called = '[{"name": "f", "parameters": {}}]'  # (one that made its call keeps content null)
    assert (
        _shape(tools_required=True).full([Choice(0, text=called, finish_reason="stop")], 3, 9)["choices"][0]["message"][
            "content"
        ]
        is None
    )
