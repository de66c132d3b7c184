"""Background responses (``background: true``) through the trouble a deployment meets, against the
real stack: the gateway running one killed outright (SIGKILL), its NATS gone when another gateway
cancels it, Redis stopped as its run begins, its client gone while its record is written, a
foreground response stored under its id. Each ends as its client would expect (``failed`` with a
reason, ``cancelled`` and stopped, run to its end, stopped), not left ``queued`` or
``in_progress`` until ``responses_ttl_s`` (``responses_lease``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import aiohttp
import msgspec
import nats
import pytest
from redis.asyncio import Redis

from dlora.common.state import StateStore
from dlora.model.make_tiny import TinyOutput
from dlora.services.gateway.background import JUDGE_READS, Background
from dlora.services.gateway.responses_lease import LAPSED, RunLease, settled
from dlora.services.gateway.responses_read import Stored
from dlora.services.servers import Server, free_port
from tests.integration.conftest import Stack, run_stack, sigstop, spawn_gateway, start_gateway
from tests.integration.test_abort import _nothing_left, _slow_steps
from tests.integration.test_responses_background import LONG, _over, _running
from tests.integration.test_responses_store import ASKED, _client


async def _ready(url: str, log: Path, proc: subprocess.Popen[bytes]) -> None:
    """Once the gateway process at ``url`` is healthy (it has heard from the workers)."""
    async with aiohttp.ClientSession() as http:
        for _ in range(1200):
            assert proc.poll() is None, log.read_text()[-3000:]
            with contextlib.suppress(aiohttp.ClientConnectionError):
                async with http.get(url + "/healthz") as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(0.1)
    raise AssertionError(log.read_text()[-3000:])


def _steps(stack: Stack) -> int:
    return sum(w.engine.stats.steps for w in stack.workers)


def _counted(stack: Stack) -> dict[str, float]:
    """The gateway's requests counted so far, by status (those counted at all)."""
    samples = [s for f in stack.gateway.metrics.requests.collect() for s in f.samples if s.name.endswith("_total")]
    return {s.labels["status"]: s.value for s in samples if s.value}


async def _stopped(stack: Stack, steps: int) -> None:
    """The LONG background response the stack's gateway runs was stopped: aborted on its worker
    well before its 400 tokens (``steps``: the workers' steps before it was to stop), its run over."""
    assert await _nothing_left(stack, within_s=10.0)
    assert _steps(stack) - steps < 100
    while stack.gateway.background.running:
        await asyncio.sleep(0.01)


