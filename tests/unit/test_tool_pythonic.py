"""tool_call_parser "pythonic" (vLLM's, for Llama 3.2 and Llama 4): a Python list of calls with
literal keyword arguments, read with ``ast`` (never evaluated), whole and streamed alike. Cases
replay vLLM's and SGLang's reports against their pythonic parsers."""

from __future__ import annotations

import ast
import json
import random

import pytest

from dlora.services.gateway import tool_pythonic, tool_pythonic_call
from dlora.services.gateway.completion_shape import Choice, Shape
from dlora.services.gateway.settings import GatewaySettings
from dlora.services.gateway.tool_parsers import ToolParser
from dlora.services.gateway.tool_pythonic_call import pythonic_call
from tests.unit.tool_cases import read

TWO = "[get_weather(city='SF'), get_date()]"
CALLS_TWO = [("get_weather", '{"city": "SF"}'), ("get_date", "{}")]


@pytest.mark.parametrize(
    ("text", "content", "calls"),
    [
        (TWO, "", CALLS_TWO),
        ('[get_weather(city="SF", days=3)]', "", [("get_weather", '{"city": "SF", "days": 3}')]),
        # nested lists and dicts (vLLM #30722: a nested list parameter failed)
        (
            "[plan(stops=[['a', 1], ['b', 2.5]], opts={'deep': {'k': [True, None]}})]",
            "",
            [("plan", '{"stops": [["a", 1], ["b", 2.5]], "opts": {"deep": {"k": [true, null]}}}')],
        ),
        # brackets, parentheses, commas and quotes inside strings
        (
            "[search(q='a], b) (c', r=\"it's [x]\", s='say \\'hi\\' ]')]",
            "",
            [("search", '{"q": "a], b) (c", "r": "it\'s [x]", "s": "say \'hi\' ]"}')],
        ),
        ("[run(code='''print(\"]\")\nx = ')'\n''')]", "", [("run", json.dumps({"code": "print(\"]\")\nx = ')'\n"}))]),
        ("[f(a=True, b=False, c=None)]", "", [("f", '{"a": true, "b": false, "c": null}')]),
        ("[f(a=true, b=null)]", "", [("f", '{"a": true, "b": null}')]),  # JSON's spellings, a model's habit
        # signed numbers (vLLM PR #15462, SGLang #27910: -5 is a UnaryOp; every call was dropped)
        (
            "[set_temperature(value=-5, delta=+2, bounds=[-1.5, 2.25], cfg={'offset': -3}), get_date()]",
            "",
            [
                ("set_temperature", '{"value": -5, "delta": 2, "bounds": [-1.5, 2.25], "cfg": {"offset": -3}}'),
                CALLS_TWO[1],
            ],
        ),
        ("[f(x=1e400, y=-1e400)]", "", [("f", '{"x": 1e400, "y": -1e400}')]),  # kept as written, as llama3_json's
        ("[f(p=(1, 2), city='Zürich')]", "", [("f", '{"p": [1, 2], "city": "Zürich"}')]),
        # text before the list (vLLM #22917: Llama 4 wrote a sentence first; all of it came back as text)
        ("To find out, I'll check.\n\n" + TWO, "To find out, I'll check.\n\n", CALLS_TWO),
        (TWO + "\nThat is all.", "", CALLS_TWO),  # after a call: not content (as hermes')
        ("```python\n" + TWO + "\n```", "```python\n", CALLS_TWO),
        # a list opens a line: one within a line is text, as code in an answer ("d[key(a=1)]" was a call of key)
        ("Read it with `d[key(a=1)]`.", "Read it with `d[key(a=1)]`.", []),
        ("Sure! " + TWO, "Sure! " + TWO, []),
        ("<|python_start|>" + TWO + "<|python_end|>", "", CALLS_TWO),  # Llama 4's tags
        ("Sure. <|python_tag|>" + TWO, "Sure. ", CALLS_TWO),
        ("[get_date()]\n[get_weather(city='SF')]", "", [CALLS_TWO[1], CALLS_TWO[0]]),  # two lists
        ("[get_weather(city='SF'), ]", "", CALLS_TWO[:1]),  # a trailing comma
        # cut by max_tokens: the calls it finished; none, and it is text
        ("[get_weather(city='SF'), get_date(tz='Eu", "", CALLS_TWO[:1]),
        ("[get_weather(city='S", "[get_weather(city='S", []),
        ("[get_weather(city='SF')", "", CALLS_TWO[:1]),  # the "]" left out (vLLM #30722)
        # not calls: text as written
        ("See [1] and [the docs](http://x) or [a b].", "See [1] and [the docs](http://x) or [a b].", []),
        ("[print('SF')]", "[print('SF')]", []),  # positional: vLLM dropped the argument
        ("[f(x=a + 1)]", "[f(x=a + 1)]", []),  # an expression, never evaluated
        ("[f(x=__import__('os'))]", "[f(x=__import__('os'))]", []),
        ("[f(x=1, x=2)]", "[f(x=1, x=2)]", []),
        ("[f(**{'x': 1})]", "[f(**{'x': 1})]", []),
        ("[f(x={1: 2})]", "[f(x={1: 2})]", []),
        ("[f(x=1))] then", "[f(x=1))] then", []),
        ("ys = [f(a=1) for a in b]", "ys = [f(a=1) for a in b]", []),
        ("[" + "x" * 65 + "()]", "[" + "x" * 65 + "()]", []),  # longer than any function name
        ("a <| b < c [", "a <| b < c [", []),
        # a list whose first item is no call is text, its other items too; after a call one is passed over
        ("[print('a'), get_date()]", "[print('a'), get_date()]", []),
        ("<|python_start|>[print('a')]", "<|python_start|>[print('a')]", []),  # the tag given back with it
        ("[get_date(), print('a'), get_weather(city='SF')]", "", [CALLS_TWO[1], CALLS_TWO[0]]),
        # a keyword's string (else'x', not'y') is Python's, an expression passed over: it ended the list as prose
        ("[get_date(), f(s=1 if t else'x', u=not'y'), get_weather(city='SF')]", "", [CALLS_TWO[1], CALLS_TWO[0]]),
        (
            "[get_date(), f(s=[1 if t else'x'], u=(a if b else c if d else'e')), get_weather(city='SF')]",
            "",
            [CALLS_TWO[1], CALLS_TWO[0]],
        ),
        # strings side by side, the second prefixed, are one string (ast's and so vLLM's): the first
        # item read a prefix after a string as a word after a value, text; an f-string is no literal
        # (vLLM's ast reads a JoinedStr, and gives the output back as text)
        ("[f(s='a' r'\\d', t='b'U\"c\")]", "", [("f", json.dumps({"s": "a\\d", "t": "bc"}))]),
        ("[f(s='a' f'b')]", "[f(s='a' f'b')]", []),
    ],
)
def test_a_whole_pythonic_output_and_its_stream_read_alike(
    text: str, content: str, calls: list[tuple[str, str]]
) -> None:
    assert read("pythonic", [text])[:2] == (content, calls)
    assert read("pythonic", list(text))[:2] == (content, calls)  # a character at a time


