"""tool_choice "required": the list-of-calls schema, and the output read back into OpenAI's
tool_calls, whole and as it streams."""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import pytest

from dlora.common.messages import SamplingParams
from dlora.services.gateway.call_ids import tool_call_id
from dlora.services.gateway.completion_shape import Choice, Shape
from dlora.services.gateway.tool_calls import CallStream, ConflictingDefs, arguments_schema, calls_schema
from dlora.services.gateway.tool_json import arguments_json
from dlora.services.worker.engine.structured import check

CITY = {"$defs": {"city": {"enum": ["kalo", "remi"]}}, "type": "object", "properties": {"at": {"$ref": "#/$defs/city"}}}


def test_the_schema_lists_calls_of_the_tools_with_their_defs_lifted_and_compiles() -> None:
    tools = [("weather", copy.deepcopy(CITY)), ("ping", None)]
    schema = calls_schema(tools)
    assert tools[0][1] == CITY  # the request's own schema is not changed
    assert schema["$defs"] == CITY["$defs"] and "$defs" not in schema["items"]["anyOf"][0]["properties"]["parameters"]
    assert schema["items"]["anyOf"][1]["properties"]["parameters"] == {"type": "object", "properties": {}}
    assert all(item["additionalProperties"] is False for item in schema["items"]["anyOf"])  # name, parameters
    check(SamplingParams(json_schema=json.dumps(schema)))  # llguidance takes it, $ref included
    one = calls_schema(tools, parallel=False)
    assert one["maxItems"] == 1
    deep: dict[str, object] = {"type": "object"}
    for _ in range(2000):  # deeper than copy.deepcopy goes: was a 500 (RecursionError)
        deep = {"type": "object", "properties": {"a": deep}}
    assert calls_schema([("deep", deep)])["items"]["anyOf"][0]["properties"]["parameters"] is not deep
    odd = calls_schema([("odd", {"$defs": [1]})])["items"]["anyOf"][0]["properties"]["parameters"]
    assert odd == {"type": "object", "$defs": [1]}  # left in place (not an object to lift)
    with pytest.raises(ConflictingDefs, match="city"):
        calls_schema([("a", CITY), ("b", {"$defs": {"city": {"type": "string"}}})])


def test_a_streamed_output_gives_each_call_as_its_item_ends() -> None:
    text = ' [ {"name": "weather", "parameters": {"at": "[remi]"}} ,\n{"name": "ping", "parameters": {}}]'
    stream, seen = CallStream(), []
    for i, char in enumerate(text):
        for call in stream.feed(char):
            seen.append((i, call))
    end_of_first = text.index("}}") + 1
    assert seen == [(end_of_first, (0, "weather", '{"at": "[remi]"}')), (len(text) - 2, (1, "ping", "{}"))]
    assert stream.closed and stream.calls == [("weather", '{"at": "[remi]"}'), ("ping", "{}")]
    cut = CallStream()
    assert cut.feed(text[:40]) == [] and cut.calls == [] and not cut.closed
    assert CallStream().feed('[{"name": "x", "parameters": {"k": "ü"}}]') == [(0, "x", '{"k": "ü"}')]  # as written
    # NaN is no JSON: an item holding one is no call ('{"x": NaN}' before)
    assert CallStream().feed('[{"name": "x", "parameters": {"k": NaN}}, {"name": "y", "parameters": {}}]') == [
        (0, "y", "{}")
    ]


def test_a_number_no_float_holds_is_a_calls_argument_as_written() -> None:
    """A schema's number may be written 1e400 (vLLM's backends bound no exponent) or with 5,000
    digits: the item was dropped (no JSON once read as a float, past int()'s digits), and a
    "required" choice answered finish_reason "tool_calls" with no call at all; vLLM's reading
    wrote Infinity (no JSON) or raised. Now the arguments hold the number as the model wrote it."""
    big = "-1" + "0" * 5000
    text = f'[{{"name": "x", "parameters": {{"k": 1e400, "a": [1.5E-400, 0e-999, {big}], "s": "ü"}}}}]'
    expected = f'{{"k": 1e400, "a": [1.5E-400, 0.0, {big}], "s": "ü"}}'
    assert CallStream().feed(text) == [(0, "x", expected)]
    json.loads(expected, parse_int=str)  # JSON still (past int() digits, as the model wrote it)
    shape = Shape(chat=True, request_id="chatcmpl-abc", model="m", created=0, tools_required=True)
    [whole] = shape.full([Choice(0, text=text, finish_reason="stop")], 3, 9)["choices"]
    assert [c["function"]["arguments"] for c in whole["message"]["tool_calls"]] == [expected]


