"""Public structured-output bug reports (vLLM, xgrammar, llguidance and servers built on them)
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