def test_text_goes_out_as_it_comes_and_a_call_as_its_item_ends() -> None:
    """Held back only where a list of calls may open; each call goes out when its item ends, before
    the list closes."""
    said = read("pythonic", ["Sun", "ny.\n[", "1] and\n  [", "note", " here]", " [x"])[2]
    assert said == ["Sun", "ny.\n", "[1] and\n  ", "", "[note here]", " [x", ""]  # (a "[" mid-line opens none)
    parser = ToolParser("pythonic")
    assert parser.feed("Let me look.\n[get_weather(city='SF')") == ("Let me look.\n", [])
    assert parser.feed(", get_da") == ("", [(0, "get_weather", '{"city": "SF"}')])
    assert parser.feed("te()]") == ("", [(1, "get_date", "{}")])
    assert parser.finish() == ("", [])


@pytest.mark.parametrize(
    ("pieces", "said"),
    [
        # prose after a call's name: an apostrophe opened a string no quote closed, the rest held
        (["[Note(Python's", " docs say so) and more.", " The end."], None),
        (["[get_weather(city='SF') is", " what I'd call.", " Bye."], None),
        (["[f(x=1", " or 2, y=3", " and so"], ["", "[f(x=1 or 2, y=3", " and so", ""]),
        (["[f(x=g(", "a=1), y=2", " more"], None),  # a call is no literal
        (["[f(x=1 2, y='it", "s']"], None),
        # a quote after a word that is no string's prefix (vLLM PR #32539's unescaped O'Brien)
        (["[get_weather(city=O'Brien", "') is it.", " Bye."], None),
        (["[get_weather(city='O'Reilly", "') is it.", " Bye."], None),
    ],
)
def test_a_list_that_becomes_no_call_goes_out_as_text_when_it_does(pieces: list[str], said: list[str] | None) -> None:
    """The closing notes' left item: a list that opened ``[name(`` and went on as no call could was
    held to the end of the stream (vLLM's pythonic holds it too, silent while its text does not
    parse, and loses it). At the first character no call can hold, it goes out as text; the whole
    output reads alike, and one that stays a call's possible start is still held. (None: each
    piece goes out as it comes.)"""
    assert read("pythonic", pieces)[2] == (said or [*pieces, ""])
    text = "".join(pieces)
    assert read("pythonic", [text])[:2] == (text, [])
    assert read("pythonic", list(text))[:2] == (text, [])


