"""Getting a worker's token chunks to their readers through NATS outages.

A chunk published while the connection is down waits in nats-py's buffer and goes out on
reconnect, but a reader that has not re-subscribed by then misses it; a chunk written just before
the link was found dead is lost; and a long outage fills the buffer, when publishing raises. So
every chunk is kept for ``RESEND_WINDOW_S``. A reader whose connection dropped (a NATS restart
drops every one) says so in its next ``ClientAlive``, once it has re-subscribed, and the recent
chunks to it are published again then (``resend_to``). When the worker's own connection comes
back, the recent ones are published again for the readers that cannot say so (no ``client``),
twice: they re-subscribe when they reconnect, which takes nats-py up to its reconnect wait (2 s by
default) after the server is back; and once, at the first, those to named readers not re-sent to
since, for the case where only the worker's link dropped (the readers stayed, and will not say).
Readers drop what they already have by ``seq`` (the gateway's ReplyStream).

A re-send never carries the chunks of a copy given up on meanwhile (its worker stalled, and
another attempt serves the request): ``superseded`` is asked first, since a reconnect after a
stall comes before the step that would learn it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import msgspec
from nats.aio.client import Client as NATS
from nats.errors import BadSubjectError, MaxPayloadError
from nats.errors import Error as NatsError

from dlora.common import bus, log
from dlora.common.messages import ErrorCode, FinishReason, TokenChunk
from dlora.services.worker.chunks import Resend

RESEND_WINDOW_S = 15.0  # a server restart takes a few seconds; what went out before it may be lost too
RESEND_DELAYS_S = (1.0, 3.0)  # after the reconnect is seen

logger = log.get("worker")


# Which of these requests (id -> the attempt whose chunks are kept) another attempt serves now.
Superseded = Callable[[dict[str, int]], Awaitable[set[str]]]


async def _none_superseded(_: dict[str, int]) -> set[str]:
    return set()


class Delivery:
    def __init__(self, nc: NATS, superseded: Superseded = _none_superseded) -> None:
        self.nc = nc
        self.superseded = superseded
        self.resend = Resend(RESEND_WINDOW_S)
        self._outage = bus.Outage("token chunks (nats)")
        self._reconnects: int | None = None  # as of the first look (the connection may come later)
        self._resending: asyncio.Task[None] | None = None
        # Named readers re-sent to (``resend_to``) since the worker's own reconnect was last seen,
        # while its re-sends are under way
        self._claimed: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()  # re-sends to one reader, held until done

    async def publish(self, subject: str, chunk: TokenChunk, client: str) -> bool:
        """Publish ``chunk`` (of a request of ``client``, "": none) and keep it for a re-send. False
        when NATS refused it (closed, or its buffer full in a long outage): logged, never raised."""
        self.resend.add(time.monotonic(), subject, chunk, client)
        return await self._send(subject, chunk)

    async def _send(self, subject: str, chunk: TokenChunk) -> bool:
        try:
            await bus.publish(self.nc, subject, chunk)
        except (BadSubjectError, MaxPayloadError) as e:
            # No outage: this chunk can never go out. Taken as sent (no reader can have it), so its
            # request still ends and its end is recorded; as a failure it was handed back and run
            # again without end. (The dispatcher refuses such requests; this is for the rest.)
            logger.warning("chunk cannot be published; dropped", subject=subject[:200], error=type(e).__name__)
            if isinstance(e, MaxPayloadError) and chunk.error is None:  # its reader is told, not left waiting
                why = f"a reply of this request is over what the message bus carries ({self.nc.max_payload} bytes)"
                if chunk.prompt_logprobs:
                    why += f": the logprobs of its {len(chunk.prompt_logprobs) + 1} prompt tokens; ask for fewer"
                failed = TokenChunk(
                    request_id=chunk.request_id,
                    seq=chunk.seq,
                    error=why,
                    error_code=ErrorCode.BAD_REQUEST,
                    finish_reason=FinishReason.ERROR,
                    worker=chunk.worker,
                    recoveries=chunk.recoveries,
                )
                return await self._send(subject, failed)
            if isinstance(e, MaxPayloadError) and chunk.error is not None and len(chunk.error) > 200:  # told, shorter
                return await self._send(subject, msgspec.structs.replace(chunk, error=chunk.error[:199] + "…"))
            return True
        except NatsError as e:
            self._outage.failed(e)
            return False
        self._outage.succeeded()
        return True

    def reconnected(self) -> bool:
        """Whether the connection came back since the last call; if so the re-sends are under way."""
        seen, self._reconnects = self._reconnects, self.nc.stats["reconnects"]
        if seen is None or seen == self._reconnects:
            return False
        if self._resending is not None:  # an earlier reconnect's passes are this one's to make: left on,
            self._resending.cancel()  # those still due sent the same chunks again beside this one's
        self._claimed.clear()
        self._resending = asyncio.create_task(self._resend(RESEND_DELAYS_S))
        return True

    def resend_to(self, client: str) -> None:
        """Publish again, now, the recent chunks to ``client`` (``Resend.recent``): it says its own
        connection came back, or it started again, and what went out meanwhile never reached it."""
        if self._resending is not None and not self._resending.done():  # (else none is pending: kept no more)
            self._claimed.add(client)
        self._tasks.add(task := asyncio.create_task(self._resend((0.0,), client)))
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Cancel the re-sends under way and wait for their end: at a worker's stop one left
        running outlived the worker, publishing on the connection closed under it (or destroyed
        still pending when the loop closed: "Task was destroyed but it is pending")."""
        tasks = [*self._tasks, *([self._resending] if self._resending is not None else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _resend(self, delays: tuple[float, ...] = RESEND_DELAYS_S, client: str | None = None) -> None:
        for n, delay in enumerate(delays):
            await asyncio.sleep(delay)
            if client is None:  # the worker's own reconnect: named readers at the first pass only
                recent = self.resend.unclaimed(time.monotonic(), self._claimed if n == 0 else None)
            else:
                recent = self.resend.recent(time.monotonic(), client)
            if not recent:  # a reader with nothing here (a trial: 500 made-up
                continue  # names announced at once stalled every worker 10 s in Redis calls and log lines)
            gone = await self.superseded({c.request_id: c.recoveries for _, c in recent})
            for rid in gone:
                self.resend.forget(rid)
            recent = [(subject, c) for subject, c in recent if c.request_id not in gone]
            logger.info("recent chunks sent again", chunks=len(recent), to="every reader" if client is None else client)
            for subject, chunk in recent:
                await self._send(subject, chunk)  # kept once: a re-send must not grow what is kept
