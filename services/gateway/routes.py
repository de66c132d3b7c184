"""The gateway's HTTP routes: which handler answers each path (OpenAI's, vLLM's and SGLang's names
side by side), the status page and the OpenAPI document."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from aiohttp import web

from dlora.services.gateway import access, cors, dashboard, monitoring, openapi
from dlora.services.gateway.adapter_routes import AdapterAdmin
from dlora.services.gateway.body import expect_continue
from dlora.services.gateway.cache_reset import reset_prefix_cache
from dlora.services.gateway.dialects import Chat, Completions, Responses
from dlora.services.gateway.errors import json_errors
from dlora.services.gateway.health import retry_after_s
from dlora.services.gateway.hosts import allowed_hosts, host_guard
from dlora.services.gateway.keys import KeyAdmin
from dlora.services.gateway.model_routes import ModelRoutes
from dlora.services.gateway.responses_routes import ResponsesRoutes
from dlora.services.gateway.responses_store import ResponsesStore
from dlora.services.gateway.tokenize_routes import TokenizeRoutes

if TYPE_CHECKING:
    from dlora.services.gateway.main import Gateway


def make_app(gw: Gateway) -> web.Application:
    """``gw``'s HTTP application: its handlers and the admin, key, tokenizer and cache routes."""
    logged = access.AccessLog(gw.s.access_log)
    middlewares = [logged.middleware, json_errors(retry_after_s(gw.s.heartbeat_ttl_s))]
    if (hosts := allowed_hosts(gw.s.host, gw.s.auth, gw.s.allowed_hosts)) is not None:
        middlewares.append(host_guard(hosts))  # inside json_errors: its 403 in the OpenAI shape
    app = web.Application(client_max_size=gw.s.max_body_bytes + 1024, middlewares=middlewares)
    app.on_response_prepare.append(logged.on_prepare)
    # every POST with its Expect: 100-continue answered by what the body may be
    post = functools.partial(app.router.add_post, expect_handler=expect_continue(gw.s.max_body_bytes))
    post("/v1/completions", functools.partial(gw.generate, Completions))
    post("/v1/chat/completions", functools.partial(gw.generate, Chat))
    stored = ResponsesStore(
        gw.store,
        gw.state_bound,
        gw.s.responses_ttl_s,
        gw.s.responses_max_bytes,
        gw.metrics.responses_store,
        legacy_s=gw.background.lease_s,
    )
    post("/v1/responses", functools.partial(gw.generate, functools.partial(Responses, stored)))  # served as a chat
    responses = ResponsesRoutes(gw.auth, stored, gw.background)
    # an id is its client's X-Request-Id where sent, any printable: "{id}" alone matches no brace
    app.router.add_get("/v1/responses/{id:[^/]+}", responses.retrieve, allow_head=False)
    app.router.add_delete("/v1/responses/{id:[^/]+}", responses.delete)
    app.router.add_get("/v1/responses/{id:[^/]+}/input_items", responses.input_items, allow_head=False)
    post("/v1/responses/{id:[^/]+}/cancel", responses.cancel)
    models = ModelRoutes(gw)
    app.router.add_get("/v1/models", models.models)
    app.router.add_get("/v1/models/{model:.+}", models.model)  # names may hold a slash (org/name)
    adapters = AdapterAdmin(gw)
    post("/v1/adapters", adapters.add)
    app.router.add_delete("/v1/adapters/{name:.+}", adapters.delete)  # org/name too
    post("/v1/load_lora_adapter", adapters.vllm_load)  # vLLM's names, for its scripts
    post("/v1/unload_lora_adapter", adapters.vllm_unload)
    keys = KeyAdmin(gw.auth, gw.read_body)
    post("/v1/keys", keys.create)
    app.router.add_get("/v1/keys", keys.listing)
    app.router.add_delete("/v1/keys/{id}", keys.revoke)
    tokens = TokenizeRoutes(gw)
    post("/tokenize", tokens.tokenize)  # vLLM's
    post("/detokenize", tokens.detokenize)
    healthz = functools.partial(monitoring.healthz, gw)
    for path in ("/healthz", "/readyz", "/health", "/ping"):  # /health and /ping (SageMaker's): vLLM's
        app.router.add_get(path, healthz)
    post("/ping", healthz)
    app.router.add_get("/livez", monitoring.livez)
    app.router.add_get("/version", openapi.version)
    app.router.add_get("/metrics", functools.partial(monitoring.metrics_handler, gw))
    app.router.add_get("/v1/status", functools.partial(monitoring.status, gw))
    reset = functools.partial(reset_prefix_cache, gw)
    post("/reset_prefix_cache", reset)  # vLLM's
    post("/flush_cache", reset)  # SGLang's (its older clients GET it)
    app.router.add_get("/flush_cache", reset, allow_head=False)
    dashboard.add_static(app)
    app.router.add_get("/openapi.json", openapi.handler)
    cors.enable(app, gw.s)  # last: every route above answers its preflight
    return app
