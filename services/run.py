"""Run one service until SIGINT/SIGTERM: settings in, ``serve(settings, stop)`` out; under systemd
the watchdog is fed meanwhile and ``STOPPING=1`` sent at the signal (``services/notify.py``)."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, NoReturn

from dlora.services.notify import notifier

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StartupError(Exception):
    """A service cannot start as configured (its model directory, device, kernels): the message
    says why in one line, for ``dlora serve`` to print instead of a traceback."""


class Stop(asyncio.Event):
    """Set at the first SIGINT or SIGTERM: the service stops as it sees fit (a worker drains, for
    up to ``drain_timeout_s``). ``hurried`` at the next: stop now (a worker hands over at once).
    Ctrl-C twice did nothing more, as vLLM's and uvicorn's users press it to force a stop."""

    hurried = False


def hurried(stop: asyncio.Event) -> bool:
    """Whether ``stop`` was asked for a second time (``Stop``)."""
    return isinstance(stop, Stop) and stop.hurried


def _asked_to_stop(stop: asyncio.Event) -> None:
    """SIGINT and SIGTERM set ``stop``, and hurry it once set (``Stop``)."""

    def on_signal() -> None:
        if stop.is_set() and isinstance(stop, Stop):
            stop.hurried = True
            return
        notifier.stopping()
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in SIGNALS:
        loop.add_signal_handler(sig, on_signal)


@contextlib.contextmanager
def killed_by_signals(stop: asyncio.Event) -> Iterator[None]:
    """In the block SIGINT and SIGTERM end the process at once (their default action) instead of
    setting ``stop``: for start-up work that leaves nothing to undo and may not let the event loop
    run to see a stop. A model's load is such: safetensors opens and reads its files holding the
    GIL, so a load from a hung network mount held off Ctrl-C, a second Ctrl-C and systemd's
    SIGTERM for as long as it lasted (vLLM #5062's kind), and a slow one until it ended."""
    loop = asyncio.get_running_loop()
    for sig in SIGNALS:
        loop.remove_signal_handler(sig)
        signal.signal(sig, signal.SIG_DFL)  # (asyncio puts Python's KeyboardInterrupt back for SIGINT)
    try:
        yield
    finally:
        _asked_to_stop(stop)


def run_until_signalled(serve: Callable[[Any, asyncio.Event], Awaitable[None]], settings: Any) -> None:
    async def main() -> None:
        stop = Stop()
        _asked_to_stop(stop)
        watchdog = asyncio.create_task(notifier.keep_alive(stop))
        try:
            await serve(settings, stop)
        finally:
            stop.set()
            await watchdog

    asyncio.run(main())


def exit_now(code: int) -> NoReturn:
    """End this process with ``code`` once its service has stopped: the exit handlers run
    (logging's flush, temporary directories' cleanup, file locks, multiprocessing's children),
    the interpreter's own teardown does not. That teardown, a garbage collection of everything
    torch, Triton and transformers built, took a stopped worker 3-7 s on a loaded 2-core machine
    (0.2 s without it), and dlora up's ordered stop, systemd's stop and every restart waited for
    it. Threads are not joined (no service leaves one that must finish: the gateway's shaping
    pool is shut down without waiting). For a process that is the service: it does not return."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed descriptor or a broken pipe: still a clean stop
            if stream is not None:
                stream.flush()
    os._exit(code)
