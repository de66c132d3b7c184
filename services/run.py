"""Run one service until SIGINT/SIGTERM: settings in, ``serve(settings, stop)`` out; under systemd
the watchdog is fed meanwhile and ``STOPPING=1`` sent at the signal (``services/notify.py``)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from typing import Any

from dlora.services.notify import notifier


class StartupError(Exception):
    """A service cannot start as configured (its model directory, device, kernels): the message
    says why in one line, for ``dlora serve`` to print instead of a traceback."""


def run_until_signalled(serve: Callable[[Any, asyncio.Event], Awaitable[None]], settings: Any) -> None:
    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            notifier.stopping()
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        watchdog = asyncio.create_task(notifier.keep_alive(stop))
        try:
            await serve(settings, stop)
        finally:
            stop.set()
            await watchdog

    asyncio.run(main())
