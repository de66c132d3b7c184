"""A chat's reasoning read apart from its answer (vLLM's deepseek_r1 and qwen3 reasoning parsers):
one reading for a whole output and a stream, however its tokens split the tags."""

from __future__ import annotations

import json
import random
from typing import Any

import msgspec
import pytest

from dlora.services.gateway.completion_shape import Choice, Shape
from dlora.services.gateway.openai import ChatBody
from dlora.services.gateway.reasoning import ReasoningParser, ReasoningTokens, split, thinking
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
    # a later <think> is taken off, the text before it kept as reasoning: vLLM's stream (was left in)
    ("deepseek_r1", "x<think>y</think>z", "xy", "z"),
    ("deepseek_r1", "<think>a<think>b</think>c", "ab", "c"),
    ("deepseek_r1", "a<think>b<thi", "ab<thi", None),  # cut there: a part of a tag is text
    ("deepseek_r1", "<thinker</think>z", "<thinker", "z"),
    ("deepseek_r1", "r</think>c</think>d", "r", "c</think>d"),  # the first close ends it
    # once the reasoning ended, literal tags are content (vLLM #48971: its Olmo3 stream went back to reasoning)
    ("qwen3", "r</think>c<think>d</think>e", "r", "c<think>d</think>e"),
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


def test_whitespace_before_a_possible_think_tag_is_not_scanned_again_at_each_token() -> None:
    """An output of whitespace (a degenerate model's newlines) waiting for ``<think>``: the text
    each token scans stays empty, where it grew by a token each time (quadratic: 100,000
    spaces took ~5 s of the gateway's loop). Given out as before, reasoning at the end."""
    parser = ReasoningParser("deepseek_r1")
    for piece in [" ", "\n", "\t "] * 2000:
        assert parser.feed(piece) == ("", "") and parser._held == ""
    assert parser.finish() == (" \n\t " * 2000, "")
    parser = ReasoningParser("deepseek_r1")
    assert [parser.feed(p) for p in ["\n", " <th", "ink>a", "</think>b"]] == [("", "")] * 2 + [("a", ""), ("", "b")]
    parser = ReasoningParser("deepseek_r1")
    assert [parser.feed(p) for p in ["\n", " <th", " x"]] == [("", ""), ("", ""), ("\n <th x", "")]


@pytest.mark.parametrize(("open_ids", "close_ids"), [([1], [2]), ([1, 3], [2, 3, 4]), ([1, 3, 4], [1, 2, 3, 4])])
def test_reasoning_tokens_are_counted_however_the_chunks_split(open_ids: list[int], close_ids: list[int]) -> None:
    """usage's reasoning_tokens: past a ``<think>`` that opens the output (else from the first
    token) up to the first ``</think>`` (else the last), the tags not counted; tags of several
    tokens split across chunks alike."""
    o, c = open_ids, close_ids
    cases = [
        (o + [5, 6, 7] + c + [8, 9], 3),
        ([5, 6] + c + [8], 2),  # R1's later templates: <think> in the prompt
        (o + [5, 6, 7], 3),  # cut while thinking
        ([5, 5] + o + [6] + c + o + [7] + c, 3),  # a later <think> taken off, what precedes it kept (the text's)
        (c + [8, 9], 0),
        ([], 0),
    ]
    rng = random.Random(5)
    for ids, count in cases:
        for _ in range(20):
            cuts = sorted(rng.sample(range(len(ids) + 1), rng.randint(0, len(ids))))
            counter = ReasoningTokens(o, c)
            for a, b in zip([0, *cuts], [*cuts, len(ids)], strict=True):
                counter.feed(ids[a:b])
            assert counter.count(done=True) == count, (ids, cuts)
        off = ReasoningTokens(o, c, thinking=False)  # the output not read for reasoning: none
        off.feed(ids)
        assert off.count(done=True) == 0
    counter = ReasoningTokens(o, c)  # a part of </think> is not counted until it is known not to be one
    counter.feed(o + [5] + c[:-1], "<think>x")  # (with its text: until it comes, how the output opens is not known)
    assert (counter.count(), counter.count(done=True)) == (1, len(c))  # (cut there: reasoning, as its text)
    counter.feed(c[-1:])
    assert counter.count() == counter.count(done=True) == 1