def test_an_item_after_a_call_that_turns_to_prose_ends_the_list_and_a_later_list_is_read() -> None:
    """The closing notes' left item: only a list's first item was checked as it came; a later one
    that went on as prose ("see(Python's docs)") opened a string at its apostrophe that took in the
    rest, so a later list's call came out at the end of the stream, or (its quote closing that
    string) not at all. The item ends the list where no call can hold it; a later list is read."""
    text = "[ping(), see(Python's docs) for more]\n[weather(city='x')] ok"
    expected = ("", [("ping", "{}"), ("weather", '{"city": "x"}')])
    assert read("pythonic", [text])[:2] == expected
    assert read("pythonic", list(text))[:2] == expected
    parser = ToolParser("pythonic")
    assert parser.feed("[ping(), see(Python's docs) for more]\n") == ("", [(0, "ping", "{}")])
    assert parser.feed("[weather(city='x')]") == ("", [(1, "weather", '{"city": "x"}')])
    assert parser.feed(" ok") == ("", []) and parser.finish() == ("", [])


@pytest.mark.parametrize(
    "text",
    [
        "[ping(), see the docs (chapter 2\n[weather(city='x')]",  # words side by side, a bracket left open
        "[ping(), ping() now\n[weather(city='x')]",
        "[ping(), not_a_call(x=1 if y else 2), bad(3) word\n[weather(city='x')]",
        # "else" is an operator only after an "if": "someone else's" opened a string to the end
        "[ping(), nobody else's\n[weather(city='x')]",
        # nor after an "if" no value came before, one a "," closed, or one an "else" matched
        "[ping(), see(if, nobody else's)\n[weather(city='x')]",
        "[ping(), note(what if, nobody else's) x\n[weather(city='x')]",
        "[ping(), f(x=1 if y else 2, z=nobody else's)\n[weather(city='x')]",
    ],
)
def test_an_item_after_a_call_that_writes_words_no_python_writes_ends_the_list(text: str) -> None:
    """A later item whose words stand side by side ("see the docs", a value then a word) is prose
    where Python takes only an operator (keywords: if, else, not, ... are operators; "else" only
    after an "if"); an item that is an expression (not a call) is passed over as before."""
    expected = ("", [("ping", "{}"), ("weather", '{"city": "x"}')])
    assert read("pythonic", [text])[:2] == expected
    assert read("pythonic", list(text))[:2] == expected


def test_strings_side_by_side_with_a_prefix_after_a_call_stay_one_value() -> None:
    """A review: a prefixed string right after a string ('a' r'b', which Python joins) read as a
    word after a value, prose, so the list ended there and its calls from that item on were lost."""
    text = "[ping(), say(t='a' r'\\b'), say(t='c'\n  U\"d\"), ping()]"
    says = [("say", json.dumps({"t": "a\\b"})), ("say", '{"t": "cd"}')]
    expected = ("", [("ping", "{}"), *says, ("ping", "{}")])
    assert read("pythonic", [text])[:2] == expected
    assert read("pythonic", list(text))[:2] == expected


