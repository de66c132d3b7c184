"""The Responses API's answer made of the chat's (services/gateway/responses_shape.py): a reasoning
parser's split answered as a reasoning item and a message, whole and streamed alike, in the shapes
the openai package's types read (its stream reader's accumulation, its Response's output_text).
The rest is tested through the real stack in tests/integration/test_responses_api.py."""

from __future__ import annotations

import json
import re
from typing import Any

import openai

from dlora.services.gateway.completion_shape import Choice, Shape
from dlora.services.gateway.responses_api import ResponsesBody
from dlora.services.gateway.responses_shape import ResponsesShape


def _shape(**chat: Any) -> ResponsesShape:
    shape = Shape(True, "chatcmpl-abc", "m", 7, **{"reasoning_parser": "qwen3"} | chat)
    return ResponsesShape.of(shape, ResponsesBody(input="kalo", instructions="Be brief."))


def _entry(token: str) -> dict[str, Any]:
    """A chat logprobs entry of ``token`` (OpenAI's ChatCompletionTokenLogprob)."""
    return {"token": token, "logprob": -1.0, "bytes": list(token.encode()), "top_logprobs": []}


def _events(pieces: list[str], finish: str, **chat: Any) -> list[tuple[str, dict[str, Any]]]:
    """The events of a stream of ``pieces``, each checked by the openai package's own event types."""
    from openai.types.responses import ResponseStreamEvent
    from pydantic import TypeAdapter

    shape, frames = _shape(**chat), []
    frames += shape.events(shape.chunk("", None, first=True))
    for k, piece in enumerate(pieces):
        frames += shape.events(shape.chunk(piece, finish if k == len(pieces) - 1 else None))
    frames += shape.events(shape.usage_chunk(5, len(pieces), 2))
    out = []
    for frame in frames:
        head, data = frame.decode().rstrip("\n").split("\n")
        out.append((head.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
        TypeAdapter(ResponseStreamEvent).validate_python(out[-1][1])  # strict: every field it requires
    return out


def test_a_reasoning_answer_is_a_reasoning_item_then_a_message_whole_and_streamed() -> None:
    from openai.lib.streaming.responses._responses import ResponseStreamState
    from openai.types.responses import Response, ResponseStreamEvent

    pieces = ["<think>", "so ", "kalo", "</think>", "remi", " ok"]
    events = _events(pieces, "stop")
    state = ResponseStreamState(input_tools=openai.omit, text_format=openai.omit)
    for name, data in events:
        assert name == data["type"]
        state.handle_event(openai._models.construct_type(type_=ResponseStreamEvent, value=data))
    streamed = state._completed_response
    assert streamed is not None and streamed.output_text == "remi ok"
    reasoning, message = streamed.output
    assert reasoning.type == "reasoning" and [c.text for c in reasoning.content or []] == ["so kalo"]
    assert message.type == "message" and message.status == "completed"
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))
    kinds = [n for n, _ in events]
    assert kinds.index("response.reasoning_text.done") < kinds.index("response.output_item.added", 3)
    assert streamed.usage is not None and (streamed.usage.input_tokens, streamed.usage.output_tokens) == (5, 6)
    assert streamed.usage.input_tokens_details.cached_tokens == 2
    # whole: the same items, and the object the package's own type takes as it is
    shape = _shape()
    whole = Response.model_validate(shape.full([Choice(0, text="".join(pieces), finish_reason="stop")], 5, 6, 2))
    assert whole.output_text == "remi ok" and [i.type for i in whole.output] == ["reasoning", "message"]
    assert whole.id == streamed.id == "resp_abc" and whole.instructions == "Be brief." and whole.status == "completed"
    assert [i.id for i in whole.output] == [i.id for i in streamed.output]


