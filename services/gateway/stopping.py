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


async def drained(
    running: Callable[[], int],
    timeout_s: float,
    stop: asyncio.Event | None = None,
    hopeless: Callable[[], bool] = lambda: False,
) -> int:
    """Wait until ``running()`` is 0, ``timeout_s`` has passed, ``stop`` is hurried, or
    ``hopeless()`` says no request can finish any more (the gateway's NATS connection closed for
    good, which is what stopped it: their answers cannot reach it, and the gateway sat out the
    timeout before its supervisor could start it again); what still runs then (0: all finished)."""
    deadline = time.monotonic() + timeout_s
    while (  # noqa: ASYNC110
        running() and time.monotonic() < deadline and not (stop is not None and hurried(stop)) and not hopeless()
    ):
        await asyncio.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))
    return running()