def test_qwen3_without_thinking_is_all_content() -> None:
    """enable_thinking false: the template closed the think block in the prompt (vLLM routes the
    whole output as content); deepseek_r1 has no such switch."""
    assert not thinking("qwen3", {"enable_thinking": False})
    assert thinking("qwen3", {"enable_thinking": True}) and thinking("qwen3", None)
    assert thinking("deepseek_r1", {"enable_thinking": False})
    assert split("qwen3", "plain answer", thinking=False) == (None, "plain answer")
    assert split("qwen3", "", thinking=False) == (None, None)
    assert streamed("qwen3", ["plain", "</think>x"], on=False)[:2] == ("", "plain</think>x")


def test_deepseek_v3_reads_reasoning_only_where_the_template_was_told_to_think() -> None:
    """vLLM's deepseek_v3 parser (DeepSeek V3.1's hybrid templates): R1's reading where
    chat_template_kwargs say ``thinking`` or ``enable_thinking`` (truthy, as vLLM's ``bool()``),
    else the whole output is content, reasoning null. dlora had no such parser: R1's read a
    non-thinking V3.1 answer as all reasoning, its content null."""
    assert not thinking("deepseek_v3", None) and not thinking("deepseek_v3", {"thinking": False})
    assert thinking("deepseek_v3", {"thinking": True}) and thinking("deepseek_v3", {"enable_thinking": True})
    assert GatewaySettings(model="m", reasoning_parser="deepseek_v3").check() == []
    shape = Shape(True, "chatcmpl-x", "m", 0, reasoning_parser="deepseek_v3", thinking=False)
    [whole] = shape.full([Choice(0, text="Hello!", finish_reason="stop")], 1, 1)["choices"]
    assert whole["message"] == {"role": "assistant", "content": "Hello!", "refusal": None, "reasoning": None}
    shape = Shape(True, "chatcmpl-x", "m", 0, reasoning_parser="deepseek_v3")
    [whole] = shape.full([Choice(0, text="hm</think>Hello!", finish_reason="stop")], 1, 1)["choices"]
    assert whole["message"] == {"role": "assistant", "content": "Hello!", "refusal": None, "reasoning": "hm"}


def test_a_reasoning_parser_must_be_one_dlora_has() -> None:
    problems = GatewaySettings(model="m", reasoning_parser="olmo3").check()
    assert [p[0] for p in problems] == ["reasoning_parser"] and "deepseek_r1" in problems[0][2]
    assert GatewaySettings(model="m", reasoning_parser="qwen3").check() == []
    assert GatewaySettings(model="m").reasoning_parser == ""  # off unless set, as vLLM's


def _stream(shape: Shape, text: str, cuts: list[int], finish: str = "stop") -> list[dict[str, Any]]:
    """The events of one choice whose tokens are ``text`` cut at ``cuts``, as sent (silent ones not)."""
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    events = [shape.chunk("", None, first=True)] + [shape.chunk(p, None) for p in pieces]
    events.append(shape.chunk("", finish))
    return [e["choices"][0] for e in events if not shape.silent(e)]


THOUGHT_CALL = '<think>I could call <tool_call>{"name": "f", "arguments": {}}</tool_call></think>Sure.'


