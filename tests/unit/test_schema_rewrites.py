"""What ``served_schema`` rewrites of a JSON Schema for the grammar engine to serve it as JSON
Schema, pydantic and vLLM's default backend read it (unknown formats, integral counts, closed
objects, overlapping oneOf, no-op keywords, boolean schemas, dates, nullable), and what it still
refuses (``structured.check``): each a 400 naming why, never a crash."""

from __future__ import annotations

import json
import re

import pytest

from dlora.common.messages import SamplingParams
from dlora.services.worker.engine.structured import GrammarError, check

# Formats pydantic 2 writes for SecretStr, bytes, Path, FilePath, IPv4Network, IPv6Interface and
# Base64Str, and uri-reference (vLLM's default backend, xgrammar, enforces it): JSON Schema reads
# a format its validator does not know as an annotation, never a failure. Counts written as
# integral floats (2.0), as JavaScript generators and float-typed configs emit them, are JSON
# Schema's integers.
PYDANTIC_FORMATS = ["password", "binary", "path", "file-path", "ipv4network", "ipv6interface", "base64"]
PYDANTIC_FORMATS.append("uri-reference")
INTEGRAL_FLOATS = {
    "type": "object",
    "properties": {
        "code": {"type": "string", "minLength": 1.0, "maxLength": 2.0},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1.0, "maxItems": 3.0},
        "meta": {"type": "object", "minProperties": 0.0, "maxProperties": 1e0},
    },
    "required": ["code", "tags"],
}


@pytest.mark.parametrize("fmt", PYDANTIC_FORMATS)
def test_a_string_format_the_engine_does_not_know_is_a_plain_string(fmt: str) -> None:
    prop = {"format": fmt, "title": "Secret", "type": "string", "writeOnly": True}
    check(SamplingParams(json_schema=json.dumps({"type": "object", "properties": {"s": prop}, "required": ["s"]})))


def test_counts_written_as_integral_floats_are_taken() -> None:
    check(SamplingParams(json_schema=json.dumps(INTEGRAL_FLOATS)))


@pytest.mark.parametrize(
    "schema,reason",
    [
        ({"type": "string", "maxLength": 2.5}, "maxLength"),  # not an integer
        ({"type": "array", "minItems": -1.0}, "minItems"),  # not a count
        ({"type": "array", "uniqueItems": True}, "uniqueItems"),  # a keyword not enforced: still refused
        ({"not": {"type": "string"}}, "not"),
    ],
)
def test_what_the_engine_cannot_enforce_is_still_refused(schema: dict, reason: str) -> None:
    with pytest.raises(GrammarError, match=reason):
        check(SamplingParams(json_schema=json.dumps(schema)))


def test_only_unknown_formats_and_integral_counts_are_rewritten() -> None:
    """A format the engine enforces stays (uuid), and so do data and names that read "format"
    (an enum's object, a property so named); numbers elsewhere are written back as they came."""
    from dlora.services.worker.engine.served_schema import served_schema

    schema = {
        "type": "object",
        "properties": {
            "format": {"enum": [{"format": "password", "maxLength": 2.0}], "default": 0.10},
            "to": {"type": "string", "format": "uuid", "maxLength": 40.0},
            "pw": {"type": "string", "format": "password"},
            "x": {"type": "number", "maximum": 1.50, "multipleOf": 0.25},
        },
    }
    served, bound = served_schema(json.dumps(schema))
    assert bound is None and json.loads(served) == {
        "type": "object",
        "properties": {
            "format": {"enum": [{"format": "password", "maxLength": 2.0}], "default": 0.10},
            "to": {"type": "string", "format": "uuid", "maxLength": 40},
            "pw": {"type": "string"},
            "x": {"type": "number", "maximum": 1.50, "multipleOf": 0.25},
        },
        "additionalProperties": False,  # (see below)
    }
    exact = '{"type": "string", "format": "password", "x-note": 0.12345678901234567890123}'
    assert "0.12345678901234567890123" in served_schema(exact)[0]  # numbers as written, not as floats
    untouched = json.dumps({"type": "string", "format": "uuid", "maxLength": 3})
    assert served_schema(untouched) == (untouched, None)


