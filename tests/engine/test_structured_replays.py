"""Public structured-output bug reports (vLLM, xgrammar, llguidance, outlines and servers built on them)
replayed against dlora's engine: each output is checked against its schema, regex or choice
(the grammar binds a random model's tokens), and a schema feature the grammar engine would not
enforce is refused naming it, never served loose."""

from __future__ import annotations

import json
import re

import pytest

from dlora.common.messages import FinishReason, SamplingParams
from dlora.model.make_tiny import TinyOutput
from dlora.services.worker.engine import LLMEngine, RequestError
from dlora.services.worker.engine.structured import GrammarError, check
from tests.engine.helpers import make_engine
from tests.engine.test_structured import PROMPT, run

SEEDS = range(6)


@pytest.fixture(scope="module")
def engine(tiny_llama: TinyOutput) -> LLMEngine:
    """One engine for the file: each request's seed alone decides its tokens."""
    return make_engine(tiny_llama)


def sampled(engine: LLMEngine, params: SamplingParams, max_tokens: int = 48) -> list[str]:
    """The texts of one request per seed (temperature 1), each ended by its constraint (STOP)."""
    asked = {
        f"s{seed}": SamplingParams(**{**_fields(params), "temperature": 1.0, "seed": seed, "max_tokens": max_tokens})
        for seed in SEEDS
    }
    out = run(engine, asked)
    texts = []
    for rid, (_, text, reason) in out.items():
        assert reason is FinishReason.STOP, (rid, text)
        texts.append(text)
    return texts


def _fields(params: SamplingParams) -> dict:
    return {f: getattr(params, f) for f in ("json_schema", "regex", "choice", "grammar")}


def schema(value: dict) -> SamplingParams:
    return SamplingParams(json_schema=json.dumps(value))


def test_a_pattern_beside_length_bounds_keeps_both(engine: LLMEngine) -> None:
    """vllm-project/vllm #45592, mlc-ai/xgrammar #895 (and #131): with a ``pattern`` the string's
    ``minLength``/``maxLength`` were dropped, a 200 whose string broke a column bound."""
    texts = sampled(
        engine,
        schema(
            {
                "type": "object",
                "properties": {"k": {"type": "string", "pattern": "^[a-z]+$", "minLength": 2, "maxLength": 3}},
                "required": ["k"],
            }
        ),
    )
    for text in texts:
        assert re.fullmatch("[a-z]{2,3}", json.loads(text)["k"]), text


def test_a_choice_that_begins_another_is_answered_whole(engine: LLMEngine) -> None:
    """vllm-project/vllm #12225 and #13260: guided_choice answered a sentence around the choice, or
    never ended. Each output is one choice exactly, "yes" able to end where "yes please" goes on."""
    choices = ["yes", "yes please", "no"]
    for text in sampled(engine, SamplingParams(choice=choices)):
        assert text in choices, text


def test_draft_04_boolean_exclusive_bounds_are_exclusive(engine: LLMEngine) -> None:
    """cloudflare/doca #61, Qiskit/ibm-quantum-schemas #17: draft-04's ``exclusiveMinimum: true``
    (a flag on ``minimum``, a number from draft-06 on) read as another draft's allowed the bound."""
    bounds = {"type": "integer", "minimum": 5, "exclusiveMinimum": True, "maximum": 8, "exclusiveMaximum": True}
    for text in sampled(engine, schema({"$schema": "http://json-schema.org/draft-04/schema#", **bounds})):
        assert json.loads(text) in (6, 7), text


def test_refs_anyof_enum_and_bounds_are_all_followed(engine: LLMEngine) -> None:
    """raullenchai/Rapid-MLX #419 (upstream waybarrios/vllm-mlx #546): a schema of $defs, $ref,
    anyOf, enum and numeric bounds, shallowly converted, answered an array of strings where an
    object was asked for. Every part binds here: the object, its enum, its bounds, its null branch."""
    texts = sampled(
        engine,
        schema(
            {
                "$defs": {"label": {"enum": ["New", "Mostly New", "Known"]}},
                "type": "object",
                "properties": {
                    "score": {"type": "integer", "minimum": 0, "maximum": 10},
                    "label": {"$ref": "#/$defs/label"},
                    "note": {"anyOf": [{"type": "null"}, {"type": "boolean"}]},
                },
                "required": ["score", "label", "note"],
                "additionalProperties": False,
            }
        ),
    )
    for text in texts:
        doc = json.loads(text)
        assert set(doc) == {"score", "label", "note"}, text
        assert 0 <= doc["score"] <= 10 and doc["label"] in ("New", "Mostly New", "Known"), text
        assert doc["note"] is None or isinstance(doc["note"], bool), text


