"""Applications on the bus, each its own NATS user, against a secured server and real services: one
cannot stop another's request, write into its reply subject, or take its request id (issue 16,
item 10: "inject text into or abort another user's stream")."""

from __future__ import annotations

import asyncio
import json

import msgspec
import nats
import pytest
from nats.aio.msg import Msg
from redis.asyncio import Redis

from dlora.common import subjects
from dlora.common.bus import flush
from dlora.common.messages import (
    MAX_NAME,
    AbortRequest,
    AdapterEntry,
    CancelResponse,
    ClientAlive,
    GenerateRequest,
    SamplingParams,
    TokenChunk,
)
from dlora.common.state import StateStore
from dlora.model.make_tiny import TinyOutput
from dlora.services.servers import start_nats
from tests.integration import app_bus
from tests.integration.app_bus import PASSWORDS, _chunks, _send, _slowed, _still_running

bus = app_bus.bus  # the fixture, for pytest to find here


async def test_an_application_stops_and_reaches_only_its_own_requests(bus, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    alice, bob, worker = bus
    _slowed(worker, monkeypatch)  # r-1 outlives every check below
    mine = await _chunks(alice, subjects.reply_inbox("r-1", "alice"))
    await _send(alice, "alice", "r-1", subjects.reply_inbox("r-1", "alice"))
    first = await asyncio.wait_for(mine.get(), 30)
    assert first.error is None

    # bob's request under the same id is refused, to bob, and alice's runs on (before bob's abort
    # of r-1, which would end his own r-1 as a worker ends a request its abort overtook)
    bobs = await _chunks(bob, subjects.reply_inbox("r-1", "bob"))
    await _send(bob, "bob", "r-1", subjects.reply_inbox("r-1", "bob"))
    refused = await asyncio.wait_for(bobs.get(), 60)
    assert refused.error_code == "bad_request" and "already in flight" in (refused.error or "")
    assert await _still_running(mine)

    # bob's abort of alice's request id does nothing to it
    await bob.publish(subjects.aborts_of("bob"), msgspec.json.encode(AbortRequest(request_id="r-1")))
    await flush(bob)
    await asyncio.sleep(0.3)
    assert await _still_running(mine)

    # bob's own r-1 sent after his abort of it ends with the abort's last chunk, to bob (the
    # dispatcher read his aborts too), and alice's runs on
    await _send(bob, "bob", "r-1", subjects.reply_inbox("r-1", "bob"))
    ended = await asyncio.wait_for(bobs.get(), 60)
    assert (ended.finish_reason, ended.error) == ("abort", None)
    assert await _still_running(mine)

    # alice sending r-1 again to its own stream (a retry): no error chunk there, which would end
    # the stream for its reader while the request runs on
    await _send(alice, "alice", "r-1", subjects.reply_inbox("r-1", "alice"))
    await flush(alice)
    await asyncio.sleep(0.5)
    assert not [c.error for c in [mine.get_nowait() for _ in range(mine.qsize())] if c.error]
    assert await _still_running(mine)

    # another request of alice's under r-1 (its id counter started again): refused, not taken for
    # a retry and given r-1's tokens (a helper's finding)
    await _send(alice, "alice", "r-1", subjects.reply_inbox("r-1", "alice"), max_tokens=5)
    async with asyncio.timeout(60):
        while (chunk := await mine.get()).error is None:
            pass
    assert chunk.error_code == "bad_request" and "already in flight" in (chunk.error or "")
    assert await _still_running(mine)

    # a request of bob's whose chunks would go to alice's subject is refused, to bob alone
    forged = GenerateRequest(request_id="r-2", reply_to=subjects.reply_inbox("r-2", "alice"), prompt_token_ids=[5])
    answer = await bob.request(subjects.requests_of("bob"), msgspec.json.encode(forged), timeout=10)
    assert "not a subject of 'bob'" in msgspec.json.decode(answer.data, type=TokenChunk).error
    assert {mine.get_nowait().request_id for _ in range(mine.qsize())} <= {"r-1"}

    # a reply subject of bob's own that NATS cannot publish to is refused at once (it was taken,
    # and every chunk to it failed on the worker as if NATS were down: handed back and run again
    # without end), and so is a request too large to forward once the dispatcher adds its seed
    # a request that does not decode (a string where a number goes) is answered on its own reply
    # subject with the reason: the app waited for chunks that never came
    malformed = await _chunks(bob, subjects.reply_inbox("r-5", "bob"))
    raw = {"request_id": "r-5", "reply_to": subjects.reply_inbox("r-5", "bob"), "prompt": "kalo"}
    await bob.publish(subjects.requests_of("bob"), json.dumps(raw | {"params": {"max_tokens": "4"}}).encode())
    told = await asyncio.wait_for(malformed.get(), 60)
    assert told.error_code == "bad_request" and "max_tokens" in (told.error or "")
    # valid JSON that msgspec refuses whole (a lone surrogate's escape in the prompt, as Python's
    # json.dumps writes it): answered too (the head was read by msgspec as well, and failed)
    await bob.publish(subjects.requests_of("bob"), json.dumps(raw | {"prompt": "hi \ud800"}).encode())
    told = await asyncio.wait_for(malformed.get(), 60)
    assert told.request_id == "r-5" and told.error_code == "bad_request" and "surrogate" in (told.error or "")

    bad_subject = subjects.reply_inbox("r-3", "bob") + " x"
    answer = await bob.request(
        subjects.requests_of("bob"),
        msgspec.json.encode(GenerateRequest(request_id="r-3", reply_to=bad_subject, prompt_token_ids=[5])),
        timeout=10,
    )
    assert msgspec.json.decode(answer.data, type=TokenChunk).error_code == "bad_request"
    big = GenerateRequest(
        request_id="r-4",
        reply_to=subjects.reply_inbox("r-4", "bob"),
        prompt_token_ids=[5],
        params=SamplingParams(temperature=1.0),  # sampled: the dispatcher gives it a seed
    )
    # a tenant that fills the message to the bus's limit: the seed the dispatcher adds overflows it
    room = bob.max_payload - len(msgspec.json.encode(big)) - len(',"tenant":""') - 8  # (defaults are not sent)
    big = msgspec.structs.replace(big, tenant="t" * room)
    bigs = await _chunks(bob, big.reply_to)
    await bob.request(subjects.requests_of("bob"), msgspec.json.encode(big), timeout=10)
    refused = await asyncio.wait_for(bigs.get(), 60)
    assert refused.error_code == "bad_request" and "bytes as forwarded" in (refused.error or "")
    assert worker.engine.seqs.keys() <= {"r-1"} and await _still_running(mine)

    # nor does the dispatcher answer it on a subject it names as the message's reply (the answer
    # would end alice's stream, or write into a JetStream bucket)
    await bob.publish(
        subjects.requests_of("bob"), msgspec.json.encode(forged), reply=subjects.reply_inbox("r-1", "alice")
    )
    await flush(bob)
    await asyncio.sleep(0.5)
    assert not [c.error for c in [mine.get_nowait() for _ in range(mine.qsize())] if c.error]
    assert await _still_running(mine)

    # alice's own abort stops it
    await alice.publish(subjects.aborts_of("alice"), msgspec.json.encode(AbortRequest(request_id="r-1")))
    await flush(alice)
    last = await asyncio.wait_for(mine.get(), 60)
    while last.finish_reason is None:  # what was under way, then a last chunk saying it stopped
        last = await asyncio.wait_for(mine.get(), 60)
    assert (last.finish_reason, last.error) == ("abort", None)
    assert "r-1" not in worker.streams and not await _still_running(mine)
    # the same id again within the abort's memory: answered "abort", not dropped without a word
    await _send(alice, "alice", "r-1", subjects.reply_inbox("r-1", "alice"))
    again = await asyncio.wait_for(mine.get(), 60)
    assert (again.seq, again.finish_reason) == (0, "abort")

    # the fields only workers set are cleared from an application's request, outputs to resume
    # from among them (sent, they were never streamed: a new user's trial got 1 chunk of 4
    # counted tokens for 3 resumed), and an adapter named "" is the base model, as at the gateway
    resumed = GenerateRequest(
        request_id="r-7",
        reply_to=subjects.reply_inbox("r-7", "bob"),
        adapter="",
        prompt_token_ids=[5, 40, 41],
        params=SamplingParams(max_tokens=3, ignore_eos=True),
        resume_token_ids=[7, 8, 9],
        resume_text_held="HELLO",
        next_seq=5,
    )
    streamed = await _chunks(bob, resumed.reply_to)
    await bob.publish(subjects.requests_of("bob"), msgspec.json.encode(resumed))
    got = [await asyncio.wait_for(streamed.get(), 30)]
    while got[-1].finish_reason is None:
        got.append(await asyncio.wait_for(streamed.get(), 30))
    assert [c.seq for c in got] == list(range(len(got))) and got[-1].error is None
    assert sum(len(c.token_ids) for c in got) == 3 and "HELLO" not in "".join(c.text for c in got)


async def test_an_application_uses_only_public_adapters_and_its_own(bus, redis: Redis, tiny_llama: TinyOutput) -> None:  # type: ignore[no-untyped-def]
    """An application is the tenant named by its NATS user: alice's adapter is, to bob, not there
    (the answer for a name never registered), as the gateway answers another tenant's key."""
    alice, bob, _ = bus
    store = StateStore(redis)
    (public, public_path), (private, private_path) = sorted(tiny_llama.adapters.items())[:2]
    await store.put_adapter(AdapterEntry(name=public, path=str(public_path), rank=8, created=0.0))
    await store.put_adapter(AdapterEntry(name=private, path=str(private_path), rank=8, created=0.0, owner="alice"))
    for nc, user, adapter, ok in (
        (bob, "bob", private, False),
        (bob, "bob", public, True),
        (alice, "alice", private, True),
    ):
        rid = f"{user}-{adapter}"
        q = await _chunks(nc, subjects.reply_inbox(rid, user))
        await _send(nc, user, rid, subjects.reply_inbox(rid, user), adapter=adapter, max_tokens=2)
        chunk = await asyncio.wait_for(q.get(), 30)
        if ok:
            assert chunk.error is None, chunk.error
        else:
            assert chunk.error_code == "not_found" and chunk.error == f"adapter {adapter!r} is not registered"


async def test_another_tenants_adapter_is_answered_as_a_name_never_registered(
    bus, redis: Redis, tiny_llama: TinyOutput
) -> None:  # type: ignore[no-untyped-def]
    """A helper's finding: bob asking for alice's private adapter was answered by the dispatcher
    (``worker`` ""), and for a name never registered by a worker (``worker`` "w0"); with a version
    the words differed too ("version x is not registered" against "is not registered (removed)",
    said of a name never registered). The same answer now, from the same place, word for word but
    the name, with or without a version."""
    _, bob, _ = bus
    name, path = sorted(tiny_llama.adapters.items())[0]
    entry = AdapterEntry(name=name, path=str(path), rank=8, created=0.0, owner="alice", version="v1")
    await StateStore(redis).put_adapter(entry)

    async def answer(adapter: str, version: str | None) -> tuple[str | None, str, str]:
        rid = f"r-{adapter}-{version}"
        q = await _chunks(bob, inbox := subjects.reply_inbox(rid, "bob"))
        req = GenerateRequest(
            request_id=rid, reply_to=inbox, adapter=adapter, adapter_version=version, prompt_token_ids=[5]
        )
        await bob.publish(subjects.requests_of("bob"), msgspec.json.encode(req))
        chunk = await asyncio.wait_for(q.get(), 30)
        return chunk.error_code, (chunk.error or "").replace(repr(adapter), "NAME"), chunk.worker

    for version in (None, "v1", "x"):
        theirs, none = await answer(name, version), await answer("no-such-adapter", version)
        assert theirs == none and theirs[0] == "not_found" and "(removed)" not in theirs[1], (version, theirs, none)


async def test_an_id_reused_as_soon_as_its_last_chunk_came_runs(bus, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """A user's trial: an app that sent the same request again as soon as the first one's last
    chunk came got no answer 1 time in 10: the worker sends the last chunk before it drops the
    record, and when the dispatcher chose another worker for the second, it took it for a retry of
    the first and dropped it. Here the record outlives the last chunk by 0.3 s, naming another
    worker meanwhile (one worker here); the second request runs all the same."""
    alice, _, worker = bus
    store = worker.store
    record_progress = store.record_progress
    key = f"{store.p}:inflight:r-9"

    async def late(w, running, finished, *args, **kwargs):  # type: ignore[no-untyped-def]
        if "r-9" in finished:
            await store.r.hset(key, "worker", "w-elsewhere")
            await asyncio.sleep(0.3)  # under the dispatcher's second look (0.5 s); milliseconds in life
            await store.r.hset(key, "worker", w)
        return await record_progress(w, running, finished, *args, **kwargs)

    monkeypatch.setattr(store, "record_progress", late)
    inbox = subjects.reply_inbox("r-9", "alice")
    chunks = await _chunks(alice, inbox)
    for attempt in range(2):
        await _send(alice, "alice", "r-9", inbox, max_tokens=2)
        while (chunk := await asyncio.wait_for(chunks.get(), 60)).finish_reason is None:
            assert chunk.error is None
        assert chunk.error is None and chunk.finish_reason == "length", (attempt, chunk)


async def test_a_request_that_does_not_decode_is_answered_on_its_nats_reply_subject(bus) -> None:  # type: ignore[no-untyped-def]
    """A user's trial: sent with NATS request/reply (``nc.request``), a request without a reply_to,
    with one of the wrong type, or not JSON at all timed out with no answer, where a decodable one
    is answered there, under its id where it gives one (a later trial: the id came back "")."""
    _, bob, _ = bus
    for body, rid, param in (
        (b'{"request_id": "r-6", "prompt": "x"}', "r-6", "reply_to"),
        (b'{"request_id": "r-6", "reply_to": 5}', "r-6", "reply_to"),
        (b'{"request_id": "r-7", "prompt": 7}', "r-7", "prompt"),
        (b'{"request_id": "r-8", "params": {"max_tokens": "ten"}}', "r-8", "max_tokens"),
        (b"not json", "", None),
    ):
        answer = await bob.request(subjects.requests_of("bob"), body, timeout=10)
        told = msgspec.json.decode(answer.data, type=TokenChunk)
        assert told.error_code == "bad_request" and "does not decode" in (told.error or ""), body
        assert (told.request_id, told.param) == (rid, param), body


async def test_an_applications_request_with_a_field_requests_lack_is_refused_by_name(bus) -> None:  # type: ignore[no-untyped-def]
    """A user's trial: ``adaptor`` (a typo) was served by the base model, and ``max_tokens``
    beside ``params`` ran with the default 16, without a word; inside ``params`` it was refused."""
    _, bob, _ = bus
    inbox = subjects.reply_inbox("r-7", "bob")
    chunks = await _chunks(bob, inbox)
    for typo in ({"adaptor": "lora-0"}, {"max_tokens": 40}):
        raw = {"request_id": "r-7", "reply_to": inbox, "prompt_token_ids": [5]} | typo
        await bob.publish(subjects.requests_of("bob"), json.dumps(raw).encode())
        told = await asyncio.wait_for(chunks.get(), 60)
        assert told.error_code == "bad_request" and f"unknown field `{next(iter(typo))}`" in (told.error or "")


async def test_an_application_speaks_only_for_readers_of_its_own(bus, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """A trial: on the one shared announcement subject any user kept another's abandoned requests
    running (announcing its reader's name) or turned off its replays (announcing it reconnected a
    trillion times). Applications announce on their own subject now, only names of their own count,
    and a request naming another's reader is sent with no reader (it runs to its end)."""
    alice, bob, worker = bus
    _slowed(worker, monkeypatch)  # bob's request is still held when it is looked at
    await alice.publish(subjects.clients_of("alice"), msgspec.json.encode(ClientAlive(client="alice.p1")))
    await bob.publish(subjects.clients_of("bob"), msgspec.json.encode(ClientAlive(client="alice.p2")))
    await bob.publish(subjects.clients_of("bob"), msgspec.json.encode(ClientAlive(client="bob")))
    await flush(alice)
    await flush(bob)
    for _ in range(100):
        if "bob" in worker.clients._last:
            break
        await asyncio.sleep(0.05)
    assert {"alice.p1", "bob"} <= worker.clients._last.keys() and "alice.p2" not in worker.clients._last
    # bob's request naming alice's reader: taken without it
    mine = await _chunks(bob, subjects.reply_inbox("r-b", "bob"))
    req = GenerateRequest(
        request_id="r-b",
        reply_to=subjects.reply_inbox("r-b", "bob"),
        prompt_token_ids=[5, 40, 41],
        params=SamplingParams(max_tokens=200, ignore_eos=True),
        client="alice.p1",
    )
    await bob.publish(subjects.requests_of("bob"), msgspec.json.encode(req))
    first = await asyncio.wait_for(mine.get(), 30)
    assert first.error is None
    assert worker.streams["r-b"].request.client == ""


async def test_names_too_long_for_a_subject_are_refused_and_every_service_stays_connected(bus) -> None:  # type: ignore[no-untyped-def]
    """A helper's finding: a 5,000-character reply subject of the application's own passed the
    checks; the worker's first chunk to it passed NATS's 4 KiB control line, the server closed the
    worker's connection, nats-py never reconnects after that, and the dispatcher's refusals went
    the same way: the cluster was cut off for good. A 1 MB request id made the refusal too large to
    send. Both are refused now, said where the sender reads, and the services serve on; an abort
    with such an id does not decode."""
    _, bob, worker = bus
    long_reply = subjects.reply_inbox("x" * 5000, "bob")
    too_long_id = {"request_id": "i" * 100_000, "reply_to": subjects.reply_inbox("r-9", "bob"), "prompt": "kalo"}
    long_reply_request = GenerateRequest(request_id="r-8", reply_to=long_reply, prompt="kalo")
    r9 = await _chunks(bob, subjects.reply_inbox("r-9", "bob"))
    for raw, said in (
        (msgspec.json.encode(long_reply_request), "at most 1024 bytes"),
        (json.dumps(too_long_id).encode(), "does not decode"),
    ):
        answer = await bob.request(subjects.requests_of("bob"), raw, timeout=10)
        told = msgspec.json.decode(answer.data, type=TokenChunk)
        assert told.error_code == "bad_request" and said in (told.error or ""), told
        assert len(answer.data) < 5000
    # and on its reply_to, as any request that does not decode, under its id cut (a later finding)
    told = await asyncio.wait_for(r9.get(), 10)
    assert told.error_code == "bad_request" and told.request_id == "i" * MAX_NAME
    # an error that quotes what the request named (a 480,000-character regex, escaped twice on
    # its way) was too large to send: the worker dropped it and the sender waited for ever
    inbox = subjects.reply_inbox("r-11", "bob")
    chunks = await _chunks(bob, inbox)
    regex = "(" + "\\\\" * 240_000
    await bob.publish(
        subjects.requests_of("bob"),
        msgspec.json.encode(
            GenerateRequest(request_id="r-11", reply_to=inbox, prompt="kalo", params=SamplingParams(regex=regex))
        ),
    )
    told = await asyncio.wait_for(chunks.get(), 30)
    assert told.error_code == "bad_request" and len(told.error or "") <= 2000, told.error_code
    # a field requests lack, named in ~1 MB: its name was the refusal's param, over max payload
    head = {"request_id": "r-12", "reply_to": subjects.reply_inbox("r-12", "bob"), "prompt": "x"}
    room = bob.max_payload - len(json.dumps(head | {"": 1}).encode()) - 16
    answer = await bob.request(subjects.requests_of("bob"), json.dumps(head | {"a" * room: 1}).encode(), timeout=10)
    told = msgspec.json.decode(answer.data, type=TokenChunk)
    assert told.error_code == "bad_request" and told.param is None and len(answer.data) < 5000
    await bob.publish(subjects.aborts_of("bob"), json.dumps({"request_id": "a" * 100_000}).encode())
    inbox = subjects.reply_inbox("r-10", "bob")
    chunks = await _chunks(bob, inbox)
    await _send(bob, "bob", "r-10", inbox, max_tokens=3)
    while (chunk := await asyncio.wait_for(chunks.get(), 60)).finish_reason is None:
        pass
    assert chunk.error is None and chunk.finish_reason == "length" and not worker.nc.is_closed


async def test_only_gateways_cancel_background_responses_on_the_bus() -> None:
    """``subjects.RESPONSE_CANCELS`` is the gateways' own (a CancelResponse names any tenant): an
    application publishing one there is refused by the server, so no gateway hears it."""
    server = start_nats(passwords=PASSWORDS)
    try:
        conns = [await nats.connect(server.url, user=u, password=PASSWORDS[u]) for u in ("gateway", "bob")]
        gateway, bob = conns
        heard: list[bytes] = []

        async def hear(msg: Msg) -> None:
            heard.append(msg.data)

        await gateway.subscribe(subjects.RESPONSE_CANCELS, cb=hear)
        await flush(gateway)
        await bob.publish(subjects.RESPONSE_CANCELS, msgspec.json.encode(CancelResponse(response_id="r", tenant="t")))
        await flush(bob)
        await gateway.publish(subjects.RESPONSE_CANCELS, b"{}")  # (after bob's: heard once it is in)
        await flush(gateway)
        for _ in range(200):  # (a bound on a hang: the gateway's own comes)
            if heard:
                break
            await asyncio.sleep(0.01)
        assert heard == [b"{}"]
        for nc in conns:
            await nc.close()
    finally:
        server.stop()
