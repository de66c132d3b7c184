"""Moves across an adapter's in-place reload, on real workers (NATS, Redis): the worker a request
moves to holds only the adapter's old version, as an RL trainer's rollout workers do while the old
policy's requests finish there after the trainer reloaded it (vLLM's load_inplace)."""

from __future__ import annotations

import asyncio
import shutil
import time
import uuid
from pathlib import Path

import msgspec
import nats
from redis.asyncio import Redis

from dlora.common import bus, subjects
from dlora.common.messages import (
    AdapterEntry,
    AdapterEvent,
    GenerateRequest,
    MovePlan,
    MoveRequest,
    SamplingParams,
    TokenChunk,
)
from dlora.common.state import StateStore
from dlora.model.adapters import content_digest
from dlora.model.make_tiny import TinyOutput
from dlora.services.dispatcher.replaced import on_current_version
from dlora.services.gateway.replies import ReplyStream
from dlora.services.migrator.trigger import snapshot_from_stats
from dlora.services.servers import Server
from tests.engine.oracle import Oracle
from tests.integration.test_migration import start_workers

FILES = ("adapter_config.json", "adapter_model.safetensors")


def _entry(path: Path) -> AdapterEntry:
    """``path``'s files registered as adapter "rl" at the version they are now."""
    conf, weights = ((path / f).read_bytes() for f in FILES)
    version = content_digest(conf, weights)
    return AdapterEntry(
        name="rl", path=str(path), rank=8, created=time.time(), version=version, file_bytes=len(conf) + len(weights)
    )


async def test_a_request_moved_onto_a_worker_holding_its_adapters_old_version_runs_on_its_own(
    nats_server: Server, redis: Redis, tiny_llama: TinyOutput, tmp_path: Path
) -> None:
    """w0 runs a request of rl@v1 (pinned there: its version retiring); rl is reloaded in place as
    v2, and a v2 request on w1 is moved to w0. w0 reads v2 for it and its tokens are the oracle's
    for v2's weights, not v1's. The migrator's view of the same stats says w0 lacks v2 (a helper's
    finding: by name it held it, and moves there were planned with no read priced)."""
    store = StateStore(redis)
    path = tmp_path / "rl"
    shutil.copytree(tiny_llama.adapters["lora-1"], path)
    v1 = _entry(path)
    assert await store.put_adapter(v1)
    stop = asyncio.Event()
    conns, tasks = [], []
    try:
        workers = await start_workers(("w0", "w1"), nats_server, store, tiny_llama, stop, conns, tasks)
        client = await nats.connect(nats_server.url)
        conns.append(client)
        owner = uuid.uuid4().hex[:8]
        streams = {rid: ReplyStream(rid, keep_ids=True) for rid in ("old", "new")}

        async def on_chunk(msg) -> None:  # type: ignore[no-untyped-def]
            chunk = msgspec.json.decode(msg.data, type=TokenChunk)
            streams[chunk.request_id].accept(chunk)

        await client.subscribe(subjects.replies_of(owner), cb=on_chunk)
        await client.flush()  # subscribed at the server before anything is sent

        async def send(rid: str, worker: str, version: str, prompt: list[int], max_tokens: int) -> None:
            req = GenerateRequest(
                request_id=rid,
                reply_to=subjects.reply_inbox(rid, owner),
                prompt_token_ids=prompt,
                params=SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                adapter="rl",
                adapter_version=version,
            )
            await client.publish(subjects.worker_requests(worker), msgspec.json.encode(req))
            async with asyncio.timeout(30):
                while not streams[rid].tokens:
                    await asyncio.sleep(0.01)

        await send("old", "w0", v1.version, [7, 8, 9, 10], 500)  # the old policy's long rollout
        for f in FILES:  # the trainer's new weights over the files, then the reload
            shutil.copyfile(tiny_llama.adapters["lora-2"] / f, path / f)
        v2 = _entry(path)
        assert v2.version != v1.version and await store.put_adapter(v2, replace=True)
        await bus.publish(client, subjects.ADAPTER_EVENTS, AdapterEvent(name="rl", removed=False, version=v2.version))
        await bus.flush(client)
        async with asyncio.timeout(30):
            while "rl" not in workers["w0"].adapters.retiring:
                await asyncio.sleep(0.01)
        prompt, n = [5, 40, 41, 300, 17], 40
        await send("new", "w1", v2.version, prompt, n)
        assert set(workers["w0"].engine.adapters) == {f"rl@{v1.version}"}

        snap = snapshot_from_stats([workers[w]._snapshot() for w in ("w0", "w1")], {"rl": v2.file_bytes})
        x, y = snap.workers
        assert [(r.request_id, r.version, r.pinned) for r in snap.requests if r.worker == "w0"] == [
            ("old", v1.version, True)
        ]
        key = f"rl@{v2.version}"
        assert not x.has(key) and y.has(key) and x.has(f"rl@{v1.version}")

        plan = MovePlan(
            plan_id="p",
            epoch=1,
            created=time.time(),
            moves=[MoveRequest(request_id="new", adapter="rl", to_worker="w0")],
        )
        await client.publish(subjects.MOVES, msgspec.json.encode(plan))
        await bus.flush(client)
        async with asyncio.timeout(60):
            while not streams["new"].done:
                await asyncio.sleep(0.02)
        assert not streams["old"].done  # w0 ran the old version's request all the while
        new = streams["new"]
        assert new.error is None and new.worker == "w0" and new.tokens == n  # it moved, and finished there
        assert key in workers["w0"].engine.adapters  # w0 read v2 for it
        oracle = Oracle(tiny_llama)
        assert new.token_ids == oracle.generate("lora-2", prompt, n, eos_token_id=None)
        assert new.token_ids != oracle.generate("lora-1", prompt, n)  # (the versions' tokens differ)
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in conns:
            await c.drain()


