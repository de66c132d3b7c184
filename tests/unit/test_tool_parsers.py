"""tool_choice "auto": the model's text read for calls (vLLM's hermes, llama3_json and mistral formats), one
reading for a whole output and a stream, answered as OpenAI's content and tool_calls."""

from __future__ import annotations

import random

import msgspec
import pytest

from dlora.services.gateway.completion_shape import Choice, Shape
from dlora.services.gateway.settings import GatewaySettings
from dlora.services.gateway.tool_base import joined
from dlora.services.gateway.tool_parsers import ToolParser
from tests.unit.tool_cases import PING, PING_CALL, UNESCAPED, read

WEATHER = ("weather", '{"city": "kalo"}')


HERMES_TWO = (
    'Let me look.\n<tool_call>\n{"name": "weather", "arguments": {"city": "kalo"}}\n</tool_call>\n'
    '<tool_call>{"name": "ping", "arguments": {}}</tool_call>'
)
NOT_A_TAG = "No tools needed: a < b and <tool_ca is not a tag."
HERMES_CUT = '<tool_call>{"name": "weather", "arguments": {"city": "ka'
LLAMA_ONE = '{"name": "weather", "parameters": {"city": "kalo"}}'
LLAMA_TWO = '<|python_tag|>{"name": "weather", "parameters": {"city": "kalo"}}; {"name": "ping", "arguments": {}}'
LLAMA_CUT = '{"name": "weather", "parameters": {"city"'
# Mistral: a JSON array after [TOOL_CALLS] (tokenizers before v11), or name{...} per call (v11 on)
MISTRAL_ARRAY = (
    'Let me look.[TOOL_CALLS] [{"name": "weather", "arguments": {"city": "kalo"}}, {"name": "ping", "arguments": {}}]'
)
MISTRAL_CUT = '[TOOL_CALLS] [{"name": "weather", "arguments": {"ci'
HERMES_NAN = '<tool_call>{"name": "f", "arguments": {"x": NaN}}</tool_call>'
GRANITE = '<tool_call>{"name": "weather", "arguments": "{\\n  \\"city\\": \\"kalo\\"\\n}"}</tool_call>'
STRING_ARRAY = '<tool_call>{"name": "f", "arguments": "[1, 2]"}</tool_call>'
# an argument that quotes the closing tag, an escaped quote before it
QUOTES_TAG = r'<tool_call>{"name": "write", "arguments": {"text": "say \"</tool_call>\" and </tool_call>"}}</tool_call>'
QUOTED = ("write", r'{"text": "say \"</tool_call>\" and </tool_call>"}')
QUOTES_CALL = '<tool_call>{"name": "write", "arguments": {"text": "e.g. </tool_call>' + PING_CALL.replace('"', '\\"')
QUOTES_CALL_ARGS = '{"text": "e.g. </tool_call>' + PING_CALL.replace('"', '\\"') + '"}'
NO_CALL_QUOTES = '<tool_call>{"temperature": 3, "note": "</tool_call>"}</tool_call>'
SAY_CALL = '<tool_call>{"name": "say", "arguments": {"t": "a \\" b"}}</tool_call>'  # one escaped quote
MISTRAL_V11 = 'Let me look.[TOOL_CALLS]weather{"city": "kalo"}[TOOL_CALLS]ping[ARGS]{}'


