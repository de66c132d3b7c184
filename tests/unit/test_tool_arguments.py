"""A call whose arguments are no JSON object (a list, a number, a string that is no JSON object):
a call all the same, its arguments encoded as JSON, as vLLM's and SGLang's parsers give it; whole,
streamed, and through the chat reply's shape."""

from __future__ import annotations

import json

import pytest

from dlora.services.gateway.completion_shape import Choice, Shape
from tests.unit.tool_cases import read

OUTPUTS = [
    ("hermes", '<tool_call>{"name": "add", "arguments": [1, 2]}</tool_call>', [1, 2]),
    ("hermes", '<tool_call>{"name": "add", "arguments": 3}</tool_call>', 3),
    ("hermes", '<tool_call>{"name": "say", "arguments": "hello there"}</tool_call>', "hello there"),
    ("llama3_json", '{"name": "add", "parameters": [1, 2]}', [1, 2]),
    ("llama3_json", '<|python_tag|>{"name": "ok", "parameters": true}', True),
    ("mistral", '[TOOL_CALLS] [{"name": "add", "arguments": [1, 2]}]', [1, 2]),
    ("mistral", '[TOOL_CALLS] [{"name": "say", "arguments": "hi"}]', "hi"),
]


@pytest.mark.parametrize(("kind", "text", "arguments"), OUTPUTS)
def test_arguments_that_are_no_object_make_a_call_all_the_same(kind: str, text: str, arguments: object) -> None:
    """The closing notes' left item: such a call came back as the reply's text, its markup
    (``<tool_call>``, ``[TOOL_CALLS]``) shown to the user and no ``tool_calls`` for the client's
    agent loop to answer; vLLM gives it as a call with ``json.dumps`` of what it holds."""
    name = json.loads(text[text.index("{") :].rstrip("]").removesuffix("</tool_call>"))["name"]
    expected = ("", [(name, json.dumps(arguments))])
    assert read(kind, [text])[:2] == expected
    assert read(kind, list(text))[:2] == expected


def test_such_a_call_answers_as_tool_calls() -> None:
    shape = Shape(chat=True, request_id="chatcmpl-a", model="m", created=0, tool_parser="hermes")
    [whole] = shape.full([Choice(0, text=OUTPUTS[0][1], finish_reason="stop")], 3, 9)["choices"]
    assert whole["finish_reason"] == "tool_calls" and whole["message"]["content"] is None
    [call] = whole["message"]["tool_calls"]
    assert call["function"] == {"name": "add", "arguments": "[1, 2]"}
