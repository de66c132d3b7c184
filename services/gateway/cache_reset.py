"""vLLM's ``POST /reset_prefix_cache`` (SGLang's ``/flush_cache``, also served), admin only: every worker forgets
its prefix cache, and every dispatcher where prefixes went, as before a cold-cache benchmark. The
gateway broadcasts a ``PrefixCacheReset`` with a reply inbox and gathers the workers' answers."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

import msgspec
from aiohttp import web
from nats.aio.msg import Msg

from dlora.common import bus, subjects
from dlora.common.messages import PrefixCacheReset, PrefixCacheResetDone
from dlora.services.gateway.openai import APIError

if TYPE_CHECKING:
    from dlora.services.gateway.main import Gateway

# How long a reset waits for the live workers' answers (each answers between steps).
RESET_WAIT_S = 5.0
_decode_done = msgspec.json.Decoder(PrefixCacheResetDone)


async def reset_prefix_cache(gw: Gateway, request: web.Request) -> web.Response:
    """``POST /reset_prefix_cache`` (admin; vLLM's path) and ``POST``/``GET /flush_cache``
    (SGLang's): every worker forgets its prefix cache, as before a cold-cache benchmark. 200 with
    the blocks each worker forgot (``workers``) and the live workers that did not answer within
    ``RESET_WAIT_S`` (``missing``); 503 when none answered."""
    await gw.auth.admin(request)
    expected = {st.worker for st, _ in gw.cluster.live(time.monotonic(), gw.s.heartbeat_ttl_s)}
    answers: dict[str, int] = {}
    all_in = asyncio.Event()

    async def answered(msg: Msg) -> None:
        if msg.headers and "Status" in msg.headers:  # NATS's "no responders": no worker subscribes
            return
        try:
            done = _decode_done.decode(msg.data)
        except msgspec.DecodeError as e:
            bus.reject("prefix-cache reset answers", msg.subject, PrefixCacheResetDone, e)
            return
        answers[done.worker] = done.blocks
        if expected and expected <= answers.keys():  # none known (no stats yet): all the wait
            all_in.set()

    inbox = gw.nc.new_inbox()
    sub = await gw.nc.subscribe(inbox, cb=answered)
    try:
        await gw.nc.publish(subjects.PREFIX_CACHE_RESET, msgspec.json.encode(PrefixCacheReset()), reply=inbox)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(RESET_WAIT_S):
                await all_in.wait()
    finally:
        await bus.unsubscribe([sub])
    if not answers:
        raise APIError(503, f"no worker answered within {RESET_WAIT_S} s; try again shortly")
    return web.json_response({"workers": answers, "missing": sorted(expected - answers.keys())})