@pytest.mark.parametrize(
    ("kind", "text", "content", "calls"),
    [
        ("hermes", HERMES_TWO, "Let me look.\n", [WEATHER, PING]),
        ("hermes", HERMES_TWO + " Done. <tool_call>{", "Let me look.\n", [WEATHER, PING]),  # after a call: not content
        ("hermes", NOT_A_TAG, NOT_A_TAG, []),
        ("hermes", HERMES_CUT, HERMES_CUT, []),  # cut short: the text as written
        ("hermes", "<tool_call>not json</tool_call> after", "<tool_call>not json</tool_call> after", []),
        ("llama3_json", LLAMA_ONE, "", [WEATHER]),
        ("llama3_json", LLAMA_TWO, "", [WEATHER, PING]),
        ("llama3_json", "The weather is {fine}.", "The weather is {fine}.", []),
        ("llama3_json", LLAMA_CUT, LLAMA_CUT, []),
        ("llama3_json", '{"temperature": 3}', '{"temperature": 3}', []),  # an object, not a call
        # no call: the text as written, as vLLM gives it (its leading space and Llama's tag were lost)
        ("llama3_json", '\n\n{"temperature": 3}', '\n\n{"temperature": 3}', []),
        ("llama3_json", '<|python_tag|>{"temperature": 3}', '<|python_tag|>{"temperature": 3}', []),
        ("llama3_json", " " + LLAMA_CUT, " " + LLAMA_CUT, []),
        # calls separated by commas (vLLM reads every object whatever lies between): the second
        # came back as content
        ("llama3_json", LLAMA_ONE + ', {"name": "ping", "arguments": {}}', "", [WEATHER, PING]),
        ("llama3_json", LLAMA_ONE + ',\n{"name": "ping", "arguments": {}},', "", [WEATHER, PING]),
        ("mistral", MISTRAL_ARRAY, "Let me look.", [WEATHER, PING]),
        ("mistral", MISTRAL_ARRAY + "\nextra trailing data", "Let me look.", [WEATHER, PING]),  # not content
        ("mistral", MISTRAL_V11, "Let me look.", [WEATHER, PING]),
        ("mistral", "a [TOOL_CALL] is not [TOOL_CALLS", "a [TOOL_CALL] is not [TOOL_CALLS", []),
        ("mistral", '[TOOL_CALLS]weather{"city": "ka', '[TOOL_CALLS]weather{"city": "ka', []),  # cut short
        ("mistral", "[TOOL_CALLS] not json at all", "[TOOL_CALLS] not json at all", []),
        # an empty array of calls makes none: the text as written (vLLM PR #53297; it was null
        # content), and a later block that is no call is text too
        ("mistral", "[TOOL_CALLS] []", "[TOOL_CALLS] []", []),
        ("mistral", "Nothing to call.[TOOL_CALLS] []", "Nothing to call.[TOOL_CALLS] []", []),
        (
            "mistral",
            'a[TOOL_CALLS] [] b[TOOL_CALLS] [5] c[TOOL_CALLS]{"x": 1}',
            'a[TOOL_CALLS] [] b[TOOL_CALLS] [5] c[TOOL_CALLS]{"x": 1}',
            [],
        ),
        # an empty array before a call is none of the content (vLLM's ends at the first tag; it
        # was "[TOOL_CALLS] [] " beside the call): text only where text, not a call, follows it
        ("mistral", '[TOOL_CALLS] [] [TOOL_CALLS] [{"name": "ping", "arguments": {}}]', "", [PING]),
        ("mistral", "Sure. [TOOL_CALLS] []\n[TOOL_CALLS]ping[ARGS]{}", "Sure. ", [PING]),
        ("mistral", "[TOOL_CALLS] [] hi [TOOL_CALLS]ping[ARGS]{}", "[TOOL_CALLS] [] hi ", [PING]),
        ("mistral", "[TOOL_CALLS]" + "x" * 150 + "{}", "[TOOL_CALLS]" + "x" * 150 + "{}", []),  # no name that long
        ("mistral", "[TOOL_CALLS]I think {so}", "[TOOL_CALLS]I think {so}", []),  # prose is no name
        ("mistral", '[TOOL_CALLS] [{"temperature": 3}]', '[TOOL_CALLS] [{"temperature": 3}]', []),
        # A last hermes call left open (a stop at </tool_call>, or EOS) is one where it is whole, as
        # vLLM and SGLang read it (it came back as text)
        ("hermes", '<tool_call>{"name": "weather", "arguments": {"city": "kalo"}}\n', "", [WEATHER]),
        ("hermes", HERMES_TWO.removesuffix("</tool_call>"), "Let me look.\n", [WEATHER, PING]),
        # mistral-common v11's call id between the name and the arguments (it became the name's)
        ("mistral", '[TOOL_CALLS]weather[CALL_ID]a1b2c3d4e[ARGS]{"city": "kalo"}', "", [WEATHER]),
        ("mistral", f"[TOOL_CALLS]{'w' * 64}[CALL_ID]a1b2c3d4e[ARGS]{{}}", "", [("w" * 64, "{}")]),  # a long name
        # NaN and Infinity are no JSON: came back as arguments JSON.parse throws on; a number that
        # overflows a float is JSON, kept as written (it came back Infinity, then as text)
        ("hermes", HERMES_NAN, HERMES_NAN, []),
        ("llama3_json", '{"name": "f", "parameters": {"x": 1e400}}', "", [("f", '{"x": 1e400}')]),
        ("mistral", '[TOOL_CALLS]f{"x": -Infinity}', '[TOOL_CALLS]f{"x": -Infinity}', []),
        # Arguments written as JSON text (Granite 4's; vLLM #54964): the call, its arguments not
        # encoded again (the whole call came back as content); text that is no object stays text
        ("hermes", GRANITE, "", [WEATHER]),
        ("llama3_json", '{"name": "weather", "parameters": "{\\"city\\": \\"kalo\\"}"}', "", [WEATHER]),
        ("mistral", '[TOOL_CALLS] [{"name": "weather", "arguments": "{\\"city\\": \\"kalo\\"}"}]', "", [WEATHER]),
        ("hermes", STRING_ARRAY, "", [("f", '"[1, 2]"')]),  # JSON text of no object: the string, as vLLM's
        # A call cut short (max_tokens) after whole ones is no content, as hermes' and mistral's are
        # not: llama3_json gave the fragment out as the reply's text beside the calls
        ("llama3_json", LLAMA_ONE + '; {"name": "pi', "", [WEATHER]),
        ("llama3_json", LLAMA_TWO + ';{"name": "weather", "parameters": {"ci', "", [WEATHER, PING]),
        ("hermes", HERMES_TWO + '<tool_call>{"name": "pi', "Let me look.\n", [WEATHER, PING]),
        ("mistral", MISTRAL_V11 + '[TOOL_CALLS]ping{"x', "Let me look.", [WEATHER, PING]),
        # a Mistral v0.3 array cut short: the calls it finished (all of it came back as text)
        ("mistral", MISTRAL_ARRAY.removesuffix("]") + ', {"name": "pi', "Let me look.", [WEATHER, PING]),
        ("mistral", MISTRAL_ARRAY.removesuffix("]"), "Let me look.", [WEATHER, PING]),
        ("mistral", MISTRAL_CUT, MISTRAL_CUT, []),
        ("hermes", STRING_ARRAY.replace("[1, 2]", "kalo"), "", [("f", '"kalo"')]),
        # </tool_call> inside an argument's string is the argument's (vLLM #45167, PRs #48353/#55848):
        # the call was cut there and given out as text
        (
            "hermes",
            "Writing.\n" + QUOTES_TAG + "\n" + HERMES_TWO.split("\n", 1)[1],
            "Writing.\n",
            [QUOTED, WEATHER, PING],
        ),
        ("hermes", QUOTES_TAG.removesuffix("</tool_call>"), "", [QUOTED]),  # left open (a stop at the tag)
        ("hermes", '<tool_call>{"name": "f", "arguments": {"s": "\\\\"}}</tool_call>x', "", [("f", '{"s": "\\\\"}')]),
        ("hermes", '<tool_call>not "json</tool_call> after', '<tool_call>not "json</tool_call> after', []),
        (
            "hermes",
            "<tool_call>[1]</tool_call>" + HERMES_TWO,
            "<tool_call>[1]</tool_call>Let me look.\n",
            [WEATHER, PING],
        ),
        (
            "hermes",
            '<tool_call>\n<function=f>"</function></tool_call>',
            '<tool_call>\n<function=f>"</function></tool_call>',
            [],
        ),
        # content of whitespace alone before calls is none (vLLM answers null): Qwen3's blank line after
        # </think> was the reply's content; without a call it is the text as written
        ("hermes", "\n\n" + HERMES_TWO.split("\n", 1)[1], "", [WEATHER, PING]),
        ("mistral", " \n[TOOL_CALLS]ping{}", "", [PING]),
        ("pythonic", "\n[ping()]", "", [PING]),
        ("hermes", " \n\n ", " \n\n ", []),
        ("hermes", "\n\nHi <tool_call>" + HERMES_TWO.split("<tool_call>")[2], "\n\nHi ", [PING]),
        # a quote left unescaped made the rest of the output a string, its calls none (vLLM alike):
        # the output ended inside one, its first tag closes the call; a quoted call is still none
        ("hermes", UNESCAPED + "\n" + PING_CALL, UNESCAPED + "\n", [PING]),
        ("hermes", HERMES_TWO + UNESCAPED + PING_CALL, "Let me look.\n", [WEATHER, PING, PING]),
        ("hermes", QUOTES_CALL, QUOTES_CALL, []),
        # an escaped quote in a later call (read outside a string, it flips them back): the output
        # ended outside one, the tags found were in its arguments, the calls after it were lost
        ("hermes", UNESCAPED + "\n" + SAY_CALL + PING_CALL, UNESCAPED + "\n", [("say", '{"t": "a \\" b"}'), PING]),
        ("hermes", UNESCAPED * 2 + PING_CALL, UNESCAPED * 2, [PING]),
        # JSON that is no call, quoting the tag: its quotes are sound, a later call's strings minded
        ("hermes", NO_CALL_QUOTES + QUOTES_TAG, NO_CALL_QUOTES, [QUOTED]),
        ("hermes", QUOTES_CALL + '"}}</tool_call>', "", [("write", QUOTES_CALL_ARGS)]),
    ],
)
def test_a_whole_output_and_its_stream_read_alike(
    kind: str, text: str, content: str, calls: list[tuple[str, str]]
) -> None:
    assert read(kind, [text])[:2] == (content, calls)
    assert read(kind, list(text))[:2] == (content, calls)  # a character at a time
    rng = random.Random(text)  # pieces of any length: an open call's kept apart, read as they come
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 6))))
        assert read(kind, [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])])[:2] == (content, calls)


