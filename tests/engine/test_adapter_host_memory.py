"""Host memory of a worker's adapters: at most ``max_cpu_loras`` held (the idle one used least
lately dropped for room, what a request moved away on kept a while), reads begun as it has room
and in the order requests need them, and versions removed or replaced let go."""

from __future__ import annotations

import asyncio
import shutil
import threading
from pathlib import Path

import pytest

from dlora.common.messages import AdapterEntry, SamplingParams
from dlora.model.adapters import AdapterError
from dlora.model.config import ModelConfig
from dlora.model.make_tiny import TinyOutput
from dlora.services.gateway.admin import check_adapter
from dlora.services.worker.adapters import (
    MOVED_AWAY_KEEP_S,
    AdapterNotFound,
    WorkerAdapters,
)
from dlora.services.worker.engine import LLMEngine
from dlora.services.worker.reads import READ_ROOM_WAIT_S
from tests.engine.helpers import make_engine
from tests.engine.test_adapter_changes import _Registry


class _Entries:
    """The registry calls ``WorkerAdapters`` makes, over several entries."""

    def __init__(self, entries: list[AdapterEntry]) -> None:
        self.entries = {e.name: e for e in entries}

    async def get_adapter(self, name: str, version: str | None = None) -> AdapterEntry | None:
        e = self.entries.get(name)
        return e if e is not None and version in (None, e.version) else None


async def test_host_memory_holds_max_cpu_loras_dropping_the_idle_one_used_least_lately(
    tiny_llama: TinyOutput, tmp_path: Path
) -> None:
    """A worker kept every adapter it ever loaded: thousands, and its stats outgrew NATS's message
    size, so the cluster counted it lost. Past ``max_cpu_loras`` the idle one used least lately goes."""
    cfg = ModelConfig.from_dir(tiny_llama.model)
    entries = []
    for i in range(4):
        path = shutil.copytree(tiny_llama.adapters["lora-0"], tmp_path / f"x{i}")
        entries.append(check_adapter(f"x{i}", str(path), [str(tmp_path)], "model", cfg))
    engine = make_engine(tiny_llama, max_loras=1, max_cpu_loras=2)
    worker = WorkerAdapters(engine, _Entries(entries))
    held = lambda: sorted(k.split("@")[0] for k in engine.adapters)  # noqa: E731
    await worker.load("x0", entries[0].version)
    await worker.load("x1", entries[1].version)
    assert held() == ["x0", "x1"]  # the adapters loaded before any was asked for went first
    await worker.load("x0", entries[0].version)  # used again: now x1 is the least lately used
    await worker.load("x2", entries[2].version)
    assert held() == ["x0", "x2"]
    engine.add_request("r", prompt_token_ids=[5, 6, 7], adapter=f"x0@{entries[0].version}")
    await worker.load("x2", entries[2].version)  # x0 is now the least lately used, but busy
    await worker.load("x3", entries[3].version)
    assert held() == ["x0", "x3"]


async def test_an_adapter_a_request_just_moved_away_on_is_not_dropped_for_room(
    tiny_llama: TinyOutput, tmp_path: Path
) -> None:
    """A review: a version kept for a hand-back (``MOVED_AWAY_KEEP_S``) was dropped as idle."""
    cfg = ModelConfig.from_dir(tiny_llama.model)
    entries = [
        check_adapter(
            f"x{i}",
            str(shutil.copytree(tiny_llama.adapters["lora-0"], tmp_path / f"x{i}")),
            [str(tmp_path)],
            "model",
            cfg,
        )
        for i in range(3)
    ]
    engine = make_engine(tiny_llama, max_loras=1, max_cpu_loras=2)
    now = [0.0]
    worker = WorkerAdapters(engine, _Entries(entries), clock=lambda: now[0])
    moved = await worker.load("x0", entries[0].version)
    worker.moved(moved)  # a request on x0 moved away: x0 is idle and used least lately
    await worker.load("x1", entries[1].version)
    await worker.load("x2", entries[2].version)
    assert moved in engine.adapters and len(engine.adapters) == 2  # x1 went for it
    now[0] += MOVED_AWAY_KEEP_S
    await worker.load("x1", entries[1].version)  # past the while, x0 is the idle one used least lately
    assert moved not in engine.adapters and len(engine.adapters) == 2


class _History(_Entries):
    """A registry whose adapters were removed: their versions are kept (requests in flight on them
    may be recovered elsewhere), the names are gone."""

    async def get_adapter(self, name: str, version: str | None = None) -> AdapterEntry | None:
        return None if version is None else await super().get_adapter(name, version)


