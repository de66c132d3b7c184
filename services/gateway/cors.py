"""CORS for a web page of another origin that calls the gateway from a browser: vLLM's
``--allowed-origins``, ``--allowed-methods``, ``--allowed-headers`` and ``--allow-credentials``
(its Starlette ``CORSMiddleware``), here the gateway's settings of those names, through aio-libs'
``aiohttp-cors``. Opt-in, where vLLM's default is any origin: without ``allowed_origins`` no CORS
header is sent and an ``OPTIONS`` is answered 405, as before. With them, every route answers its
preflight ``OPTIONS`` (the origin, the method and the headers asked for, when allowed; a 403 naming
what is not) and each answer to an allowed origin, an error's too (a page reads why it failed),
carries ``Access-Control-Allow-Origin``; every answer says ``Vary: Origin``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import aiohttp_cors
from aiohttp import hdrs, web

if TYPE_CHECKING:
    from dlora.services.gateway.settings import GatewaySettings

# Seconds a browser may keep a preflight's answer: Starlette's CORSMiddleware default, vLLM's.
MAX_AGE_S = 600


def enable(app: web.Application, s: GatewaySettings) -> None:
    """Answer CORS on every route of ``app`` (add it last) where ``s.allowed_origins`` names some;
    nothing otherwise."""
    if not s.allowed_origins:
        return
    methods = "*" if "*" in s.allowed_methods else [m.upper() for m in s.allowed_methods]
    options = aiohttp_cors.ResourceOptions(  # type: ignore[no-untyped-call]  # (its __init__ has no hints)
        allow_credentials=s.allow_credentials,
        allow_headers="*" if "*" in s.allowed_headers else s.allowed_headers,
        allow_methods=methods,
        max_age=MAX_AGE_S,
    )
    cors = aiohttp_cors.setup(app, defaults=dict.fromkeys(s.allowed_origins, options))
    # By resource, not by route: aiohttp-cors takes a method with a route of its own as allowed,
    # whatever allow_methods says, so allowed_methods = ["GET"] still let a page POST.
    for resource in list(app.router.resources()):
        cors.add(resource)
    app.on_response_prepare.append(_vary_by_origin)


async def _vary_by_origin(request: web.Request, response: web.StreamResponse) -> None:
    """``Vary: Origin`` on every answer: aiohttp-cors echoes each allowed Origin (even for "*"),
    so an answer kept by a cache for one page, or for a request with no Origin, would be read by
    another with the wrong or no ``Access-Control-Allow-Origin`` (the Fetch standard, "CORS
    protocol and HTTP caches"; Starlette's CORSMiddleware sends it likewise)."""
    vary = response.headers.get(hdrs.VARY, "")
    if vary.strip() != "*" and "origin" not in {v.strip().lower() for v in vary.split(",")}:
        response.headers[hdrs.VARY] = f"{vary}, Origin" if vary else "Origin"