def test_an_answer_cut_short_is_incomplete_and_an_empty_one_still_a_message() -> None:
    events = _events(["kalo", " remi"], "length")
    assert events[-1][0] == "response.incomplete"
    last = events[-1][1]["response"]
    assert last["status"] == "incomplete" and last["incomplete_details"] == {"reason": "max_output_tokens"}
    assert last["output"][0]["status"] == "incomplete"
    events = _events([""], "stop")  # nothing written: one empty message, as the whole answer's
    assert events[-1][1]["response"]["output"][0]["content"][0]["text"] == ""
    whole = _shape().full([Choice(0, text="", finish_reason="stop")], 5, 1)
    assert [(i["type"], i["content"][0]["text"]) for i in whole["output"]] == [("message", "")]


def test_a_long_answer_is_not_copied_at_each_event() -> None:
    """A delta's text is kept as a piece, given to the open item once when it closes: the item's
    text was rebuilt at each delta (the whole text so far copied), so a long answer's last events
    cost far more than its first (128k tokens: 63 us an event, 8 s of the gateway's loop in all).
    Checked by what is kept, not by the clock."""
    shape = _shape(reasoning_parser="")
    shape.events(shape.chunk("", None, first=True))
    piece = "k" * 4096
    for _ in range(1600):
        shape.events(shape.chunk(piece, None))
    assert len(shape._pieces) == 1600 and shape._open is not None and shape._open["content"][0]["text"] == ""
    *_, done = shape.events(shape.chunk("", "stop")) + shape.events(shape.usage_chunk(5, 1600))
    said = json.loads(done.decode().split("\n")[1].removeprefix("data: "))["response"]["output"][0]["content"][0]
    assert said["text"] == piece * 1600


def test_a_forced_call_streams_its_arguments_into_one_function_call_item() -> None:
    from openai.types.responses import Response

    events = _events(['{"city"', ': "kalo"}'], "stop", tool="weather", reasoning_parser="")
    kinds = [n for n, _ in events]
    assert kinds.count("response.function_call_arguments.delta") == 2 and kinds[-1] == "response.completed"
    [item] = events[-1][1]["response"]["output"]
    assert (item["type"], item["name"], item["arguments"], item["status"]) == (
        "function_call",
        "weather",
        '{"city": "kalo"}',
        "completed",
    )
    whole = _shape(tool="weather", reasoning_parser="").full(
        [Choice(0, text='{"city": "kalo"}', finish_reason="stop")], 5, 2
    )
    [call] = Response.model_validate(whole).output
    assert call.type == "function_call" and call.call_id == item["call_id"] and call.id == item["id"]
    assert re.fullmatch("chatcmpl-tool-[0-9a-f]{32}", call.call_id), call.call_id  # vLLM's form, as the chat's


def test_an_error_mid_stream_is_an_error_event_then_the_response_failed() -> None:
    from openai.types.responses import ResponseStreamEvent
    from pydantic import TypeAdapter

    from dlora.services.gateway.openai import APIError

    shape = _shape()
    frames = shape.events(shape.chunk("", None, first=True)) + shape.events(shape.chunk("kalo", None))
    frames += shape.events(APIError(400, "response_format: the output cannot go on", "response_format").body())
    events = [json.loads(f.decode().split("\n")[1].removeprefix("data: ")) for f in frames]
    for event in events:
        TypeAdapter(ResponseStreamEvent).validate_python(event)
    error, failed = events[-2:]
    said = "text.format: the output cannot go on"  # named by the Responses field, as a refusal before it
    assert (error["type"], error["message"], error["param"]) == ("error", said, "text.format")
    assert failed["type"] == "response.failed" and failed["response"]["status"] == "failed"
    assert failed["response"]["error"]["message"] == said


def test_a_clients_request_id_names_the_response_once() -> None:
    for sent in ("abc", "resp_abc"):  # (vLLM's own are "resp_..."; X-Request-Id is as the client has it)
        shape = ResponsesShape.of(Shape(True, f"chatcmpl-{sent}", "m", 7), ResponsesBody(input="kalo"))
        whole = shape.full([Choice(0, text="kalo", finish_reason="stop")], 5, 1)
        assert whole["id"] == "resp_abc" and whole["output"][0]["id"] == "msg_abc_0"


