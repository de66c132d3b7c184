"""Rate-limited logging: a flood of one kind of message (a line per connection, per bad request,
per failed ``accept``) must not write megabytes a second of log, nor hide the first occurrence.

``RateLimiter`` lets ``burst`` events of a kind through per ``interval_s`` and counts the rest;
the next one let through carries that count. ``install`` puts one as a ``logging.Filter`` on the
standard-library loggers that log per connection or per request in the gateway: asyncio's (its
accept loop logged ``socket.accept() out of system resource`` thousands of times a second when
file descriptors ran out; issue 16, fault 8) and aiohttp's server, access and web loggers
("Error handling request" with a traceback for each malformed request). The bus's log of rejected
messages (``common/bus.py``) uses a ``RateLimiter`` too: any process on the bus can publish.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from aiohttp.http_exceptions import HttpProcessingError

# Errors of a process out of descriptors or memory: their traceback (asyncio's accept loop, the
# same frames every time) is ~2 KB of nothing the one-line message does not say.
_EXHAUSTION_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

# The standard-library loggers that write a line per connection or request in the gateway.
PER_CONNECTION_LOGGERS = ("asyncio", "aiohttp.server", "aiohttp.access", "aiohttp.web", "aiohttp.internal")


@dataclass
class _Window:
    start: float
    passed: int = 0  # let through in this window
    suppressed: int = 0  # held back since the last one let through


class RateLimiter:
    """At most ``burst`` events of each kind (a hashable key) per ``interval_s``; at most
    ``max_kinds`` kinds are tracked (past that the oldest windows are forgotten, so a flood of
    distinct keys cannot grow it)."""

    def __init__(
        self, burst: int, interval_s: float, max_kinds: int = 1024, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.burst, self.interval_s, self.max_kinds, self.clock = burst, interval_s, max_kinds, clock
        self._windows: dict[Hashable, _Window] = {}

    def allow(self, kind: Hashable) -> tuple[bool, int]:
        """Whether this event of ``kind`` may be logged, and (if so) how many of its kind were held
        back since the last one that was."""
        now = self.clock()
        w = self._windows.get(kind)
        if w is None or now - w.start >= self.interval_s:
            if w is None and len(self._windows) >= self.max_kinds:
                oldest = min(self._windows, key=lambda k: self._windows[k].start)
                del self._windows[oldest]
            w = self._windows[kind] = _Window(now, suppressed=w.suppressed if w else 0)
        if w.passed >= self.burst:
            w.suppressed += 1
            return False, 0
        w.passed += 1
        suppressed, w.suppressed = w.suppressed, 0
        return True, suppressed


class RateLimitFilter(logging.Filter):
    """A ``logging.Filter`` over a ``RateLimiter``; a record's kind is its logger, level and the
    first line of its message template (the arguments vary: the client's address). A record let
    through for running out of descriptors or memory loses its traceback and keeps the error's
    one line (``[Errno 24] Too many open files``)."""

    def __init__(self, limiter: RateLimiter) -> None:
        super().__init__()
        self.limiter = limiter

    def filter(self, record: logging.LogRecord) -> bool:
        first_line = str(record.msg).split("\n", 1)[0][:200]
        allowed, suppressed = self.limiter.allow((record.name, record.levelno, first_line))
        if not allowed:
            return False
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):  # a request aiohttp could not parse
            # Its message quotes the offending line, an Authorization header's key whole (a user's
            # trial: a valid key with 9 KB appended landed in the log with a traceback).
            record.msg, record.args = f"a malformed HTTP request was refused: {type(exc).__name__}", None
            record.exc_info = record.exc_text = None
        if isinstance(exc, OSError) and exc.errno in _EXHAUSTION_ERRNOS:
            record.msg, record.args = f"{record.getMessage().split(chr(10), 1)[0]}: {exc}", None
            record.exc_info = record.exc_text = None
        if suppressed:
            record.msg = f"{record.getMessage()}\n[{suppressed} more like this were not logged]"
            record.args = None
        return True


def install(burst: int = 10, interval_s: float = 10.0, loggers: tuple[str, ...] = PER_CONNECTION_LOGGERS) -> None:
    """Put one rate-limit filter on each of ``loggers`` (a logger's filter sees the records logged
    to it, not those of its children, so each is named); again on the same logger replaces it."""
    f = RateLimitFilter(RateLimiter(burst, interval_s))
    for name in loggers:
        target = logging.getLogger(name)
        for old in [x for x in target.filters if isinstance(x, RateLimitFilter)]:
            target.removeFilter(old)
        target.addFilter(f)