async def test_a_removed_adapter_takes_no_new_request_even_by_its_version(
    tiny_llama: TinyOutput, tmp_path: Path
) -> None:
    """An application could name the version of an adapter deleted since and have its weights
    loaded and served again; requests that began on it (or a gateway took before) go on with it."""
    cfg = ModelConfig.from_dir(tiny_llama.model)
    path = shutil.copytree(tiny_llama.adapters["lora-0"], tmp_path / "gone")
    entry = check_adapter("gone", str(path), [str(tmp_path)], "model", cfg)
    engine = make_engine(tiny_llama)
    worker = WorkerAdapters(engine, _History([entry]))
    with pytest.raises(AdapterNotFound, match="removed"):
        await worker.load("gone", entry.version, registered=True)
    assert not any(k.startswith("gone@") for k in engine.adapters)  # not loaded
    key = await worker.load("gone", entry.version)  # a recovered or moved request goes on
    engine.add_request("r", prompt_token_ids=[5, 6, 7], adapter=key)
    worker.changed("gone", None)  # the removal's event: kept while "r" runs on it
    assert key in engine.adapters and worker.retired() == {key}  # its requests stay here (no move)
    with pytest.raises(AdapterNotFound, match="removed"):
        await worker.load("gone", entry.version, registered=True)


async def test_adapters_kept_by_a_burst_go_once_idle(tiny_llama: TinyOutput) -> None:
    """Busy when loaded, an adapter past max_cpu_loras stayed for good: a burst over many adapters
    left the worker above its cap while idle (found by a new user's trial: 16 held, cap 4)."""
    engine = make_engine(tiny_llama, max_loras=1, max_cpu_loras=2)  # five adapters registered
    worker = WorkerAdapters(engine, _Entries([]))
    for i, name in enumerate(sorted(engine.adapters)):
        engine.add_request(f"r{i}", prompt_token_ids=[5, 6, 7], params=SamplingParams(max_tokens=2), adapter=name)
    worker.tidy()
    assert len(engine.adapters) == 5  # all busy
    while engine.has_unfinished():
        engine.step()
    worker.tidy()
    assert len(engine.adapters) == 2


async def test_a_burst_over_many_adapters_is_read_as_host_memory_has_room(
    tiny_llama: TinyOutput, tmp_path: Path
) -> None:
    """Reads began as requests came: a burst over 58 adapters held 58 in host memory at
    ``max_cpu_loras`` 2 (a helper's trial through the stack), where vLLM and SGLang hold their cap.
    A read now waits until a request ends and frees one; every request still runs."""
    entries = _copies(tiny_llama, tmp_path, *(f"b{i}" for i in range(8)))
    engine = make_engine(tiny_llama, max_loras=1, max_cpu_loras=2)
    for name in list(engine.adapters):
        engine.unregister_adapter(name)
    worker = WorkerAdapters(engine, _Entries(entries))
    for i, e in enumerate(entries):
        key = await worker.ensure(e.name, e.version)
        engine.add_request(f"r{i}", prompt_token_ids=[5, 6, 7], params=SamplingParams(max_tokens=2), adapter=key)
    peak, done = 0, set()
    async with asyncio.timeout(60):
        while engine.has_unfinished():
            await asyncio.sleep(0.01)  # reads settle (``post``: at once)
            peak = max(peak, len(engine.adapters))
            if engine.runnable():
                done |= {out.request_id for out in engine.step() if out.finished}
            worker.tidy()
    assert peak <= 2 and done == {f"r{i}" for i in range(8)} and not worker.failed


async def test_a_request_moved_in_with_its_cache_has_its_adapter_read_without_waiting_for_room(
    tiny_llama: TinyOutput, tmp_path: Path
) -> None:
    """Its KV blocks are held while it waits for its read: waiting for requests on the adapters held
    to end, as reads do when host memory is full, could wait on the very blocks it holds."""
    entries = _copies(tiny_llama, tmp_path, "held", "moved")
    params = SamplingParams(max_tokens=6, ignore_eos=True, temperature=0.0)
    source = make_engine(tiny_llama)
    source.add_request("m", prompt_token_ids=[5, 40, 41], params=params, adapter="lora-0")
    sent = [t for _ in range(2) for o in source.step() for t in o.new_token_ids]
    kv = source.export_kv("m")
    engine = make_engine(tiny_llama, max_loras=1, max_cpu_loras=1)
    for name in list(engine.adapters):
        engine.unregister_adapter(name)
    worker = WorkerAdapters(engine, _Entries(entries))
    held = await worker.load("held", entries[0].version)
    engine.add_request("h", prompt_token_ids=[5, 6, 7], params=params, adapter=held)  # host memory full
    key = await worker.ensure("moved", entries[1].version)
    engine.add_request("m", prompt_token_ids=[5, 40, 41], params=params, adapter=key, resume_token_ids=sent, kv=kv)
    await asyncio.wait_for(asyncio.shield(worker.reads[key]), 5)
    assert key in engine.adapters and "h" in engine.seqs  # read while "h" still runs


