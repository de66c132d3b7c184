"""The gateway's OpenAPI 3.1 document (``GET /openapi.json``), generated from the request types it
decodes (``msgspec.json.schema_components`` over the msgspec Structs), so the document cannot
drift from what the gateway accepts; a schema-driven fuzzer (the suite runs schemathesis) reads
it. OpenAPI 3.1 because its schemas are JSON Schema 2020-12, which is what msgspec writes
(``anyOf`` with ``{"type": "null"}`` for an optional field, where 3.0 had ``nullable``).
Responses are described by status; only the error body has a schema. Two bearer schemes: ``apiKey``
(an inference API key, required when the gateway's ``auth`` is "keys", hence optional here) and
``admin`` (the admin key, or an API key with the admin scope)."""

from __future__ import annotations

import functools
import importlib.metadata
from typing import Any

import msgspec
from aiohttp import web

from dlora.services.gateway.adapter_routes import LoadLoraAdapterBody, UnloadLoraAdapterBody
from dlora.services.gateway.admin import AdapterBody
from dlora.services.gateway.keys import KeyBody
from dlora.services.gateway.openai import ChatBody, CompletionBody
from dlora.services.gateway.responses_api import ResponsesBody
from dlora.services.gateway.status import ClusterStatus
from dlora.services.gateway.tokenize_routes import DetokenizeBody, TokenizeBody

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


def _text_responses(ok: str, *errors: int) -> dict[str, Any]:
    """``_responses`` with a success answered as a line of text (vLLM's adapter endpoints)."""
    out = _responses("", *errors, 408, 413, 415)
    out["200"] = {"description": ok, "content": {"text/plain": {"schema": {"type": "string"}}}}
    return out


def _responses(ok: str, *errors: int, streams: bool = False) -> dict[str, Any]:
    error = {"application/json": {"schema": {"$ref": _REF.format(name="ErrorBody")}}}
    out: dict[str, Any] = {}
    if ok:
        out["200"] = {"description": ok, "content": {"application/json": {"schema": {"type": "object"}}}}
    if ok and streams:
        out["200"]["content"]["text/event-stream"] = {"schema": {"type": "string"}}
    why = {
        400: "invalid request",
        401: "no key, or a wrong or revoked one",
        403: "the key lacks the scope (inference or admin)",
        404: "unknown model, adapter, key or stored response",
        408: "the body did not arrive within body_timeout_s",
        409: "adapter name taken",
        413: "body over the limit, or the request over what the message bus carries",
        415: "not application/json",
        429: "over the API key's rate or concurrency limit: try again after Retry-After",
    }
    for status in errors:
        out[str(status)] = {"description": why[status], "content": error}
        if status == 429:
            out["429"]["headers"] = {"Retry-After": {"description": "seconds", "schema": {"type": "integer"}}}
    out["503"] = {
        "description": "no worker or dispatcher, Redis or NATS unreachable, or shutting down: try again later",
        "headers": {"Retry-After": {"description": "seconds", "schema": {"type": "integer"}}},
        "content": error,
    }
    return out


# A stored response's id in its path, and its routes' query parameters (each a string as sent)
_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}


def _query(*names: str) -> list[dict[str, Any]]:
    return [{"name": n, "in": "query", "required": False, "schema": {"type": "string"}} for n in names]