def test_an_anchor_reference_is_resolved(engine: LLMEngine) -> None:
    """ai-dynamo/dynamo #12795 (guided-decoding schema validation): ``$anchor`` references and
    their cycles took a backend down or were left unresolved; here one is followed."""
    anchored = {"$defs": {"d": {"$anchor": "digit", "type": "integer", "minimum": 0, "maximum": 3}}, "$ref": "#digit"}
    for text in sampled(engine, schema(anchored)):
        assert json.loads(text) in (0, 1, 2, 3), text


@pytest.mark.parametrize(
    "value,keyword",
    [
        ({"if": {"type": "integer"}, "then": {"minimum": 3}, "else": {"type": "string"}}, "if"),
        ({"type": "array", "contains": {"const": 5}}, "contains"),
        ({"type": "array", "contains": {"type": "integer"}, "minContains": 2}, "minContains"),
        ({"type": "object", "propertyNames": {"pattern": "^[a-c]$"}}, "propertyNames"),
        ({"type": "object", "dependentRequired": {"a": ["b"]}}, "dependentRequired"),
    ],
)
def test_keywords_the_engine_cannot_enforce_are_refused_naming_them(value: dict, keyword: str) -> None:
    """kekzl/imp #1567 (and googleapis/go-genai #886): validation keywords accepted and silently
    discarded, a request that bounds its output answered as if it had not. Refused, named."""
    with pytest.raises(GrammarError, match=keyword):
        check(schema(value))


def test_llguidance_lenient_mode_is_refused_not_a_loose_document(engine: LLMEngine) -> None:
    """guidance-ai/llguidance #136: its "lenient" option ignores every keyword it cannot enforce.
    Sent in a schema's "x-guidance", {"not": {"type": "string"}} was served as any value (a string
    too), a 200; now a 400 naming the option, on the gateway's check and on the worker, in a Lark
    grammar's %json block too."""
    loose = {"not": {"type": "string"}, "x-guidance": {"lenient": True}}
    with pytest.raises(GrammarError, match="lenient"):
        check(schema(loose))
    with pytest.raises(RequestError, match="lenient"):
        engine.add_request("x", prompt_token_ids=PROMPT, params=schema(loose))
    check(schema({"type": "integer", "x-guidance": {"lenient": False}}))  # asks for nothing loose
    with pytest.raises(GrammarError, match="%json block that asks for .x-guidance. .lenient"):  # a grammar's schema too
        check(SamplingParams(grammar=f"start: %json {json.dumps(loose)}"))


@pytest.mark.parametrize(
    "value",
    [
        {"type": "object", "patternProperties": {"^[a-c]$": {"type": "integer"}}, "additionalProperties": False},
        {"type": "object", "additionalProperties": {"type": "integer"}},
    ],
    ids=["pattern", "additional"],
)
def test_min_properties_over_keys_that_may_repeat_is_refused(value: dict) -> None:
    """guidance-ai/llguidance #168 (min/maxProperties, counted as written): a key of
    patternProperties or additionalProperties may be written twice, {"b": 3, "b": 4}, which every
    JSON reader takes as one key: minProperties 2 answered one. Refused, naming it; a count its
    named properties hold, a minimum of 1, and a schema whose type is no object's are served."""
    with pytest.raises(GrammarError, match="minProperties 2"):
        check(schema({**value, "minProperties": 2.0}))
    check(schema({**value, "minProperties": 1, "maxProperties": 2}))
    named = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "minProperties": 2}
    check(schema({**named, "required": ["a", "b"]}))  # closed over its names: no key repeats
    check(schema({"type": ["string", "null"], "minProperties": 2}))  # no object: constrains nothing


