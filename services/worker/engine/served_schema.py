"""A JSON Schema as the grammar engine is given it, and the bounds it cannot hold.

llguidance holds numeric bounds in 64-bit integers (past them it clamps, or crashed its process),
refuses string formats it does not know and counts written as integral floats (pydantic's and
JavaScript generators' schemas), reads an object that names its properties as open to others and
a pattern's "." as Rust's, and leaves some keywords unenforced (its "lenient" option; a
minProperties its keys may repeat past), which are refused.
``served_schema`` screens and rewrites a schema for those (its numbers as ``schema_numbers``
reads them, its formats as ``read_back_formats`` serves them); ``laid_out`` lays out a Lark
grammar's JSON blocks as a schema is.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import msgspec
from llguidance import LLMatcher

from dlora.services.worker.engine.ecma_pattern import ecma_dots
from dlora.services.worker.engine.read_back_formats import read_back
from dlora.services.worker.engine.schema_numbers import BOUNDS, misread_number, too_large

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

# Documents are laid out as json.dumps lays them out, with no other whitespace: a model free to
# put whitespace anywhere may never leave it (a schema's "x-guidance" options can say otherwise).
# A oneOf whose branches may overlap (integer and number: pydantic's and OpenAPI generators'
# unions) is served as anyOf, as vLLM's default backend (xgrammar) and SGLang's serve it:
# llguidance refused it (a 400), and a document is still one of its branches (an integer, a
# number too, matches both). Branches it proves disjoint were exact already, and stay so.
LAYOUT: JsonCompileOptions = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
    "coerce_one_of": True,
}


# Keywords whose values are data, not schemas (a "maximum" key inside an enum's object is no bound),
# and those whose values map names to schemas (a property named "default" is a schema all the same).
DATA_KEYWORDS = frozenset({"enum", "const", "default", "examples"})
SCHEMA_MAPS = frozenset({"properties", "$defs", "definitions", "patternProperties", "dependentSchemas"})


# A Lark grammar's %json block is compiled with llguidance's defaults, whitespace anywhere between
# its tokens: a random model wrote whitespace after 'R={ "k"' up to max_tokens, never closing it
# (vLLM #4093's kind, which LAYOUT ends for schemas). Each is laid out as a schema, unless it says.
# Scanned as Lark's lexer reads it: a comment, string or regex holding "%json {" is no block (its
# string gained the options, a 400; a comment's unread JSON stopped the scan before the real ones).
_LARK_TOKEN = re.compile(r'(?://|#)[^\n]*|"(?:[^"\\\n]|\\.)*"|/(?:[^/\\\n]|\\.)+/|(%json\s*)(?=\{)')
_LAYOUT_OPTION = '"x-guidance": ' + json.dumps(LAYOUT)


def laid_out(grammar: str) -> str:
    """``grammar`` with each ``%json`` block that names no "x-guidance" options given ``LAYOUT``'s
    (spliced in as text: its numbers stay as written); raises NotASchema for a block whose options
    leave it unenforced (``_unenforced``)."""
    decoder, out, at, scanned = json.JSONDecoder(), [], 0, 0
    while (match := _LARK_TOKEN.search(grammar, scanned)) is not None:
        scanned = match.end()
        if match[1] is None:
            continue
        try:
            block, scanned = decoder.raw_decode(grammar, match.end())
        except (ValueError, RecursionError):  # (llguidance says why; one scan to its error, then none:
            break  # scanning on from each unclosed block would take time quadratic in them)
        if isinstance(block, dict) and (loose := _unenforced(block)) is not None:
            raise NotASchema(f"holds a %json block that {loose}")
        if not isinstance(block, dict) or "x-guidance" in block:
            continue
        out += [grammar[at : match.end() + 1], _LAYOUT_OPTION, ", " if block else ""]
        at = match.end() + 1
    return "".join(out) + grammar[at:]


def _schema_nodes(tree: Any) -> Iterator[dict[str, Any]]:
    """Every schema object in a decoded JSON Schema: not the data of enum, const, default and
    examples (a "format" key there is a value), and a map of names to schemas read as such (a
    property named "format" is a schema all the same). A loop: schemas thousands deep are served."""
    stack: list[tuple[Any, bool]] = [(tree, False)]
    while stack:
        node, names_schemas = stack.pop()
        if isinstance(node, list):
            stack.extend((item, False) for item in node)
        elif isinstance(node, dict) and names_schemas:
            stack.extend((value, False) for value in node.values())
        elif isinstance(node, dict):
            yield node
            stack.extend((value, key in SCHEMA_MAPS) for key, value in node.items() if key not in DATA_KEYWORDS)


# Keywords JSON Schema gives a non-negative integer, which it lets a number with no fraction be
# (2.0: JavaScript's generators and float-typed configs write them so); llguidance takes only
# integers written as such and refused these schemas.
_COUNTS = {"minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties"}
# A string's length bounds llguidance holds (a regex's repetition, 32 bits): past it, it refused the
# schema ("regex parse error: decimal literal invalid"), a 400 for a maxLength of 2**53 - 1 or
# 2**63 - 1 (JavaScript's and Java's largest). No context holds a string that long: served as it.
_LENGTHS = {"minLength", "maxLength"}
_MAX_LENGTH = 2**32 - 1
_DECIMALS = msgspec.json.Encoder(decimal_format="number")  # numbers written back as they were read
# Keywords llguidance does not implement, at values that constrain nothing: it refused them all
# the same ("Unimplemented keys"), a 400 for schemas that Jackson's, OpenAPI generators' and
# pydantic's (Field(unique_items=False)) writers spell out; vLLM's default backend serves them.
_NO_OPS: dict[str, tuple[Any, ...]] = {
    "uniqueItems": (False,),
    "propertyNames": (True, {}),
    "dependentRequired": ({},),
    "dependentSchemas": ({},),
    "dependencies": ({},),
}


# Keywords through which other schemas evaluate an object's properties. Where none is, as in a
# plain object, unevaluatedProperties reads as additionalProperties: llguidance lacks the first
# (a 400; xgrammar serves it) and has the second. Not beside patternProperties (llguidance #265).
_EVALUATING = frozenset(
    {"$ref", "$dynamicRef", "allOf", "anyOf", "oneOf", "if", "then", "else", "dependentSchemas", "patternProperties"}
)


def _same(value: Any, no_ops: tuple[Any, ...]) -> bool:
    """Whether ``value`` is one of ``no_ops`` as JSON reads it (1 is not true, nor 0 false)."""
    return any(type(value) is type(no_op) and value == no_op for no_op in no_ops)


@functools.lru_cache(maxsize=256)
def _known_format(name: str) -> bool:
    """Whether llguidance enforces string format ``name`` (a compile of ~50 us, once a name)."""
    probe = LLMatcher.grammar_from_json_schema(json.dumps({"type": "string", "format": name}), LAYOUT)
    return not LLMatcher.validate_grammar(probe).startswith("Unknown format")


@functools.lru_cache(maxsize=256)
def _known_dialect(uri: str) -> bool:
    """Whether llguidance reads a schema whose ``$schema`` is ``uri`` (JSON Schema's drafts 3 to
    2020-12); any other it looks up to fetch, and refused the schema."""
    probe = LLMatcher.grammar_from_json_schema(json.dumps({"$schema": uri}), LAYOUT)
    return not LLMatcher.validate_grammar(probe).startswith("Resource '")


class NotASchema(ValueError):
    """A JSON document that is no JSON Schema a document can follow (``false``, a number, a list)."""


_KINDS = {list: "array", str: "string", type(None): "null"}


def served_schema(text: str) -> tuple[str, tuple[str, str] | None]:
    """The JSON Schema ``text`` as the grammar engine is given it, and the first numeric bound in
    it whose magnitude reaches 2**63, as (keyword, its number), compared exactly (2**63 - 1,
    int64's maximum, read as a float was 2**63). Counts written as integral floats become
    integers; a string format llguidance does not know is left out, as JSON Schema reads a format
    its validator does not know (an annotation): pydantic writes SecretStr as "password", bytes
    as "binary", Path as "path", and llguidance refused them (a 400 for a pydantic model's
    schema); date-time, date and time are served as patterns their readers all take
    (``read_back_formats``); a ``$schema`` naming a dialect llguidance does not know (GenSON's
    default "http://json-schema.org/schema#", OpenAPI 3.1's) is left out, as vLLM's default
    backend reads any: llguidance refused the schema, failing to fetch it. An object whose
    properties are named takes no others unless it says so (as vLLM's default backend, xgrammar,
    and outlines read it, and vLLM makes its guidance backend do: PR #15949): pydantic writes no
    additionalProperties, and llguidance's reading (JSON Schema's, any others allowed) let a model
    add keys without end. Keywords llguidance lacks are left
    out at values that constrain nothing (``_NO_OPS``). A pattern's "." is ECMA-262's
    (``ecma_dots``). Rewritten only where one of those was found. The boolean schema ``true``
    is served as ``{}``; raises NotASchema for ``false`` and documents that are no schema
    (llguidance's reason for them named its own options), and for what the grammar engine would
    leave unenforced (``_unenforced``, ``_repeatable_keys``)."""
    try:
        tree = json.loads(text, parse_float=Decimal)
    except (ValueError, RecursionError):
        return text, None  # llguidance says why
    if tree is True:  # any JSON value, as JSON Schema and vLLM's default backend read it
        return "{}", None
    if not isinstance(tree, dict):  # (llguidance said "Expecting object schema to apply options")
        why = "accepts no document" if tree is False else f"is a JSON {_KINDS.get(type(tree), 'number')}"
        raise NotASchema(f"{why}: a JSON Schema is an object, or true (any JSON value)")
    if (loose := _unenforced(tree)) is not None:
        raise NotASchema(loose)
    bound, changed, nodes = None, False, list(_schema_nodes(tree))
    closed = not any(map(_composed, nodes))
    branches = {id(b) for node in nodes for k in _BRANCHES if isinstance(node.get(k), list) for b in node[k]}
    misread = None
    for node in nodes:
        misread = misread or misread_number(node)
        for key in BOUNDS & node.keys():
            value = node[key]
            if bound is None and isinstance(value, int | Decimal) and not isinstance(value, bool) and too_large(value):
                bound = key, str(value)
        for key in _COUNTS & node.keys():
            value = node[key]  # (its exponent first: int() of 1e1000000 is a million digits)
            if isinstance(value, Decimal) and value.is_finite() and value.adjusted() < 19:
                if value >= 0 and value == value.to_integral_value():
                    node[key], changed = int(value), True
        for key in _LENGTHS & node.keys():
            if type(node[key]) is int and node[key] > _MAX_LENGTH:
                node[key], changed = _MAX_LENGTH, True
        if isinstance(name := node.get("format"), str) and (read_back(node, name) or not _known_format(name)):
            node.pop("format", None)
            changed = True
        if isinstance(uri := node.get("$schema"), str) and not _known_dialect(uri):
            del node["$schema"]  # an annotation, as vLLM's default backend reads it
            changed = True
        for key in [key for key in _NO_OPS.keys() & node.keys() if _same(node[key], _NO_OPS[key])]:
            del node[key]
            changed = True
        if "unevaluatedProperties" in node and not _EVALUATING.intersection(node):
            unevaluated = node.pop("unevaluatedProperties")
            node.setdefault("additionalProperties", unevaluated)
            changed = True
        if id(node) not in branches and (implied := _implied_type(node)) is not None:
            node["type"], changed = implied, True
        changed = _ecma_patterns(node) or changed
        if closed and _open(node):
            node["additionalProperties"], changed = False, True
            _name_required(node)
        if (repeated := _repeatable_keys(node)) is not None:  # (as closed, counts made integers)
            raise NotASchema(repeated)
        if node.get("required") is True:  # draft-03's flag, which the grammar engine passed over
            raise NotASchema('holds "required": true (draft-03\'s): list the name in its object\'s "required" array')
    if misread is not None and bound is None:  # (a bound past 2**63 is said as such)
        key, value, read = misread
        raise NotASchema(
            f"holds {key} {value}, which the grammar engine reads as {read} (it holds a const's and an "
            "enum's numbers, and a bound's, as 64-bit floats): write it within a float's precision"
        )
    return (_DECIMALS.encode(tree).decode() if changed else text), bound


# Keywords by which vLLM's default backend (xgrammar) reads a schema that names no "type" as an
# object's or an array's, where no $ref, const, enum or combinator comes first. JSON Schema lets
# any other value pass it: {"properties": {...}, "required": ["a"]} answered "694.0E+00408066"
# (a random model's), where its writer, and xgrammar, meant an object. Not a combinator's branch:
# it is read with its siblings (an allOf's typeless branch beside a string's would refuse all).
_OBJECT_KEYS = ("properties", "additionalProperties", "unevaluatedProperties")
_ARRAY_KEYS = ("items", "prefixItems", "unevaluatedItems")
_BEFORE_TYPE = frozenset({"type", "$ref", "$dynamicRef", "const", "enum", "anyOf", "oneOf", "allOf"})


def _implied_type(node: dict[str, Any]) -> str | None:
    """The type xgrammar reads ``node`` as where it names none and one is implied (None: none)."""
    if _BEFORE_TYPE.intersection(node):
        return None
    if any(key in node for key in _OBJECT_KEYS):
        return "object"
    return "array" if any(key in node for key in _ARRAY_KEYS) else None


def _name_required(node: dict[str, Any]) -> None:
    """Names closed ``node`` requires but does not list, listed as any value: closed, the object
    both needed the name and forbade it ("required property 'b' is unsatisfiable"), a 400 for a
    valid schema its writer left open. What JSON Schema proposed for such names (json-schema-spec
    #65: defined with a blank schema)."""
    properties, required = node["properties"], node.get("required")
    for name in required if isinstance(required, list) else ():
        if isinstance(name, str) and name not in properties:
            properties[name] = {}


def _composed(node: dict[str, Any]) -> bool:
    """Whether schema ``node`` joins schemas that may each name properties (allOf of several, or a
    $ref or any allOf, anyOf or oneOf beside properties of its own): each closed would forbid the
    others' properties, so a schema holding one is left open (closed, properties beside anyOf
    branches naming others made a valid schema unsatisfiable: a review). pydantic v1's one-branch
    allOf around a $ref, and an anyOf of closed branches alone, are not one."""
    joined = node.get("allOf")
    if isinstance(joined, list) and len(joined) > 1:
        return True
    return _named(node) and ("$ref" in node or any(isinstance(node.get(k), list) for k in _BRANCHES))


_BRANCHES = ("allOf", "anyOf", "oneOf")


def _named(node: dict[str, Any]) -> bool:
    """Whether schema ``node`` names its object's properties (by name or pattern)."""
    return isinstance(node.get("properties"), dict) or isinstance(node.get("patternProperties"), dict)


def _open(node: dict[str, Any]) -> bool:
    """Whether schema ``node`` names properties and says nothing of others. Not one with
    patternProperties: llguidance 1.9 closed over a pattern that matches a named property lets
    the model write ", " and then allows no key (llguidance #265), a request failing midway."""
    return (
        isinstance(node.get("properties"), dict)
        and "patternProperties" not in node
        and "additionalProperties" not in node
        and "unevaluatedProperties" not in node
    )


def _unenforced(tree: dict[str, Any]) -> str | None:
    """Why the grammar engine would leave part of schema ``tree`` unenforced, or None. llguidance's
    "x-guidance" option ``lenient`` drops every keyword it does not implement (its #136), where
    they are otherwise refused: {"not": {"type": "string"}} beside it answered a string, a 200."""
    options = tree.get("x-guidance")
    if isinstance(options, dict) and options.get("lenient") not in (None, False):
        return (
            'asks for "x-guidance" "lenient", which drops the keywords the grammar engine does not '
            "enforce: a keyword it cannot enforce is refused instead, naming it"
        )
    return None


def _repeatable_keys(node: dict[str, Any]) -> str | None:
    """Why ``node``'s minProperties cannot be enforced, or None. The grammar engine counts the
    keys it writes, and a key of patternProperties or additionalProperties may be written twice
    ({"b": 3, "b": 4}: llguidance #168's counting), which every JSON reader takes as one: two
    keys asked for, one read. A minimum of 0 or 1, keys only its named properties, or a type
    that is no object's (minProperties constrains only objects: JSON Schema's), holds."""
    least, kind = node.get("minProperties"), node.get("type", "object")
    if type(least) is not int or least < 2 or "object" not in (kind if isinstance(kind, list) else [kind]):
        return None
    others = node.get("additionalProperties", True) is not False or isinstance(node.get("patternProperties"), dict)
    if not others:
        return None
    return (
        f"asks for minProperties {least} of an object whose patternProperties or additionalProperties "
        "keys the grammar engine may write twice (read as one key): name the properties, or ask for at most 1"
    )


def _ecma_patterns(node: dict[str, Any]) -> bool:
    """``node``'s pattern and patternProperties names read as ECMA-262 reads their "."
    (``ecma_dots``); whether one changed."""
    before = node.get("pattern"), node.get("patternProperties")
    if isinstance(before[0], str):
        node["pattern"] = ecma_dots(before[0])
    if isinstance(before[1], dict):
        node["patternProperties"] = {ecma_dots(name): value for name, value in before[1].items()}
    return (node.get("pattern"), node.get("patternProperties")) != before
