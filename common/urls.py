"""The server addresses a service is given (pure): NATS seed URLs and Redis Sentinel URLs, and
any URL as it may be shown (without its password)."""

from __future__ import annotations

import urllib.parse

import msgspec


def nats_servers(url: str) -> list[str]:
    """The NATS seed URLs in ``url``, comma-separated (``nats://a:4222,nats://b:4222``): the client
    connects to one of them and, once connected, learns the rest of the cluster from it, moving to
    another node when its own goes."""
    servers = [u.strip() for u in url.split(",") if u.strip()]
    if not servers:
        raise ValueError(f"no NATS server URL in {url!r}")
    return servers


SENTINEL_SCHEME = "redis+sentinel"


class SentinelAddress(msgspec.Struct, frozen=True):
    """A ``redis+sentinel://[user:password@]host:port[,host:port...]/service[/db]`` URL, parsed:
    the Sentinels to ask (port 26379 where none is given) for the primary of ``service``."""

    sentinels: list[tuple[str, int]]
    service: str
    db: int = 0
    username: str = ""
    password: str = ""


def parse_sentinel_url(url: str) -> SentinelAddress:
    """``url`` parsed; ValueError naming what is wrong (no Sentinel, no service name, a bad port
    or database number). The form is redis-py's Sentinel arguments in one string, as Celery,
    Kombu and django-redis write them (several hosts, the service name as the path)."""
    prefix = f"{SENTINEL_SCHEME}://"
    if not url.startswith(prefix):
        raise ValueError(f"{url!r} is not a {prefix} URL")
    rest = url[len(prefix) :]
    userinfo, _, rest = rest.rpartition("@")
    hosts, _, path = rest.partition("/")
    username, _, password = userinfo.partition(":") if userinfo else ("", "", "")
    sentinels: list[tuple[str, int]] = []
    for host in filter(None, (h.strip() for h in hosts.split(","))):
        try:  # urllib's own host[:port] parsing: IPv6 in brackets, ports 0-65535
            parts = urllib.parse.urlsplit(f"//{host}")
            name, port = parts.hostname, parts.port or 26379
        except ValueError:
            name = None
        if not name:
            raise ValueError(f"{url!r}: Sentinel {host!r} is not host[:port]")
        sentinels.append((name, port))
    service, _, db = path.partition("/")
    if not sentinels or not service:
        raise ValueError(f"{url!r}: expected {prefix}host:port[,host:port...]/service[/db]")
    if db and not db.isdigit():
        raise ValueError(f"{url!r}: database {db!r} is not a number")
    return SentinelAddress(
        sentinels, service, int(db or 0), urllib.parse.unquote(username), urllib.parse.unquote(password)
    )


def redacted(url: str) -> str:
    """``url`` without its password (logs, messages, result.json and report.html get shared)."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def http_url(host: str, port: int) -> str:
    """The URL of an HTTP server bound to ``host``: an IPv6 address in brackets (``http://::1:8000``
    is no URL: curl refused the one ``dlora up`` printed), every interface ("") as 0.0.0.0."""
    host = host or "0.0.0.0"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
