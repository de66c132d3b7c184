"""Run one service until SIGINT/SIGTERM: settings in, ``serve(settings, stop)`` out."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from typing import Any


def run_until_signalled(serve: Callable[[Any, asyncio.Event], Awaitable[None]], settings: Any) -> None:
    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(settings, stop)

    asyncio.run(main())
