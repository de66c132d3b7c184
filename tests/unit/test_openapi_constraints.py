"""The OpenAPI document says the checks the gateway makes on admin and tokenizer bodies: a
schema-driven client (schemathesis's "schema-valid request rejected") had valid requests refused
on five operations, the document giving a tenant or an adapter name as any string (a helper)."""

from __future__ import annotations

import re

from dlora.common.apikeys import MAX_LIMIT, MIN_RATE, SCOPES, tenant_problem
from dlora.common.registry import valid_name
from dlora.services.gateway.openapi import document

SCHEMAS = document()["components"]["schemas"]
NAMES = ["acme", "a", "A.b-c_d", "", "-x", ".a", "a b", "é", "x" * 64, "x" * 65, "org/name", "a//b", "a/", "x" * 129]


def _matches(schema: dict, value: str) -> bool:
    return re.search(schema["pattern"], value) is not None and len(value) <= schema.get("maxLength", len(value))


def test_the_tenant_and_name_patterns_are_the_checks_own() -> None:
    tenant = SCHEMAS["KeyBody"]["properties"]["tenant"]
    owner = SCHEMAS["AdapterBody"]["properties"]["owner"]["anyOf"][0]
    name = SCHEMAS["AdapterBody"]["properties"]["name"]
    for value in NAMES:
        assert _matches(tenant, value) == _matches(owner, value) == (tenant_problem(value) is None), value
        assert _matches(name, value) == valid_name(value), value


def test_scopes_limits_and_token_ids_are_bounded_as_checked() -> None:
    key = SCHEMAS["KeyBody"]["properties"]
    assert key["scopes"]["items"]["enum"] == list(SCOPES) and key["scopes"]["minItems"] == 1
    for field in ("burst", "concurrency"):
        assert key[field]["anyOf"][0]["minimum"] == 0
    # 0, or a rate whose refusals' wait can be said (apikeys.MIN_RATE)
    assert key["rate_per_s"]["anyOf"][0]["anyOf"] == [{"const": 0}, {"minimum": MIN_RATE, "maximum": MAX_LIMIT}]
    assert SCHEMAS["DetokenizeBody"]["properties"]["tokens"]["items"]["minimum"] == 0
