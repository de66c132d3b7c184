"""What a service tells systemd (sd_notify, through cysystemd): ``READY=1`` once it serves,
``WATCHDOG=1`` while its main loop turns, ``STOPPING=1`` when told to stop.

Without ``$NOTIFY_SOCKET`` (not under systemd, or a unit that is not ``Type=notify``) every call is
a no-op and cysystemd is not even imported, so a service runs the same anywhere. The watchdog
(``WatchdogSec=`` in the unit, which systemd passes as ``$WATCHDOG_USEC``) is fed every half
interval by ``keep_alive`` from the event loop, so a loop blocked by a stuck call stops feeding it;
a service whose real work runs off the loop (the worker's engine steps run in a thread) also
calls ``beat`` from that work's loop, and once it has, the watchdog is fed only while the beats
are fresh: a worker stuck in one step is restarted by systemd even though its event loop runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from dlora.common import log
from dlora.common.bus import Outage

logger = log.get("notify")


def watchdog_interval_s(env: Mapping[str, str], pid: int) -> float | None:
    """Seconds systemd waits for a ``WATCHDOG=1`` (``$WATCHDOG_USEC``), or None when no watchdog
    watches this process: unset, not a positive number, or ``$WATCHDOG_PID`` naming another
    process (sd_watchdog_enabled(3)'s rules)."""
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if env.get("WATCHDOG_PID") and env["WATCHDOG_PID"] != str(pid):
        return None
    return int(usec) / 1e6


class Notifier:
    """sd_notify for this process; every method a no-op without ``$NOTIFY_SOCKET``."""

    def __init__(self, env: Mapping[str, str] | None = None, clock: Any = time.monotonic) -> None:
        env = os.environ if env is None else env
        self.enabled = bool(env.get("NOTIFY_SOCKET"))
        self.watchdog_s = watchdog_interval_s(env, os.getpid()) if self.enabled else None
        self.clock = clock
        self._beat_at: float | None = None  # None: nothing beats off the loop; the loop is enough

    def _send(self, name: str, value: str = "") -> None:
        if not self.enabled:
            return
        from cysystemd.daemon import Notification, notify  # only under systemd: see the module doc

        notify(Notification[name], value or None)  # type: ignore[arg-type]  # None: a constant's

    def ready(self, status: str) -> None:
        """``READY=1`` with a one-line ``STATUS`` (``systemctl status`` shows it)."""
        self._send("READY")
        self._send("STATUS", status)

    async def ready_when(self, reachable: Callable[[], Awaitable[object]], status: str, every_s: float = 1.0) -> None:
        """``ready`` once ``reachable()`` returns (Redis answers a ping), trying every ``every_s``:
        a service that rides out a Redis outage serves meanwhile, but is not yet what the unit
        promises (connected to NATS and Redis), so systemd's start timeout still applies. Logged
        when it first fails and when it answers, not at every try."""
        store = Outage("the state store, before ready")
        while True:
            try:
                await reachable()
                break
            except Exception as e:  # noqa: BLE001 - down at start: tried again
                store.failed(e)
            await asyncio.sleep(every_s)
        store.succeeded()
        self.ready(status)

    def stopping(self) -> None:
        self._send("STOPPING")

    def beat(self) -> None:
        """The service's own work loop turned: the watchdog is fed only while these are fresh."""
        self._beat_at = self.clock()

    def alive(self) -> bool:
        """Whether to feed the watchdog now: no beats are kept, or the last is within its interval."""
        return self._beat_at is None or self.watchdog_s is None or self.clock() - self._beat_at < self.watchdog_s

    async def keep_alive(self, stop: asyncio.Event) -> None:
        """Feed the watchdog every half interval while ``alive``, until ``stop``; returns at once
        when no watchdog is set."""
        if self.watchdog_s is None:
            return
        while not stop.is_set():
            if self.alive():
                self._send("WATCHDOG")
            else:
                logger.error("work loop stalled; not feeding the watchdog", since_s=self.clock() - (self._beat_at or 0))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.watchdog_s / 2):
                    await stop.wait()


# One per process: the services' ready points and the worker's loop reach it without threading it
# through every constructor.
notifier = Notifier()
