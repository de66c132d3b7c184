"""A chat's reasoning read apart from its answer (vLLM's deepseek_r1 and qwen3 reasoning parsers):
one reading for a whole output and a stream, however its tokens split the tags."""

from __future__ import annotations

import random

import pytest

from dlora.services.gateway.reasoning import ReasoningParser, split, thinking
from dlora.services.gateway.settings import GatewaySettings


def streamed(kind: str, pieces: list[str], on: bool = True) -> tuple[str, str, list[tuple[str, str]]]:
    """Reasoning and content joined, and what was given out at each piece (then at the finish)."""
    parser = ReasoningParser(kind, on)
    said = [parser.feed(piece) for piece in pieces] + [parser.finish()]
    return "".join(r for r, _ in said), "".join(c for _, c in said), said


CASES = [
    # R1's later templates open <think> in the prompt: only </think> in the output
    ("deepseek_r1", "I should greet.</think>Hello!", "I should greet.", "Hello!"),
    ("deepseek_r1", "<think>\nI should greet.\n</think>\n\nHello!", "\nI should greet.\n", "\n\nHello!"),
    ("deepseek_r1", "\n<think>x</think>y", "x", "y"),  # the tag after whitespace opens the output all the same
    ("deepseek_r1", "still thinking when cut", "still thinking when cut", None),  # no </think>: all reasoning
    ("deepseek_r1", "a</think>", "a", None),  # nothing after it: content null (vLLM's)
    ("deepseek_r1", "", "", None),
    ("deepseek_r1", "a < b, </thin is no tag</think>ok", "a < b, </thin is no tag", "ok"),
    ("deepseek_r1", "x<think>y</think>z", "x<think>y", "z"),  # a later <think> is reasoning text
    ("deepseek_r1", "<thinker</think>z", "<thinker", "z"),
    ("deepseek_r1", "r</think>c</think>d", "r", "c</think>d"),  # the first close ends it
    ("qwen3", "<think>\nhmm\n</think>\n\nAnswer.", "\nhmm\n", "\n\nAnswer."),
    ("qwen3", "<think>\n\n</think>\n\nAnswer.", "\n\n", "\n\nAnswer."),
    ("qwen3", "Qwen3.5 opened it in the prompt</think>A", "Qwen3.5 opened it in the prompt", "A"),
    ("qwen3", "<thi", "<thi", None),  # a tag begun and cut: reasoning text
    # a hermes call written while thinking is reasoning: the tool parser reads the content only
    ("qwen3", '<think><tool_call>{"name": "f"}</tool_call></think>ok', '<tool_call>{"name": "f"}</tool_call>', "ok"),
]


@pytest.mark.parametrize(("kind", "text", "reasoning", "content"), CASES)
def test_a_whole_output_splits_as_vllm_reads_it(kind: str, text: str, reasoning: str, content: str | None) -> None:
    assert split(kind, text) == (reasoning, content)
    r, c, _ = streamed(kind, list(text))  # a character at a time
    assert (r, c or None) == (reasoning, content)


def test_a_stream_split_anywhere_reads_as_the_whole_output() -> None:
    """Fuzz: every case cut at random places (tags split across tokens) joins to the whole reading."""
    rng = random.Random(7)
    for kind, text, reasoning, content in CASES:
        for _ in range(200):
            cuts = sorted(rng.sample(range(len(text) + 1), rng.randint(0, min(6, len(text) + 1))))
            pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
            r, c, _ = streamed(kind, pieces)
            assert (r, c or None) == (reasoning, content), pieces


def test_reasoning_goes_out_as_it_comes_and_only_a_possible_tag_is_held_back() -> None:
    _, _, said = streamed("deepseek_r1", ["<th", "ink>", "Let me", " see </th", "ink", ">", "Hi", " there"])
    held = [("", ""), ("", "")]
    assert said == [*held, ("Let me", ""), (" see ", ""), *held, ("", "Hi"), ("", " there"), ("", "")]


def test_qwen3_without_thinking_is_all_content() -> None:
    """enable_thinking false: the template closed the think block in the prompt (vLLM routes the
    whole output as content); deepseek_r1 has no such switch."""
    assert not thinking("qwen3", {"enable_thinking": False})
    assert thinking("qwen3", {"enable_thinking": True}) and thinking("qwen3", None)
    assert thinking("deepseek_r1", {"enable_thinking": False})
    assert split("qwen3", "plain answer", thinking=False) == (None, "plain answer")
    assert split("qwen3", "", thinking=False) == (None, None)
    assert streamed("qwen3", ["plain", "</think>x"], on=False)[:2] == ("", "plain</think>x")


def test_a_reasoning_parser_must_be_one_dlora_has() -> None:
    problems = GatewaySettings(model="m", reasoning_parser="granite").check()
    assert [p[0] for p in problems] == ["reasoning_parser"] and "deepseek_r1" in problems[0][2]
    assert GatewaySettings(model="m", reasoning_parser="qwen3").check() == []
    assert GatewaySettings(model="m").reasoning_parser == ""  # off unless set, as vLLM's
