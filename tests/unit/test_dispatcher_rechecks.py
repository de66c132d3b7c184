"""The dispatcher's work in the background (``dispatcher/rechecks.py``): a wait that an abort ends
early, only for the requests it stops, and a close that leaves nothing running. No bus."""

from __future__ import annotations

import asyncio

import pytest

from dlora.common.messages import GenerateRequest, SamplingParams
from dlora.services.dispatcher.rechecks import Rechecks


def _req(owner: str = "") -> GenerateRequest:
    return GenerateRequest(request_id="r", reply_to="x", prompt="p", params=SamplingParams(), owner=owner)


async def _never() -> None:
    await asyncio.Event().wait()


async def test_an_abort_ends_the_wait_of_the_requests_it_stops_and_no_other() -> None:
    """An application's abort stops only its own request under an id: bob's wait ends, the
    gateway's request under the same id waits on until its own look."""
    rechecks, over = Rechecks(), asyncio.Event()
    gateways = asyncio.create_task(rechecks.wait(_req(), over.wait))
    bobs = asyncio.create_task(rechecks.wait(_req("bob"), _never))
    await asyncio.sleep(0)  # both begun: each is noted before its first await
    async with asyncio.timeout(10):
        rechecks.wake("r", lambda req: req.owner == "bob")
        await bobs
        assert not gateways.done() and "r" in rechecks
        over.set()
        await gateways
    assert "r" not in rechecks


async def test_an_error_of_what_is_awaited_is_raised() -> None:
    async def broken() -> None:
        raise RuntimeError("broken")

    with pytest.raises(RuntimeError, match="broken"):
        await Rechecks().wait(_req(), broken)


async def test_close_ends_every_task_and_those_started_as_one_was_cancelled() -> None:
    """A dispatch cut off by the stop's cancel starts a take-back of its write: ended too."""
    rechecks, begun, ended = Rechecks(), asyncio.Event(), []

    async def take_back() -> None:
        try:
            await _never()
        finally:
            ended.append("take-back")

    async def cut_off() -> None:
        try:
            begun.set()
            await _never()
        finally:
            rechecks.start(take_back())

    rechecks.start(cut_off())
    await begun.wait()
    async with asyncio.timeout(10):
        await rechecks.close()
    assert ended == ["take-back"] and not len(rechecks)


async def test_nothing_is_started_once_closed() -> None:
    """A bus handler the stop's unsubscribe cancelled ends after ``close``: the take-back it
    starts then would outlive the stop, so it is dropped unrun."""
    rechecks, ran = Rechecks(), []

    async def take_back() -> None:
        ran.append("take-back")

    await rechecks.close()
    rechecks.start(take_back())
    await asyncio.sleep(0)  # (a task started would have run its first step by now)
    assert not ran and not len(rechecks)