@pytest.mark.parametrize("tool_parser", ["", "hermes"])
def test_a_chat_answers_reasoning_apart_alike_whole_and_streamed(tool_parser: str) -> None:
    """The message's reasoning and content (null where none, vLLM's), and a stream whose deltas
    carry the reasoning then the content, joined to the same; a hermes call written while thinking
    is reasoning, not a call."""
    rng = random.Random(3)
    texts = [THOUGHT_CALL, "r</think>", "no close", 'ok</think>A<tool_call>{"name": "g", "arguments": {}}</tool_call>']
    for text in texts:
        shape = Shape(True, "chatcmpl-x", "m", 0, reasoning_parser="qwen3", tool_parser=tool_parser)
        [whole] = shape.full([Choice(0, text=text, finish_reason="stop")], 1, 1)["choices"]
        message = whole["message"]
        for _ in range(30):
            cuts = sorted(rng.sample(range(len(text) + 1), rng.randint(0, 8)))
            shape = Shape(True, "chatcmpl-x", "m", 0, reasoning_parser="qwen3", tool_parser=tool_parser)
            events = _stream(shape, text, cuts)
            deltas = [e["delta"] for e in events]
            reasoning = "".join(d.get("reasoning", "") for d in deltas)
            assert reasoning == message["reasoning"]
            assert "".join(d.get("content") or "" for d in deltas) == (message["content"] or "")
            calls = [c["function"]["name"] for d in deltas for c in d.get("tool_calls", [])]
            assert calls == [c["function"]["name"] for c in message.get("tool_calls", [])]
            assert events[-1]["finish_reason"] == whole["finish_reason"]
            said = [("reasoning" in d, bool(d.get("content"))) for d in deltas]
            last_reasoning = max((i for i, (r, _) in enumerate(said) if r), default=-1)
            assert not any(c for _, c in said[:last_reasoning])  # reasoning first, then content
    shape = Shape(True, "chatcmpl-x", "m", 0, reasoning_parser="qwen3", tool_parser="hermes")
    [whole] = shape.full([Choice(0, text=THOUGHT_CALL, finish_reason="stop")], 1, 1)["choices"]
    assert whole["message"] == {
        "role": "assistant",
        "content": "Sure.",
        "refusal": None,
        "reasoning": THOUGHT_CALL[7:-13],
    }
    assert whole["finish_reason"] == "stop"
    shape = Shape(True, "chatcmpl-x", "m", 0, reasoning_parser="deepseek_r1", thinking=True)
    [whole] = shape.full([Choice(0, text="cut while thinking", finish_reason="length")], 1, 1)["choices"]
    assert whole["message"] == {
        "role": "assistant",
        "content": None,
        "refusal": None,
        "reasoning": "cut while thinking",
    }


def test_without_a_reasoning_parser_the_answer_is_as_before() -> None:
    shape = Shape(True, "chatcmpl-x", "m", 0)
    [whole] = shape.full([Choice(0, text="<think>a</think>b", finish_reason="stop")], 1, 1)["choices"]
    assert whole["message"] == {"role": "assistant", "content": "<think>a</think>b", "refusal": None}
    assert "reasoning" not in shape.chunk("<think>a</think>b", None)["choices"][0]["delta"]


def test_each_choice_of_a_stream_has_its_own_reading() -> None:
    """n > 1: the choices' tokens interleave; one's </think> ends no other's reasoning."""
    shape = Shape(True, "chatcmpl-x", "m", 0, reasoning_parser="deepseek_r1")
    deltas: dict[int, list[dict[str, Any]]] = {0: [], 1: []}
    for index, text in [(0, "a</th"), (1, "b"), (0, "ink>A"), (1, "</think>B"), (0, ""), (1, "")]:
        deltas[index].append(shape.chunk(text, None, index=index)["choices"][0]["delta"])
    for index in (0, 1):
        deltas[index].append(shape.chunk("", "stop", index=index)["choices"][0]["delta"])
    assert [
        ("".join(d.get("reasoning", "") for d in deltas[i]), "".join(d.get("content", "") for d in deltas[i]))
        for i in (0, 1)
    ] == [("a", "A"), ("b", "B")]


def test_include_reasoning_false_answers_no_reasoning_nor_what_would_show_it() -> None:
    """vLLM's include_reasoning: false: reasoning null, and no logprobs or token ids, whose tokens
    would show it (the field was refused as unknown)."""
    shape = Shape(True, "chatcmpl-x", "m", 0, reasoning_parser="deepseek_r1", include_reasoning=False)
    part = {"content": [{"token": "a", "logprob": -1.0}]}
    [whole] = shape.full([Choice(0, text="a</think>b", finish_reason="stop", logprobs=part)], 1, 1)["choices"]
    assert whole["message"] == {"role": "assistant", "content": "b", "refusal": None, "reasoning": None}
    assert whole["logprobs"] is None
    choices = [shape.chunk(t, None, logprobs=part, token_ids=[1])["choices"][0] for t in ("a</think>", "b")]
    assert [c["delta"] for c in choices] == [{"content": ""}, {"content": "b"}]
    assert all(c["logprobs"] is None and "token_ids" not in c for c in choices)
    body = msgspec.json.decode(b'{"messages": [], "include_reasoning": false}', type=ChatBody)
    assert body.include_reasoning is False


