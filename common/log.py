"""structlog set up once per process: JSON lines in services, readable lines on a terminal."""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import TextIO, cast

import structlog


class _Stderr:
    """Whatever ``sys.stderr`` is when a line is written, not when logging was configured: a
    command run in-process under a test's captured stderr would otherwise keep writing to that
    stream after the test closed it ("I/O operation on closed file" in every later test).

    A line that cannot be written is dropped: with its reader gone (``dlora up 2>&1 | head``, a
    log shipper that died) every write raised BrokenPipeError, and every request whose handling
    logs failed with it (a helper's trial: each gateway request a 500 from its access-log line).
    The standard library's handlers drop theirs alike (``Handler.handleError``)."""

    def write(self, text: str) -> int:
        try:
            return sys.stderr.write(text)
        except (OSError, ValueError):  # a broken pipe, a full disk; a closed file
            return 0

    def flush(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()


class _Writer(structlog.WriteLogger):
    """One write per record: the record and its newline together (PrintLogger's print() wrote
    them apart, and under ``dlora up``, whose services share one stderr, another process's record
    landed between them: ``{...}{...}``). It keeps the name it was got under for
    ``structlog.stdlib.add_logger_name`` (PrintLoggerFactory dropped it: no line said which
    service or part wrote it)."""

    def __init__(self, file: TextIO, name: str) -> None:
        super().__init__(file)
        self.name = name


class _Handler(logging.StreamHandler[TextIO]):
    """The standard library's records (aiohttp, asyncio, nats) rendered as structlog's: told
    apart from other handlers on the root logger (a test's capture), which configuring again
    keeps."""


# The settings' ``log_level`` names, in any case (vLLM's VLLM_LOGGING_LEVEL=INFO reads as info).
LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


def configure(json: bool = True, level: int | str = logging.INFO) -> None:
    """Every record at ``level`` or above (a number, or a name of ``LEVELS``) to stderr as one
    line, written at once (``_Writer``), naming its logger: one JSON object per line where
    ``json`` (``journalctl -o cat | jq`` reads them), else readable.

    The standard library's loggers go the same way at WARNING and above (with no handler they
    reached Python's last-resort handler as bare text, and jq stopped at the first of them), and
    so do ``warnings`` (a library's FutureWarning)."""
    level = LEVELS[level.lower()] if isinstance(level, str) else level
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.stdlib.add_logger_name,
    ]
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    stderr = cast(TextIO, _Stderr())  # one object: WriteLogger's lock is the file's

    def writer(*args: object) -> _Writer:
        return _Writer(stderr, str(args[0]) if args else "")

    structlog.configure(
        processors=[*processors, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=writer,
        # Not cached: a logger first used under one level kept it when configured again (a
        # command run in-process at WARNING silenced every later INFO line of the tests' process);
        # no log call is on a per-token path, so resolving the configuration each call costs nothing seen.
        cache_logger_on_first_use=False,
    )
    handler = _Handler(stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=processors,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    # What the last-resort handler let through: the libraries' INFO chatter stays out.
    root.setLevel(max(level, logging.WARNING))
    logging.captureWarnings(True)


def get(name: str) -> structlog.stdlib.BoundLogger:
    """A logger whose records name it: ``"logger": name``."""
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(name)
    return logger


def stopped(service: str, **how: object) -> None:
    """The last line of a service's stop: ``"<service> stopped"`` at info from its logger, with
    what the stop did (``how``: a worker's hand-over, the requests a gateway ended). The journal
    says when a process ended, not whether its stop ran to its end or was cut off (SIGKILL at the
    unit's ``TimeoutStopSec``): a stop with no such line was cut, or ended in an error."""
    get(service).info(f"{service} stopped", **how)
