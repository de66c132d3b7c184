"""The granite reasoning parser (vLLM's granite_reasoning_parser): Granite 3.2/3.3 mark their
reasoning with plain text, "Here is my thought process:" ... "Here is my response:", not tags."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import BaseModel

from dlora.services.gateway.completion_shape import Choice, Shape
from dlora.services.gateway.reasoning import ReasoningParser, split
from dlora.services.gateway.served_model import ServedModel
from dlora.services.gateway.settings import GatewaySettings
from tests.unit.test_gateway_shaping import served, shape

__all__ = ["served"]  # the fixture, shared

THOUGHT, RESPONSE = "Here is my thought process:", "Here is my response:"
CASES = [
    (f"{THOUGHT}\nThe user greets.\n{RESPONSE}\nHello!", "\nThe user greets.\n", "\nHello!"),
    ("Here's my thought process: a Here's my response: b", " a ", " b"),  # (quantized Granites write so)
    (f"\n{THOUGHT}x{RESPONSE}", "x", None),  # whitespace before the marker; nothing after the response's
    (f"{THOUGHT} cut while thinking, Here is my", " cut while thinking, Here is my", None),
    (f"{THOUGHT}a{RESPONSE}b{RESPONSE}c", "a", f"b{RESPONSE}c"),  # the first response marker ends it
    ("Hello! No thinking asked.", None, "Hello! No thinking asked."),  # no marker: all content, reasoning null
    ("Here is my answer: 4.", None, "Here is my answer: 4."),
    ("Here is my", None, "Here is my"),  # a part of the marker, cut there: content
    (f"So: {THOUGHT} x", None, f"So: {THOUGHT} x"),  # not at the start: content, as vLLM's stream
    ("", None, None),
]


def _reasoning(said: BaseModel) -> Any:
    """vLLM's ``reasoning``, a field the openai package does not know and keeps as an extra."""
    return (said.model_extra or {}).get("reasoning")


def streamed(text: str, cuts: list[int]) -> tuple[str, str]:
    parser = ReasoningParser("granite")
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    said = [parser.feed(piece) for piece in pieces] + [parser.finish()]
    return "".join(r for r, _ in said), "".join(c for _, c in said)


@pytest.mark.parametrize(("text", "reasoning", "content"), CASES)
def test_granite_splits_at_its_markers_alike_whole_and_streamed(text: str, reasoning: str, content: str) -> None:
    """vLLM's reading (its stream's where its whole reading differs: an output cut before the
    response marker is reasoning), one for the whole output and a stream split anywhere."""
    assert split("granite", text) == (reasoning, content)
    rng = random.Random(text)
    for _ in range(100):
        cuts = sorted(rng.sample(range(len(text) + 1), rng.randint(0, min(8, len(text) + 1))))
        assert streamed(text, cuts) == (reasoning or "", content or ""), cuts


def test_granite_answers_as_the_openai_types_read_alike_whole_and_streamed() -> None:
    """A chat beside the granite parser and a hermes tool parser: the message's reasoning and
    content, the call after the response marker, the same joined from the stream's deltas."""
    call = f'{THOUGHT} I need the weather.\n{RESPONSE}\n<tool_call>{{"name": "w", "arguments": {{}}}}</tool_call>'
    rng = random.Random(5)
    for text in [call, CASES[0][0], "Plain answer."]:
        made = Shape(True, "chatcmpl-x", "m", 0, reasoning_parser="granite", tool_parser="hermes")
        whole = ChatCompletion.model_validate(made.full([Choice(0, text=text, finish_reason="stop")], 1, 1))
        message = whole.choices[0].message
        for _ in range(20):
            cuts = sorted(rng.sample(range(len(text) + 1), rng.randint(0, 8)))
            made = Shape(True, "chatcmpl-x", "m", 0, reasoning_parser="granite", tool_parser="hermes")
            pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
            events: list[dict[str, Any]] = [made.chunk("", None, first=True)]
            events += [made.chunk(p, None) for p in pieces] + [made.chunk("", "stop")]
            chunks = [ChatCompletionChunk.model_validate(e) for e in events if not made.silent(e)]
            deltas = [c.choices[0].delta for c in chunks]
            assert "".join(_reasoning(d) or "" for d in deltas) == (_reasoning(message) or "")
            assert "".join(d.content or "" for d in deltas) == (message.content or "")
            names = [c.function.name for d in deltas for c in d.tool_calls or [] if c.function]
            assert names == [c.function.name for c in message.tool_calls or []]
            assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert names == [] and message.content == "Plain answer." and _reasoning(message) is None


def test_granite_is_served_and_a_structured_output_beside_it_binds_from_the_first_token(served: ServedModel) -> None:
    """Its markers are text of several tokens no grammar can wait for, nor a usage count between:
    a structured output binds the whole output (read as content), and no reasoning_tokens are said."""
    assert GatewaySettings(model="m", reasoning_parser="granite").check() == []
    granite = dataclasses.replace(served, reasoning_parser="granite")
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    job = shape(granite, body | {"response_format": {"type": "json_object"}}, chat=True)
    [choice] = job.choices
    assert choice.request is not None and choice.request.params.structured_outputs()
    assert choice.request.params.structured_after_token_ids == [] and job.shape.thinking is False
    job = shape(granite, body, chat=True)
    assert (job.shape.reasoning_parser, job.shape.thinking, job.reasoning_tags) == ("granite", True, None)