def test_llamas_call_tag_between_calls_reads_alike_whole_and_streamed() -> None:
    """A <|python_tag|> after "; " (skip_special_tokens false: the tag is a special token) was read
    as text unstreamed, and the second call as a call streamed, where the tag came as a token of its
    own: the two answers differed (a fuzz of stream against whole)."""
    text = LLAMA_ONE + '; <|python_tag|>{"name": "ping", "arguments": {}}'
    pieces = [LLAMA_ONE, ";", " ", "<|python_tag|>", '{"name": "ping", "arguments": {}}']
    assert read("llama3_json", [text])[:2] == read("llama3_json", pieces)[:2] == ("", [WEATHER, PING])
    assert read("llama3_json", list(text))[:2] == ("", [WEATHER, PING])
    # a tag begun at the end is text, whole and streamed
    assert read("llama3_json", [LLAMA_ONE + "; <|pyth"])[:2] == read("llama3_json", list(LLAMA_ONE + "; <|pyth"))[:2]


def test_text_goes_out_as_it_comes_and_only_a_possible_tag_is_held_back() -> None:
    _, _, said = read(
        "hermes", ["Hello", " world <tool", "_call>", '{"name": "ping", "arguments": {}}', "</tool_call>"]
    )
    assert said == ["Hello", " world ", "", "", "", ""]
    _, _, said = read("llama3_json", ["Sun", "ny"])
    assert said == ["Sun", "ny", ""]


