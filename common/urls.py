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
    or database number) and the URL without its password. The form is redis-py's Sentinel
    arguments in one string, as Celery, Kombu and django-redis write them (several hosts, the
    service name as the path)."""
    prefix = f"{SENTINEL_SCHEME}://"
    shown = redacted(url)  # the message goes to a log or a terminal
    if not url.startswith(prefix):
        raise ValueError(f"{shown!r} is not a {prefix} URL")
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
            raise ValueError(f"{shown!r}: Sentinel {host!r} is not host[:port]")
        sentinels.append((name, port))
    service, _, db = path.partition("/")
    if not sentinels or not service:
        raise ValueError(f"{shown!r}: expected {prefix}host:port[,host:port...]/service[/db]")
    if db and not db.isdigit():
        raise ValueError(f"{shown!r}: database {db!r} is not a number")
    return SentinelAddress(
        sentinels, service, int(db or 0), urllib.parse.unquote(username), urllib.parse.unquote(password)
    )


def redacted(url: str) -> str:
    """``url`` as it may be shown (logs, messages, result.json and report.html get shared): each
    comma-separated part's password, or its whole login where it has no ``:`` (a NATS token,
    ``nats://TOKEN@host``), as ``***``. Every documented form (a NATS seed list, a
    ``redis+sentinel://`` URL with several hosts, IPv6 hosts in brackets) and any malformed one:
    it never raises, as urllib's parsing did on a seed list (``dlora keys`` died on it)."""
    # Redis reads a lone login as a user name (redis-py), NATS as a token.
    lone_is_user = url.startswith(("redis://", "rediss://", "unix://", f"{SENTINEL_SCHEME}://"))
    parts = []
    for part in url.split(","):
        head, login, tail = _login(part)
        if login is not None:
            user, colon, _ = login.partition(":")
            shown = f"{user}:***" if colon else user if lone_is_user else "***"
            part = f"{head}{shown}@{tail}"
        parts.append(part)
    return ",".join(parts)


def nats_login(url: str, user: str = "", password: str = "") -> str:
    """Who a NATS client given ``url`` and ``user``/``password`` logs in as, to name in a message:
    "user 'NAME'", "a token" or "no user". nats-py sends ``user`` and ``password`` when both are
    set, else the login in the URL of the seed it reached: the first seed's with one is named."""
    if user and password:
        return f"user {user!r}"
    for part in url.split(","):
        _, login, _ = _login(part)
        if login is not None:
            name, colon, _ = login.partition(":")
            return f"user {urllib.parse.unquote(name)!r}" if colon else "a token"
    return "no user"


def _login(part: str) -> tuple[str, str | None, str]:
    """``part`` of a URL (one seed of a list) as what comes before its login, the login (None
    where it has none) and what follows its ``@``."""
    scheme, sep, rest = part.rpartition("://")
    end = min((i for i in map(rest.find, "/?#") if i >= 0), default=len(rest))
    login, at, tail = rest[:end].rpartition("@")  # the last "@": a password may hold one unquoted
    return (f"{scheme}{sep}", login, tail + rest[end:]) if at else (part, None, "")


def http_url(host: str, port: int) -> str:
    """The URL of an HTTP server bound to ``host``: an IPv6 address in brackets (``http://::1:8000``
    is no URL: curl refused the one ``dlora up`` printed), every interface ("") as 0.0.0.0."""
    host = host or "0.0.0.0"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