def test_objects_with_named_properties_take_no_others_unless_the_schema_says() -> None:
    """vLLM's default backend (xgrammar, strict) and outlines serve an object's named properties
    alone, and vLLM makes its guidance backend do so (PR #15949): pydantic writes no
    additionalProperties, and llguidance's reading (JSON Schema's: any others allowed) let a model
    add keys without end. Where the schema says (true, or a schema), as it says; allOf's branches
    are left as written (each would forbid the others' properties), and patternProperties too."""
    from dlora.services.worker.engine.served_schema import served_schema

    point = {"type": "object", "properties": {"x": {"type": "integer"}}}
    schema = {
        "type": "object",
        "properties": {"p": {"$ref": "#/$defs/P"}, "q": {"anyOf": [point, {"type": "null"}]}},
        "$defs": {"P": {"type": "object", "properties": {"y": {"type": "integer"}}, "additionalProperties": True}},
    }
    served = json.loads(served_schema(json.dumps(schema))[0])
    assert served["additionalProperties"] is False
    assert served["properties"]["q"]["anyOf"][0]["additionalProperties"] is False
    assert served["$defs"]["P"]["additionalProperties"] is True
    for kept in (
        {"type": "object"},  # json_object's: any object
        {"type": "object", "properties": {"x": {}}, "additionalProperties": {"type": "integer"}},
        {"allOf": [point, {"properties": {"y": {"type": "integer"}}}]},
        {"$defs": {"P": point}, "$ref": "#/$defs/P", "properties": {"y": {"type": "integer"}}},
        # llguidance #265: closed over patterns matching a named property, no key may follow ", "
        {"type": "object", "properties": {"n": {}}, "patternProperties": {"^n$": {"type": "integer"}}},
    ):
        assert json.loads(served_schema(json.dumps(kept))[0]) == kept, kept
    wrapped = {"definitions": {"P": point}, "properties": {"p": {"allOf": [{"$ref": "#/definitions/P"}]}}}
    served = json.loads(served_schema(json.dumps(wrapped))[0])  # pydantic v1's one-branch allOf
    assert served["additionalProperties"] is False and served["definitions"]["P"]["additionalProperties"] is False


@pytest.mark.parametrize(
    "schema",
    [
        {  # properties beside anyOf branches naming their own (a variant's fields)
            "type": "object",
            "properties": {"a": {"type": "integer"}},
            "required": ["a"],
            "anyOf": [{"properties": {"b": {"type": "string"}}, "required": ["b"]}, {"required": ["a"]}],
        },
        {  # a discriminated oneOf beside the discriminator's property
            "type": "object",
            "properties": {"kind": {"type": "string"}},
            "required": ["kind"],
            "oneOf": [{"properties": {"kind": {"const": "x"}, "x": {"type": "integer"}}, "required": ["x"]}],
        },
        {  # a base joined by a one-branch allOf, properties of its own beside it
            "$defs": {"B": {"type": "object", "properties": {"b": {"type": "integer"}}, "required": ["b"]}},
            "allOf": [{"$ref": "#/$defs/B"}],
            "properties": {"c": {"type": "integer"}},
            "required": ["c"],
        },
    ],
)
def test_properties_beside_branches_that_name_others_are_left_open(schema: dict) -> None:
    """Closed, the node forbade the properties its branches name and each branch the node's: a
    valid schema became unsatisfiable ("required property 'a' is unsatisfiable"), a 400 where it
    was served. A review of the additionalProperties rewrite (238e880): left as written, as allOf's."""
    from dlora.services.worker.engine.served_schema import served_schema

    assert json.loads(served_schema(json.dumps(schema))[0]) == schema
    check(SamplingParams(json_schema=json.dumps(schema)))