def test_a_reply_quoting_the_call_tag_streams_on_past_it() -> None:
    """A <tool_call> not followed by a JSON object is no call (a reply about the format, a
    Qwen3-Coder XML call): the text after it was held until the end of the reply, the stream silent
    meanwhile (club-3090 #72's kind). It goes out as it comes; a call after it is still read."""
    pieces = [
        "Write <tool_call> t",
        'hen "JSON',
        "</tool_call>. Like: ",
        '<tool_call>{"name": "ping", "arguments": {}}',
    ]
    content, calls, said = read("hermes", [*pieces, "</tool_call>"])
    assert said[:3] == pieces[:3] and calls == [PING]
    text = "".join(pieces) + "</tool_call>"
    assert read("hermes", [text])[:2] == read("hermes", list(text))[:2] == (content, calls)


def test_auto_calls_answer_as_content_and_tool_calls_whole_and_streamed() -> None:
    shape = Shape(chat=True, request_id="chatcmpl-abc", model="m", created=0, tool_parser="hermes")
    [whole] = shape.full([Choice(0, text=HERMES_TWO, finish_reason="stop")], 3, 9)["choices"]
    assert whole["finish_reason"] == "tool_calls" and whole["message"]["content"] == "Let me look.\n"
    assert [c["function"]["name"] for c in whole["message"]["tool_calls"]] == ["weather", "ping"]
    [plain] = shape.full([Choice(0, text=NOT_A_TAG, finish_reason="stop")], 3, 9)["choices"]
    assert plain["finish_reason"] == "stop" and plain["message"] == {
        "role": "assistant",
        "content": NOT_A_TAG,
        "refusal": None,
    }

    events = [shape.chunk("", None, first=True)["choices"][0]]
    events += [shape.chunk(HERMES_TWO[i : i + 7], None)["choices"][0] for i in range(0, len(HERMES_TWO), 7)]
    events.append(shape.chunk("", "stop")["choices"][0])
    assert events[0]["delta"] == {"role": "assistant", "content": ""}
    assert all("content" in e["delta"] or "tool_calls" in e["delta"] for e in events[1:-1])  # "" while held
    assert "".join(e["delta"].get("content", "") for e in events) == whole["message"]["content"]
    calls = [c for e in events for c in e["delta"].get("tool_calls", [])]
    assert [{k: v for k, v in c.items() if k != "index"} for c in calls] == whole["message"]["tool_calls"]
    assert [c["index"] for c in calls] == [0, 1] and events[-1]["finish_reason"] == "tool_calls"