async def test_a_read_waiting_behind_an_adapter_always_busy_begins_after_a_while(
    tiny_llama: TinyOutput, tmp_path: Path
) -> None:
    """Host memory full of an adapter that requests keep coming for: none ends to make room, and a
    rare adapter's read waited for ever (300 steps here). It now begins once it has waited
    ``READ_ROOM_WAIT_S``, host memory one over ``max_cpu_loras`` meanwhile."""
    entries = _copies(tiny_llama, tmp_path, "hot", "rare")
    engine = make_engine(tiny_llama, max_loras=1, max_cpu_loras=1)
    for name in list(engine.adapters):
        engine.unregister_adapter(name)
    now = [0.0]
    worker = WorkerAdapters(engine, _Entries(entries), clock=lambda: now[0])
    params = SamplingParams(max_tokens=3, ignore_eos=True, temperature=0.0)
    hot = await worker.load("hot", entries[0].version)
    engine.add_request("h0", prompt_token_ids=[5, 6, 7], params=params, adapter=hot)
    rare = await worker.ensure("rare", entries[1].version)
    engine.add_request("r", prompt_token_ids=[5, 6, 7], params=params, adapter=rare)
    done, peak = set(), 0
    for i in range(1, 300):
        engine.add_request(f"h{i}", prompt_token_ids=[5, 6, 7], params=params, adapter=hot)
        done |= {o.request_id for o in engine.step() if o.finished}
        now[0] += 0.25
        worker.tidy()
        for _ in range(3):
            await asyncio.sleep(0)  # the reader looks again
        if rare in worker.reads and rare not in worker._queued:  # its read begun: settled at once (``post``)
            await asyncio.wait_for(asyncio.shield(worker.reads[rare]), 5)
        peak = max(peak, len(engine.adapters))
        if "r" in done:
            break
    assert "r" in done and i * 0.25 <= READ_ROOM_WAIT_S + 2 and peak == 2


def _copies(tiny_llama: TinyOutput, tmp_path: Path, *names: str) -> list[AdapterEntry]:
    """A registered copy of one tiny adapter under each of ``names``."""
    cfg = ModelConfig.from_dir(tiny_llama.model)
    paths = [shutil.copytree(tiny_llama.adapters["lora-0"], tmp_path / name) for name in names]
    return [check_adapter(name, str(path), [str(tmp_path)], "model", cfg) for name, path in zip(names, paths)]


def _first_read_held(engine: LLMEngine) -> tuple[list[str], threading.Event]:
    """The names ``engine`` reads, in order, the read of "first" held until the event is set."""
    order, held = [], threading.Event()
    read = engine.read_adapter

    def recorded(key: str, path: object) -> object:
        order.append(key.split("@")[0])
        if key.startswith("first@"):
            assert held.wait(10)
        return read(key, path)

    engine.read_adapter = recorded  # type: ignore[method-assign]
    return order, held


async def test_reads_requests_wait_for_go_ahead_of_prefetches(tiny_llama: TinyOutput, tmp_path: Path) -> None:
    """One read at a time: a prefetch queued behind the read under way waits for the reads that
    requests asked for since (a prefetch's read queued ahead of it delayed a request by a read),
    and a prefetch's read a request asks for while it waits goes ahead too."""
    entries = _copies(tiny_llama, tmp_path, "first", "pre", "asked", "hurried")
    engine = make_engine(tiny_llama, max_loras=1, max_cpu_loras=1)  # each read drops the one before
    for name in list(engine.adapters):
        engine.unregister_adapter(name)
    worker = WorkerAdapters(engine, _Entries(entries))
    order, first_held = _first_read_held(engine)
    await worker.prefetch(["first", "pre", "hurried"])
    while not order:  # "first" is being read
        await asyncio.sleep(0.01)
    await worker.ensure("asked", entries[2].version)
    await worker.ensure("hurried", entries[3].version)  # queued for a prefetch, asked for now
    first_held.set()
    await asyncio.gather(*worker.reads.values())
    assert order == ["first", "asked", "hurried", "pre"] and not worker.failed
    # past max_cpu_loras the idle one used least lately went, never one queued for its read (not
    # held yet: "pre", asked for before "asked" and "hurried", was dropped and failed the reads)
    assert [k.split("@")[0] for k in engine.adapters] == ["pre"]


