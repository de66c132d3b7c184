"""Public bug reports about the Responses API (vLLM's, Codex's, and clients' of OpenAI's) replayed
against the pure cores that read its body and make its answer (services/gateway/responses_api.py,
responses_shape.py): each test names the report and checks the answer OpenAI's reference gives,
each event read by the openai package's own strict types (``test_responses_shape._events``).
Those that need the store or a model are replayed through the real stack in
tests/integration/test_responses_replays.py."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from openai.types.responses import Response

from dlora.services.gateway import shaping
from dlora.services.gateway.completion_shape import Choice, Shape
from dlora.services.gateway.openai import ChatMessage
from dlora.services.gateway.responses_api import decode
from dlora.services.gateway.responses_shape import ResponsesShape
from dlora.services.gateway.served_model import ServedModel
from tests.unit.test_gateway_shaping import BASE, served
from tests.unit.test_responses_api import _refused
from tests.unit.test_responses_shape import _events, _shape

__all__ = ["served"]  # the fixture, shared


def _call(k: int) -> dict[str, Any]:
    return {"type": "function_call", "call_id": f"call_{k}", "name": "f", "arguments": "{}"}


def _output(k: int) -> dict[str, Any]:
    return {"type": "function_call_output", "call_id": f"call_{k}", "output": "ok"}


def _reasoning(text: str) -> dict[str, Any]:
    return {
        "type": "reasoning",
        "id": f"rs_{text}",
        "summary": [],
        "content": [{"type": "reasoning_text", "text": text}],
    }


def _chat(given: list[dict[str, Any]]) -> list[ChatMessage]:
    """The chat messages a Responses input is served as."""
    return decode(json.dumps({"model": "m", "input": given}).encode())[1].messages


def test_a_call_after_reasoning_streams_as_a_function_call_not_as_text() -> None:
    """vllm-project/vllm#29725 (and #36435, PR #36445): with a reasoning parser and a tool parser
    both on, the call after ``</think>`` streamed as ``response.output_text.delta`` events holding
    the raw ``<tool_call>`` text; and #55284 (PR #52418): a function_call item added without its
    name aborted the stream in the openai package. The call is a function_call item, named when
    added, its arguments streamed as ``response.function_call_arguments.delta``; no text of it."""
    pieces = ["<think>", "plan", "</think>", "<tool_call>", '{"name": "f", ', '"arguments": {"a": 1}}', "</tool_call>"]
    events = _events(pieces, "stop", tool_parser="hermes")
    kinds = [n for n, _ in events]
    assert "response.function_call_arguments.done" in kinds and kinds[-1] == "response.completed"
    assert not [d for n, d in events if n == "response.output_text.delta" and "tool_call" in d["delta"]]
    added = [d["item"] for n, d in events if n == "response.output_item.added" and d["item"]["type"] == "function_call"]
    assert [a["name"] for a in added] == ["f"] and added[0]["call_id"]
    output = events[-1][1]["response"]["output"]
    assert [i["type"] for i in output] == ["reasoning", "function_call"] and output[1]["arguments"] == '{"a": 1}'


def test_an_answer_cut_by_max_output_tokens_says_so_and_keeps_what_it_made() -> None:
    """vllm-project/vllm#24184: ``max_output_tokens=1`` answered ``status: completed``, no
    ``incomplete_details``, ``output: []`` and zero usage, so a client could not tell an answer cut
    short. OpenAI's: ``incomplete`` with reason ``max_output_tokens``, the usage counted, and what
    was made kept, also an answer cut within its reasoning (its reasoning item, not an empty
    output), whole and streamed alike."""
    one = [Choice(0, text="k", finish_reason="length")]
    whole = Response.model_validate(_shape(reasoning_parser="").full(one, 5, 1))
    assert whole.status == "incomplete" and whole.incomplete_details is not None
    assert whole.incomplete_details.reason == "max_output_tokens" and whole.output_text == "k"
    assert whole.usage is not None and (whole.usage.input_tokens, whole.usage.output_tokens) == (5, 1)
    cut = ["<think>", "so ", "kalo"]
    streamed = Response.model_validate(_events(cut, "length")[-1][1]["response"])
    whole = Response.model_validate(_shape().full([Choice(0, text="".join(cut), finish_reason="length")], 5, 3))
    for response in (streamed, whole):
        assert response.status == "incomplete" and [i.type for i in response.output][:1] == ["reasoning"]
        reasoning = response.output[0]
        assert reasoning.type == "reasoning" and [c.text for c in reasoning.content or []] == ["so kalo"]


def test_a_reasoning_item_streams_its_part_opened_and_closed_before_the_message() -> None:
    """vllm-project/vllm PR #35184 (and PR #24938, openai/openai-python#2634): a reasoning parser's
    reasoning item streamed a content_part.added of an output_text part and never closed it, so
    a client reading parts by type built an empty message out of the reasoning. Its part is a
    reasoning_text, added before its deltas and done after them (OpenAI's event types, each read
    by the openai package), all before the message's item is added."""
    events = _events(["<think>", "a", "</think>", "b"], "stop")
    item = ["output_item.added", "content_part.added", "{}_text.delta", "{}_text.done", "content_part.done"]
    kinds = ["created", "in_progress", *[k.format("reasoning") for k in item], "output_item.done"]
    kinds += [*[k.format("output") for k in item], "output_item.done", "completed"]
    assert [n for n, _ in events] == [f"response.{k}" for k in kinds]
    parts = [d["part"]["type"] for n, d in events if n.startswith("response.content_part.")]
    assert parts == ["reasoning_text", "reasoning_text", "output_text", "output_text"]
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))


