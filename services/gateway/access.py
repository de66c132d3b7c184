"""The gateway's access log and request ids: one line per HTTP request, and an id that ties a
client's request to every line logged about it, here and on the dispatcher and workers.

Each request gets an id: the client's ``X-Request-Id`` where it sent a usable one (vLLM reads it
so), else a fresh one. It is answered in the response's ``X-Request-Id`` header (every response,
errors and streams included: vLLM's ``--enable-request-id-headers``), bound to every log line the
request's handler writes (``request_id``), and named by the request's access line. A completion's
internal id (``request``: ``cmpl-<hex>``, ``chatcmpl-<hex>``, a Responses request's ``resp_<hex>``;
its choices ``<id>-<i>`` in the dispatcher's and workers' lines) is the response's ``id`` when the
client named none.

The access line is written by a middleware, not aiohttp's access logger: that one writes nothing
for a request whose client went away (its handler cancelled), the requests an operator looks for.
Health checks, scrapes and the status page's polls go at debug level unless they fail (vLLM
users ask to filter them out of the log): a 4xx is said each time, a 5xx as its path begins failing
or fails with another status and again as it ends, at debug while it fails the same way; no line
names a prompt, an output or a key's secret.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog
from aiohttp import web

from dlora.common import log
from dlora.services.gateway.sampling import valid_request_id

if TYPE_CHECKING:
    from dlora.services.gateway.auth import Principal

logger = log.get("gateway.access")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Polled by load balancers, Prometheus and the status page every few seconds: at debug level.
_QUIET = frozenset({"/healthz", "/readyz", "/health", "/ping", "/livez", "/metrics", "/v1/status"})
# Characters of a request's model named in its line: the longest adapter name (registry.py).
_MODEL_SHOWN = 128
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
    internal: str = ""  # the completion's internal id (``cmpl-<hex>``; ``dialects.Dialect.response_id``)
    workers: list[str] = field(default_factory=list)  # the workers its choices' last chunks came from

    @property
    def request_id(self) -> str:
        return self.traced or self.ours


_NOTED = web.RequestKey("dlora_access", _Noted)


class AccessLog:
    """Names each request (``request_id``) and, where ``enabled``, logs it once it has ended:
    ``middleware`` for the requests that reach a handler, ``on_prepare`` (the app's
    ``on_response_prepare``) for the header, and for the answers aiohttp gives before any
    middleware runs (a route's ``Expect: 100-continue`` refusal: 413, 417)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        # The status each polled path last answered. A readiness probe polls every second or less
        # while workers load (dlora up's own every 0.2 s, a load balancer's): a line for each of its
        # 503s put 16-19 of them before dlora up's banner (a new user's try-out).
        self._polled: dict[str, int] = {}

    def _said(self, path: str, status: int) -> bool:
        """Whether a request to ``path`` answered ``status`` is logged at info, not debug: any but a
        polled path's (``_QUIET``); of those each 4xx (a key refused at ``/v1/status``, a client gone:
        said every time, and no break in a run of failures), a 5xx as its path begins failing or
        fails with another status, and the first answer after such a run (its end)."""
        if path not in _QUIET or 400 <= status < 500:
            return True
        last, self._polled[path] = self._polled.get(path), status
        return status != last and (status >= 500 or (last or 0) >= 500)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        noted = request[_NOTED] = _noted(request)
        started, status = time.monotonic(), CLIENT_GONE
        try:
            with structlog.contextvars.bound_contextvars(request_id=noted.request_id):
                response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as e:  # a redirect (json_errors answers the rest)
            status = e.status
            raise
        finally:
            if self.enabled:
                _log(request, noted, status, time.monotonic() - started, self._said(request.path, status))

    async def on_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        """The request's id in its response's headers."""
        if (noted := request.get(_NOTED)) is None:  # answered before the middleware (see above)
            noted = request[_NOTED] = _noted(request)
            if self.enabled:
                _log(request, noted, response.status, 0.0, self._said(request.path, response.status))
        response.headers["X-Request-Id"] = noted.request_id


def _noted(request: web.Request) -> _Noted:
    traced = request.headers.get("X-Request-Id", "")
    return _Noted(uuid.uuid4().hex, traced if valid_request_id(traced) else None)


def traced(request: web.Request) -> str | None:
    """The client's usable ``X-Request-Id``, or None (a proxy's odd one is ignored)."""
    return request[_NOTED].traced


def ours(request: web.Request) -> str:
    """The id the gateway drew for ``request`` (unique: a client's may not be)."""
    return request[_NOTED].ours


def note(
    request: web.Request,
    *,
    caller: Principal | None = None,
    model: str = "",
    internal: str = "",
    traced: str | None = None,
    workers: list[str] | None = None,
) -> None:
    """What the access line says beside the method, path and status: who asked (their key's id
    and tenant, never its secret), the model named, the completion's internal id and the workers
    that answered it (a moved or recovered choice: the last); and the
    id a client named its request by in its body (vLLM's ``request_id``), which stands for its
    ``X-Request-Id`` where it sent none: in the header, the line and the lines logged after."""
    if (noted := request.get(_NOTED)) is None:  # (not under an app without the middleware)
        return
    if traced and noted.traced is None and valid_request_id(traced):  # (an unusable one is refused 400 later)
        noted.traced = traced
        structlog.contextvars.bind_contextvars(request_id=traced)  # (the middleware's block resets it)
    noted.caller, noted.model, noted.internal = caller or noted.caller, model or noted.model, internal or noted.internal
    noted.workers = workers or noted.workers


def _log(request: web.Request, noted: _Noted, status: int, seconds: float, said: bool) -> None:
    caller = noted.caller
    fields = {
        "method": request.method,
        "path": request.path,  # no query string: nothing of ours reads one, a client may put anything there
        "status": status,
        "duration_s": round(seconds, 4),
        "remote": request.remote,
        "request_id": noted.request_id,
        "request": noted.internal or None,
        "model": noted.model[:_MODEL_SHOWN] or None,  # any text a body sent: bounded
        "workers": noted.workers or None,
        "key_id": caller.key_id if caller else None,
        "tenant": caller.tenant if caller else None,
        "admin": caller.admin if caller else None,
    }
    write = logger.info if said else logger.debug
    write("http request", **{k: v for k, v in fields.items() if v is not None})