def test_a_comments_quote_opens_no_string() -> None:
    """A comment in a list ("# don't") read its apostrophe as a string's start: the list's end
    was lost with the calls after it; a comment before an item made it none (Python's eval reads
    no comment before its expression)."""
    text = "[a(),  # don't stop\n b(x=1,  # it's 1\n y=2), # last\n\r\n # one\r c(s='#')]\n[d()]"
    expected = ("", [("a", "{}"), ("b", '{"x": 1, "y": 2}'), ("c", '{"s": "#"}'), ("d", "{}")])
    assert read("pythonic", [text])[:2] == expected
    assert read("pythonic", list(text))[:2] == expected


@pytest.mark.parametrize(
    ("text", "calls"),
    [
        ("[memory_get(from=1, to=2)]", [("memory_get", '{"from": 1, "to": 2}')]),
        (
            "[mail(to='a', class = 'b'), ping(import=None)]",
            [("mail", '{"to": "a", "class": "b"}'), ("ping", '{"import": null}')],
        ),
        (
            "[run(command='cat > f.py << EOF\nprint(1)\r\nEOF')]",
            [("run", '{"command": "cat > f.py << EOF\\nprint(1)\\r\\nEOF"}')],
        ),
        ("[run(a=\"x\ny\", b='''p\nq''', c=r'\\d')]", [("run", '{"a": "x\\ny", "b": "p\\nq", "c": "\\\\d"}')]),
    ],
)
def test_calls_python_refuses_but_a_model_means_one_way_are_calls(text: str, calls: list[tuple[str, str]]) -> None:
    """vLLM PR #48171's cases (its lfm2 parser reads them; its pythonic one, and dlora's, gave the
    calls back as text): a tool's parameter named by a reserved word ("from", "class", "import"),
    a line break inside a one-line quoted string (a shell command written over lines)."""
    assert read("pythonic", [text])[:2] == ("", calls)
    assert read("pythonic", list(text))[:2] == ("", calls)


@pytest.mark.parametrize(
    "text",
    [
        "[f(x = - 1.5e-3, y=r'a' \"b\", z=u'c', w=(1, [2]), v={'k': None})]",
        "[f(\n  x=1,  # a comment\n  y=2,\n)]",
        "[f(x=1,\\\n y=2)]",
        "[ f ( x=True , ) ]",
    ],
)
def test_calls_python_writes_in_every_form_stay_calls(text: str) -> None:
    """The early word on a list that is no call takes any call Python reads: signs and exponents,
    strings side by side and their prefixes, comments and joined lines (left to ast), spaces."""
    expected = pythonic_call(text.strip()[1:-1].rstrip().rstrip(","))
    assert expected is not None
    assert read("pythonic", [text])[:2] == ("", [expected])
    assert read("pythonic", list(text))[:2] == ("", [expected])


CODE_ANSWER = "Two points:\n\n```python\n[Point(x=1, y=2), Point(x=3, y=4)]\n```\nEach has x and y."


def test_a_list_after_text_is_calls_only_where_it_names_a_tool() -> None:
    """A review: a list may follow text (Llama 4's habit), so a code answer's line
    "[Point(x=1, y=2)]" was read as two calls of Point, a tool no one declared, and the rest of the
    answer dropped; vLLM reads only an output that is the list. After text (and no tag), a list
    is calls where its first names one of the request's tools; an output that is the list, or a
    tagged one, is read as vLLM reads it."""
    tools = frozenset({"get_weather", "get_date"})
    shape = Shape(chat=True, request_id="chatcmpl-c", model="m", created=0, tool_parser="pythonic", tool_names=tools)
    [whole] = shape.full([Choice(0, text=CODE_ANSWER, finish_reason="stop")], 3, 9)["choices"]
    assert whole["message"]["content"] == CODE_ANSWER and "tool_calls" not in whole["message"]
    assert whole["finish_reason"] == "stop"
    events = [shape.chunk(CODE_ANSWER[i : i + 2], None)["choices"][0] for i in range(0, len(CODE_ANSWER), 2)]
    events.append(shape.chunk("", "stop")["choices"][0])
    assert "".join(e["delta"].get("content") or "" for e in events) == CODE_ANSWER
    assert not any("tool_calls" in e["delta"] for e in events)
    for text, calls in [
        ("Let me check.\n" + TWO, CALLS_TWO),
        ("[Point(x=1)]", [("Point", '{"x": 1}')]),  # the whole output: vLLM's reading
        ("Sure. <|python_start|>[Point(x=1)]", [("Point", '{"x": 1}')]),
    ]:
        parser = ToolParser("pythonic", names=tools)
        found = parser.feed(text)[1] + parser.finish()[1]
        assert [(name, arguments) for _, name, arguments in found] == calls, text


