"""JSON Schemas as their writers' tools write them, served as vLLM's default backend reads them."""

from __future__ import annotations

import json

import pytest

from dlora.common.messages import SamplingParams
from dlora.services.worker.engine.served_schema import served_schema
from dlora.services.worker.engine.structured import GrammarError, check


@pytest.mark.parametrize(
    "uri",
    [
        "http://json-schema.org/schema#",
        "https://json-schema.org/schema",
        "https://spec.openapis.org/oas/3.1/dialect/base",
    ],
)
def test_a_dialect_the_engine_does_not_know_is_an_annotation(uri: str) -> None:
    """GenSON writes "$schema": "http://json-schema.org/schema#" by default, OpenAPI 3.1 documents
    their own dialect: llguidance tried to fetch it and refused the schema (a 400), where vLLM's
    default backend reads $schema as an annotation. The drafts it knows are kept (draft-04's
    readings differ)."""
    nested = {"type": "object", "properties": {"a": {"$schema": uri, "type": "boolean"}}, "required": ["a"]}
    for schema in ({"$schema": uri, "type": "boolean"}, nested):
        check(SamplingParams(json_schema=json.dumps(schema)))
    kept = json.dumps({"$schema": "http://json-schema.org/draft-04/schema#", "type": "boolean"})
    assert served_schema(kept) == (kept, None)


@pytest.mark.parametrize("length", [2**32, 2**53 - 1, 2**63 - 1, 10**30])
def test_string_lengths_past_32_bits_are_served(length: int) -> None:
    """A maxLength of 2**53 - 1 (Number.MAX_SAFE_INTEGER) or 2**63 - 1 was a 400 "regex parse
    error: decimal literal invalid" (llguidance's repetitions are 32-bit); no context holds such a
    string, so it is served as 2**32 - 1, and a minLength alike."""
    for key in ("maxLength", "minLength"):
        schema = json.dumps({"type": "object", "properties": {"s": {"type": "string", key: length}}})
        check(SamplingParams(json_schema=schema))
        assert json.loads(served_schema(schema)[0])["properties"]["s"][key] == 2**32 - 1


@pytest.mark.parametrize(
    "schema,reason",
    [
        ('{"properties": {"a": ' * 70 + "{}" + "}}" * 70, "nests deeper than the grammar engine reads"),
        ('{"const": 1e400}', "holds a number past what the grammar engine reads"),
    ],
)
def test_a_schema_past_the_engines_reader_says_so(schema: str, reason: str) -> None:
    """70 levels of nested properties (140 of JSON), or a const of 1e400, were refused "is not a
    JSON object: recursion limit exceeded" ("number out of range"): each is one, past what
    llguidance's JSON reader takes."""
    with pytest.raises(GrammarError) as refused:
        check(SamplingParams(json_schema=schema))
    assert reason in str(refused.value) and "not a JSON object" not in str(refused.value)


@pytest.mark.parametrize(
    "schema,key,read",
    [
        ('{"const": 9007199254740993}', "const", "9007199254740992"),  # 2**53 + 1: an int64 id
        ('{"const": 1.5e-400}', "const", "0"),
        ('{"type": "object", "properties": {"a": {"enum": ["x", [12345678901234567890123]]}}}', "enum", "1.23"),
        ('{"type": "number", "minimum": 1e-400}', "minimum", "0"),
        ('{"type": "integer", "maximum": 9007199254740999}', "maximum", "9007199254741000"),  # allowed that
        ('{"type": "integer", "minimum": 9007199254740993}', "minimum", "9007199254740992"),  # and that
        ('{"type": "integer", "maximum": 9223372036854775806}', "maximum", "9223372036854775807"),
    ],
)
def test_a_number_the_engine_would_write_as_another_is_refused(schema: str, key: str, read: str) -> None:
    """llguidance holds a const's and an enum's numbers as 64-bit floats: "const": 9007199254740993
    was served as 9007199254740992 and 1.5e-400 as 0, a 200 whose document a Python client reads
    as another number than its schema's; a minimum of 1e-400 allowed 0. Refused, saying which."""
    with pytest.raises(GrammarError, match=f"holds {key} .*, which the grammar engine reads as {read}"):
        check(SamplingParams(json_schema=schema))


@pytest.mark.parametrize(
    "value",
    ["0.1", "0.30000000000000004", "1E2", "-0", "9223372036854775807", "5e-324", "3.14159265358979323846"],
)
def test_numbers_the_engine_writes_as_given_are_served(value: str) -> None:
    """Floats' shortest forms, an int64's maximum (written back exactly), the least subnormal, and
    a decimal past a float's digits (pi to 20: written as the float every float reader makes of it;
    a review found it refused, though xgrammar serves it)."""
    for schema in (f'{{"const": {value}}}', f'{{"enum": [{value}, "x"]}}', f'{{"const": {{"a": [{value}]}}}}'):
        check(SamplingParams(json_schema=schema))
    if value in ("9223372036854775807", "1E2"):  # (bounds llguidance reads exactly)
        check(SamplingParams(json_schema=f'{{"type": "integer", "maximum": {value}, "minimum": -9007199254740992}}'))


@pytest.mark.parametrize(
    "schema,text,ok",
    [
        ({"properties": {"a": {"type": "boolean"}}, "required": ["a"]}, '{"a": true}', True),
        ({"properties": {"a": {"type": "boolean"}}, "required": ["a"]}, "694.0", False),
        ({"properties": {"a": {"type": "boolean"}}}, '"a"', False),
        ({"additionalProperties": {"type": "integer"}}, "[]", False),
        ({"items": {"type": "integer"}}, "[1, 2]", True),
        ({"prefixItems": [{"type": "integer"}]}, "true", False),
        ({"required": ["a"]}, "7", True),  # nothing implies a type (xgrammar alike)
        ({"anyOf": [{"properties": {"a": {}}}, {"type": "string"}]}, '"s"', True),
        ({"type": "object", "additionalProperties": {"items": {"type": "null"}}}, '{"k": [null]}', True),
        ({"type": "object", "additionalProperties": {"items": {"type": "null"}}}, '{"k": 1}', False),
        ({"allOf": [{"properties": {"a": {}}}, {"type": "string"}]}, '"s"', True),  # a branch: as written
    ],
)
def test_a_schema_naming_properties_or_items_without_a_type_is_an_object_or_an_array(
    schema: dict[str, object], text: str, ok: bool
) -> None:
    """vLLM's default backend (xgrammar) reads a schema with properties (additionalProperties,
    unevaluatedProperties) and no "type" as an object's, with items (prefixItems) as an array's;
    llguidance, as JSON Schema, let any other value pass it: {"properties": ..., "required":
    ["a"]} answered "694.0E+0040806666406666666664" (a random model's; four seeds of four)."""
    from dlora.services.worker.engine.structured import Grammars
    from tests.unit.test_token_bytes import byte_level

    hf = byte_level()
    matcher = Grammars(hf, len(hf), {hf.eos_token_id}).matcher(SamplingParams(json_schema=json.dumps(schema)), [])
    assert matcher is not None
    taken = matcher.consume_tokens(hf.encode(text, add_special_tokens=False))
    assert (taken and matcher.is_accepting()) is ok, (schema, text)
