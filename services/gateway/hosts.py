"""DNS rebinding protection: which Host headers a gateway answers.

A web page the user visits can have its own name resolve to 127.0.0.1 and then call a loopback
gateway as its own origin, so no CORS preflight stops it; with ``auth = "none"`` nothing else
does, and the page uses the gateway as the user would (the attack behind Jupyter's, webpack-dev-
server's and the MCP SDK's Host checks). Such a request names the page's host in its Host
header. A gateway on a loopback address without keys therefore answers only Host headers naming a
loopback host, or one of ``allowed_hosts``. A gateway on another address, or one that asks for
keys, answers any Host (its names are not known here; a caller without a key gets a 401 anyway)
unless ``allowed_hosts`` names them. A name there beginning with a dot (``.example.com``) stands for
that name and every name under it, as in Django's ``ALLOWED_HOSTS``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection

from aiohttp import web

from dlora.services.gateway.errors import Handler, Middleware
from dlora.services.gateway.openai import APIError

# RFC 6761 6.3: "localhost" and names under it are the loopback host (browsers resolve them so).
_LOOPBACK_NAMES = ("localhost",)
# What a Host header's host and port are made of in practice (DNS names, IDNs as punycode, IPv4,
# bracketed IPv6 with a zone): RFC 3986's sub-delims (",", ";", ...) make no DNS name.
_HOST_CHARS = re.compile(r"[a-z0-9._~%:\[\]-]*")


def host_name(header: str) -> str:
    """The host of a Host header: without its port or IPv6 brackets, lower case, no final dot
    ("[::1]:8000" -> "::1", "LocalHost.:80" -> "localhost"); a header with characters no host
    or port has (a list, a path, userinfo) is returned whole, to match nothing."""
    host = header.strip().lower()
    if not _HOST_CHARS.fullmatch(host):  # "localhost:8000, evil" is no loopback name
        return host
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else host[1:]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def is_loopback(host: str) -> bool:
    """``host`` (a name or an address, as ``host_name`` gives it) is this machine's loopback."""
    if host in _LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    # ::ffff:127.0.0.1 reaches 127.0.0.1 (a dual-stack socket's IPv4); Python < 3.13 says not loopback
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def host_allowed(host: str, allowed: frozenset[str]) -> bool:
    """``host`` (as ``host_name`` gives it) is loopback, one of ``allowed`` or under one of its
    ``.domain`` entries ("api.example.com" and "example.com" under ".example.com")."""
    if is_loopback(host) or host in allowed:
        return True
    if not _HOST_CHARS.fullmatch(host):  # a header ``host_name`` gave back whole matches no domain
        return False
    parts = host.split(".")
    return any("." + ".".join(parts[i:]) in allowed for i in range(len(parts)))


def allowed_hosts(bind: str, auth: str, allowed: Collection[str]) -> frozenset[str] | None:
    """The Host names a gateway listening on ``bind`` with ``auth`` answers beside the loopback
    ones, or None for any: ``allowed`` if it names some ("*" alone: any), none on a loopback
    address without keys, any otherwise."""
    if "*" in allowed:
        return None
    if allowed:
        return frozenset(host_name(h) for h in allowed)
    return frozenset() if auth == "none" and is_loopback(host_name(bind)) else None


def host_guard(allowed: frozenset[str]) -> Middleware:
    """The middleware: a 403 naming the setting for a request whose Host is not allowed
    (``host_allowed``). A request without a Host header (HTTP/1.0) is answered: browsers send one."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        header = request.headers.get("Host")
        if header is not None and not host_allowed(host_name(header), allowed):
            raise APIError(
                403,
                f"Host {header[:253]!r} is not one this gateway answers: loopback names only, and those of its "
                "allowed_hosts setting (DNS rebinding protection); add the name there to serve it "
                '(a list: allowed_hosts = ["name"], DLORA_GATEWAY_ALLOWED_HOSTS=\'["name"]\')',
            )
        return await handler(request)

    return middleware