def test_a_parser_must_be_one_dlora_has() -> None:
    problems = GatewaySettings(model="m", tool_call_parser="xlam").check()
    assert [p[0] for p in problems] == ["tool_call_parser"] and "hermes" in problems[0][2]
    assert GatewaySettings(model="m", tool_call_parser="llama3_json").check() == []
    assert GatewaySettings(model="m", tool_call_parser="mistral").check() == []


def test_mistral_calls_have_the_nine_character_ids_its_templates_take() -> None:
    """Mistral's chat templates raise on a call id that is not 9 alphanumeric characters: a client
    sending an answer's calls back in its history got a 400 (a trial). vLLM makes them so."""
    shape = Shape(chat=True, request_id="chatcmpl-abc", model="m", created=0, tool_parser="mistral", call_id_length=9)
    [whole] = shape.full([Choice(0, text=MISTRAL_V11, finish_reason="stop")], 3, 9)["choices"]
    ids = [c["id"] for c in whole["message"]["tool_calls"]]
    assert all(len(i) == 9 and i.isalnum() and i.isascii() for i in ids) and len(set(ids)) == 2
    events = [shape.chunk(MISTRAL_V11, None), shape.chunk("", "stop")]
    assert [c["id"] for e in events for c in e["choices"][0]["delta"].get("tool_calls", [])] == ids  # streamed alike


