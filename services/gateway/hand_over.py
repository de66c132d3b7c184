"""Handing a request to a dispatcher, waiting out a dispatcher's restart.

The dispatchers take requests as one NATS queue group, so with several running NATS routes each
request to one that is subscribed: one stopping (its connection closes, its subscription goes with
it) costs nothing. With none subscribed the server answers "no responders" at once, and a single
dispatcher's restart (``systemctl restart``: its stop, then 2-3 s of imports and connecting) was a
window of 503s. Such a request was never received by anyone, so sending it again duplicates
nothing: it is sent again, waits doubling from ``FIRST_WAIT_S`` to ``MAX_WAIT_S``, until the
gateway's ``dispatch_timeout_s`` is spent, as vLLM's router retries (with backoff) a worker it
could not reach. A request that timed out (a dispatcher subscribed but not answering) is not sent again:
that dispatcher may still take it, and it would run twice."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError

FIRST_WAIT_S = 0.05  # a dispatcher that was only re-subscribing (its NATS reconnect) is back at once
MAX_WAIT_S = 0.5  # each waiting request asks at most twice a second: 1,000 waiting, 2,000 messages/s


async def hand_over(
    nc: NATS, subject: str, data: bytes, timeout_s: float, waited: Callable[[], None] | None = None
) -> None:
    """Send ``data`` as a NATS request on ``subject`` until one subscriber answers, within
    ``timeout_s`` seconds in all; ``waited()`` is called once where none was subscribed at first.

    Raises:
        NoRespondersError: still none subscribed when ``timeout_s`` was spent.
        nats.errors.TimeoutError: one was subscribed but did not answer in the time left.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    wait_s = FIRST_WAIT_S
    while True:
        # Only "no responders" is sent again: nobody received the request. A timeout is not: the
        # dispatcher NATS gave it to may hold it in its subscription's queue and take it later (NATS
        # gives it to no other), and a copy sent again would run beside it. The dispatchers' check
        # that joins a request sent again to its stream (``inflight.sent_again``) holds only while
        # the first is in flight: one taken after the copy ended runs again, for nobody. (And it
        # spends what is left of ``timeout_s``: there is no time for another try.)
        try:
            await nc.request(subject, data, timeout=deadline - loop.time())
            return
        except NoRespondersError:
            # what is left after the wait must still hold a request's round trip (a few ms), else
            # its timeout would answer for the missing dispatcher
            if deadline - loop.time() < 2 * wait_s:
                raise
            if waited is not None and wait_s == FIRST_WAIT_S:
                waited()
            await asyncio.sleep(wait_s)
            wait_s = min(2 * wait_s, MAX_WAIT_S)