@pytest.mark.parametrize(
    "schema",
    [
        {"oneOf": [{"type": "integer"}, {"type": "number"}]},  # Union[int, float] as OpenAPI writes it
        {  # an OpenAPI generator's variants of optional properties ({} is either)
            "type": "object",
            "properties": {
                "target": {
                    "oneOf": [
                        {"type": "object", "properties": {"id": {"type": "integer"}}},
                        {"type": "object", "properties": {"name": {"type": "string"}}},
                    ]
                }
            },
        },
        {"type": "array", "items": {"oneOf": [{"type": "integer", "minimum": 0}, {"type": "integer", "maximum": 10}]}},
    ],
)
def test_a_oneof_whose_branches_may_overlap_is_served(schema: dict) -> None:
    """llguidance refuses a oneOf it cannot prove disjoint ("oneOf constraints are not supported"),
    a 400 where vLLM's default backend (xgrammar) and SGLang's serve it as anyOf."""
    check(SamplingParams(json_schema=json.dumps(schema)))


def test_a_name_required_but_not_listed_is_served_as_any_value() -> None:
    """Valid JSON Schema (the name may hold anything), made unsatisfiable by the closing rewrite:
    "required property 'b' is unsatisfiable", a 400. Listed as any value, the object stays closed."""
    from dlora.services.worker.engine.served_schema import served_schema

    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a", "b"]}
    check(SamplingParams(json_schema=json.dumps(schema)))
    served = json.loads(served_schema(json.dumps(schema))[0])
    assert served["properties"] == {"a": {"type": "integer"}, "b": {}} and served["additionalProperties"] is False


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "array", "items": {"type": "string"}, "uniqueItems": False},
        {"type": "object", "propertyNames": True},
        {"type": "object", "propertyNames": {}},
        {"type": "object", "properties": {"a": {}}, "dependentRequired": {}},
    ],
)
def test_a_keyword_the_engine_lacks_is_served_at_a_value_that_constrains_nothing(schema: dict) -> None:
    """llguidance refused any value of them ("Unimplemented keys"), a 400 for the uniqueItems: false
    that Jackson and OpenAPI generators write out; a value that constrains is refused still."""
    from dlora.services.worker.engine.served_schema import served_schema

    wrapped = {"type": "object", "properties": {"p": schema}, "required": ["p"]}
    check(SamplingParams(json_schema=json.dumps(wrapped)))
    served = json.loads(served_schema(json.dumps(wrapped))[0])["properties"]["p"]
    assert not served.keys() & {"uniqueItems", "propertyNames", "dependentRequired"}, served
    with pytest.raises(GrammarError, match="uniqueItems"):
        check(SamplingParams(json_schema=json.dumps({"type": "array", "uniqueItems": 0})))


def test_unevaluated_properties_of_a_plain_object_are_served_as_additional_ones() -> None:
    """llguidance lacks unevaluatedProperties ("Unimplemented keys", a 400; vLLM's default backend
    serves it); where no other schema evaluates the object's properties it is additionalProperties.
    Beside a $ref or a branch it is not, and is refused as before."""
    from dlora.services.worker.engine.served_schema import served_schema

    for value in (False, {"type": "integer"}):
        schema = {"type": "object", "properties": {"x": {"type": "string"}}, "unevaluatedProperties": value}
        check(SamplingParams(json_schema=json.dumps(schema)))
        served = json.loads(served_schema(json.dumps(schema))[0])
        assert "unevaluatedProperties" not in served and served["additionalProperties"] == value, served
    said = {"type": "object", "additionalProperties": True, "unevaluatedProperties": False}
    assert json.loads(served_schema(json.dumps(said))[0]) == {"type": "object", "additionalProperties": True}
    composed = {"$defs": {"B": {"type": "object"}}, "$ref": "#/$defs/B", "unevaluatedProperties": False}
    with pytest.raises(GrammarError, match="unevaluatedProperties"):
        check(SamplingParams(json_schema=json.dumps(composed)))


