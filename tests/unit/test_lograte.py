"""Rate-limited logging: a flood of one kind of line is cut to a few per interval, with a count."""

from __future__ import annotations

import logging

from dlora.common.lograte import RateLimiter, RateLimitFilter, install


def test_a_kind_passes_burst_times_per_interval_and_the_next_one_carries_the_count() -> None:
    now = [0.0]
    limiter = RateLimiter(burst=2, interval_s=10.0, clock=lambda: now[0])
    assert [limiter.allow("a") for _ in range(5)] == [(True, 0), (True, 0), (False, 0), (False, 0), (False, 0)]
    assert limiter.allow("b") == (True, 0)  # kinds are counted apart
    now[0] = 10.0
    assert limiter.allow("a") == (True, 3)  # a new interval: the three held back are reported
    assert limiter.allow("a") == (True, 0)


def test_distinct_kinds_cannot_grow_it_without_bound() -> None:
    limiter = RateLimiter(burst=1, interval_s=10.0, max_kinds=8)
    for i in range(1000):
        assert limiter.allow(i) == (True, 0)
    assert len(limiter._windows) == 8


def test_the_filter_on_asyncio_and_aiohttp_loggers_bounds_a_flood(caplog) -> None:
    install(burst=3, interval_s=60.0)
    try:
        with caplog.at_level(logging.ERROR):
            for _ in range(10_000):
                logging.getLogger("asyncio").error("socket.accept() out of system resource\nsocket: <fd=7>")
                logging.getLogger("aiohttp.server").error("Error handling request from %s", "127.0.0.1")
        assert len(caplog.records) == 6
    finally:
        for name in ("asyncio", "aiohttp.server", "aiohttp.access", "aiohttp.web", "aiohttp.internal"):
            logger = logging.getLogger(name)
            for f in [f for f in logger.filters if isinstance(f, RateLimitFilter)]:
                logger.removeFilter(f)


def test_a_record_let_through_after_a_flood_says_how_many_were_dropped() -> None:
    now = [0.0]
    f = RateLimitFilter(RateLimiter(burst=1, interval_s=1.0, clock=lambda: now[0]))
    record = lambda: logging.LogRecord("asyncio", logging.ERROR, __file__, 1, "lost %s", ("x",), None)  # noqa: E731
    assert f.filter(record())
    assert not any(f.filter(record()) for _ in range(41))
    now[0] = 2.0
    r = record()
    assert f.filter(r) and r.getMessage() == "lost x\n[41 more like this were not logged]"


def test_running_out_of_descriptors_is_logged_as_one_line_without_its_traceback() -> None:
    """asyncio logs each failed ``accept`` with a ~2 KB traceback that says nothing the error's
    one line does not; other errors keep theirs."""
    import errno
    import sys

    f = RateLimitFilter(RateLimiter(burst=10, interval_s=1.0))

    def record(exc: Exception) -> logging.LogRecord:
        try:
            raise exc
        except Exception:  # noqa: BLE001 - any error, to log it as asyncio does
            info = sys.exc_info()
        return logging.LogRecord(
            "asyncio", logging.ERROR, __file__, 1, "socket.accept() out of system resource\nsocket: <fd=8>", None, info
        )

    r = record(OSError(errno.EMFILE, "Too many open files"))
    assert f.filter(r) and r.exc_info is None
    assert r.getMessage() == "socket.accept() out of system resource: [Errno 24] Too many open files"
    other = record(ValueError("a bug"))
    assert f.filter(other) and other.exc_info is not None


def test_a_flood_of_bad_bus_messages_logs_a_few_lines_and_counts_them_all(capsys) -> None:
    from dlora.common import bus, log
    from dlora.common.messages import GenerateRequest

    log.configure(json=True)
    before = bus.REJECTED.labels("flood.>", "GenerateRequest")._value.get()
    for i in range(100):
        bus.reject("flood.>", f"flood.{i}", GenerateRequest, ValueError("not JSON"))
    lines = [line for line in capsys.readouterr().err.splitlines() if "bus message rejected" in line]
    assert len(lines) == 10
    assert bus.REJECTED.labels("flood.>", "GenerateRequest")._value.get() - before == 100


def test_a_request_aiohttp_cannot_parse_is_logged_without_its_header_line() -> None:
    """aiohttp's "Error handling request" quoted the header it could not read: a valid API key
    with 9 KB appended, whole, with a traceback."""
    import logging

    from aiohttp.http_exceptions import LineTooLong

    from dlora.common.lograte import RateLimiter, RateLimitFilter

    try:
        raise LineTooLong(b"Bearer sk-dlora-secret" + b"A" * 9000, 8190)
    except LineTooLong:
        import sys

        record = logging.LogRecord(
            "aiohttp.server", logging.ERROR, __file__, 1, "Error handling request", None, sys.exc_info()
        )
    assert RateLimitFilter(RateLimiter(10, 10.0)).filter(record)
    assert "secret" not in record.getMessage() and record.exc_info is None
    assert record.getMessage() == "a malformed HTTP request was refused: LineTooLong"
