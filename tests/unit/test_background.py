"""Background responses' runner (services/gateway/background.py) with its Redis and NATS stood in:
what a run holds is given back on every way it ends. The rest runs against the real stack in
tests/integration/test_responses_background.py."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import ExitStack
from types import SimpleNamespace
from typing import Any, cast

import msgspec
import nats.errors
import pytest
from aiohttp import web

from dlora.common.messages import CancelResponse
from dlora.services.gateway.background import Background
from dlora.services.gateway.openai import APIError
from dlora.services.gateway.shaping import Job


@contextlib.asynccontextmanager
async def _bound() -> AsyncIterator[None]:
    yield


class _Shape:
    def __init__(self, created: int = 0) -> None:
        self.created = created

    def response(self, status: str, output: list[Any]) -> dict[str, Any]:
        return {"id": "resp_1", "created_at": self.created, "status": status, "output": output, "background": True}


class _NATS:
    def __init__(self) -> None:
        self.sent: list[str] = []

    async def publish(self, subject: str, payload: bytes) -> None:
        self.sent.append(subject)


class _Keeping:
    def __init__(self) -> None:
        self.tenant, self.expect, self.written = "t", cast(bytes | None, None), cast(bytes | None, None)
        self.store = SimpleNamespace(ttl_s=60.0)

    def keep(self, response: dict[str, Any]) -> bool:
        return True

    async def finishing(self) -> bool:
        self.written = b'{"status":"queued"}'
        return True


class _Redis:
    """A response's record, swapped as Redis's compare-and-swap does."""

    def __init__(self) -> None:
        self.record: bytes | None = None

    async def swap_response(
        self, response_id: str, tenant: str, old: bytes, new: bytes, closing: tuple[bytes, bytes] = (b"", b"")
    ) -> bool:
        if self.record != old:  # (no stream here: ``closing`` closes none)
            return False
        self.record = new
        return True

    async def response_fields(self, response_id: str, tenant: str, *fields: str) -> list[bytes | None]:
        return [tenant.encode(), self.record]

    async def lease_response(
        self, response_id: str, tenant: str, holder: str, ttl_s: float, expect: bytes | None = None
    ) -> bool:
        return expect is None or self.record == expect


async def test_a_run_cancelled_before_its_first_step_gives_its_keys_slot_back() -> None:
    """A cancel heard (NATS, DELETE, a cancel route) between the POST's answer and the run's first
    step: a task cancelled before it starts never enters its body, so a slot released only there
    was held for good, the key refused at its concurrency for the gateway's life."""
    released: list[int] = []
    held = ExitStack()
    held.callback(released.append, 1)
    relayed: list[int] = []

    async def relay(request: web.Request, job: Job) -> None:
        relayed.append(1)

    background = Background(cast(Any, _NATS()), cast(Any, _Redis()), _bound)
    job = cast(Job, SimpleNamespace(shape=_Shape(), stream=False, finishing=None))
    queued = _Shape().response("queued", [])
    await background._begin(queued, job, cast(Any, _Keeping()), held, relay)  # (``start`` past its checks)
    task = background.running[("t", "resp_1")]
    await background._on_cancel(CancelResponse(response_id="resp_1", tenant="t"))
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await asyncio.sleep(0)  # (done callbacks run)
    assert (released, relayed, background.running) == ([1], [], {})


class _NATSAway(_NATS):
    async def publish(self, subject: str, payload: bytes) -> None:
        raise nats.errors.OutboundBufferLimitError  # (nats-py's, reconnecting with its buffer full)