def test_a_patterns_dot_matches_no_line_terminator(engine: LLMEngine) -> None:
    """json-schema-org/json-schema-spec #1469: a pattern's "." is ECMA-262's, any character but a
    line terminator (\\n, \\r, U+2028, U+2029). The grammar engine's (Rust's) left out \\n alone:
    "^.{2}$" took "a\\r", which a JavaScript client's validator refuses. An escaped dot and a dot in
    a class are the character itself, a dotAll group's any character; patternProperties names are
    read alike."""

    def takes(value: dict, text: str) -> bool:
        matcher = engine.grammars.matcher(schema(value), [])
        assert matcher is not None
        ids = engine.tokenizer.encode(text, add_special_tokens=False)
        return matcher.consume_tokens(ids) and not matcher.is_error() and matcher.is_accepting()

    dots = {"type": "string", "pattern": "^a.$"}
    assert takes(dots, '"ab"') and takes(dots, '"a."')
    for terminator in ("\\r", "\\n", "\u2028", "\\u2028", "\u2029"):
        assert not takes(dots, f'"a{terminator}"'), terminator
    assert takes({"type": "string", "pattern": "^[.]\\.$"}, '".."')
    assert not takes({"type": "string", "pattern": "^[.]\\.$"}, '"\\r."')
    keys = {"type": "object", "patternProperties": {"^k.$": {"type": "integer"}}, "additionalProperties": False}
    assert takes(keys, '{"ka": 1}') and not takes(keys, '{"k\\r": 1}')
    # A dotAll group (ECMA-262's modifier, ES2025; Rust's too) keeps its "." any character, and
    # only its own: rewritten, "(?s:.)" refused the "\r" its writer allowed.
    flagged = {"type": "string", "pattern": "^(?s:.)(?-s:.)?.$"}
    assert takes(flagged, '"\\rb"') and takes(flagged, '"\u2028ab"')
    assert not takes(flagged, '"a\\r"') and not takes(flagged, '"a\\rb"')


@pytest.mark.parametrize(
    "dialect", [{}, {"$schema": "http://json-schema.org/draft-03/schema#"}], ids=["none", "draft-03"]
)
def test_draft_03s_required_flag_is_refused_not_passed_over(dialect: dict) -> None:
    """bcherny/json-schema-to-typescript #396 (and glideapps/quicktype #991): draft-03 marks a
    property ``"required": true`` on the property itself; read as a later draft, the flag was passed
    over and the property left optional ({} answered). Refused naming it: its writer meant a
    constraint the grammar engine would drop. ``"required": false`` asks for nothing: served."""
    flagged = {"type": "object", "properties": {"a": {"type": "integer", "required": True}}, **dialect}
    with pytest.raises(GrammarError, match='"required": true'):
        check(schema(flagged))
    check(schema({"type": "object", "properties": {"a": {"type": "integer", "required": False}}, **dialect}))


def test_min_and_max_items_bound_an_arrays_length(engine: LLMEngine) -> None:
    """vllm-project/vllm #12201 (mlc-ai/xgrammar #160): ``list[str] = Field(min_length=2,
    max_length=2)`` asked for two names and got four, the array's bounds dropped."""
    names = {"type": "array", "items": {"type": "string", "maxLength": 2}, "minItems": 2, "maxItems": 2}
    for text in sampled(engine, schema({"type": "object", "properties": {"names": names}, "required": ["names"]})):
        assert len(json.loads(text)["names"]) == 2, text


def test_an_integer_bound_past_32_bits_is_served(engine: LLMEngine) -> None:
    """vllm-project/vllm #17894: ``conint(ge=0, le=20_000_000_000)`` took the engine down
    ("maximum must be an integer"). Served, and held to."""
    population = {"type": "integer", "minimum": 0, "maximum": 20_000_000_000}
    for text in sampled(engine, schema({"type": "object", "properties": {"p": population}, "required": ["p"]})):
        value = json.loads(text)["p"]
        assert type(value) is int and 0 <= value <= 20_000_000_000, text


def test_a_document_is_laid_out_with_no_whitespace_of_the_models(engine: LLMEngine) -> None:
    """vllm-project/vllm #4093: guided_json let a model write whitespace between tokens without end
    (llama2-13b's newlines until max_tokens). Each document is laid out as json.dumps lays it out."""
    value = {"type": "object", "properties": {"a": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}}}
    for text in sampled(engine, schema({**value, "required": ["a"]})):
        assert text == json.dumps(json.loads(text)), text


def test_a_pydantic_enum_through_a_reference_is_followed(engine: LLMEngine) -> None:
    """vllm-project/vllm #15236 (fixed in #15594): a pydantic ``str`` Enum, written as a ``$defs``
    entry and a ``$ref``, was refused as unsupported or its values left unenforced."""
    car = {
        "$defs": {"CarType": {"enum": ["sedan", "SUV", "Truck", "Coupe"], "title": "CarType", "type": "string"}},
        "properties": {"brand": {"type": "string", "maxLength": 3}, "car_type": {"$ref": "#/$defs/CarType"}},
        "required": ["brand", "car_type"],
        "title": "CarDescription",
        "type": "object",
    }
    for text in sampled(engine, schema(car)):
        assert json.loads(text)["car_type"] in ("sedan", "SUV", "Truck", "Coupe"), text


