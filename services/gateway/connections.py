"""The gateway's HTTP listener with connection limits and a header-read timeout.

aiohttp's server (3.9 to 3.14) has an idle timeout (``keepalive_timeout``, counted from a
connection's start and from the end of each response) but no header-read timeout and no
connection limits, so idle or slow-header clients could hold sockets until the process ran out
of file descriptors, and asyncio then logged ``socket.accept() out of system resource`` in a loop
(megabytes a second; issue 16, fault 8). ``ConnectionGuard`` sits between the listening socket and
aiohttp's per-connection protocol:

- a connection over the total limit (503) or over its client address's limit (429) is answered at
  once, before aiohttp sees it, and closed; the total is kept ``FD_RESERVE`` below the process's
  file-descriptor limit. A flood can still run ``accept`` out of descriptors for a moment: asyncio
  accepts up to ``backlog`` connections per loop turn, and those refused are closed a turn or two
  later. asyncio then pauses accepting for 1 s and logs it, one line without a traceback
  (``common/lograte.py``);
- a connection must send a complete request head within ``header_timeout_s`` of opening, or of
  its first byte after a finished request, or it is closed (nginx's ``client_header_timeout``);
- between requests aiohttp's keep-alive timer closes it after ``idle_timeout_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
from aiohttp import web

from dlora.common import log
from dlora.common.lograte import RateLimiter
from dlora.common.urls import http_url
from dlora.services.gateway.openai import APIError
from dlora.services.gateway.settings import GatewaySettings

logger = log.get("gateway.connections")

# File descriptors kept free of client connections for everything else the process opens: the
# NATS connection, the Redis pool, model files, logs. The total connection limit is lowered to
# fit under the process's descriptor limit with this much to spare.
FD_RESERVE = 256
# Seconds a refused connection is kept half-closed for the client to read its answer and close.
REFUSED_LINGER_S = 0.5


def _refusal(status: int, reason: str, message: str, kind: str) -> bytes:
    """A complete HTTP response that closes the connection (written before any request is read)."""
    body = msgspec.json.encode(APIError(status, message, kind=kind).body())
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Retry-After: 1\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


_TOO_MANY = _refusal(503, "Service Unavailable", "the gateway has too many open connections", "service_unavailable")
_TOO_MANY_FROM_CLIENT = _refusal(
    429, "Too Many Requests", "too many open connections from this address", "rate_limit_exceeded"
)


def connection_limit(configured: int) -> int:
    """``configured`` lowered to what the file-descriptor limit (RLIMIT_NOFILE, soft) allows with
    ``FD_RESERVE`` to spare; at least 1."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    return max(1, min(configured, soft - FD_RESERVE))


