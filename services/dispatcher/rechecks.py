"""The dispatcher's work in the background: requests looked at again later (a second request under
an id in flight, looked at once its record may have gone; one waiting for a worker that holds its
adapter version, looked at once every worker's next stats came) and records taken back
(``take_back.py``). No I/O of its own: the caller passes the work and says which aborts it heard.

A request's wait ends early when its abort is heard (``wake``): the look that follows finds the
abort as the intake does and ends the request with the abort's last chunk at once. Waited out,
the request was failed ("no worker is available", a duplicate id) or sent to a worker, for
nobody, after its client had gone (a review). The stop cancels every task and waits for its end
(``close``, as ``Delivery.close`` in the worker): cancelled only, one outlived the dispatcher, to
log or write after its stop, or be destroyed pending when the loop closed."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from dlora.common.messages import GenerateRequest


class Rechecks:
    """Tasks run beside the bus handlers, and the requests among them waiting to be looked at again."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False  # (``close`` returned: nothing more is started)
        # request id -> each request waiting under it (two retries of one id may wait at once),
        # with the event that ends its wait
        self._waiting: dict[str, list[tuple[GenerateRequest, asyncio.Event]]] = {}

    def __contains__(self, request_id: str) -> bool:
        """Whether a request under ``request_id`` waits to be looked at again."""
        return request_id in self._waiting

    def __len__(self) -> int:
        """Tasks not ended yet."""
        return len(self._tasks)

    def start(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` in a task of its own, kept until it ends (and cancelled at ``close``); once
        ``close`` returned, ``work`` is dropped unrun: a bus handler the stop's unsubscribe cut off
        and gave up on (past ``bus.HANDLERS_S``) must not start a take-back after the stop (its
        Redis work and log lines too). Dropped, as one cancelled at ``close`` is: a record Redis
        writes late stays, for its worker to hand back (``take_back.py``)."""
        if self._closed:
            work.close()  # (never begun: no "never awaited" warning)
            return
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def wait(self, req: GenerateRequest, after: Callable[[], Awaitable[None]]) -> None:
        """Until ``after()`` is done, or ``wake`` ends ``req``'s wait sooner. An error of ``after()``
        is raised here."""
        woken = asyncio.Event()
        entry = (req, woken)
        self._waiting.setdefault(req.request_id, []).append(entry)
        waits = [asyncio.ensure_future(after()), asyncio.ensure_future(woken.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
            # (an await in finally: a cancel of this task was delivered already, and both end at once)
            await asyncio.gather(*waits, return_exceptions=True)
            entries = self._waiting[req.request_id]
            entries.remove(entry)
            if not entries:
                del self._waiting[req.request_id]
        if not waits[0].cancelled() and (error := waits[0].exception()) is not None:
            raise error

    def wake(self, request_id: str, aborted: Callable[[GenerateRequest], bool]) -> None:
        """End the wait of each request under ``request_id`` that ``aborted`` says was aborted (an
        application's abort stops only its own requests: the others under the id wait on)."""
        for req, woken in self._waiting.get(request_id, []):
            if aborted(req):
                woken.set()

    async def close(self) -> None:
        """Cancel every task and wait for its end, and for any a cancelled one started meanwhile
        (a dispatch cut off in its Redis write starts a take-back of that write: ``_dispatch``);
        none is started after (``start``)."""
        while self._tasks:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        self._closed = True