def test_truncation_auto_is_refused_by_name_and_disabled_echoed() -> None:
    """vllm-project/vllm#38132 (PRs #38143, #39413): ``truncation: "auto"`` with an input past the
    context was a 400 naming the context, not truncation, on one path and truncated on another.
    dlora drops no items: "auto" is a 400 naming ``truncation`` up front, whatever the input's
    length; "disabled" (OpenAI's default) is served and echoed."""
    e = _refused({"input": "kalo", "truncation": "auto"})
    assert e.param == "truncation" and '"auto"' in e.message
    asked, _ = decode(json.dumps({"model": "m", "input": "kalo", "truncation": "disabled"}).encode())
    shape = ResponsesShape.of(Shape(True, "chatcmpl-abc", "m", 7), asked)
    assert shape.full([Choice(0, text="k", finish_reason="stop")], 5, 1)["truncation"] == "disabled"


def test_a_function_call_output_without_its_call_id_is_a_400_naming_it() -> None:
    """openai/codex#42088: Codex sent a function_call_output without ``call_id`` (a tool output it
    injected), which strict servers refused with a 400 and lenient ones rendered as a tool message
    answering nothing. It is a 400 naming that item's field (OpenAI's requires it)."""
    e = _refused({"input": [_call(1), {"type": "function_call_output", "output": "sunny"}]})
    assert e.param == "input[1].call_id" and "call_id" in e.message


def test_a_function_call_output_of_content_parts_is_its_tool_message() -> None:
    """experientiallabs/experiential#791 (Codex CLI 0.153): Codex sends a tool's output as a list
    of content parts (OpenAI's function_call_output.output is a string or such a list), refused
    there as "expected a string, but got an array". Its text parts are the tool message's."""
    parts = [{"type": "input_text", "text": "sunny"}, {"type": "input_text", "text": "warm"}]
    [_, tool] = _chat([_call(1), {"type": "function_call_output", "call_id": "call_1", "output": parts}])
    assert tool.role == "tool" and tool.tool_call_id == "call_1"
    assert [p.text for p in tool.content] == ["sunny", "warm"]


def test_a_reasoning_item_of_encrypted_content_alone_is_taken() -> None:
    """vllm-project/vllm PR #28248: reasoning items sent back as input were not read; Codex sends
    each as OpenAI gave it, ``summary`` empty, ``content`` null and ``encrypted_content`` (with
    ``store: false``). It is taken, and adds nothing to the prompt: there is no text to read."""
    thought = {"type": "reasoning", "id": "rs_1", "summary": [], "content": None, "encrypted_content": "gAAAAB"}
    answer = {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "ok"}]}
    said = [(m.role, m.reasoning) for m in _chat([{"role": "user", "content": "kalo"}, thought, answer])]
    assert said == [("user", None), ("assistant", None)]