def test_the_reasoning_effort_asked_is_echoed_whole_and_streamed() -> None:
    from openai.types.responses import Response

    from dlora.services.gateway.responses_api import Reasoning

    asked = ResponsesBody(input="kalo", reasoning=Reasoning(effort="low"))
    shape = ResponsesShape.of(Shape(True, "chatcmpl-abc", "m", 7), asked)
    whole = Response.model_validate(shape.full([Choice(0, text="kalo", finish_reason="stop")], 5, 1))
    assert whole.reasoning is not None and whole.reasoning.effort == "low"
    [created, *_] = shape.events(shape.chunk("", None, first=True))
    event = json.loads(created.decode().split("\n")[1].removeprefix("data: "))
    assert event["response"]["reasoning"]["effort"] == "low"


def test_output_logprobs_go_with_the_deltas_and_whole_with_the_done_part() -> None:
    """``include: ["message.output_text.logprobs"]`` (vLLM #23225): each chat event's logprobs go
    with the output_text delta it makes; those of an event that writes no text yet (a reasoning's,
    a character's first bytes) with the next, the end's (an EOS's) with output_text.done, which
    holds them all, as the whole answer's part does."""
    from openai.types.responses import Response, ResponseStreamEvent
    from pydantic import TypeAdapter

    pieces = [("<think>", ["<think>"]), ("so", ["so"]), ("</think>", ["</think>"]), ("", ["\\xc3"]), ("é", ["\\xa9"])]
    pieces += [("", ["</s>"])]
    every = [_entry(t) for _, tokens in pieces for t in tokens]
    shape, frames = _shape(), []
    frames += shape.events(shape.chunk("", None, first=True))
    for k, (text, tokens) in enumerate(pieces):
        finish = "stop" if k == len(pieces) - 1 else None
        frames += shape.events(shape.chunk(text, finish, logprobs={"content": [_entry(t) for t in tokens]}))
    frames += shape.events(shape.usage_chunk(5, len(every)))
    events = [json.loads(f.decode().split("\n")[1].removeprefix("data: ")) for f in frames]
    for event in events:
        TypeAdapter(ResponseStreamEvent).validate_python(event)
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    assert [(d["delta"], [lp["token"] for lp in d["logprobs"]]) for d in deltas] == [
        ("é", ["<think>", "so", "</think>", "\\xc3", "\\xa9"])
    ]
    [done] = [e for e in events if e["type"] == "response.output_text.done"]
    assert done["logprobs"] == every == events[-1]["response"]["output"][1]["content"][0]["logprobs"]
    text = "".join(t for t, _ in pieces)
    whole = _shape().full([Choice(0, text=text, finish_reason="stop", logprobs={"content": every})], 5, len(every))
    assert Response.model_validate(whole).output_text == "é"
    assert whole["output"][1]["content"][0]["logprobs"] == every


def test_a_message_then_a_call_gives_the_same_logprobs_streamed_and_whole() -> None:
    """A message followed by a function call (hermes): the stream's message closes as the call
    begins, before the call's tokens come; its final response (what get_final_response gives and
    what is stored) must hold every token's entry on the message, as the whole answer does."""
    from openai.lib.streaming.responses._responses import ResponseStreamState
    from openai.types.responses import ResponseStreamEvent

    tokens = ["kalo", " remi", "<tool_call>", '{"name": "f", ', '"arguments": {}}', "</tool_call>", ""]
    every = [_entry(t) for t in tokens]
    shape, frames = _shape(reasoning_parser="", tool_parser="hermes"), []
    frames += shape.events(shape.chunk("", None, first=True))
    for k, token in enumerate(tokens):
        finish = "stop" if k == len(tokens) - 1 else None
        frames += shape.events(shape.chunk(token, finish, logprobs={"content": [every[k]]}))
    frames += shape.events(shape.usage_chunk(5, len(tokens)))
    state = ResponseStreamState(input_tools=openai.omit, text_format=openai.omit)
    for frame in frames:
        event = json.loads(frame.decode().split("\n")[1].removeprefix("data: "))
        state.handle_event(openai._models.construct_type(type_=ResponseStreamEvent, value=event))
    streamed = state._completed_response
    assert streamed is not None and [item.type for item in streamed.output] == ["message", "function_call"]
    whole = _shape(reasoning_parser="", tool_parser="hermes").full(
        [Choice(0, text="".join(tokens), finish_reason="stop", logprobs={"content": every})], 5, len(tokens)
    )
    assert [item["type"] for item in whole["output"]] == ["message", "function_call"]
    assert whole["output"][0]["content"][0]["logprobs"] == every
    assert [lp.model_dump() for lp in streamed.output[0].content[0].logprobs] == every