def test_an_adapter_host_memory_cannot_drop_is_said_and_the_worker_serves_on(tiny_llama: TinyOutput) -> None:
    """A trial: a drop that raised between steps (``tidy`` is outside the commands' guard) ended the
    worker, and every request it held counted a death."""
    engine = make_engine(tiny_llama, max_loras=1, max_cpu_loras=2)  # five adapters registered
    worker = WorkerAdapters(engine, _Entries([]))

    def refused(name: str) -> None:
        raise AdapterError(f"adapter {name!r} is not registered")

    engine.unregister_adapter = refused  # type: ignore[method-assign]
    worker.tidy()
    assert len(engine.adapters) == 5


async def test_a_prefetch_not_begun_of_an_adapter_removed_or_replaced_is_not_read(
    tiny_llama: TinyOutput, tmp_path: Path
) -> None:
    """A prefetch queued behind a read was read after its adapter was removed, then retired: a read
    of hundreds of MB for nothing. One a request asked for too is still read (the request runs on
    that version); one under way ends as it would."""
    entries = _copies(tiny_llama, tmp_path, "first", "removed", "replaced", "wanted")
    engine = make_engine(tiny_llama, max_cpu_loras=8)
    worker = WorkerAdapters(engine, _Entries(entries))
    order, first_held = _first_read_held(engine)
    await worker.prefetch(["first", "removed", "replaced", "wanted"])
    while not order:  # "first" is being read
        await asyncio.sleep(0.01)
    await worker.ensure("wanted", entries[3].version)  # a request's too
    for name, version in (("first", None), ("removed", None), ("replaced", "v2"), ("wanted", None)):
        worker.changed(name, version)
    assert sorted(k.split("@")[0] for k in engine.loading) == ["first", "wanted"]
    first_held.set()
    await asyncio.gather(*worker.reads.values())
    assert order == ["first", "wanted"] and not worker.reads and not engine.loading


async def test_a_removed_adapters_load_counts_go_once_its_last_version_is_unloaded(
    tiny_llama: TinyOutput, tmp_path: Path
) -> None:
    """They stayed, two entries per adapter name ever removed (a helper's churn); dropped at the
    removal event, they came back as the held version was unloaded and folded into its name, and
    meanwhile its exported counter went down (a review)."""
    path = Path(shutil.copytree(tiny_llama.adapters["lora-0"], tmp_path / "x"))
    entry = check_adapter("x", str(path), [str(tmp_path)], "model", ModelConfig.from_dir(tiny_llama.model))
    engine = make_engine(tiny_llama)
    worker = WorkerAdapters(engine, _Registry(entry))
    key = await worker.load("x", entry.version)
    engine.add_request("r1", prompt_token_ids=[1, 2, 3], params=SamplingParams(max_tokens=4), adapter=key)
    engine.step()  # running on x as it is removed
    worker.changed("x", None)
    assert key in engine.adapters and engine.stats.loads_by_adapter == {key: 1}  # counted while held
    while engine.has_unfinished():
        engine.step()
    worker.retire()
    assert key not in engine.adapters
    assert not engine.stats.loads_by_adapter and not engine.stats.load_seconds_by_adapter


async def test_a_replaced_version_a_request_just_moved_away_on_stays_for_its_hand_back(
    tiny_llama: TinyOutput, tmp_path: Path
) -> None:
    """A helper's trial (files rewritten, then load_inplace, a plan taken meanwhile): the request
    moved on the old version before its replacement was heard of; the destination found the files
    rewritten and handed it back, but the old version, retired and then unused, was unloaded at
    its source, and no worker held it: the stream failed after its first tokens. Kept a while."""
    path = Path(shutil.copytree(tiny_llama.adapters["lora-0"], tmp_path / "x"))
    entry = check_adapter("x", str(path), [str(tmp_path)], "model", ModelConfig.from_dir(tiny_llama.model))
    engine = make_engine(tiny_llama)
    now = [0.0]
    worker = WorkerAdapters(engine, _Registry(entry), clock=lambda: now[0])
    key = await worker.load("x", entry.version)
    engine.add_request("r", prompt_token_ids=[5, 6, 7], adapter=key)
    engine.step()
    engine.abort("r")  # moved away (``move_out``)
    worker.moved(key)
    worker.changed("x", "v2")  # the replacement's event, heard after
    assert key in engine.adapters  # a hand-back finds it here (the worker's stats list it)
    now[0] += MOVED_AWAY_KEEP_S
    worker.tidy()
    assert key not in engine.adapters and not worker.retiring