def test_include_reasoning_false_sends_no_event_for_a_thinking_token() -> None:
    """vLLM's stream skips a delta left empty once its reasoning is dropped (``parse_delta``): no
    event for a hidden thinking token. dlora sent each as an empty content delta (a client timing
    tokens, or counting events, saw the hidden reasoning's length)."""
    shape = Shape(True, "chatcmpl-x", "m", 0, reasoning_parser="deepseek_r1", include_reasoning=False)
    events = _stream(shape, "hmm, let me think</think>Hi!", [3, 8, 17, 25])
    assert [e["delta"] for e in events] == [{"role": "assistant", "content": ""}, {"content": "Hi!"}, {}]
    assert events[-1]["finish_reason"] == "stop"
    shown = Shape(True, "chatcmpl-x", "m", 0, reasoning_parser="deepseek_r1")
    assert len(_stream(shown, "hmm, let me think</think>Hi!", [3, 8, 17, 25])) == 7  # one per token, as before


def test_include_reasoning_false_answers_a_whole_chat_without_its_token_ids_as_its_stream() -> None:
    """return_token_ids beside include_reasoning false: the stream left the ids out, the whole
    answer gave them, and with them the reasoning it had just hidden."""
    shape = Shape(True, "chatcmpl-x", "m", 0, reasoning_parser="deepseek_r1", include_reasoning=False)
    done = Choice(0, text="a</think>b", finish_reason="stop", token_ids=[1, 2, 3], prompt_token_ids=[7])
    [whole] = shape.full([done], 1, 3)["choices"]
    assert "token_ids" not in whole and whole["message"]["reasoning"] is None
    shown = Shape(True, "chatcmpl-x", "m", 0, reasoning_parser="deepseek_r1")
    assert shown.full([done], 1, 3)["choices"][0]["token_ids"] == [1, 2, 3]  # included: as asked


def test_a_required_or_named_call_is_read_from_the_content_after_the_reasoning() -> None:
    """With a reasoning parser a structured output's grammar binds only what follows ``</think>``:
    tool_choice's calls (required: a list; named: the arguments) are read from that content, whole
    and streamed alike, the thinking answered as reasoning."""
    text = 'plan: call f</think>[{"name": "f", "parameters": {"x": 1}}]'
    for kind, forced in (("required", None), ("named", "f")):
        shape = Shape(True, "chatcmpl-x", "m", 0, tool=forced, tools_required=forced is None, reasoning_parser="qwen3")
        [whole] = shape.full([Choice(0, text=text, finish_reason="stop")], 1, 1)["choices"]
        message = whole["message"]
        assert message["reasoning"] == "plan: call f" and message["content"] is None, kind
        [call] = message["tool_calls"]
        want = '{"x": 1}' if kind == "required" else '[{"name": "f", "parameters": {"x": 1}}]'
        assert (call["function"]["name"], json.loads(call["function"]["arguments"])) == ("f", json.loads(want))
        shape = Shape(True, "chatcmpl-x", "m", 0, tool=forced, tools_required=forced is None, reasoning_parser="qwen3")
        events = _stream(shape, text, [5, 20, 30])
        assert "".join(e["delta"].get("reasoning", "") for e in events) == "plan: call f"
        args = "".join(c["function"]["arguments"] for e in events for c in e["delta"].get("tool_calls", []))
        assert json.loads(args) == json.loads(want), kind


