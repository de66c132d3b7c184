"""The gateway's access log and request ids: one line per HTTP request, and an id that ties a
client's request to every line logged about it, here and on the dispatcher and workers.

Each request gets an id: the client's ``X-Request-Id`` where it sent a usable one (vLLM reads it
so), else a fresh one. It is answered in the response's ``X-Request-Id`` header (every response,
errors and streams included: vLLM's ``--enable-request-id-headers``), bound to every log line the
request's handler writes (``request_id``), and named by the request's access line. A completion's
internal id (``request``: ``cmpl-<hex>``, its choices ``cmpl-<hex>-<i>`` in the dispatcher's and
workers' lines) is the response's ``id`` when the client named none.

The access line is written by a middleware, not aiohttp's access logger: that one writes nothing
for a request whose client went away (its handler cancelled), the requests an operator looks for.
Health checks and scrapes go at debug level (vLLM users ask to filter them out of the log); no
line names a prompt, an output or a key's secret.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog
from aiohttp import web

from dlora.common import log
from dlora.services.gateway.sampling import valid_request_id

if TYPE_CHECKING:
    from dlora.services.gateway.auth import Principal

logger = log.get("gateway.access")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Polled by load balancers and Prometheus every few seconds: at debug level.
_QUIET = frozenset({"/healthz", "/readyz", "/health", "/ping", "/livez", "/metrics"})
# The status logged for a request whose handler ended without an answer (its client went away),
# nginx's.
CLIENT_GONE = 499


@dataclass
class _Noted:
    """What one request's access line says beside its method, path and status."""

    ours: str  # the id the gateway drew (unique: a client's need not be)
    traced: str | None  # the client's usable X-Request-Id
    caller: Principal | None = None
    model: str = ""
    internal: str = ""  # the completion's internal id (``cmpl-<hex>``)

    @property
    def request_id(self) -> str:
        return self.traced or self.ours


_NOTED = web.RequestKey("dlora_access", _Noted)


def middleware(enabled: bool) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """Names each request (``request_id``) and, where ``enabled``, logs it once it has ended."""

    @web.middleware
    async def access(request: web.Request, handler: Handler) -> web.StreamResponse:
        traced = request.headers.get("X-Request-Id", "")
        noted = request[_NOTED] = _Noted(uuid.uuid4().hex, traced if valid_request_id(traced) else None)
        started, status = time.monotonic(), CLIENT_GONE
        try:
            with structlog.contextvars.bound_contextvars(request_id=noted.request_id):
                response = await handler(request)
            status = response.status
            return response
        finally:
            if enabled:
                _log(request, noted, status, time.monotonic() - started)

    return access


async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """The request's id in its response's headers (``web.Application.on_response_prepare``)."""
    if (noted := request.get(_NOTED)) is not None:
        response.headers["X-Request-Id"] = noted.request_id


def traced(request: web.Request) -> str | None:
    """The client's usable ``X-Request-Id``, or None (a proxy's odd one is ignored)."""
    return request[_NOTED].traced


def ours(request: web.Request) -> str:
    """The id the gateway drew for ``request`` (unique: a client's may not be)."""
    return request[_NOTED].ours


def note(request: web.Request, *, caller: Principal | None = None, model: str = "", internal: str = "") -> None:
    """What the access line says beside the method, path and status: who asked (their key's id
    and tenant, never its secret), the model named and the completion's internal id."""
    if (noted := request.get(_NOTED)) is not None:  # (not under an app without the middleware)
        noted.caller, noted.model, noted.internal = (
            caller or noted.caller,
            model or noted.model,
            internal or noted.internal,
        )


def _log(request: web.Request, noted: _Noted, status: int, seconds: float) -> None:
    caller = noted.caller
    fields = {
        "method": request.method,
        "path": request.path,  # no query string: nothing of ours reads one, a client may put anything there
        "status": status,
        "duration_s": round(seconds, 4),
        "remote": request.remote,
        "request_id": noted.request_id,
        "request": noted.internal or None,
        "model": noted.model or None,
        "key_id": caller.key_id if caller else None,
        "tenant": caller.tenant if caller else None,
        "admin": caller.admin if caller else None,
    }
    write = logger.debug if request.path in _QUIET else logger.info
    write("http request", **{k: v for k, v in fields.items() if v is not None})
