"""NATS restarted under a running request (issue 16, the NATS restart fault): every service
reconnects, and the client's stream completes exact, though chunks published around the outage
never reached it the first time (the worker sends its recent chunks again after reconnecting; the
reader drops what it has by sequence number)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import time

import aiohttp
import msgspec
import nats
import pytest
import structlog
from redis.asyncio import Redis

from dlora.common import bus, subjects
from dlora.common.bus import ConnectionLost, connections
from dlora.common.clients import announce
from dlora.common.messages import GenerateRequest, SamplingParams, TokenChunk
from dlora.common.settings import Common
from dlora.common.state import StateStore
from dlora.model.make_tiny import TinyOutput
from dlora.services.dispatcher.main import Dispatcher
from dlora.services.dispatcher.settings import DispatcherSettings
from dlora.services.gateway.replies import ReplyStream
from dlora.services.servers import Server, start_nats
from dlora.services.worker.main import WorkerService, build_engine
from dlora.services.worker.settings import WorkerSettings
from tests.integration.conftest import run_stack, sigstop, small_engine, sse_events
from tests.integration.test_gateway import offline

PROMPT, N = [5, 40, 41, 300, 17], 200


async def test_a_stream_survives_a_nats_restart(redis: Redis, redis_server: Server, tiny_llama: TinyOutput) -> None:
    await _through_a_restart(redis, redis_server, tiny_llama, ttl_s=30.0, outage_s=1.0)


async def test_a_stream_whose_client_announces_survives_an_outage_past_the_heartbeat_ttl(
    redis: Redis, redis_server: Server, tiny_llama: TinyOutput
) -> None:
    """The client's announcements cannot reach anyone while NATS is down: its silence is the
    outage's. The worker, hearing Redis take its heartbeats meanwhile, took it for the client's own
    and stopped the stream (a gateway's streams too: a helper's finding, 9 s of outage)."""
    # (a TTL past the reader's reconnect, 2 s after the worker's: silent that long after the
    # outage, it would be gone)
    await _through_a_restart(redis, redis_server, tiny_llama, ttl_s=3.0, outage_s=4.5, client="app", step_s=0.05)


async def _through_a_restart(
    redis: Redis,
    redis_server: Server,
    tiny_llama: TinyOutput,
    ttl_s: float,
    outage_s: float,
    client: str = "",
    step_s: float = 0.02,
) -> None:
    server = start_nats()
    port = int(server.url.rsplit(":", 1)[1])
    store = StateStore(redis)
    common = dict(nats_url=server.url, redis_url=redis_server.url, heartbeat_ttl_s=ttl_s)
    stop = asyncio.Event()
    # The worker is back first; the reader re-subscribes only at nats-py's default 2 s, so what the
    # worker sends in between reaches nobody the first time.
    conns = [await nats.connect(server.url, reconnect_time_wait=wait) for wait in (0.2, 0.2, 2.0)]
    d_nc, w_nc, app = conns
    ws = WorkerSettings(
        **common,
        worker_id="w0",
        model=str(tiny_llama.model),
        stats_interval_s=0.1,
        engine=small_engine(device="cpu"),
        drain_timeout_s=0.0,  # (nothing here is of the drain: the stop hands over at once)
    )
    worker = WorkerService(ws, w_nc, store, build_engine(ws))
    step = worker.engine.step

    def slow():  # type: ignore[no-untyped-def]
        time.sleep(step_s)  # the request outlives the outage
        return step()

    worker.engine.step = slow  # type: ignore[method-assign]
    tasks = [
        asyncio.create_task(worker.run(stop)),
        asyncio.create_task(Dispatcher(DispatcherSettings(**common), d_nc, store).run(stop)),
    ]
    if client:
        tasks.append(asyncio.create_task(announce(app, client, stop)))
    try:
        while not await store.live_workers():
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        chunks: asyncio.Queue[TokenChunk] = asyncio.Queue()

        async def on_chunk(msg) -> None:  # type: ignore[no-untyped-def]
            chunks.put_nowait(msgspec.json.decode(msg.data, type=TokenChunk))

        await app.subscribe(subjects.replies_of("app"), cb=on_chunk)
        req = GenerateRequest(
            request_id="through",
            reply_to=subjects.reply_inbox("through"),
            prompt_token_ids=PROMPT,
            params=SamplingParams(max_tokens=N, ignore_eos=True),
            client=client,
        )
        await app.request(subjects.REQUESTS, msgspec.json.encode(req), timeout=60)
        stream = ReplyStream("through")
        started = time.monotonic()
        while stream.tokens < 20 or time.monotonic() - started < (1.5 if client else 0):  # (announced, and heard)
            stream.take(await asyncio.wait_for(chunks.get(), 30), time.monotonic())
        server.stop()  # the worker goes on generating meanwhile
        await asyncio.sleep(outage_s)
        server = start_nats(port)
        while not stream.done:
            stream.take(await asyncio.wait_for(chunks.get(), 30), time.monotonic())
        assert stream.error is None and stream.tokens == N
        expected = offline(tiny_llama, [{"id": "x", "prompt_token_ids": PROMPT, "max_tokens": N, "ignore_eos": True}])
        assert stream.text == expected[0]["text"]
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=15)
        for c in conns:
            await c.close()
        server.stop()


class CuttableLink:
    """A TCP relay between one client and the NATS server that the test can cut: every connection
    through it is closed, and new ones refused, until it is restored (the network between that one
    client and the server failing, while everyone else's stays up)."""

    def __init__(self, target: str) -> None:
        self.host, port = target.removeprefix("nats://").split(":")
        self.port, self.up = int(port), True
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return f"nats://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.up:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        self.writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def cut(self) -> None:
        self.up = False
        for w in self.writers:
            w.close()
        self.writers = []

    async def close(self) -> None:
        self.cut()
        self.server.close()


async def test_a_gateway_whose_own_connection_dropped_gets_the_chunks_it_missed(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput
) -> None:
    """Only the gateway's link to NATS fails for a second: the chunks the worker published
    meanwhile never reached it, and the worker, whose own connection stayed up, had no reason to
    send them again; the stream waited on the gap and failed. The gateway's next ClientAlive says
    it reconnected, and the worker sends it its recent chunks again."""
    link = CuttableLink(nats_server.url)
    async with run_stack(nats_server, redis, tiny_llama, gateway_nats_url=await link.start()) as stack:
        body = {"model": "lora-0", "prompt": PROMPT, "max_tokens": N, "ignore_eos": True, "stream": True}
        body |= {"temperature": 0}
        texts, finish = [], None
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{stack.url}/v1/completions", json=body) as r:
                async for event in sse_events(r):
                    if event == "[DONE]":
                        continue
                    choice = event["choices"][0]
                    texts.append(choice["text"])
                    finish = choice["finish_reason"] or finish
                    if len(texts) == 5:  # the link fails for a second, mid-stream
                        link.cut()
                        await asyncio.sleep(1.0)
                        link.up = True
    await link.close()
    request = {"id": "x", "prompt_token_ids": PROMPT, "max_tokens": N, "ignore_eos": True, "adapter": "lora-0"}
    assert finish == "length" and "".join(texts) == offline(tiny_llama, [request])[0]["text"]


async def test_a_re_send_does_not_grow_what_a_worker_keeps(nats_server: Server) -> None:
    from dlora.services.worker.delivery import Delivery

    nc = await nats.connect(nats_server.url)
    try:
        delivery = Delivery(nc)
        for seq in range(3):
            assert await delivery.publish(subjects.reply_inbox("r", "gw"), TokenChunk(request_id="r", seq=seq), "")
        for _ in range(3):  # a reader announcing reconnects
            delivery.resend_to("gw")
            await asyncio.sleep(0.05)
        assert len(delivery.resend.recent(time.monotonic())) == 3
    finally:
        await nc.close()


async def test_a_nats_restart_sends_a_named_readers_chunks_again_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """An operator's drill: after a NATS restart every worker published its last 15 s of chunks
    (400-870 each) twice, and each gateway, which reconnected too, was sent its own again once
    more when it said so: three copies. A named reader gets them once, when it says it reconnected;
    a reader without a name, which cannot say, still gets both passes. A second restart soon
    after the first ends the first's passes: left on, its second pass (unnamed readers' chunks only,
    as every second pass) sent those a third time."""
    from dlora.services.worker import delivery as module

    monkeypatch.setattr(module, "RESEND_DELAYS_S", (0.0, 0.05))  # (the passes' count is the point)
    server = start_nats()
    port = int(server.url.rsplit(":", 1)[1])
    nc = await nats.connect(server.url, reconnect_time_wait=0.05, max_reconnect_attempts=-1)
    reader = await nats.connect(server.url, reconnect_time_wait=0.05, max_reconnect_attempts=-1)
    got: list[str] = []

    async def on_chunk(msg: nats.aio.msg.Msg) -> None:
        got.append(msgspec.json.decode(msg.data, type=TokenChunk).request_id)

    async def restart(times: int) -> Server:
        server.stop()
        started = start_nats(port)
        for _ in range(500):  # both back, subscriptions and all
            if (
                min(nc.stats["reconnects"], reader.stats["reconnects"]) >= times
                and nc.is_connected
                and reader.is_connected
            ):
                break
            await asyncio.sleep(0.01)
        await reader.flush()
        return started

    try:
        await reader.subscribe(subjects.replies_prefix("gw") + ">", cb=on_chunk)
        await reader.subscribe(subjects.replies_prefix("app") + ">", cb=on_chunk)
        await reader.flush()
        delivery = module.Delivery(nc)
        assert not delivery.reconnected()  # (the first look)
        await delivery.publish(subjects.reply_inbox("named", "gw"), TokenChunk(request_id="named", seq=0), "gw")
        await delivery.publish(subjects.reply_inbox("unnamed", "app"), TokenChunk(request_id="unnamed", seq=0), "")
        await bus.flush(nc)
        server = await restart(1)
        got.clear()  # (whatever the first publish delivered)
        assert delivery.reconnected()
        delivery.resend_to("gw")  # the gateway's next ClientAlive, its reconnects grown
        assert delivery._resending is not None
        await delivery._resending
        await asyncio.gather(*delivery._tasks)
        await bus.flush(nc)
        await reader.flush()
        assert sorted(got) == ["named", "unnamed", "unnamed"]

        monkeypatch.setattr(module, "RESEND_DELAYS_S", (0.0, 3600.0))  # its second pass due after the next restart
        server = await restart(2)
        got.clear()
        assert delivery.reconnected() and (first := delivery._resending) is not None
        for _ in range(500):  # its first pass out
            if len(got) == 2:
                break
            await asyncio.sleep(0.01)
        monkeypatch.setattr(module, "RESEND_DELAYS_S", (0.0, 0.05))
        server = await restart(3)
        got.clear()
        assert delivery.reconnected() and delivery._resending is not None
        await delivery._resending
        await bus.flush(nc)
        await reader.flush()
        assert first.cancelled() and sorted(got) == ["named", "unnamed", "unnamed"]
    finally:
        await nc.close()
        await reader.close()
        server.stop()


async def test_a_chunk_that_can_never_go_out_is_dropped_not_taken_for_an_outage(nats_server: Server) -> None:
    """A blank in the subject, or a chunk over max_payload: no reconnect will send it. Taken for an
    outage, its request's end was never recorded, and it was handed back and run again for ever."""
    from dlora.services.worker.delivery import Delivery

    nc = await nats.connect(nats_server.url)
    try:
        delivery = Delivery(nc)
        assert await delivery.publish(subjects.reply_inbox("r", "gw") + " x", TokenChunk(request_id="r", seq=0), "")
        inbox = subjects.reply_inbox("r", "gw")
        heard = await nc.subscribe(inbox)
        huge = TokenChunk(request_id="r", seq=1, text="x" * nc.max_payload)
        assert await delivery.publish(inbox, huge, "")
        assert delivery._outage.failures == 0  # no outage was counted
        # its reader is told why, in its place (a request whose prompt logprobs outgrew the bus hung)
        told = msgspec.json.decode((await heard.next_msg(timeout=60)).data, type=TokenChunk)
        assert (told.seq, told.error_code) == (1, "bad_request") and "over what the message bus carries" in told.error
    finally:
        await nc.close()


async def test_a_re_send_leaves_out_what_another_attempt_serves(nats_server: Server) -> None:
    from dlora.services.worker.delivery import Delivery

    async def superseded(attempts: dict[str, int]) -> set[str]:
        return {rid for rid in attempts if rid == "old"}

    nc = await nats.connect(nats_server.url)
    got: list[TokenChunk] = []

    async def on_chunk(msg: nats.aio.msg.Msg) -> None:
        got.append(msgspec.json.decode(msg.data, type=TokenChunk))

    try:
        await nc.subscribe(subjects.replies_prefix("gw") + ">", cb=on_chunk)
        delivery = Delivery(nc, superseded)
        for rid in ("old", "new"):
            assert await delivery.publish(subjects.reply_inbox(rid, "gw"), TokenChunk(request_id=rid, seq=0), "")
        for _ in range(100):  # both delivered (a flush says the server has them, not that we do)
            if len(got) == 2:
                break
            await asyncio.sleep(0.01)
        got.clear()
        delivery.resend_to("gw")
        for _ in range(100):
            if got:
                break
            await asyncio.sleep(0.01)
        await bus.flush(nc)
        assert [c.request_id for c in got] == ["new"]
        assert [c.request_id for _, c in delivery.resend.recent(time.monotonic())] == ["new"]
    finally:
        await nc.close()


async def test_announcements_of_readers_with_nothing_here_cost_no_lookups(nats_server: Server) -> None:
    """A trial: 500 made-up client names announced at once stalled every worker ~10 s, each name a
    scan, a Redis lookup of the recent chunks' records and a log line. A reader with no recent
    chunk here costs the scan only."""
    from dlora.services.worker.delivery import Delivery

    asked: list[dict[str, int]] = []

    async def superseded(attempts: dict[str, int]) -> set[str]:
        asked.append(attempts)
        return set()

    nc = await nats.connect(nats_server.url)
    try:
        delivery = Delivery(nc, superseded)
        await delivery.publish(subjects.reply_inbox("r", "gw"), TokenChunk(request_id="r", seq=0), "")
        for i in range(500):
            delivery.resend_to(f"made-up-{i}")
        delivery.resend_to("gw")
        await asyncio.sleep(0.2)
        assert asked == [{"r": 0}]  # the one reader that has a chunk here
    finally:
        await nc.close()


async def test_a_connection_nats_closes_for_good_stops_the_service_to_be_restarted(redis_server: Server) -> None:
    """nats-py reconnects after an outage but never after the server answers a command with an
    error (here a publish past its 4 KiB control line): the service ran on deaf and mute. Now its
    ``stop`` is set and, once it has stopped, ``ConnectionLost`` (``dlora serve`` exits 1)."""
    server = start_nats()
    try:
        stop = asyncio.Event()
        with pytest.raises(ConnectionLost, match="closed the connection for good"):
            async with connections(Common(nats_url=server.url, redis_url=redis_server.url), stop) as (nc, _):
                await nc.publish("x" * 5000, b"")
                async with asyncio.timeout(60):
                    await stop.wait()
                assert nc.is_closed
        stop = asyncio.Event()
        async with connections(Common(nats_url=server.url, redis_url=redis_server.url), stop) as (nc, _):
            pass  # closed by its owner: no ConnectionLost
        assert not stop.is_set()
    finally:
        server.stop()


async def test_a_nats_outage_is_logged_once_and_its_end_once_not_at_each_attempt(redis_server: Server) -> None:
    """A helper's finding: a line per reconnect attempt in every process for as long as NATS was
    away (148 lines for a 30 s outage of a small stack)."""
    server = start_nats()
    port = int(server.url.rsplit(":", 1)[1])
    try:
        with structlog.testing.capture_logs() as logs:
            async with connections(Common(nats_url=server.url, redis_url=redis_server.url)) as (nc, _):
                server.stop()
                # nats-py tries again 2 s after it lost the server: back after 3 s, the outage held
                # the lost connection and one refused attempt (5 s here waited out two more)
                await asyncio.sleep(3.0)
                server = start_nats(port)
                async with asyncio.timeout(15):
                    while not nc.is_connected:
                        await asyncio.sleep(0.1)
                await asyncio.sleep(0.2)
        events = [line["event"] for line in logs]
        assert events.count("dependency unavailable; retrying") == 1 and "dependency back" in events, events
        back = next(line for line in logs if line["event"] == "dependency back")
        assert back["failed_attempts"] >= 2, logs  # (one line though it failed more than once)
        assert "nats error" not in events, events
    finally:
        server.stop()


@pytest.mark.parametrize("loop_held", [False, True], ids=["loop_free", "loop_held"])
async def test_a_service_whose_handler_never_ends_stops_within_its_drain_bound(
    redis_server: Server, monkeypatch: pytest.MonkeyPatch, loop_held: bool
) -> None:
    """A CI run: ``dlora up`` killed outright stops NATS, Redis and every service at once; the
    dispatcher's handler waited out Redis, and nats-py's drain waited for it 30 s, then 10 s for a
    PONG from a server already gone: the dispatcher outlived the test's 30 s. The drain has a bound
    of its own now, then the connection is closed (its handlers with it), and with nothing left for
    asyncio to log as never retrieved (nats-py's gather of the subscriptions' drains, cancelled).
    ``loop_held``, a review's case: the loop held (a long step, a GC pause, a loaded host) past both
    nats-py's drain timeout and DRAIN_S fired both in one turn; the cancel came while nats-py's
    wait_for was cancelling its gather, which then held a CancelledError nobody retrieved."""
    monkeypatch.setattr(bus, "DRAIN_S", 0.5)
    server = start_nats()
    held = asyncio.Event()
    loop = asyncio.get_running_loop()
    reported: list[str] = []
    loop.set_exception_handler(lambda _, context: reported.append(context["message"]))

    async def waits_for_ever(msg: nats.aio.msg.Msg) -> None:
        held.set()
        if loop_held:  # over 0.4 s (drain_timeout) and 0.5 s (DRAIN_S)
            loop.call_later(0.3, time.sleep, 0.4)
        await asyncio.Event().wait()

    async def serve() -> None:
        async with connections(Common(nats_url=server.url, redis_url=redis_server.url)) as (nc, _):
            await nc.subscribe("held", cb=waits_for_ever)
            await nc.publish("held", b"")
            await held.wait()
        assert nc.is_closed

    service = asyncio.create_task(serve())
    try:
        # not asyncio.timeout: nats-py's drain takes a cancel for its cue to flush, and ends normally
        await asyncio.wait([service], timeout=10)  # nats-py's own bounds: 30 s, then 10 s
        assert service.done()
        service.result()
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
        service.cancel()
        server.stop()
    assert reported == []


async def test_a_stop_with_nats_hung_logs_no_error_of_nats_pys_drain() -> None:
    """The drain's bound (DRAIN_S) cancelled nats-py's drain while its subscriptions waited for a
    PONG from a server that no longer answered; nats-py's gather of them then held a CancelledError
    nobody retrieved, and asyncio logged "exception was never retrieved" with a traceback, an error
    line at every such stop (``dlora up`` closed under its services). A server that does not answer
    is not drained."""
    server = start_nats()
    loop = asyncio.get_running_loop()
    reported: list[str] = []
    loop.set_exception_handler(lambda _, context: reported.append(context["message"]))

    async def ignored(msg: nats.aio.msg.Msg) -> None:
        pass

    try:
        nc = await nats.connect(server.url)
        await nc.subscribe("some.subject", cb=ignored)
        await bus.flush(nc)
        sigstop(server.proc)
        await bus._close_nats(nc)
        assert nc.is_closed
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
        server.proc.send_signal(signal.SIGCONT)
        server.stop()
    assert reported == []