class ConnectionGuard:
    """Counts open connections, in all and per client address, and times request heads. Wraps
    aiohttp's protocol factory (``wrap``); its ``middleware`` tells it when a request is being
    handled (its head is complete) and when that is over."""

    def __init__(self, max_connections: int, max_per_client: int, header_timeout_s: float) -> None:
        self.max_connections, self.max_per_client = max_connections, max_per_client
        self.header_timeout_s = header_timeout_s
        self.open = 0
        self.per_client: Counter[str] = Counter()
        self.refused = 0  # connections answered 429/503 and closed at once
        self.header_timeouts = 0  # connections closed for not sending a request head in time
        self._by_handler: dict[asyncio.Protocol, _Guarded] = {}
        self._log = RateLimiter(burst=1, interval_s=10.0)  # one line per kind each 10 s, with a count

    def wrap(self, factory: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        """A protocol factory for ``loop.create_server``: each connection guarded, and handed to a
        protocol from ``factory`` (aiohttp's) only when admitted."""
        return lambda: _Guarded(self, factory)

    def _admit(self, client: str) -> bytes | None:
        """None: admitted and counted; else the response that refuses it."""
        if self.open >= self.max_connections:
            self._refused("total", client)
            return _TOO_MANY
        if self.max_per_client and self.per_client[client] >= self.max_per_client:
            self._refused("per client", client)
            return _TOO_MANY_FROM_CLIENT
        self.open += 1
        self.per_client[client] += 1
        return None

    def _release(self, client: str) -> None:
        self.open -= 1
        self.per_client[client] -= 1
        if self.per_client[client] <= 0:
            del self.per_client[client]  # the map holds only addresses with a connection open

    def _refused(self, limit: str, client: str) -> None:
        self.refused += 1
        allowed, suppressed = self._log.allow(limit)
        if allowed:
            logger.warning(
                "connection refused: limit reached",
                limit=limit,
                client=client,
                open=self.open,
                max_connections=self.max_connections,
                max_per_client=self.max_per_client,
                refused_since_last_line=suppressed + 1,
            )

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """While a handler runs the connection's head timer is off (its head is complete)."""
        guarded = self._by_handler.get(request.protocol)
        if guarded is not None:
            guarded.request_started()
        try:
            return await handler(request)
        finally:
            if guarded is not None:
                guarded.in_request = False


class _Guarded(asyncio.Protocol):
    """One client connection: admitted or refused, its head timed, then passed through to
    aiohttp's protocol (``inner``) call for call."""

    def __init__(self, guard: ConnectionGuard, factory: Callable[[], asyncio.Protocol]) -> None:
        self.guard, self.factory = guard, factory
        self.inner: asyncio.Protocol | None = None  # None: refused (or not yet connected)
        self.transport: asyncio.Transport | None = None
        self.client = ""
        self.in_request = False
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        peer: Any = transport.get_extra_info("peername")
        self.client = str(peer[0]) if isinstance(peer, tuple) else str(peer)
        refusal = self.guard._admit(self.client)
        if refusal is not None:
            transport.write(refusal)
            if transport.can_write_eof():
                # A lingering close (as nginx's): the answer and a FIN go out, what the client
                # sent is read and dropped until it closes or REFUSED_LINGER_S pass. Closing at
                # once with its request head unread made the kernel reset the connection, and
                # the client could lose the 429/503 before reading it.
                transport.write_eof()
                asyncio.get_running_loop().call_later(REFUSED_LINGER_S, transport.close)
            else:
                transport.close()
            return
        self.transport = transport
        self.inner = self.factory()
        self.guard._by_handler[self.inner] = self
        self.inner.connection_made(transport)
        self._arm()  # the first request's head must come within the timeout too

    def data_received(self, data: bytes) -> None:
        if self.inner is None:
            return  # refused: whatever it sent is dropped with it
        if not self.in_request and self.timer is None:
            self._arm()  # the first bytes after a finished request: the next head starts
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.inner is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.inner is None:
            return
        self._disarm()
        self.guard._release(self.client)
        self.guard._by_handler.pop(self.inner, None)
        inner, self.inner, self.transport = self.inner, None, None
        inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    def request_started(self) -> None:
        self.in_request = True
        self._disarm()

    def _arm(self) -> None:
        self._disarm()
        self.timer = asyncio.get_running_loop().call_later(self.guard.header_timeout_s, self._head_timed_out)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _head_timed_out(self) -> None:
        self.timer = None
        if self.transport is not None and not self.in_request:
            self.guard.header_timeouts += 1
            self.transport.close()  # as nginx does: no response, the client was not talking HTTP in time


class _GuardedSite(web.BaseSite):
    """A TCP site whose connections go through a ``ConnectionGuard``; stopped with its runner."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, guard: ConnectionGuard) -> None:
        super().__init__(runner)
        self.host, self.port, self.guard = host, port, guard

    @property
    def name(self) -> str:
        return http_url(self.host, self.port)

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None  # the runner is set up before a site is made
        self._server = await asyncio.get_running_loop().create_server(
            self.guard.wrap(server), self.host, self.port, backlog=self._backlog
        )


@dataclass
class Listener:
    """The gateway's HTTP server: aiohttp's runner and the guard in front of it."""

    runner: web.AppRunner
    guard: ConnectionGuard

    async def close(self) -> None:
        """Stop listening and close every connection (each handler still running is cancelled
        after the runner's shutdown timeout)."""
        with contextlib.suppress(RuntimeError):  # a runner never set up
            await self.runner.cleanup()


async def listen(app: web.Application, s: GatewaySettings) -> Listener:
    """Serve ``app`` on ``s.host:s.port`` with ``s``'s timeouts and connection limits.

    Raises:
        OSError: the address cannot be bound.
    """
    guard = ConnectionGuard(connection_limit(s.max_connections), s.max_connections_per_client, s.header_timeout_s)
    app.middlewares.insert(0, guard.middleware)  # outermost: the head is complete when any handler runs
    runner = web.AppRunner(
        app,
        handler_cancellation=True,  # a client that goes away cancels its handler, which aborts its work
        access_log=None,
        keepalive_timeout=s.idle_timeout_s,
        auto_decompress=False,  # bodies are decoded by read_body (body.py says why)
        # The gateway aborts its requests itself before closing (Gateway.shutdown); what is left
        # is only the writing of those answers.
        shutdown_timeout=5.0,
    )
    await runner.setup()
    await _GuardedSite(runner, s.host, s.port, guard).start()
    if guard.max_connections < s.max_connections:
        logger.warning(
            "max_connections lowered to fit the file-descriptor limit",
            configured=s.max_connections,
            used=guard.max_connections,
            fd_reserve=FD_RESERVE,
        )
    return Listener(runner, guard)