@pytest.mark.parametrize(
    "schema,reason",
    [
        ("false", "it accepts no document: a JSON Schema is an object, or true"),
        ("[]", "it is a JSON array: a JSON Schema is an object, or true"),
        ("null", "it is a JSON null"),
        ("3", "it is a JSON number"),
    ],
)
def test_a_top_level_boolean_schema_is_read_as_json_schema_reads_it(schema: str, reason: str) -> None:
    """``true`` (any JSON value) was refused "is not a JSON object: Expecting object schema to apply
    options", llguidance's words for the options dlora gives it; vLLM's default backend serves it,
    and says ``false`` accepts nothing. An application's ``SamplingParams.json_schema`` and a string
    ``guided_json`` are read so."""
    check(SamplingParams(json_schema="true"))
    with pytest.raises(GrammarError, match=f"^json_schema cannot be used: {re.escape(reason)}"):
        check(SamplingParams(json_schema=schema))


DATES = [  # (format, the string, whether pydantic, Python's fromisoformat and RFC 3339 all read it)
    ("date-time", "1963-06-19T08:30:06.283185Z", True),
    ("date-time", "2000-02-29T16:39:57-08:00", True),
    ("date-time", "0001-01-01T00:00:00+23:59", True),
    ("date-time", "1990-12-31T23:59:60Z", False),  # RFC 3339's leap second: "second must be in 0..59"
    ("date-time", "1963-06-19t08:30:06z", False),  # RFC 3339 allows, fromisoformat refuses
    ("date-time", "0000-01-01T00:00:00Z", False),
    ("date-time", "1900-02-29T00:00:00Z", False),
    ("date", "2024-02-29", True),
    ("date", "2023-02-29", False),
    ("time", "23:59:59.5+01:00", True),
    ("time", "23:59:60Z", False),
]


@pytest.mark.parametrize("fmt,text,ok", DATES)
def test_dates_and_times_are_ones_their_client_reads_back(fmt: str, text: str, ok: bool) -> None:
    """llguidance served RFC 3339's whole grammar (second 60, lowercase t and z, year 0000, 29
    February of any year), and a pydantic model's datetime, date or time field refused such a
    document: now the part every reader takes, as vLLM's default backend writes "T" and "Z"."""
    import datetime

    from pydantic import TypeAdapter

    from dlora.services.worker.engine.structured import Grammars
    from tests.unit.test_token_bytes import byte_level

    kind = {"date-time": datetime.datetime, "date": datetime.date, "time": datetime.time}[fmt]
    if ok:  # (the table's own check)
        TypeAdapter(kind).validate_json(json.dumps(text))
        kind.fromisoformat(text)
    hf = byte_level()
    grammars = Grammars(hf, len(hf), {hf.eos_token_id})
    for schema in ({"type": "string", "format": fmt}, {"type": "string", "format": fmt, "pattern": "^[0-9]"}):
        matcher = grammars.matcher(SamplingParams(json_schema=json.dumps(schema)), [])
        assert matcher is not None
        taken = matcher.consume_tokens(hf.encode(json.dumps(text), add_special_tokens=False))
        assert (taken and matcher.is_accepting()) is ok, (schema, text)


def test_openapis_nullable_is_an_annotation_as_vllms_backends_read_it() -> None:
    """OpenAPI 3.0's ``nullable: true`` (zod's openapi target, Google's SDKs) is no JSON Schema
    keyword: xgrammar, llguidance, outlines and llama.cpp ignore it, and OpenAI's structured
    outputs did (openai-node #1049). Served so: a null would fail the schema's own ``type`` in a
    JSON Schema validator. Taken, not refused; null only where the type says."""
    from dlora.services.worker.engine.structured import Grammars
    from tests.unit.test_token_bytes import byte_level

    hf = byte_level()
    grammars = Grammars(hf, len(hf), {hf.eos_token_id})
    for schema, text, ok in (
        ({"type": "string", "nullable": True}, '"a"', True),
        ({"type": "string", "nullable": True}, "null", False),
        ({"type": ["string", "null"], "nullable": True}, "null", True),
    ):
        matcher = grammars.matcher(SamplingParams(json_schema=json.dumps(schema)), [])
        assert matcher is not None
        taken = matcher.consume_tokens(hf.encode(text, add_special_tokens=False))
        assert (taken and matcher.is_accepting()) is ok, (schema, text)
