"""How the gateway answers what its handlers do not: every error in the OpenAI error shape, and a
fault of ours as a 500 that names its cause, logged at a bounded rate."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web

from dlora.common import log
from dlora.services.gateway.lograte import RateLimiter
from dlora.services.gateway.openai import APIError

logger = log.get("gateway")
# A fault that every request meets must not log a traceback per request: 10 a kind each 10 s.
_failures = RateLimiter(burst=10, interval_s=10.0)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Unknown routes and methods answer in the OpenAI error shape too, and so does a fault of
    ours: a 500 that names its cause, never a bare one."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return web.json_response(APIError(e.status, e.reason).body(), status=e.status)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as e:
        allowed, suppressed = _failures.allow(type(e).__name__)
        if allowed:
            logger.exception("handler failed", path=request.path, like_this_not_logged=suppressed)
        return web.json_response(APIError(500, f"internal error: {type(e).__name__}: {e}").body(), status=500)