def test_a_json_schema_format_beside_a_reasoning_parser_binds_after_the_reasoning(served: ServedModel) -> None:
    """vllm-project/vllm#44012: with a reasoning parser, a Responses ``text.format`` json_schema was
    not bound: the answer went to the unconstrained reasoning item, its JSON invalid half the
    time, where the chat's response_format held. Here it is the chat's: its grammar binds what
    follows ``</think>``, the reasoning item free and the message the schema's JSON."""
    fmt = {"type": "json_schema", "name": "w", "schema": {"type": "object"}, "strict": True}
    asked, chat = decode(json.dumps({"model": BASE, "input": "kalo", "text": {"format": fmt}}).encode())
    thinks = dataclasses.replace(served, reasoning_parser="qwen3")
    job = shaping.shape_request(chat, None, thinks, base_name=BASE, request_id="chatcmpl-1", gateway_id="gw", now=1.0)
    [choice] = job.choices
    assert choice.request is not None and choice.request.params.json_schema is not None
    end = served.tokenizer.encode("</think>", add_special_tokens=False)
    assert end and choice.request.params.structured_after_token_ids == end
    whole = ResponsesShape.of(job.shape, asked).full(
        [Choice(0, text='<think>hm</think>{"a": 1}', finish_reason="stop")], 5, 9
    )
    assert [i["type"] for i in whole["output"]] == ["reasoning", "message"] and whole["text"]["format"] == fmt
    assert json.loads(whole["output"][1]["content"][0]["text"]) == {"a": 1}


def test_outputs_after_calls_split_by_reasoning_answer_each_call_by_its_id() -> None:
    """deepseek-ai/awesome-deepseek-integration#740: "No tool output found for tool call" when a
    reasoning item sat between an answer's calls and the outputs came after both (outputs paired
    by position, not call_id). Each call is made, then each output answers its own by call_id."""
    given = [{"role": "user", "content": "go"}, _reasoning("a"), _call(1), _reasoning("b"), _call(2)]
    given += [{"type": "function_call_output", "call_id": f"call_{k}", "output": "ok"} for k in (1, 2)]
    chat = _chat(given)
    calls = [c["id"] for m in chat if m.role == "assistant" for c in m.tool_calls or []]
    assert calls == ["call_1", "call_2"] and [m.tool_call_id for m in chat if m.role == "tool"] == calls
    assert [m.reasoning for m in chat if m.role == "assistant"] == ["a", "b"]


def test_a_streams_completed_event_holds_every_item_it_streamed() -> None:
    """vllm-project/vllm PR #30223: a stream's ``response.completed`` held ``output: []`` (only the
    last delta was kept), so a client reading the final object, as the openai package's
    ``get_final_response`` does, lost the answer its deltas had shown. Its output is every item
    as its ``output_item.done`` gave it, the text whole."""
    events = _events(["<think>", "so ", "kalo", "</think>", "remi", " ok"], "stop", tool_parser="hermes")
    done = [d["item"] for n, d in events if n == "response.output_item.done"]
    final = events[-1][1]["response"]
    assert events[-1][0] == "response.completed" and final["output"] == done and len(done) == 2
    assert Response.model_validate(final).output_text == "remi ok"


def test_a_function_call_output_answering_no_call_is_openais_400() -> None:
    """agentscope-ai/AgentTeams#299 and binaricat/Netcatty#684 show OpenAI's 400 "No tool call found
    for function call output with call_id ...": an output whose call no function_call before it
    made (its client dropped the call from its history, or sent the output to the wrong chain).
    dlora rendered it as a tool message answering nothing, the model reading a result of a call
    it never made. OpenAI's 400 (param ``input``); with its call before it, served."""
    e = _refused({"input": [{"role": "user", "content": "go"}, _output(9)]})
    assert (e.param, e.message) == ("input", "No tool call found for function call output with call_id call_9.")
    assert _refused({"input": [_output(1), _call(1)]}).param == "input"  # (its call after it: none before)
    assert [m.role for m in _chat([_call(1), _output(1)])] == ["assistant", "tool"]