def test_call_ids_are_vllms_form_and_a_stream_gives_the_whole_answers() -> None:
    """Ids were ``chatcmpl-tool-`` and the response's hex and the call's place, neither vLLM's
    (``chatcmpl-tool-`` and 32 hex, its random_tool_call_id) nor OpenAI's (``call_`` and 24)."""
    text = '[{"name": "weather", "parameters": {}}, {"name": "ping", "parameters": {}}]'
    rid = "chatcmpl-" + "0123456789abcdef" * 2

    def shape() -> Shape:
        return Shape(chat=True, request_id=rid, model="m", created=0, tools_required=True)

    [whole] = shape().full([Choice(0, text=text, finish_reason="stop")], 3, 9)["choices"]
    ids = [c["id"] for c in whole["message"]["tool_calls"]]
    assert len(set(ids)) == 2 and all(re.fullmatch("chatcmpl-tool-[0-9a-f]{32}", i) for i in ids), ids
    streamed = shape().chunk(text, "stop")["choices"][0]["delta"]["tool_calls"]
    assert [c["id"] for c in streamed] == ids
    assert tool_call_id("chatcmpl-tool-x0") != tool_call_id("chatcmpl-tool-x1")


def test_required_calls_answer_as_openai_tool_calls_whole_and_streamed() -> None:
    text = '[{"name": "weather", "parameters": {"at": "kalo"}}, {"name": "ping", "parameters": {}}]'
    shape = Shape(chat=True, request_id="chatcmpl-abc", model="m", created=0, tools_required=True)
    [whole] = shape.full([Choice(0, text=text, finish_reason="stop")], 3, 9)["choices"]
    assert whole["finish_reason"] == "tool_calls" and whole["message"]["content"] is None
    assert [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in whole["message"]["tool_calls"]] == [
        (tool_call_id("chatcmpl-tool-abc0"), "weather", '{"at": "kalo"}'),
        (tool_call_id("chatcmpl-tool-abc0-1"), "ping", "{}"),
    ]
    # cut short (max_tokens, or a stop string that took the list's end): the calls it finished
    cut_at = text.index("}}") + 2
    for cut, finish in ((text[:cut_at] + ', {"name": "pi', "length"), (text[:-1], "stop"), (text[:5], "length")):
        [answer] = shape.full([Choice(0, text=cut, finish_reason=finish)], 3, 9)["choices"]
        # (none finished: content "", a turn OpenAI's API takes back; test_tool_answers.py)
        assert answer["finish_reason"] == finish and answer["message"]["content"] == (None if "}}" in cut else "")
        assert answer["message"].get("tool_calls", []) == whole["message"]["tool_calls"][: cut.count("}}")]
    odd = Shape(chat=True, request_id="chatcmpl-abc", model="m", created=0, tools_required=True)
    [named] = odd.full([Choice(0, text='[{"name": "", "parameters": {}}]', finish_reason="stop")], 3, 9)["choices"]
    assert named["message"]["tool_calls"][0]["function"]["name"] == ""  # was null

    opening = shape.chunk("", None, first=True)["choices"][0]
    assert opening["delta"] == {"role": "assistant", "content": None}
    half = len(text) // 2
    events = [shape.chunk(text[:half], None)["choices"][0], shape.chunk(text[half:], "stop")["choices"][0]]
    calls = [c for e in events for c in e["delta"].get("tool_calls", [])]
    assert [c["index"] for c in calls] == [0, 1] and events[-1]["finish_reason"] == "tool_calls"
    # an event that says nothing (a call not whole yet) is not sent, as vLLM sends none
    quiet = Shape(chat=True, request_id="chatcmpl-q", model="m", created=0, tools_required=True)
    pieces = [quiet.chunk("", None, first=True), *(quiet.chunk(ch, None) for ch in text), quiet.chunk("", "stop")]
    sent = [e for e in pieces if not quiet.silent(e)]
    assert len(sent) == 4  # the role, a call each, the finish
    named = Shape(chat=True, request_id="chatcmpl-n", model="m", created=0, tool="f")
    assert named.silent(named.chunk("", None)) and not named.silent(named.chunk("{", None))
    assert not Shape(chat=True, request_id="c", model="m", created=0).silent(Shape.new(True, "c", "m").chunk("", None))
    assert [{k: v for k, v in c.items() if k != "index"} for c in calls] == whole["message"]["tool_calls"]


