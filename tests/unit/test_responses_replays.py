"""Public vLLM bug reports about the Responses API's answer replayed against the pure shape that
makes it (services/gateway/responses_shape.py): each test names the report and checks the answer
OpenAI's reference gives, each event read by the openai package's own strict types
(``test_responses_shape._events``). Those that need the store or a model are replayed through the
real stack in tests/integration/test_responses_replays.py."""

from __future__ import annotations

from openai.types.responses import Response

from dlora.services.gateway.openai import Choice
from tests.unit.test_responses_shape import _events, _shape


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