async def test_only_a_request_not_begun_takes_the_version_registered_since_and_only_of_the_same_owner(
    redis: Redis,
) -> None:
    """A request whose pinned version no worker can load runs on the name's newer registration
    (``replaced.on_current_version``) only where it has produced nothing (a running one finishes on
    its own version or fails), and only where both belong to one owner (a tenant's request must
    not reach another tenant's adapter registered under the freed name)."""
    store = StateStore(redis)
    for version, owner in (("v1", "acme"), ("v2", "acme")):
        await store.put_adapter(
            AdapterEntry(name="rl", path="/x", rank=8, created=0.0, version=version, owner=owner), replace=True
        )
    req = GenerateRequest(request_id="r", reply_to="x", prompt_token_ids=[1, 2], adapter="rl", adapter_version="v1")
    assert (await on_current_version(store, req)).adapter_version == "v2"
    assert await on_current_version(store, msgspec.structs.replace(req, resume_token_ids=[7])) is None
    assert await on_current_version(store, msgspec.structs.replace(req, adapter_version="v2")) is None
    await store.put_adapter(
        AdapterEntry(name="rl", path="/x", rank=8, created=0.0, version="v3", owner="other"), replace=True
    )
    assert await on_current_version(store, req) is None


async def test_a_request_whose_worker_died_with_it_keeps_its_version_though_its_record_shows_no_tokens(
    redis: Redis,
) -> None:
    """A worker sends a step's chunks first and records them after (``stepping.deliver``): one
    that died between the two left a record with no tokens while its client had some. Re-dispatched,
    then handed back by a worker that found the version's files rewritten, such a request looked not
    begun, took the reload, and the client's text went on from the new weights after the old's (the
    gateway drops the re-sent numbers, not their other text): a review of the rule that moves a
    request not begun to the version registered since. A death in its record keeps it on its own."""
    store = StateStore(redis)
    for version in ("v1", "v2"):
        await store.put_adapter(
            AdapterEntry(name="rl", path="/x", rank=8, created=0.0, version=version, owner="acme"), replace=True
        )
    req = GenerateRequest(request_id="r", reply_to="x", prompt_token_ids=[1, 2], adapter="rl", adapter_version="v1")
    assert await store.put_inflight(req, "dead", new=True, marks_taken=True)
    resumed = msgspec.structs.replace(req, recoveries=1, continued=True)  # the record had no tokens yet
    assert await store.put_inflight(resumed, "next", expect=("dead", 0), died=True, marks_taken=True)
    assert (await store.get_inflight("r")).deaths == 1
    assert await on_current_version(store, resumed) is None
    # a hand-back alone (its message never reached a worker that could load it) still takes the reload
    other = msgspec.structs.replace(req, request_id="s")
    assert await store.put_inflight(other, "w", new=True, marks_taken=True)
    moved = msgspec.structs.replace(other, recoveries=1, continued=True)
    assert await store.put_inflight(moved, "w2", expect=("w", 0), marks_taken=True)
    assert (await on_current_version(store, moved)).adapter_version == "v2"