def test_a_stream_failed_mid_message_keeps_the_logprobs_of_its_text_so_far() -> None:
    """A stream that fails mid-message (include: ["message.output_text.logprobs"]): its failed
    response shows the message's text so far, and must show those tokens' logprobs with it, as
    its deltas sent them, not the empty list of a response that asked for none."""
    from dlora.services.gateway.openai import APIError

    said = {"token": "kalo", "logprob": -0.5, "bytes": list(b"kalo"), "top_logprobs": []}
    shape = _shape(reasoning_parser="")
    frames = shape.events(shape.chunk("", None, first=True))
    frames += shape.events(shape.chunk("kalo", None, logprobs={"content": [said]}))
    frames += shape.events(APIError(500, "the worker failed", None).body())
    failed = json.loads(frames[-1].decode().split("\n")[1].removeprefix("data: "))
    assert failed["type"] == "response.failed"
    [message] = failed["response"]["output"]
    assert message["content"][0]["text"] == "kalo" and message["content"][0]["logprobs"] == [said]


def test_the_top_logprobs_asked_are_echoed_whole_and_streamed() -> None:
    """``top_logprobs`` is served (with include ["message.output_text.logprobs"]): the response
    object echoes it, as OpenAI's (the openai package's Response.top_logprobs) does the sampling
    fields it was sent, where it was always null."""
    from openai.types.responses import Response

    asked = ResponsesBody(input="kalo", include=["message.output_text.logprobs"], top_logprobs=3)
    shape = ResponsesShape.of(Shape(True, "chatcmpl-abc", "m", 7), asked)
    whole = Response.model_validate(shape.full([Choice(0, text="kalo", finish_reason="stop")], 5, 1))
    assert whole.top_logprobs == 3
    [created, *_] = shape.events(shape.chunk("", None, first=True))
    assert json.loads(created.decode().split("\n")[1].removeprefix("data: "))["response"]["top_logprobs"] == 3


def test_prompt_cache_key_and_safety_identifier_are_echoed_whole_and_streamed() -> None:
    """OpenAI's Response carries them as asked (None where not): they were taken and dropped
    (prompt_cache_retention still was, after the other two were echoed)."""
    from openai.types.responses import Response

    asked = ResponsesBody(
        input="kalo", prompt_cache_key="chat-7", safety_identifier="user-9f", prompt_cache_retention="24h"
    )
    shape = ResponsesShape.of(Shape(True, "chatcmpl-abc", "m", 7), asked)
    whole = Response.model_validate(shape.full([Choice(0, text="kalo", finish_reason="stop")], 5, 1))
    assert (whole.prompt_cache_key, whole.safety_identifier) == ("chat-7", "user-9f")
    assert whole.prompt_cache_retention == "24h"
    [created, *_] = shape.events(shape.chunk("", None, first=True))
    event = json.loads(created.decode().split("\n")[1].removeprefix("data: "))
    assert (event["response"]["prompt_cache_key"], event["response"]["safety_identifier"]) == ("chat-7", "user-9f")
    plain = ResponsesShape.of(Shape(True, "chatcmpl-abc", "m", 7), ResponsesBody(input="kalo"))
    unasked = plain.full([Choice(0, text="kalo", finish_reason="stop")], 5, 1)
    assert (unasked["prompt_cache_key"], unasked["safety_identifier"]) == (None, None)