@functools.cache
def document() -> dict[str, Any]:
    """The OpenAPI document of every route a client uses (``/metrics``, ``/readyz``, ``/health`` and
    ``/ping``, aliases of ``/healthz``, and the ``/dashboard`` page's HTML are left out)."""
    bodies = [CompletionBody, ChatBody, AdapterBody, KeyBody, ErrorBody, ClusterStatus, LoadLoraAdapterBody]
    bodies += [UnloadLoraAdapterBody, TokenizeBody, DetokenizeBody, ResponsesBody]
    (completion, chat, adapter, key, _, status, load, unload, tokenize, detokenize, responses), schemas = (
        msgspec.json.schema_components(bodies, ref_template=_REF)
    )
    for name in _closed_structs(bodies):
        schemas[name]["additionalProperties"] = False
    admin: list[dict[str, list[str]]] = [{"admin": []}]
    # {}: no credential, which a gateway with auth = "none" takes
    inference: list[dict[str, list[str]]] = [{"apiKey": []}, {}]
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
                "security": inference,
                "requestBody": _json_body(completion),
                "responses": _responses("a completion", 400, 401, 403, 404, 408, 413, 415, 429, streams=True),
            }
        },
        "/v1/chat/completions": {
            "post": {
                "operationId": "createChatCompletion",
                "security": inference,
                "requestBody": _json_body(chat),
                "responses": _responses("a chat completion", 400, 401, 403, 404, 408, 413, 415, 429, streams=True),
            }
        },
        "/v1/responses": {
            "post": {
                "operationId": "createResponse",
                "description": (
                    "OpenAI's Responses API, served as a chat; stored (store) for responses_ttl_s; "
                    "background: answered queued at once, run for nobody connected (GET /v1/responses/{id})"
                ),
                "security": inference,
                "requestBody": _json_body(responses),
                "responses": _responses("a response", 400, 401, 403, 404, 408, 413, 415, 429, streams=True),
            }
        },
        "/v1/responses/{id}": {
            "get": {
                "operationId": "getResponse",
                "security": inference,
                "parameters": [_ID, *_query("include", "stream", "starting_after")],
                "responses": _responses(
                    "the stored response, as its POST answered it (a background one: queued, in_progress, then "
                    "done); a streamed background one's events with stream=true, after starting_after",
                    400,
                    401,
                    403,
                    404,
                ),
            },
            "delete": {
                "operationId": "deleteResponse",
                "security": inference,
                "parameters": [_ID],
                "responses": _responses("OpenAI's deleted object", 401, 403, 404),
            },
        },
        "/v1/responses/{id}/cancel": {
            "post": {
                "operationId": "cancelResponse",
                "description": (
                    "A background response's cancel, from any gateway: one queued or running is answered "
                    "cancelled and its request aborted; one over answered unchanged; a foreground one a 400"
                ),
                "security": inference,
                "parameters": [_ID],
                "responses": _responses("the response, cancelled", 400, 401, 403, 404),
            }
        },
        "/v1/responses/{id}/input_items": {
            "get": {
                "operationId": "listInputItems",
                "security": inference,
                "parameters": [_ID, *_query("include", "limit", "order", "after", "before")],
                "responses": _responses("a page of its input items (OpenAI's list object)", 400, 401, 403, 404),
            }
        },
        "/v1/models": {
            "get": {
                "operationId": "listModels",
                "security": inference,
                "responses": _responses("the base model and the adapters the caller may use", 401, 403),
            }
        },
        "/v1/models/{model}": {
            "get": {
                "operationId": "retrieveModel",
                "security": inference,
                "parameters": [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": _responses("the model, if the caller may use it", 401, 403, 404),
            }
        },
        "/v1/adapters": {
            "post": {
                "operationId": "registerAdapter",
                "security": admin,
                "requestBody": _json_body(adapter),
                "responses": {  # 201, never 200 (it listed a 200 it never answers)
                    "201": {
                        "description": "registered: its registry entry",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    **_responses("", 400, 401, 403, 408, 409, 413, 415),
                },
            }
        },
        "/v1/adapters/{name}": {
            "delete": {
                "operationId": "deleteAdapter",
                "security": admin,
                "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": _responses("unregistered", 401, 403, 404),
            }
        },
        "/v1/load_lora_adapter": {
            "post": {
                "operationId": "loadLoraAdapter",
                "description": "vLLM's: registers lora_name from lora_path (load_inplace: replaces it)",
                "security": admin,
                "requestBody": _json_body(load),
                "responses": _text_responses("Success: LoRA adapter '...' added successfully.", 400, 401, 403),
            }
        },
        "/v1/unload_lora_adapter": {
            "post": {
                "operationId": "unloadLoraAdapter",
                "description": "vLLM's: unregisters lora_name",
                "security": admin,
                "requestBody": _json_body(unload),
                "responses": _text_responses("Success: LoRA adapter '...' removed successfully.", 400, 401, 403, 404),
            }
        },
        "/v1/keys": {
            "post": {
                "operationId": "createKey",
                "security": admin,
                "requestBody": _json_body(key),
                "responses": {
                    **_responses("", 400, 401, 403, 408, 413, 415),
                    "201": {
                        "description": "the new key (its only showing, in `key`) and its record",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                },
            },
            "get": {
                "operationId": "listKeys",
                "security": admin,
                "responses": _responses("every key's record, revoked ones too (never the key)", 401, 403),
            },
        },
        "/v1/keys/{id}": {
            "delete": {
                "operationId": "revokeKey",
                "security": admin,
                "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": _responses("revoked: the key's record", 401, 403, 404),
            }
        },
        "/v1/status": {
            "get": {
                "operationId": "clusterStatus",
                "description": "The cluster as this gateway hears it: workers (mode, merged adapter, queues, KV "
                "usage, adapters), where each adapter lives, recent migrations, and this gateway's traffic and "
                "latency per adapter. What the /dashboard page polls.",
                "security": admin,
                "responses": {
                    **_responses("", 401, 403),
                    "200": {"description": "the status", "content": {"application/json": {"schema": status}}},
                },
            }
        },
        "/reset_prefix_cache": {
            "post": {
                "operationId": "resetPrefixCache",
                "description": "vLLM's (SGLang's /flush_cache): every worker forgets its prefix cache, as before "
                "a cold-cache benchmark; requests running keep their blocks.",
                "security": admin,
                "responses": _responses(
                    "`workers`: the cached blocks each worker forgot; `missing`: live workers that did not answer",
                    401,
                    403,
                ),
            }
        },
        "/flush_cache": {
            method: {
                "operationId": f"flushCache{method.capitalize()}",
                "description": "SGLang's name for /reset_prefix_cache (POST; GET as its older clients send).",
                "security": admin,
                "responses": _responses("as /reset_prefix_cache", 401, 403),
            }
            for method in ("post", "get")
        },
        "/tokenize": {
            "post": {
                "operationId": "tokenize",
                "description": "vLLM's: a prompt, or a conversation rendered as chat renders it, as token ids",
                "security": inference,
                "requestBody": _json_body(tokenize),
                "responses": _responses(
                    "count, max_model_len and the token ids", 400, 401, 403, 404, 408, 413, 415, 429
                ),
            }
        },
        "/detokenize": {
            "post": {
                "operationId": "detokenize",
                "description": "vLLM's: token ids as text",
                "security": inference,
                "requestBody": _json_body(detokenize),
                "responses": _responses("the text, as prompt", 400, 401, 403, 404, 408, 413, 415, 429),
            }
        },
        "/healthz": {"get": {"operationId": "readiness", "responses": {"200": health, "503": not_ready}}},
        "/livez": {"get": {"operationId": "liveness", "responses": {"200": health}}},
        "/version": {"get": {"operationId": "version", "responses": {"200": {**health, "description": "its version"}}}},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "dlora gateway", "version": "1", "description": "OpenAI-compatible serving of LoRA adapters"},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "apiKey": {"type": "http", "scheme": "bearer", "description": "an API key (sk-dlora-...)"},
                "admin": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "the admin key, or an admin-scope API key",
                },
            },
        },
    }


async def handler(request: web.Request) -> web.Response:
    """``GET /openapi.json``."""
    return web.json_response(document())


async def version(request: web.Request) -> web.Response:
    """``GET /version``: the installed dlora's version, as vLLM's ``/version`` gives its own."""
    return web.json_response({"version": importlib.metadata.version("dlora")})
