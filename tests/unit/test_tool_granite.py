"""tool_call_parser "granite" (vLLM's, for Granite 3.0 and 3.1): the output a JSON array of calls
after ``<|tool_call|>`` (3.0) or ``<tool_call>`` (3.1), whole and streamed alike."""

from __future__ import annotations

import random

import pytest

from dlora.services.gateway.completion_shape import Choice, Shape
from dlora.services.gateway.settings import GatewaySettings
from dlora.services.gateway.tool_parsers import ToolParser
from tests.unit.tool_cases import read

ARRAY = '[{"name": "get_weather", "arguments": {"city": "SF"}}, {"name": "get_date", "arguments": {}}]'
CALLS = [("get_weather", '{"city": "SF"}'), ("get_date", "{}")]


@pytest.mark.parametrize(
    ("text", "content", "calls"),
    [
        ("<|tool_call|>" + ARRAY, "", CALLS),  # Granite 3.0's special token
        ("<tool_call>" + ARRAY, "", CALLS),  # 3.1's string
        ("\n <|tool_call|> \n<tool_call>\n" + ARRAY + "\n", "", CALLS),  # both, whitespace around
        (ARRAY, "", CALLS),  # neither: vLLM's reads the array alike
        ("<|tool_call|>" + ARRAY + " Done.", "", CALLS),  # after the array: not content
        ('<|tool_call|>[{"name": "f", "arguments": "{\\"x\\": 1}"}]', "", [("f", '{"x": 1}')]),  # JSON text
        # cut short: the calls it finished; none, and it is text as written
        ("<|tool_call|>" + ARRAY[: ARRAY.index("get_date") + 3], "", CALLS[:1]),
        ('<|tool_call|>[{"name": "get_we', '<|tool_call|>[{"name": "get_we', []),
        ("<|tool_call|>", "<|tool_call|>", []),
        # not calls: text as written, the tag too
        ("The weather is fine.", "The weather is fine.", []),
        ("Sure. <|tool_call|>" + ARRAY, "Sure. <|tool_call|>" + ARRAY, []),  # vLLM's: only an output that opens so
        ("<|tool_call|>[1, 2]", "<|tool_call|>[1, 2]", []),
        # an empty array makes no call: text as written, as vLLM PR #53297 answers it (it was
        # null content, an empty turn); with or without a tag, and text after it
        ("<|tool_call|>[]", "<|tool_call|>[]", []),
        ("<tool_call> [ ]\n", "<tool_call> [ ]\n", []),
        ("[]", "[]", []),
        ("<|tool_call|>[] None fits.", "<|tool_call|>[] None fits.", []),
        ('[{"city": "SF"}] is the list.', '[{"city": "SF"}] is the list.', []),
        ("<tool_call><|tool_call|>" + ARRAY, "<tool_call><|tool_call|>" + ARRAY, []),  # (3.0's first, as vLLM's)
        ("<|tool_", "<|tool_", []),
        # an item after a call that is none is passed over
        ('[{"name": "a", "arguments": {}}, {"x": 1}, {"name": "b", "arguments": {}}]', "", [("a", "{}"), ("b", "{}")]),
    ],
)
def test_a_whole_granite_output_and_its_stream_read_alike(
    text: str, content: str, calls: list[tuple[str, str]]
) -> None:
    assert read("granite", [text])[:2] == (content, calls)
    assert read("granite", list(text))[:2] == (content, calls)


def test_text_goes_out_once_its_start_says_so_and_each_call_as_its_item_ends() -> None:
    said = read("granite", ["<", "|tool", "_call|>", " Sure", ", it is.", " Bye"])[2]
    assert said == ["", "", "", "<|tool_call|> Sure", ", it is.", " Bye", ""]
    parser = ToolParser("granite")
    assert parser.feed("<|tool_call|>[" + ARRAY[1:50]) == ("", [])
    assert parser.feed(ARRAY[50:60]) == ("", [(0, *CALLS[0])])
    assert parser.feed(ARRAY[60:]) == ("", [(1, *CALLS[1])])
    assert parser.feed(" more") == ("", []) and parser.finish() == ("", [])


def test_granite_calls_answer_as_tool_calls_whole_and_streamed() -> None:
    shape = Shape(chat=True, request_id="chatcmpl-g", model="m", created=0, tool_parser="granite")
    text = "<|tool_call|>" + ARRAY
    [whole] = shape.full([Choice(0, text=text, finish_reason="stop")], 3, 9)["choices"]
    assert whole["finish_reason"] == "tool_calls" and whole["message"]["content"] is None
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in whole["message"]["tool_calls"]] == CALLS
    events = [shape.chunk("", None, first=True)["choices"][0]]
    events += [shape.chunk(text[i : i + 4], None)["choices"][0] for i in range(0, len(text), 4)]
    events.append(shape.chunk("", "stop")["choices"][0])
    calls = [c for e in events for c in e["delta"].get("tool_calls", [])]
    assert [{k: v for k, v in c.items() if k != "index"} for c in calls] == whole["message"]["tool_calls"]
    assert [c["index"] for c in calls] == [0, 1] and events[-1]["finish_reason"] == "tool_calls"
    assert GatewaySettings(model="m", tool_call_parser="granite").check() == []


