"""The gateway's OpenAPI 3.1 document (``GET /openapi.json``), generated from the request types it
decodes (``msgspec.json.schema_components`` over the msgspec Structs), so the document cannot
drift from what the gateway accepts; a schema-driven fuzzer (the suite runs schemathesis) reads
it. OpenAPI 3.1 because its schemas are JSON Schema 2020-12, which is what msgspec writes
(``anyOf`` with ``{"type": "null"}`` for an optional field, where 3.0 had ``nullable``).
Responses are described by status; only the error body has a schema."""

from __future__ import annotations

import functools
from typing import Any

import msgspec
from aiohttp import web

from dlora.services.gateway.admin import AdapterBody
from dlora.services.gateway.openai import ChatBody, CompletionBody

_REF = "#/components/schemas/{name}"


class ErrorDetail(msgspec.Struct, kw_only=True):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(msgspec.Struct, kw_only=True):
    """Every 4xx and 5xx the gateway answers, in the OpenAI shape."""

    error: ErrorDetail


def _closed_structs(types: list[Any]) -> set[str]:
    """Names of the Structs (these and every one they contain) that refuse unknown fields:
    msgspec's schema does not say so, the document must (``additionalProperties: false``)."""
    names: set[str] = set()
    seen: set[type] = set()

    def walk(t: msgspec.inspect.Type) -> None:
        if isinstance(t, msgspec.inspect.StructType):
            if t.cls in seen:
                return
            seen.add(t.cls)
            if t.forbid_unknown_fields:
                names.add(t.cls.__name__)
            for f in t.fields:
                walk(f.type)
        elif isinstance(t, msgspec.inspect.UnionType):
            for u in t.types:
                walk(u)
        elif isinstance(t, (msgspec.inspect.ListType, msgspec.inspect.SetType, msgspec.inspect.FrozenSetType)):
            walk(t.item_type)
        elif isinstance(t, msgspec.inspect.DictType):
            walk(t.value_type)

    for t in msgspec.inspect.multi_type_info(types):
        walk(t)
    return names


def _json_body(ref: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": ref}}}


def _responses(ok: str, *errors: int, streams: bool = False) -> dict[str, Any]:
    error = {"application/json": {"schema": {"$ref": _REF.format(name="ErrorBody")}}}
    out: dict[str, Any] = {}
    if ok:
        out["200"] = {"description": ok, "content": {"application/json": {"schema": {"type": "object"}}}}
    if ok and streams:
        out["200"]["content"]["text/event-stream"] = {"schema": {"type": "string"}}
    why = {
        400: "invalid request",
        401: "no or a wrong admin key",
        404: "unknown model or adapter",
        409: "adapter name taken",
        413: "body over the limit",
        415: "not application/json",
    }
    for status in errors:
        out[str(status)] = {"description": why[status], "content": error}
    out["503"] = {
        "description": "no worker or dispatcher, Redis or NATS unreachable, or shutting down: try again later",
        "headers": {"Retry-After": {"description": "seconds", "schema": {"type": "integer"}}},
        "content": error,
    }
    return out


@functools.cache
def document() -> dict[str, Any]:
    """The OpenAPI document of every route a client uses (``/metrics`` and ``/readyz``, an alias
    of ``/healthz``, are left out)."""
    bodies = [CompletionBody, ChatBody, AdapterBody, ErrorBody]
    (completion, chat, adapter, _), schemas = msgspec.json.schema_components(bodies, ref_template=_REF)
    for name in _closed_structs(bodies):
        schemas[name]["additionalProperties"] = False
    admin: list[dict[str, list[str]]] = [{"admin": []}]
    health = {"description": "ready", "content": {"application/json": {"schema": {"type": "object"}}}}
    not_ready = {
        "description": "not ready, and why",
        "headers": {"Retry-After": {"description": "seconds", "schema": {"type": "integer"}}},
        "content": {"application/json": {"schema": {"type": "object"}}},
    }
    paths = {
        "/v1/completions": {
            "post": {
                "operationId": "createCompletion",
                "requestBody": _json_body(completion),
                "responses": _responses("a completion", 400, 404, 413, 415, streams=True),
            }
        },
        "/v1/chat/completions": {
            "post": {
                "operationId": "createChatCompletion",
                "requestBody": _json_body(chat),
                "responses": _responses("a chat completion", 400, 404, 413, 415, streams=True),
            }
        },
        "/v1/models": {"get": {"operationId": "listModels", "responses": _responses("the base model and adapters")}},
        "/v1/adapters": {
            "post": {
                "operationId": "registerAdapter",
                "security": admin,
                "requestBody": _json_body(adapter),
                "responses": {
                    **_responses("registered", 400, 401, 409, 413, 415),
                    "201": {"description": "registered"},
                },
            }
        },
        "/v1/adapters/{name}": {
            "delete": {
                "operationId": "deleteAdapter",
                "security": admin,
                "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": _responses("unregistered", 401, 404),
            }
        },
        "/healthz": {"get": {"operationId": "readiness", "responses": {"200": health, "503": not_ready}}},
        "/livez": {"get": {"operationId": "liveness", "responses": {"200": health}}},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "dlora gateway", "version": "1", "description": "OpenAI-compatible serving of LoRA adapters"},
        "paths": paths,
        "components": {"schemas": schemas, "securitySchemes": {"admin": {"type": "http", "scheme": "bearer"}}},
    }


async def handler(request: web.Request) -> web.Response:
    """``GET /openapi.json``."""
    return web.json_response(document())