def test_a_call_holds_its_name_and_parameters_alone() -> None:
    """A helper's trial: under llguidance's lenient default a random model added keys to a
    required call without end (vLLM's default backend, xgrammar, reads the schema strictly)."""
    from dlora.services.worker.engine.structured import Grammars
    from tests.unit.test_token_bytes import byte_level

    hf = byte_level()
    grammars, schema = Grammars(hf, len(hf), {hf.eos_token_id}), json.dumps(calls_schema([("ping", None)]))
    call = '{"name": "ping", "parameters": {}'
    for text, ok in ((f"[{call}}}]", True), (f'[{call}, "x": 1}}]', False)):
        matcher = grammars.matcher(SamplingParams(json_schema=schema), [])
        assert matcher is not None
        assert matcher.consume_tokens(hf.encode(text, add_special_tokens=False)) is ok, text


def _at(schema: dict[str, Any], ref: str) -> Any:
    """What a local ``$ref`` points at in ``schema`` (a JSON pointer)."""
    node: Any = schema
    for part in filter(None, ref.removeprefix("#").split("/")):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def test_a_tools_own_references_point_into_it_inside_the_list() -> None:
    """vLLM #20470's kind (a tool served by a named choice refused under "required": the list's
    anyOf moved what its references point at): ``$defs`` were lifted, but zod-to-json-schema's and
    pydantic v1's ``#/definitions/...``, a shared ``#/properties/...`` and a recursive ``#``
    pointed at the list's root (the first two refused, the last read as a list of calls)."""
    city = {"enum": ["kalo", "remi"]}
    tools = [
        ("ping", None),
        (
            "old",
            {"type": "object", "definitions": {"city": city}, "properties": {"at": {"$ref": "#/definitions/city"}}},
        ),
        ("shared", {"type": "object", "properties": {"home": city, "work": {"$ref": "#/properties/home"}}}),
        ("tree", {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#"}}}}),
        ("data", {"$defs": {"c": city}, "properties": {"k": {"const": {"$ref": "#"}}, "enum": {"$ref": "#/$defs/c"}}}),
    ]
    given = copy.deepcopy(tools)
    schema = calls_schema(tools)
    check(SamplingParams(json_schema=json.dumps(schema)))  # refused: "Pointer '/definitions/city' does not exist"
    old, shared, tree, data = (schema["items"]["anyOf"][i]["properties"]["parameters"] for i in (1, 2, 3, 4))
    assert _at(schema, old["properties"]["at"]["$ref"]) == city
    assert _at(schema, shared["properties"]["work"]["$ref"]) == city
    assert _at(schema, tree["properties"]["kids"]["items"]["$ref"]) is tree  # the tool's arguments, not the list
    assert data["properties"]["k"] == {"const": {"$ref": "#"}}  # data, not a reference
    assert data["properties"]["enum"] == {"$ref": "#/$defs/c"}  # a property named so is a schema; $defs are lifted
    assert tools == given  # the request's own schemas are not changed


def test_a_tool_with_its_own_id_keeps_its_references_as_written() -> None:
    """A review of the rebasing (c10b096): a schema with ``$id`` (TypeBox's, a spec's published
    schema) is a resource of its own, where ``#`` references resolve against it, wherever it sits:
    served before under "required", rebased they pointed past it and the list was refused
    ("Pointer ... does not exist"); its ``$defs``, lifted out of it, were lost to its references."""
    city = {"enum": ["kalo", "remi"]}
    props = {
        "type": "object",
        "$id": "https://example.com/a.json",
        "properties": {"h": city, "t": {"$ref": "#/properties/h"}},
    }
    own_defs = {"type": "object", "$id": "b.json", "$defs": {"C": city}, "properties": {"t": {"$ref": "#/$defs/C"}}}
    inner = {"$id": "c.json", "properties": {"h": city, "t": {"$ref": "#/properties/h"}}}
    nested = {"type": "object", "properties": {"n": inner}}
    given = copy.deepcopy([props, own_defs, nested])
    schema = calls_schema([("props", props), ("own_defs", own_defs), ("nested", nested)])
    check(SamplingParams(json_schema=json.dumps(schema)))
    listed = [schema["items"]["anyOf"][i]["properties"]["parameters"] for i in range(3)]
    assert listed == given and "$defs" not in schema


def test_a_percent_encoded_reference_into_defs_points_at_the_lifted_defs() -> None:
    """A reference is a URI fragment: ``#/%24defs/C`` is ``#/$defs/C`` (llguidance decodes it), and
    was served before the rebasing (c10b096), which took it for one elsewhere in the tool and
    pointed it where its ``$defs`` no longer are (refused: "Pointer ... does not exist")."""
    city = {"enum": ["kalo", "remi"]}
    schema = calls_schema(
        [("a", {"type": "object", "$defs": {"C": city}, "properties": {"w": {"$ref": "#/%24defs/C"}}})]
    )
    check(SamplingParams(json_schema=json.dumps(schema)))
    assert schema["$defs"] == {"C": city}


@pytest.mark.parametrize("parameters", [None, {}])
def test_a_tool_without_parameters_is_called_with_none(parameters: dict[str, Any] | None) -> None:
    """OpenAI: "omitting parameters defines a function with an empty parameter list"; vLLM's
    "required" schema makes them an object of no properties, and its default backend writes {}.
    Any object was allowed here: a random model wrote keys into a parameterless call until
    max_tokens, named and "required" alike."""
    from dlora.services.worker.engine.structured import Grammars
    from tests.unit.test_token_bytes import byte_level

    hf = byte_level()
    grammars = Grammars(hf, len(hf), {hf.eos_token_id})
    for schema, written in (
        (calls_schema([("ping", parameters)]), '[{{"name": "ping", "parameters": {}}}]'),
        (arguments_schema(parameters), "{}"),
    ):
        for arguments, ok in (("{}", True), ('{"x": 1}', False)):
            matcher = grammars.matcher(SamplingParams(json_schema=json.dumps(schema)), [])
            assert matcher is not None
            text = written.format(arguments)
            assert matcher.consume_tokens(hf.encode(text, add_special_tokens=False)) is ok, text


def test_an_open_item_is_kept_in_pieces_not_copied_at_each_token() -> None:
    """A review: the output grew by a str concatenation at every token (and the open item was
    sliced off it again), all of it copied each time: a 200 kB argument took 0.5-0.8 s of the
    gateway's loop. An open item's pieces are kept and joined once, as it ends; what was read into
    calls goes. Checked by what is kept, not by the clock."""
    stream, piece = CallStream(), 'k]}{"'.replace('"', '\\"')
    assert stream.feed('[{"name": "a", "parameters": {}}, {"name": "f", "parameters": {"s": "') == [(0, "a", "{}")]
    held = len(stream.text)
    for _ in range(1000):
        assert stream.feed(piece) == []
    assert len(stream.text) == held and len(stream._pieces) == 1000  # none joined yet
    assert stream.feed('"}}') == [(1, "f", arguments_json({"s": 'k]}{"' * 1000}))]
    assert stream._pieces == [] and not stream.text.startswith("[")  # the first item's text is gone
    assert stream.feed("]") == [] and stream.closed and stream.feed(" trailing") == []


def test_blanks_between_items_are_read_once_not_kept() -> None:
    """A review of the pieces' change: between items (and before the list) nothing was kept apart
    and the blanks were not passed, so each token joined all of them again and a Python loop
    stepped over them again (8,000 newline tokens: 2.7 s of the gateway's loop, 0.2 s before it).
    Blanks read are passed; checked by what is kept, not by the clock."""
    stream = CallStream()
    for _ in range(1000):
        assert stream.feed("\n") == []
    assert len(stream.text) <= 1
    assert stream.feed('[{"name": "a", "parameters": {}}') == [(0, "a", "{}")]
    for _ in range(1000):
        assert stream.feed(" \n") == []
    assert len(stream.text) <= len(" \n")
    assert stream.feed(', {"name": "b", "parameters": {}}]') == [(1, "b", "{}")] and stream.closed


def test_an_empty_piece_does_not_join_an_open_item() -> None:
    """A token that completes no character (or that a stop string holds) has an event with no
    text: each joined the open item's pieces, an argument of emoji or CJK copied again at every
    other token (a review of the pieces' change). Checked by what is kept."""
    stream = CallStream()
    assert stream.feed('[{"name": "f", "parameters": {"s": "') == []
    held = len(stream.text)
    for _ in range(1000):
        assert stream.feed("日本😀") == [] and stream.feed("") == []
    assert len(stream.text) == held and len(stream._pieces) == 1000
    assert stream.feed('"}}]') == [(0, "f", arguments_json({"s": "日本😀" * 1000}))] and stream.closed