def test_without_parallel_calls_only_the_first_is_answered() -> None:
    """parallel_tool_calls false: OpenAI answers one call at most; a model that wrote two gives its first."""
    one = Shape(chat=True, request_id="chatcmpl-1", model="m", created=0, tool_parser="hermes", parallel_calls=False)
    [whole] = one.full([Choice(0, text=HERMES_TWO, finish_reason="stop")], 3, 9)["choices"]
    assert [c["function"]["name"] for c in whole["message"]["tool_calls"]] == ["weather"]
    events = [one.chunk(HERMES_TWO, None), one.chunk("", "stop")]
    assert [c["function"]["name"] for e in events for c in e["choices"][0]["delta"].get("tool_calls", [])] == [
        "weather"
    ]


def test_a_lone_surrogate_in_the_arguments_is_escaped_not_a_broken_stream() -> None:
    """A model may write "\\ud83d" in a string: decoded, it is no text, and the stream's encoder
    stopped the response without [DONE]; escaped, it goes out (non-ASCII stays as written)."""
    shape = Shape(chat=True, request_id="chatcmpl-s", model="m", created=0, tool_parser="hermes")
    event = shape.chunk('<tool_call>{"name": "a", "arguments": {"k": "\\ud83d", "c": "é"}}</tool_call>', "stop")
    [call] = event["choices"][0]["delta"]["tool_calls"]
    assert call["function"]["arguments"] == '{"k": "\\ud83d", "c": "\\u00e9"}'
    msgspec.json.encode(event)  # raised UnicodeEncodeError
    assert (
        ToolParser("hermes").feed('<tool_call>{"name": "a", "arguments": {"c": "é"}}</tool_call>')[1][0][2]
        == '{"c": "é"}'
    )


def test_a_llama3_json_text_answer_is_not_kept_a_second_time() -> None:
    """A review: the output kept to give back one that began like a call and held none grew with
    every text answer too, copied at every token: 200 kB of text streamed took 0.9 s of the
    gateway's loop, 57 times what it took before. Only an output that may be calls is kept."""
    parser = ToolParser("llama3_json")
    for _ in range(1000):
        assert parser.feed("word ") == ("word ", [])
    assert len("".join(parser._written)) <= len("word ") and parser.finish() == ("", [])
    assert read("llama3_json", ["\n", "\n{", '"temperature"', ": 3}"])[0] == '\n\n{"temperature": 3}'


def test_a_mistral_stream_reads_each_character_once() -> None:
    """A review: whitespace after [TOOL_CALLS], rescanned at every token, took 9 s of the gateway's
    loop for 16k tokens; and "[AR" split from "GS]" began an array that [ARGS] then contradicted."""
    parser = ToolParser("mistral")
    parser.feed("[TOOL_CALLS]")
    for n in range(1, 1001):
        parser.feed("\n")
        assert parser._read == n  # where the next token's look starts: after what was read
        assert parser._held == "" and len(parser._pieces) == n  # kept in pieces, not joined per token
    assert parser.finish()[0] == "[TOOL_CALLS]" + "\n" * 1000
    for then in ["ping{}", '[{"name": "ping", "arguments": {}}]', "[ARGS]", "Hi."]:  # read as whole
        parser = ToolParser("mistral")
        content, calls = joined(*(parser.feed(p) for p in ["[TOOL_CALLS]", *["\n"] * 100, then]), parser.finish())
        assert (content, [c[1:] for c in calls]) == read("mistral", ["[TOOL_CALLS]" + "\n" * 100 + then])[:2]
    text = '[TOOL_CALLS] [ARGS][{"a": 1}'
    pieces = ["[TOOL_CA", "LLS] [", "AR", 'GS][{"a": 1}']
    assert read("mistral", pieces)[:2] == read("mistral", [text])[:2]


