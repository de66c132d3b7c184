"""A stopping gateway's wait for the requests it took (``shutdown_timeout_s``: vLLM's
``--shutdown-timeout``), bounded so that its stop is: by the timeout, and by a second SIGTERM or
Ctrl-C (``run.Stop.hurried``), which ends the wait at once as it hurries a draining worker."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from dlora.services.run import hurried

# Seconds between two looks at what still runs: a hurry is a flag set by a signal handler, not an
# event to wait on, and a request that ends is one counter's decrement.
POLL_S = 0.05


async def drained(running: Callable[[], int], timeout_s: float, stop: asyncio.Event | None = None) -> int:
    """Wait until ``running()`` is 0, ``timeout_s`` has passed, or ``stop`` is hurried; what
    still runs then (0: all finished)."""
    deadline = time.monotonic() + timeout_s
    while running() and time.monotonic() < deadline and not (stop is not None and hurried(stop)):  # noqa: ASYNC110
        await asyncio.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))
    return running()