async def test_a_background_response_of_a_gateway_killed_outright_is_failed_by_its_next_reader(
    stack: Stack,
    nats_server: Server,
    redis_server: Server,
    tiny_llama: TinyOutput,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """`dlora serve gateway` SIGKILLed while it runs a background response: nothing of it is left
    to write the end, and its record said ``in_progress`` until ``responses_ttl_s`` (a day). Once
    its lease lapses (unrenewed for three heartbeat_ttl_s), the next GET on another gateway finds it
    ``failed`` with the reason; a cancel then answers it as it is."""
    _slow_steps(stack, monkeypatch, 0.02)
    port, log = free_port(), tmp_path / "gateway.log"
    url = f"http://127.0.0.1:{port}"
    model = str(tiny_llama.model)
    proc = spawn_gateway(nats_server.url, redis_server.url, model, port, log, DLORA_HEARTBEAT_TTL_S="1")
    client = _client(stack.url)
    try:
        await _ready(url, log, proc)
        async with aiohttp.ClientSession() as http:
            body = {**ASKED, "max_output_tokens": 400, "ignore_eos": True, "input": "kalo", "background": True}
            async with http.post(url + "/v1/responses", json=body) as r:
                made = await r.json()
        assert r.status == 200 and made["status"] == "queued", made
        await _running(stack)
        assert (await client.responses.retrieve(made["id"])).status == "in_progress"  # (its lease renewed)
        proc.kill()
        proc.wait()
        ended = await _over(client, made["id"])
        assert ended.status == "failed" and ended.error is not None, ended
        assert (ended.error.code, ended.error.message) == ("server_error", LAPSED)
        assert (await client.responses.cancel(made["id"])).model_dump() == ended.model_dump()
    finally:
        await client.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_a_cancel_whose_gateway_lost_nats_answers_cancelled_and_the_run_elsewhere_stops(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancel on a gateway whose NATS connection is gone: the record was made ``cancelled`` but
    the route answered 503, and the gateway running it, never told, ran its 400 tokens for nobody.
    The record is the truth: the cancel answers it, and the run finds it changed at its lease's
    next renewal and stops (its request aborted on its worker)."""
    async with run_stack(nats_server, redis, tiny_llama, heartbeat_ttl_s=1.0) as stack:
        _slow_steps(stack, monkeypatch, 0.02)
        conns: list[nats.NATS] = []
        other_url, runner = await start_gateway(nats_server.url, stack.store, str(tiny_llama.model), conns)
        one, two = _client(stack.url), _client(other_url)
        try:
            long = await one.responses.create(**LONG, input="kalo", background=True)
            await _running(stack)
            await conns[0].close()
            steps = _steps(stack)
            cancelled = await two.responses.cancel(long.id)
            assert (cancelled.id, cancelled.status) == (long.id, "cancelled")
            await _stopped(stack, steps)
            assert (await one.responses.retrieve(long.id)).model_dump() == cancelled.model_dump()
        finally:
            await one.close()
            await two.close()
            await runner.cleanup()


async def test_a_background_response_whose_start_met_redis_stopped_runs_once_it_is_back(
    stack: Stack, redis_server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis stopped (SIGSTOP: its data kept) just as a run makes its record ``in_progress``: that
    write failed and the run gave up, the response ``queued`` until ``responses_ttl_s``. It tries
    again while its lease lasts, and runs once Redis answers."""
    import openai

    real, stopped = stack.store.swap_response, asyncio.Event()

    async def swap(*args: Any) -> bool:
        if stopped.is_set():
            return await real(*args)
        stopped.set()
        sigstop(redis_server.proc)
        try:
            return await real(*args)
        finally:
            redis_server.proc.send_signal(signal.SIGCONT)

    monkeypatch.setattr(stack.store, "swap_response", swap)
    client = _client(stack.url)
    try:
        made = await client.responses.create(**ASKED, input="kalo", background=True)
        for _ in range(600):  # (its readers meanwhile answered 503, Redis out: as a client tries again)
            with contextlib.suppress(openai.InternalServerError):
                done = await client.responses.retrieve(made.id)
                if done.status not in ("queued", "in_progress"):
                    break
            await asyncio.sleep(0.05)
        assert stopped.is_set()
        foreground = await client.responses.create(**ASKED, input="kalo")
        assert (done.status, done.output_text) == ("incomplete", foreground.output_text), done
    finally:
        await client.close()


async def test_a_streamed_background_response_whose_client_left_while_it_was_stored_runs(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A streamed background POST whose client hangs up while its record is written: its handler
    cancelled there left the record ``queued`` with nothing to run it. Its client gone, it runs
    all the same (as a background response's whose client leaves later does)."""
    real, written, release = stack.store.put_response, asyncio.Event(), asyncio.Event()

    async def put(*args: Any, **kwargs: Any) -> bool:
        put = await real(*args, **kwargs)
        if not written.is_set():
            written.set()
            await release.wait()
        return put

    monkeypatch.setattr(stack.store, "put_response", put)
    headers = {"X-Request-Id": "resp_left"}
    body = {**ASKED, "input": "kalo", "background": True, "stream": True}
    async with aiohttp.ClientSession() as http:

        async def post() -> None:
            async with http.post(stack.url + "/v1/responses", json=body, headers=headers) as r:
                await r.read()

        posting = asyncio.create_task(post())
        await written.wait()
        posting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await posting
    while stack.gateway.handling:  # (its handler cancelled by its client's leaving)
        await asyncio.sleep(0.01)
    release.set()
    client = _client(stack.url)
    try:
        done = await _over(client, "resp_left")
        assert done.status == "incomplete", done.error
    finally:
        await client.close()


@pytest.mark.parametrize("stream", [False, True])
async def test_a_foreground_response_stored_under_a_running_background_ones_id_stops_it(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput, monkeypatch: pytest.MonkeyPatch, stream: bool
) -> None:
    """A foreground POST under the X-Request-Id of a background response still running: its
    record replaced the background one's, whose run went on for nobody, its 400 tokens. It stops
    once it finds its record replaced (its lease's renewal; streamed, its next append refused,
    whichever comes first): aborted on its worker, counted once; the record stays the
    foreground's."""
    async with run_stack(nats_server, redis, tiny_llama, heartbeat_ttl_s=1.0) as stack:
        _slow_steps(stack, monkeypatch, 0.02)
        client, headers = _client(stack.url), {"X-Request-Id": "resp_twice"}
        body = {**ASKED, "max_output_tokens": 400, "ignore_eos": True, "input": "kalo", "background": True}
        try:
            async with aiohttp.ClientSession() as http:
                r = await http.post(stack.url + "/v1/responses", json=body | {"stream": stream}, headers=headers)
                assert r.status == 200, await r.text()
                r.close()  # (streamed, its run goes on)
            await _running(stack)
            steps = _steps(stack)
            foreground = await client.responses.create(**ASKED, input="remi", extra_headers=headers)
            await _stopped(stack, steps)
            assert (await client.responses.retrieve("resp_twice")).model_dump() == foreground.model_dump()
        finally:
            await client.close()
        while stack.gateway.handling:
            await asyncio.sleep(0.01)
        assert _counted(stack) == {"200": 1, "aborted": 1}


async def test_a_streamed_background_response_whose_client_leaves_is_counted_once_by_how_it_ended(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Its client reading its first event and hanging up: the POST was counted ``aborted`` and its
    run, which goes on, counted again at its end; one request, counted once, as it ended. Its
    POST's handler, writing to the closed connection, ends quietly (aiohttp logged a traceback,
    as for an error of the gateway's)."""
    _slow_steps(stack, monkeypatch, 0.02)  # (it runs on after its client left)
    body = {**ASKED, "max_output_tokens": 50, "input": "kalo", "background": True, "stream": True}
    async with aiohttp.ClientSession() as http:
        r = await http.post(stack.url + "/v1/responses", json=body, headers={"X-Request-Id": "resp_gone"})
        assert (await r.content.readuntil(b"\n\n")).startswith(b"event: response.created")
        r.close()  # (its connection closed)
    client = _client(stack.url)
    try:
        done = await _over(client, "resp_gone")
        assert done.status == "incomplete", done.error
    finally:
        await client.close()
    while stack.gateway.background.running or stack.gateway.handling:  # (each counts as it ends)
        await asyncio.sleep(0.01)
    assert _counted(stack) == {"200": 1}
    assert not [r.getMessage() for r in caplog.records if r.name == "aiohttp.server"]


async def test_a_streamed_run_past_its_lease_ends_its_stream_failed_and_is_stopped_once(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A streamed run that lives on past its lease (its gateway cut from Redis longer than that;
    here its renewals never run): the reader that failed it left its stream with no closing event,
    and the run, whose token its record still named, appended after the record said failed and
    ran its 400 tokens for nobody. Its stream ends with the record's ``response.failed``, and the
    run, its next append refused, is aborted on its worker and counted once."""
    _slow_steps(stack, monkeypatch, 0.02)

    async def unrenewed(lease: RunLease, run: asyncio.Task[None]) -> None:
        pass

    monkeypatch.setattr(RunLease, "hold", unrenewed)
    body = {**ASKED, "max_output_tokens": 400, "ignore_eos": True, "input": "kalo", "background": True, "stream": True}
    client = _client(stack.url)
    try:
        async with aiohttp.ClientSession() as http:
            r = await http.post(stack.url + "/v1/responses", json=body, headers={"X-Request-Id": "resp_lapsed"})
            assert (await r.content.readuntil(b"\n\n")).startswith(b"event: response.created")
            r.close()
            # Lapsed now, not by a short lease: one of 0.5 s lapsed under load before the run's
            # first event, and its stream began with the failed one
            await stack.store.r.delete(f"{stack.store.p}:response-lease::resp_lapsed")
            await _running(stack)
            steps = _steps(stack)
            ended = await _over(client, "resp_lapsed")
            assert ended.error is not None and ended.error.message == LAPSED, ended
            await _stopped(stack, steps)
            async with http.get(stack.url + "/v1/responses/resp_lapsed") as got:
                record = await got.json()
            async with http.get(stack.url + "/v1/responses/resp_lapsed?stream=true") as got:
                frames = (await got.read()).decode().split("\n\n")[:-1]
        events = [json.loads(f.split("\ndata: ", 1)[1]) for f in frames]
        assert [e["sequence_number"] for e in events] == list(range(len(events)))
        assert frames[-1].startswith("event: response.failed\n")
        assert events[-1] == {"type": "response.failed", "response": record, "sequence_number": len(events) - 1}
    finally:
        await client.close()
    while stack.gateway.background.running or stack.gateway.handling:
        await asyncio.sleep(0.01)
    assert _counted(stack) == {"aborted": 1}
    assert not [r.getMessage() for r in caplog.records if r.name == "aiohttp.server"]


@contextlib.asynccontextmanager
async def _bound() -> AsyncIterator[None]:
    yield


class _Written:
    """A stream's writer that keeps what it is given (``Background._follow`` writes to it)."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []

    async def write(self, data: bytes) -> None:
        self.frames += [f + b"\n\n" for f in data.split(b"\n\n") if f]


async def test_a_reader_of_a_run_that_appends_on_past_its_lease_ends_its_stream_failed(redis: Redis) -> None:
    """A run living on past its lapsed lease (its renewals starved) that appends an event before
    each of its reader's reads: the lease was judged only by a read that found no new event, so
    its reader read on for as long as it appended. It is judged within ``JUDGE_READS`` reads
    (a bound on reads, not on time), and the stream ends with the failed object's event."""
    state = StateStore(redis)
    running = msgspec.json.encode({"id": "resp_1", "status": "in_progress", "background": True})
    await state.put_response("resp_1", "t", running, b"[]", 60.0, stream="run-a", leased=True)  # (lapsed)
    reads, real = 0, state.response_events

    async def appended(response_id: str, tenant: str, start: int) -> list[bytes]:
        nonlocal reads
        reads += 1
        assert reads < 10 * JUDGE_READS, "read on for ever"
        await state.append_events(response_id, tenant, "run-a", [b"event: response.output_text.delta\n\n"], 60.0)
        return await real(response_id, tenant, start)

    state.response_events = appended  # type: ignore[method-assign]
    background, written = Background(cast(Any, None), state, _bound), _Written()
    await background._follow(cast(Any, written), "resp_1", "t", -1)
    assert reads <= JUDGE_READS + 2 and written.frames[-1].startswith(b"event: response.failed\n")
    assert LAPSED.encode() in written.frames[-1]


async def test_an_older_gateways_record_is_judged_lost_only_a_leases_span_after_first_found(redis: Redis) -> None:
    """A background response an older gateway runs (a rolling upgrade: no lease taken, none
    marked ``leased``) was failed by a newer gateway's first reader, though it ran on. It is read
    as it stands until a lease's span after a reader first found it so, on Redis's clock: its
    created_at, the older gateway's wall clock, may lag the reader's by more than the span (here
    20 s), which failed it at once. A record of ours without its lease is failed at once, as before.
    Its stream, which names no run token, is one to read."""
    state = StateStore(redis)
    old = {"id": "resp_o", "status": "in_progress", "created_at": int(time.time()) - 20}
    ours = old | {"id": "resp_ours"}
    await state.put_response("resp_o", "t", msgspec.json.encode(old), b"[]", 60.0)
    await state.put_response("resp_ours", "t", msgspec.json.encode(ours), b"[]", 60.0, leased=True)

    async def status(record: dict[str, Any]) -> str:
        now_stored = await settled(state, record["id"], "t", Stored(msgspec.json.encode(record), record), legacy_s=15.0)
        assert now_stored is not None
        return cast(str, msgspec.json.decode(now_stored)["status"])

    assert [await status(old), await status(old), await status(ours)] == ["in_progress", "in_progress", "failed"]
    seen = int(await redis.hget(f"{state.p}:response:t:resp_o", "seen") or 0)
    await redis.hset(f"{state.p}:response:t:resp_o", "seen", seen - 15_000)  # (first found a span ago)
    assert await status(old) == "failed"
    await redis.rpush(f"{state.p}:response-events:t:resp_o", b"event: response.created\n\n")  # (as it appended)
    assert await state.streamed("resp_o", "t") and not await state.streamed("resp_ours", "t")  # (its stream read)


async def test_an_older_gateways_streamed_record_failed_by_age_ends_its_stream_failed(redis: Redis) -> None:
    """An older gateway's streamed record (no ``leased`` mark, no run token: its events appended
    unguarded) failed by a reader a lease's span after first found running got no closing event:
    the closing step looked for a run token only, so its readers' stream ended with no terminal
    event. It ends with the failed object's ``response.failed``, as every other failure's."""
    state, key = StateStore(redis), "resp_old"
    old = {"id": key, "status": "in_progress", "background": True}
    # (an older gateway's: not leased, no token)
    await state.put_response(key, "t", msgspec.json.encode(old), b"[]", 60.0)
    await redis.rpush(f"{state.p}:response-events:t:{key}", b"event: response.created\n\n")
    now_stored = await settled(state, key, "t", Stored(msgspec.json.encode(old), old), legacy_s=0.0)
    assert msgspec.json.decode(now_stored or b"{}")["status"] == "failed"
    background, written = Background(cast(Any, None), state, _bound), _Written()
    await background._follow(cast(Any, written), key, "t", -1)
    assert written.frames[-1].startswith(b"event: response.failed\n") and LAPSED.encode() in written.frames[-1]
    assert b'"sequence_number":1}' in written.frames[-1]  # (after the one event it appended)
