"""How the gateway answers what its handlers do not: every error in the OpenAI error shape; a
dependency that is down (Redis, NATS) as a 503; a fault of ours as a 500 that names its cause,
logged at a bounded rate; and every 503 with a ``Retry-After``."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web
from nats.errors import Error as NatsError
from redis.exceptions import RedisError

from dlora.common import log
from dlora.common.lograte import RateLimiter
from dlora.services.gateway.openai import APIError

logger = log.get("gateway")
# A fault that every request meets must not log a traceback per request: 10 a kind each 10 s.
_failures = RateLimiter(burst=10, interval_s=10.0)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]


def json_errors(retry_after_s: int) -> Middleware:
    """The middleware: errors in the OpenAI shape, and ``Retry-After: retry_after_s`` on each 503
    not yet sent (a 503 here always means try again later: no worker or dispatcher, Redis or NATS
    unreachable, the gateway shutting down)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await _answer(request, handler)
        if response.status == 503 and not response.prepared:
            response.headers.setdefault("Retry-After", str(retry_after_s))
        return response

    return middleware


async def _answer(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except APIError as e:  # a refusal, raised anywhere in a handler
        return error_response(e)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        # Its headers kept: a 405's Allow (RFC 9110 15.5.6 requires it), a 413's and the like.
        headers = {k: v for k, v in e.headers.items() if k.lower() not in ("content-type", "content-length")}
        # Its own words where it has any (aiohttp-cors's 403 names the origin, method or header it
        # refuses), not aiohttp's default "403: Forbidden": else its reason phrase.
        message = e.reason if e.text in (None, f"{e.status}: {e.reason}") else e.text
        return web.json_response(APIError(e.status, message).body(), status=e.status, headers=headers)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except RedisError as e:  # a restart or outage: the client may try again, it is not a fault of ours
        return _unavailable(f"the state store (Redis) is unreachable: {type(e).__name__}")
    except NatsError as e:
        return _unavailable(f"the message bus (NATS) is unavailable: {type(e).__name__}")
    except Exception as e:
        allowed, suppressed = _failures.allow(type(e).__name__)
        if allowed:
            logger.exception("handler failed", path=request.path, like_this_not_logged=suppressed)
        return web.json_response(APIError(500, f"internal error: {type(e).__name__}: {e}").body(), status=500)


def _unavailable(message: str) -> web.Response:
    return web.json_response(APIError(503, message).body(), status=503)


def error_response(e: APIError) -> web.Response:
    """A refusal as the client gets it: OpenAI's error body and the error's headers
    (``Retry-After``, ``WWW-Authenticate``; ``Connection: close`` also closes it here)."""
    response = web.json_response(e.body(), status=e.status, headers=e.headers or None)
    if e.headers.get("Connection", "").lower() == "close":
        response.force_close()
    return response


def failure_status(e: Exception) -> int:
    """The status ``json_errors`` answers ``e`` with, raised by a handler."""
    if isinstance(e, APIError | web.HTTPException):
        return e.status
    return 503 if isinstance(e, RedisError | NatsError) else 500