def test_an_empty_grammar_is_refused_saying_why(engine: LLMEngine) -> None:
    """vllm-project/vllm #23215: ``guided_grammar: ""`` crashed the grammar backend's compile. A
    grammar with no rule is refused before any token, naming why, and the engine serves on."""
    for empty in ("", "  \n"):
        with pytest.raises(GrammarError, match="root"):
            check(SamplingParams(grammar=empty))
        with pytest.raises(RequestError, match="root"):
            engine.add_request("empty", prompt_token_ids=PROMPT, params=SamplingParams(grammar=empty))
    assert sampled(engine, SamplingParams(choice=["ok"])) == ["ok"] * len(SEEDS)


def test_a_lark_grammar_with_inlined_rules_and_imports_is_served(engine: LLMEngine) -> None:
    """dottxt-ai/outlines #1610: vLLM's workers died on an arithmetic Lark grammar (``?start``,
    ``%import common.NUMBER``). Served: each output that ends is an expression of it (Python reads
    it as one), and one cut by max_tokens is a prefix of one (a random model may nest on)."""
    arithmetic = (
        '?start: expression\n?expression: term (("+" | "-") term)*\n?term: factor (("*" | "/") factor)*\n'
        '?factor: NUMBER | "-" factor | "(" expression ")"\n%import common.NUMBER\n'
    )
    asked = {f"s{s}": SamplingParams(grammar=arithmetic, temperature=1.0, seed=s, max_tokens=32) for s in SEEDS}
    ended = 0
    for rid, (_, text, reason) in run(engine, asked).items():
        assert re.fullmatch(r"[0-9.eE+*/()-]+", text), (rid, text)
        if reason is FinishReason.STOP:
            compile(text, "<expression>", "eval")  # (a SyntaxError fails the test)
            ended += 1
    assert ended, "no output ended"


def test_a_format_beside_length_bounds_keeps_both(engine: LLMEngine) -> None:
    """vllm-project/vllm PR #45599: xgrammar dropped a string's ``minLength``/``maxLength`` beside a
    ``format`` (email, uuid). Both bind here: an address of the format, within the lengths."""
    email = {"type": "string", "format": "email", "minLength": 8, "maxLength": 12}
    for text in sampled(engine, schema({"type": "object", "properties": {"e": email}, "required": ["e"]})):
        address = json.loads(text)["e"]
        assert 8 <= len(address) <= 12 and re.fullmatch(r"[^@]+@[^@]+\.[A-Za-z]{2,}", address), text


def test_a_property_left_out_of_required_is_optional_not_nullable(engine: LLMEngine) -> None:
    """dottxt-ai/outlines #1948 (PR #1949): a property missing from ``required`` was served as
    nullable, ``"age": null`` for ``{"type": "integer"}``. It may be left out; never null."""
    person = {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 9}}}
    for text in sampled(engine, schema(person)):
        assert json.loads(text).get("age", 0) in range(10), text


def test_streamed_pieces_make_the_document(engine: LLMEngine) -> None:
    """vllm-project/vllm #10376: with ``stream``, guided decoding's output broke (pieces that did not
    add up to the schema's document). Each step's new text, joined, is the document, and it is the
    detokenized whole."""
    params = SamplingParams(json_schema=json.dumps({"type": "array", "items": {"enum": ["kalo", "remi"]}}))
    for rid, (tokens, text, reason) in run(engine, {"stream": params}).items():
        assert reason is FinishReason.STOP and text == engine.tokenizer.decode(tokens), (rid, text)
        assert set(json.loads(text)) <= {"kalo", "remi"}


def test_a_reference_cycle_with_no_base_case_is_refused_and_one_with_a_base_case_served(engine: LLMEngine) -> None:
    """vllm-project/vllm #57725 (PR #57788): ``{"$ref": "#/$defs/n"}`` with ``n`` a reference to
    itself passed validation and killed the request at its first token (a 500). Refused up front;
    a recursive schema that ends (a tree whose children may be empty) is served."""
    endless = {"$ref": "#/$defs/n", "$defs": {"n": {"$ref": "#/$defs/n"}}}
    with pytest.raises(RequestError, match="json_schema"):
        engine.add_request("cycle", prompt_token_ids=PROMPT, params=schema(endless))
    node = {
        "type": "object",
        "properties": {"v": {"type": "boolean"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/N"}}},
        "required": ["v", "kids"],
    }
    for text in sampled(engine, schema({"$defs": {"N": node}, "$ref": "#/$defs/N"}), max_tokens=96):
        stack = [json.loads(text)]
        while stack:
            doc = stack.pop()
            assert set(doc) == {"v", "kids"} and isinstance(doc["v"], bool), text
            stack += doc["kids"]