async def test_a_removed_adapters_credit_goes_from_the_policys_ledger(tiny_llama: TinyOutput, tmp_path: Path) -> None:
    """The dLoRA policy's ledger kept a deleted adapter's balance for good (its series went, the
    balance stayed, saved to Redis with every checkpoint: one more per adapter ever deleted), and the
    others' balances still counted against it. It goes once the adapter's last version here does,
    the total kept (its debt cut from what the others are owed)."""
    path = Path(shutil.copytree(tiny_llama.adapters["lora-0"], tmp_path / "x"))
    entry = check_adapter("x", str(path), [str(tmp_path)], "model", ModelConfig.from_dir(tiny_llama.model))
    engine = make_engine(tiny_llama, policy="dlora")
    worker = WorkerAdapters(engine, _Registry(entry))
    key = await worker.load("x", entry.version)
    credits = engine.policy.credits  # type: ignore[attr-defined]
    credits.balances.update({key: -1.0, "": 0.25, "lora-1": 1.75, "lora-2": -1.0})  # x paid for others' waits
    worker.changed("x", None)
    assert key not in engine.adapters
    assert dict(credits.balances) == {"": 0.125, "lora-1": 0.875, "lora-2": -1.0}
    assert key not in engine.policy.checkpoint()["credits"]
    # a version replaced (an RL trainer's load_inplace, again and again): its balance is the
    # version's now, where one key per version ever was kept (the exported figure, by name, the same)
    key = await worker.load("x", entry.version)
    credits.balances.update({key: -0.5, "x@v2": 0.25})
    worker.changed("x", "v2")
    assert key not in engine.adapters and dict(credits.balances)["x@v2"] == -0.25 and key not in credits.balances


async def test_an_adapter_registered_again_takes_new_requests_before_its_event_is_heard(
    tiny_llama: TinyOutput, tmp_path: Path
) -> None:
    """Deleted while a request ran on it here, then registered again (same files or others): a NATS
    application's new requests for it (checked against the registry here, not at a gateway) were
    refused 404 "removed" by a worker not yet told (NATS's events are at most once: one lost to a
    reconnect is never heard) for as long as the old request ran, while the dispatcher sent it the
    adapter's requests as the worker holding it."""
    cfg = ModelConfig.from_dir(tiny_llama.model)
    paths = [shutil.copytree(tiny_llama.adapters[src], tmp_path / src) for src in ("lora-0", "lora-1")]
    old, new = (check_adapter("x", str(path), [str(tmp_path)], "model", cfg) for path in paths)
    for again in (old, new):
        engine = make_engine(tiny_llama)
        registry = _Entries([old])
        worker = WorkerAdapters(engine, registry)
        key = await worker.load("x", old.version, registered=True)
        engine.add_request("r", prompt_token_ids=[5, 6, 7], adapter=key)
        worker.changed("x", None)  # the removal's event: "r" goes on with it
        registry.entries = {"x": again}  # registered again; its event not heard (yet)
        got = await worker.load("x", again.version, registered=True)
        assert got == f"x@{again.version}" and got in engine.adapters
        assert key in engine.adapters  # "r" still runs on the old one
        engine.abort("r")
        worker.tidy()
        assert [k for k in engine.adapters if k.startswith("x@")] == [got]  # the old one went once unused


async def test_credit_kept_for_an_adapter_no_longer_registered_goes_once_the_registry_is_listed(
    tiny_llama: TinyOutput, tmp_path: Path
) -> None:
    """A balance leaves the ledger only where this worker heard the adapter's removal and retired it:
    one restored from a checkpoint (an adapter deleted while the worker was down, or by the older
    version that kept every deleted one's) or whose removal's event was lost (NATS's events are at
    most once) stayed for good. The registry's listing (every LIST_EVERY_S) drops those not in it
    nor held here, the total kept."""
    path = Path(shutil.copytree(tiny_llama.adapters["lora-0"], tmp_path / "x"))
    entry = check_adapter("x", str(path), [str(tmp_path)], "model", ModelConfig.from_dir(tiny_llama.model))
    engine = make_engine(tiny_llama, policy="dlora")
    worker = WorkerAdapters(engine, _Registry(entry))
    key = await worker.load("x", entry.version)
    engine.policy.restore({"credits": {key: 1.0, "": 1.0, "gone@v1": -1.5, "evicted@v2": -0.5}})
    worker.listed = {"x", "evicted"}  # x held, evicted registered: theirs stay
    worker.tidy()  # (between steps)
    assert dict(engine.policy.checkpoint()["credits"]) == {key: 0.25, "": 0.25, "evicted@v2": -0.5}