def test_pythonic_calls_answer_as_tool_calls_whole_and_streamed() -> None:
    shape = Shape(chat=True, request_id="chatcmpl-py", model="m", created=0, tool_parser="pythonic")
    text = "Checking.\n" + TWO
    [whole] = shape.full([Choice(0, text=text, finish_reason="stop")], 3, 9)["choices"]
    assert whole["finish_reason"] == "tool_calls" and whole["message"]["content"] == "Checking.\n"
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in whole["message"]["tool_calls"]] == CALLS_TWO
    events = [shape.chunk("", None, first=True)["choices"][0]]
    events += [shape.chunk(text[i : i + 3], None)["choices"][0] for i in range(0, len(text), 3)]
    events.append(shape.chunk("", "stop")["choices"][0])
    calls = [c for e in events for c in e["delta"].get("tool_calls", [])]
    assert [{k: v for k, v in c.items() if k != "index"} for c in calls] == whole["message"]["tool_calls"]
    assert [c["index"] for c in calls] == [0, 1] and events[-1]["finish_reason"] == "tool_calls"
    assert "".join(e["delta"].get("content") or "" for e in events) == "Checking.\n"
    assert GatewaySettings(model="m", tool_call_parser="pythonic").check() == []


def test_a_long_output_costs_the_gateway_each_character_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A review: a whole answer's reading looked again at all that followed at every "[" and every
    list (a copy of the rest each time): 200 kB of code took 8 s of the gateway's event loop, 200 kB
    of "[1]" lines 12 s, every stream on the gateway held as long. A whole answer is read in pieces,
    as a stream's tokens, and what the reader holds stays small; streamed, a list of calls was held
    whole, copied at every token: only the item being read is held."""
    fed: list[tuple[int, int]] = []  # (piece, held after it)
    feed = tool_pythonic.PythonicReader.feed

    def counted(self: tool_pythonic.PythonicReader, text: str) -> tuple[str, list]:
        out = feed(self, text)
        fed.append((len(text), len(self._held)))
        return out

    monkeypatch.setattr(tool_pythonic.PythonicReader, "feed", counted)
    for text in ("x = a[0] + b[1]\n" * 12_500, "[1]\n" * 50_000, "[get_date()]\n" * 16_000):
        fed.clear()
        content, calls, _ = read("pythonic", [text])
        assert (content, len(calls)) == ((text, 0) if "get_date" not in text else ("", 16_000))
        held = [held for piece, held in fed if piece <= tool_pythonic._PIECE]  # (the whole is fed in them)
        assert len(held) >= len(text) // tool_pythonic._PIECE and max(held) < 64
    parser = ToolParser("pythonic")
    parser.feed("[get_weather(city='SF')")
    for n in range(2_000):
        ended = (n, "get_date", f'{{"n": {n - 1}}}') if n else (0, "get_weather", '{"city": "SF"}')
        assert parser.feed(f", get_date(n={n})")[1] == [ended]
        assert len(parser._reader._held if parser._reader else "") < 30  # the item being read, not the list
    assert len(parser.feed("]")[1]) == 1 and len(parser.calls) == 2_001


def _literal(rng: random.Random, depth: int = 0) -> str:
    kinds = ["str", "int", "float", "const"] + (["list", "dict", "tuple"] if depth < 3 else [])
    kind = rng.choice(kinds)
    if kind == "str":
        chars = rng.choices("ab ])([}{,'\"\\=\n<|é", k=rng.randint(0, 6))
        return repr("".join(chars))
    if kind == "int":
        return str(rng.randint(-50, 50))
    if kind == "float":
        return repr(round(rng.uniform(-10, 10), 3))
    if kind == "const":
        return rng.choice(["True", "False", "None"])
    items = [_literal(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if kind == "dict":
        return "{" + ", ".join(f"{_literal_key(rng)}: {v}" for v in items) + "}"
    return ("[" + ", ".join(items) + "]") if kind == "list" else ("(" + "".join(f"{v}, " for v in items) + ")")


def _literal_key(rng: random.Random) -> str:
    return repr("".join(rng.choices("k]'\"(", k=rng.randint(1, 3))))


def test_fuzzed_lists_read_as_python_reads_them_and_alike_streamed() -> None:
    """Random literal arguments (Python's repr: either quote, escapes, brackets in strings): the
    arguments are what ast.literal_eval reads, and any split into pieces reads alike."""
    rng = random.Random(7)
    for _ in range(300):
        calls = []
        for n in range(rng.randint(1, 3)):
            args = {f"k{j}": _literal(rng) for j in range(rng.randint(0, 3))}
            calls.append((f"fn{n}", args))
        written = [f"{name}({', '.join(f'{k}={v}' for k, v in args.items())})" for name, args in calls]
        text = "[" + ", ".join(written) + "]"
        expected = [
            (name, json.dumps({k: _jsonish(ast.literal_eval(v)) for k, v in args.items()}, ensure_ascii=False))
            for name, args in calls
        ]
        cuts = sorted(rng.sample(range(1, len(text)), k=min(6, len(text) - 1)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        assert read("pythonic", [text])[:2] == ("", expected), text
        assert read("pythonic", pieces)[:2] == ("", expected), pieces


def _jsonish(value: object) -> object:
    if isinstance(value, (list, tuple)):
        return [_jsonish(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonish(v) for k, v in value.items()}
    return value


def test_fuzzed_text_reads_alike_streamed_and_is_given_back_whole_where_no_call() -> None:
    """Random runs of brackets, quotes, tags and calls: any split reads as the whole does, and an
    output with no call is its own text (a tag before a list that turned out text was lost)."""
    rng = random.Random(1)
    atoms = ["[", "]", "(", ")", "{", "}", "f", "x", "=", "-2", "'", '"', "'''", "\\", ",", " ", "\n", "<|", "<"]
    atoms += ["<|python_start|>", "<|python_tag|>", "text", "True", "[f(x=1)]", "[g()", "a=", "'s]'"]
    for _ in range(3000):
        text = "".join(rng.choices(atoms, k=rng.randint(1, 25)))
        cuts = sorted(rng.sample(range(1, len(text)), k=min(rng.randint(1, 8), len(text) - 1)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        whole = read("pythonic", [text])[:2]
        assert read("pythonic", pieces)[:2] == whole, pieces
        assert whole[1] or whole[0] == text, text


def test_numbers_past_a_float_cost_each_its_own_length(monkeypatch: pytest.MonkeyPatch) -> None:
    """A review: each 1e400 (kept as written) split the whole item into lines again to find its
    text: 4,000 of them in a 28 kB call took 26 s of the gateway's event loop. Its place is read
    from the item's lines, split once (in bytes, as ast counts columns: non-ASCII before it)."""
    splits: list[str] = []
    breaks = tool_pythonic_call.LINE_BREAK

    class Counted:
        def split(self, text: str) -> list[str]:
            splits.append(text)
            return breaks.split(text)

    monkeypatch.setattr(tool_pythonic_call, "LINE_BREAK", Counted())
    monkeypatch.setattr(ast, "get_source_segment", None)  # (it splits the whole source at each call)
    numbers = ", ".join(["1e400", "-2E+999"] * 1_000)
    text = "[f(city='Zürich', x=[" + numbers + "], y='''\né''', z=1e400)]"
    [(name, arguments)] = read("pythonic", [text])[1]
    assert name == "f" and arguments == '{"city": "Zürich", "x": [' + numbers + '], "y": "\\né", "z": 1e400}'
    assert len(splits) == 1