def test_a_named_call_opens_once_the_reasoning_has_ended_and_not_at_all_while_thinking() -> None:
    """vLLM streams a forced call's reasoning alone and opens the call (id, name) once the
    reasoning has ended; dlora opened it in the first event and sent an empty arguments piece
    beside every reasoning delta, and a whole output cut while thinking answered a call of f with
    arguments "" the model never began (found against dlora up: streamed and whole disagreed)."""
    for text, finish, want in (('plan</think>{"x": 1}', "stop", '{"x": 1}'), ("cut while thinking", "length", None)):
        shape = Shape(True, "chatcmpl-x", "m", 0, tool="f", reasoning_parser="deepseek_r1")
        [whole] = shape.full([Choice(0, text=text, finish_reason=finish)], 1, 1)["choices"]
        calls = whole["message"].get("tool_calls", [])
        assert [c["function"]["arguments"] for c in calls] == ([want] if want else []), whole
        shape = Shape(True, "chatcmpl-x", "m", 0, tool="f", reasoning_parser="deepseek_r1")
        events = _stream(shape, text, [2, 4, 8, 12])
        assert not any("tool_calls" in e["delta"] for e in events if "reasoning" in e["delta"]), events
        opened = [c for e in events for c in e["delta"].get("tool_calls", []) if "id" in c]
        assert len(opened) == (1 if want else 0) and all(c["function"]["name"] == "f" for c in opened)
        args = "".join(c["function"]["arguments"] for e in events for c in e["delta"].get("tool_calls", []))
        assert args == (want or "")


@pytest.mark.parametrize(("open_ids", "close_ids"), [([1], [2]), ([1, 3], [2, 3, 4]), ([1, 3, 4], [1, 2, 3, 4])])
def test_reasoning_tokens_are_the_reasoning_text_s_and_never_go_down(open_ids: list[int], close_ids: list[int]) -> None:
    """The count follows the text parser: a ``<think>`` later in the reasoning is taken off its
    text, the text before it kept (R1's later templates open ``<think>`` in the prompt), so the
    tokens before it are reasoning too; a ``<think>`` past the ``</think>`` is content. Was: the
    start moved past such a tag, a stream's continuous usage said 2 reasoning tokens, then 0; and a
    ``<think>`` after ``</think>`` in the same chunk made the whole count 0."""
    o, c = open_ids, close_ids
    cases = [
        ([5, 5] + o + [6] + c + [7], 3),  # the later tag taken off, as the text's "55 6"
        ([5, 6, 7] + c + o + [8], 3),  # a <think> in the content is not the reasoning's start
        (o + [5] + o + [6] + c, 2),
        ([5, 6] + c, 2),
    ]
    rng = random.Random(7)
    for ids, count in cases:
        for _ in range(20):
            cuts = sorted(rng.sample(range(len(ids) + 1), rng.randint(0, len(ids))))
            counter, said = ReasoningTokens(o, c), []
            for a, b in zip([0, *cuts], [*cuts, len(ids)], strict=True):
                counter.feed(ids[a:b])
                said.append(counter.count())
            assert said == sorted(said) and counter.count(done=True) == count, (ids, cuts, said)
    counter = ReasoningTokens(o, c)  # whitespace before the opening <think> is not reasoning (the text's)
    for ids, text in [([9], "\n"), (o, "<think>"), ([5], "a"), (c, "</think>")]:
        counter.feed(ids, text)
    assert counter.count(done=True) == 1


def test_whitespace_before_the_opening_think_is_not_counted_where_the_text_lags_its_tokens() -> None:
    """A request with a stop string has its text held back (the longest stop's length less one)
    while its tokens go out: the chunks' text lags their ids. The whitespace before an opening
    ``<think>`` was counted as reasoning there (the tag was looked for only in the last ids), so
    reasoning_tokens said one more with ``stop`` set than without. Each chunk's text comes here
    ``lag`` chunks after its ids, the rest with the last; the count never goes down meanwhile."""
    o, c = [100, 101], [102, 103]
    ids = [[9], o, [5], [6], c, [7]]  # "\n" "<think>" "a" "b" "</think>" "ok"
    texts = ["\n", "<think>", "a", "b", "</think>", "ok"]
    for lag in range(len(ids)):
        counter, sent, said = ReasoningTokens(o, c), 0, []
        for k, chunk in enumerate(ids):
            upto = len(ids) if k == len(ids) - 1 else max(0, k - lag + 1)
            counter.feed(chunk, "".join(texts[sent:upto]))
            sent = upto
            said.append(counter.count())
        assert counter.count(done=True) == 2 and said == sorted(said), (lag, said)