async def test_a_retry_runs_when_nats_cannot_carry_its_cancel() -> None:
    """A background POST sent again under its id tells the other gateways to stop the run it
    replaces: NATS reconnecting with its buffer full, that cancel raised out of ``start`` and the POST
    answered 503, where before the retry's cancel it was stored and run (its own relay waits out
    NATS's return). The run it replaces here is stopped all the same."""
    gate, relayed = asyncio.Event(), cast(list[int], [])

    async def relay(request: web.Request, job: Job) -> None:
        relayed.append(1)
        await gate.wait()

    redis = _Redis()
    background = Background(cast(Any, _NATSAway()), cast(Any, redis), _bound)
    job = cast(Job, SimpleNamespace(shape=_Shape(), stream=False, finishing=None))
    keeping = _Stored(redis, 0)
    background.running[("t", "resp_1")] = first = asyncio.create_task(gate.wait())
    answered = await background.start(cast(web.Request, {}), job, cast(Any, keeping), ExitStack(), relay)
    assert cast(web.Response, answered).status == 200 and ("t", "resp_1") in background.running
    with contextlib.suppress(asyncio.CancelledError):
        await first
    assert first.cancelled()
    background.running[("t", "resp_1")].cancel()
    gate.set()


class _Stored(_Keeping):
    def __init__(self, redis: _Redis, n: int) -> None:
        super().__init__()
        self.redis, self.n = redis, n

    async def finishing(self) -> bool:
        self.written = self.redis.record = msgspec.json.encode(_Shape(self.n).response("queued", []))
        return True


async def test_two_retries_on_two_gateways_leave_the_one_stored_last_running() -> None:
    """A client's POST sent twice under one X-Request-Id (a proxy's retry while the first was in
    flight), each to another gateway: each gateway's cancel for the run its retry replaces reached
    the other after that one had started its own, so both runs stopped, and the record (the later
    retry's) said ``queued`` until its TTL with nothing running it. The run whose record is the
    stored one goes on; the other, replaced, stops."""
    redis, nats_ = _Redis(), _NATS()
    payloads: list[bytes] = []

    async def publish(subject: str, payload: bytes) -> None:
        payloads.append(payload)

    nats_.publish = publish  # type: ignore[method-assign]
    gate = asyncio.Event()

    async def relay(request: web.Request, job: Job) -> None:
        await gate.wait()

    a, b = (Background(cast(Any, nats_), cast(Any, redis), _bound, gateway) for gateway in ("a", "b"))
    for n, gateway in enumerate((a, b)):  # (a second apart: their objects' created_at differ)
        job = cast(Job, SimpleNamespace(shape=_Shape(n), stream=False, finishing=None))
        await gateway.start(cast(web.Request, {}), job, cast(Any, _Stored(redis, n)), ExitStack(), relay)
        for _ in range(3):
            await asyncio.sleep(0)  # (its run made in_progress)
    runs = [a.running[("t", "resp_1")], b.running[("t", "resp_1")]]
    for gateway in (a, b):  # (each hears both: its own echo and the other's)
        for payload in payloads:
            await gateway._on_cancel(msgspec.json.decode(payload, type=CancelResponse))
    await asyncio.sleep(0)
    assert [run.cancelled() or run.done() for run in runs] == [True, False]
    runs[1].cancel()
    gate.set()
    await asyncio.gather(*runs, return_exceptions=True)


class _Unstored(_Keeping):
    async def finishing(self) -> bool:
        return False  # (Redis failed: the record is not written)


async def test_a_retry_whose_record_cannot_be_stored_leaves_the_run_it_would_replace_running() -> None:
    """A background POST sent again under its id, its record not stored (Redis failed: a 503):
    the run it would have replaced, on the same gateway, was cancelled before the store was
    tried, so nothing ran either and its record said ``in_progress`` until its TTL. Its record
    still its own, it runs on."""
    gate = asyncio.Event()

    async def relay(request: web.Request, job: Job) -> None:
        await gate.wait()

    background = Background(cast(Any, _NATS()), cast(Any, _Redis()), _bound)
    background.running[("t", "resp_1")] = first = asyncio.create_task(gate.wait())
    job = cast(Job, SimpleNamespace(shape=_Shape(), stream=False, finishing=None))
    with pytest.raises(APIError) as refused:
        await background.start(cast(web.Request, {}), job, cast(Any, _Unstored()), ExitStack(), relay)
    assert refused.value.status == 503 and not first.done()
    gate.set()
    await first