@pytest.mark.parametrize(
    ("kind", "text"),
    [
        ("hermes", HERMES_TWO + '\n<tool_call>{"name": "weather", "arguments": {"ci'),
        ("hermes", HERMES_TWO + " and then some words the limit cut"),
        ("llama3_json", LLAMA_TWO + '; {"name": "weather", "parameters": {"ci'),
        ("mistral", MISTRAL_V11 + '[TOOL_CALLS]weather{"ci'),
        ("mistral", MISTRAL_ARRAY.removesuffix("]") + ', {"name": "pi'),
    ],
)
def test_calls_cut_by_max_tokens_finish_length_with_the_whole_calls(kind: str, text: str) -> None:
    """OpenAI's finish_reason is "length" whenever max_tokens ended the reply, calls or not (vLLM
    says "tool_calls" where its parser found one, and streamed gives a cut call's half arguments):
    a client must know the reply was cut. The calls that ended are answered, the cut one is not;
    whole and streamed alike."""
    shape = Shape(chat=True, request_id="chatcmpl-abc", model="m", created=0, tool_parser=kind)
    [whole] = shape.full([Choice(0, text=text, finish_reason="length")], 3, 9)["choices"]
    assert whole["finish_reason"] == "length"
    assert [c["function"]["name"] for c in whole["message"]["tool_calls"]] == ["weather", "ping"]
    assert not (whole["message"]["content"] or "").strip(" \n").endswith(("{", '"ci', '"pi', "cut"))
    streamed = Shape(chat=True, request_id="chatcmpl-abc", model="m", created=0, tool_parser=kind)
    events = [streamed.chunk("", None, first=True)["choices"][0]]
    events += [streamed.chunk(ch, None)["choices"][0] for ch in text]
    events.append(streamed.chunk("", "length")["choices"][0])
    calls = [{k: v for k, v in c.items() if k != "index"} for e in events for c in e["delta"].get("tool_calls", [])]
    assert calls == whole["message"]["tool_calls"] and events[-1]["finish_reason"] == "length"
    assert "".join(e["delta"].get("content") or "" for e in events) == (whole["message"]["content"] or "")


@pytest.mark.parametrize(
    ("kind", "text"),
    [
        ("hermes", '<tool_call>{"name": "now", "arguments": ""}</tool_call>'),
        ("hermes", '<tool_call>{"name": "now", "arguments": null}</tool_call>'),
        ("hermes", '<tool_call>{"name": "now", "arguments": " "}</tool_call>'),
        ("llama3_json", '{"name": "now", "parameters": ""}'),
        ("llama3_json", '{"name": "now", "parameters": null}'),
        ("mistral", '[TOOL_CALLS][{"name": "now", "arguments": null}]'),
        ("mistral", '[TOOL_CALLS][{"name": "now", "arguments": ""}]'),
    ],
)
def test_a_parameterless_call_written_with_empty_or_null_arguments_is_a_call(kind: str, text: str) -> None:
    """Models write a call of a tool without parameters with "arguments": "" or null (clients'
    reports: langchain #34242, aichat #1217); the call came back as the reply's text, its markup
    shown, finish_reason "stop", while one leaving the key out was a call: now all are, "{}"."""
    assert read(kind, [text])[:2] == read(kind, list(text))[:2] == ("", [("now", "{}")])


def test_a_blank_line_before_a_call_is_no_content_whole_or_streamed() -> None:
    """Qwen3 writes a blank line between </think> and <tool_call>: its reply's content was "\\n\\n"
    beside the call, where vLLM answers null; the stream gave out the same, read as the openai
    package reads it."""
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    text = '<think>\nhm\n</think>\n\n<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>'
    shape = Shape(True, "chatcmpl-abc", "m", 0, tool_parser="hermes", reasoning_parser="qwen3")
    whole = ChatCompletion.model_validate(shape.full([Choice(0, text=text, finish_reason="stop")], 3, 9))
    assert whole.choices[0].message.content is None and whole.choices[0].finish_reason == "tool_calls"
    events = [shape.chunk("", None, first=True)] + [shape.chunk(c, None) for c in text] + [shape.chunk("", "stop")]
    deltas = [ChatCompletionChunk.model_validate(e).choices[0].delta for e in events if not shape.silent(e)]
    assert "".join(d.content or "" for d in deltas) == ""
    assert [c.function.name for d in deltas for c in d.tool_calls or [] if c.function] == ["ping"]