@pytest.mark.parametrize(("kind", "text"), [("granite", "<|tool_call|>[]\n"), ("mistral", "None fit.[TOOL_CALLS] []")])
def test_an_output_that_parses_to_no_calls_is_a_text_answer_whole_and_streamed(kind: str, text: str) -> None:
    """vLLM PR #53297: a parser that read an empty array as calls (``tools_called``, none in it)
    answered null content, an empty turn (text before the tag dropped, or all of it). vLLM's
    parser tests assert ``tools_called == bool(tool_calls)``: no call, the output is the text."""
    shape = Shape(chat=True, request_id="chatcmpl-g", model="m", created=0, tool_parser=kind)
    [whole] = shape.full([Choice(0, text=text, finish_reason="stop")], 3, 4)["choices"]
    assert whole["message"]["content"] == text and "tool_calls" not in whole["message"]
    assert whole["finish_reason"] == "stop"
    events = [shape.chunk(text[0], None, first=True)] + [shape.chunk(t, None) for t in text[1:]]
    events.append(shape.chunk("", "stop"))
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events) == text
    assert not any("tool_calls" in e["choices"][0]["delta"] for e in events)
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    [plain] = shape.full([Choice(0, text="[]", finish_reason="stop")], 3, 1)["choices"]
    assert plain["message"]["content"] == "[]"


def test_fuzzed_granite_outputs_read_alike_however_split() -> None:
    rng = random.Random(3)
    atoms = ["<|tool_call|>", "<tool_call>", "<|tool", "[", "]", "{", "}", ",", " ", "\n", '"', "\\", "x"]
    atoms += ['{"name": "f", "arguments": {"a": "]}"}}', '{"name": "g"}', "1", "text", ARRAY]
    for _ in range(3000):
        text = "".join(rng.choices(atoms, k=rng.randint(1, 12)))
        cuts = sorted(rng.sample(range(1, len(text)), k=min(rng.randint(1, 6), len(text) - 1)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        whole = read("granite", [text])[:2]
        assert read("granite", pieces)[:2] == whole, pieces
        assert whole[1] or whole[0] == text, text


FC = (
    '<function_call> {"name": "get_weather", "arguments": {"city": "SF"}}\n'
    '<function_call> {"name": "get_date", "arguments": {}}'
)


@pytest.mark.parametrize(
    ("text", "content", "calls"),
    [
        (FC, "", CALLS),
        ("Let me look.\n" + FC, "Let me look.\n", CALLS),  # text before the first: content (vLLM's whole reading)
        (FC + "\nDone.", "", CALLS),  # after a call: not content
        ('<function_call>{"name": "f", "arguments": [1]}', "", [("f", "[1]")]),
        (FC[: FC.index("get_date") + 3], "", CALLS[:1]),  # cut short: the calls it finished
        ('<function_call> {"name": "get_we', '<function_call> {"name": "get_we', []),
        ("Use <function_call> tags.", "Use <function_call> tags.", []),  # no object after it: text
        ('<function_call> {"city": "SF"} ok', '<function_call> {"city": "SF"} ok', []),  # no call
        ("<function_call>" + " " * 65 + "{}", "<function_call>" + " " * 65 + "{}", []),
        ("a <functio", "a <functio", []),
    ],
)
def test_a_whole_granite_20b_fc_output_and_its_stream_read_alike(
    text: str, content: str, calls: list[tuple[str, str]]
) -> None:
    assert read("granite-20b-fc", [text])[:2] == (content, calls)
    assert read("granite-20b-fc", list(text))[:2] == (content, calls)


def test_granite_20b_fc_text_goes_out_as_it_comes_and_each_call_as_it_ends() -> None:
    pieces = ["Sure", " thing <func", "tion_call> {", '"name": "get_date", "arguments": {}}', " x"]
    said = read("granite-20b-fc", pieces)[2]
    assert said == ["Sure", " thing ", "", "", "", ""]
    assert GatewaySettings(model="m", tool_call_parser="granite-20b-fc").check() == []


def test_fuzzed_granite_20b_fc_outputs_read_alike_however_split() -> None:
    rng = random.Random(20)
    atoms = ["<function_call>", "<function", "{", "}", " ", "\n", '"', "\\", "x", "[", "]"]
    atoms += ['{"name": "f", "arguments": {"a": "}<function_call>"}}', '{"name": "g"}', "text"]
    for _ in range(3000):
        text = "".join(rng.choices(atoms, k=rng.randint(1, 12)))
        cuts = sorted(rng.sample(range(1, len(text)), k=min(rng.randint(1, 6), len(text) - 1)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        whole = read("granite-20b-fc", [text])[:2]
        assert read("granite-20b-fc", pieces)[:2] == whole, pieces
        assert whole[1] or whole[0] == text, text


def test_an_item_whose_quotes_are_unsound_is_read_as_vllms_json_reads_it() -> None:
    """The bug hermes', mistral's and granite-20b-fc's quotes check fixes, a string that took in
    the next call's tag, cannot happen here: Granite 3.x writes no tag between items, and one an
    argument quotes is the argument's. An unescaped quote ("5" inches") makes the rest of the array
    a string with no tag to end it at: the output is text, as vLLM's json.loads gives it (whole
    and streamed alike, the stream silent until the end shows it); calls before it are kept."""
    ping, bad = '{"name": "ping", "arguments": {}}', '{"name": "find", "arguments": {"q": "5" inches"}}'
    quoting = '{"name": "write", "arguments": {"s": "}]<|tool_call|>[<tool_call>"}}'
    for text, expected in [
        (f"<|tool_call|>[{bad}, {ping}]", (f"<|tool_call|>[{bad}, {ping}]", [])),
        (f"<|tool_call|>[{ping}, {bad}, {ping}]", ("", [("ping", "{}")])),
        (
            f"<|tool_call|>[{quoting}, {ping}]",
            ("", [("write", '{"s": "}]<|tool_call|>[<tool_call>"}'), ("ping", "{}")]),
        ),
    ]:
        content, calls, said = read("granite", list(text))
        assert read("granite", [text])[:2] == (content, calls) == expected
        assert not any(said[:-1])
