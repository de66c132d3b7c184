"""The adapter versions a worker holds: loaded as registered (the files' digest must match the
version), retired once no request uses a replaced or removed one, prefetched where the placement
puts them. Files are read beside the steps, one adapter at a time, and installed between steps;
the requests that wait meanwhile are the engine's (``LLMEngine.loading``), as LoRAX loads adapters
(vLLM reads them inside its step, every stream waiting). Names, keys and versions: ``versions``."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, cast

import msgspec

from dlora.common import log
from dlora.common.bus import StateBound
from dlora.common.messages import AdapterEntry, GenerateRequest
from dlora.common.versions import engine_key, name_of, version_of
from dlora.model.adapter_files import files_bytes
from dlora.services.worker.engine import LLMEngine
from dlora.services.worker.engine.lora import AdapterError, AdapterRefused, LoraAdapter
from dlora.services.worker.reads import ReadCosts, ReadOrder, read_may_begin

logger = log.get("worker")
T = TypeVar("T")


# A version that could not be loaded is not read again for this long: each request for it would
# read and hash its files again (hundreds of MB for a real adapter), and files a trainer is
# rewriting may be whole again soon after.
FAILED_MEMORY_S = 10.0
# A version a request moved away on is kept this long after it is retired: the destination may
# find its files rewritten (load_inplace) and hand the request back to a worker that holds it.
MOVED_AWAY_KEEP_S = 30.0


def on_daemon_thread(fn: Callable[..., T], *args: object) -> asyncio.Future[T]:
    """``fn(*args)`` on a thread of its own that does not hold up the process's exit, as
    ``asyncio.to_thread`` does (its pool's threads are joined at exit): a worker stopping during a
    read of seconds (a 400 MB adapter, a trial: 5 s after its hand-over) exits at once."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()
    context = contextvars.copy_context()  # (as to_thread: the worker's log context)

    def settle(result: T | None, error: BaseException | None) -> None:
        if not done.done():
            done.set_exception(error) if error is not None else done.set_result(cast(T, result))

    def run() -> None:
        try:
            result, error = context.run(fn, *args), None
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting task
            # (a StopIteration cannot be set on a future: it raised in the callback, and the read
            # never ended, holding every read after it)
            result, error = None, RuntimeError(repr(e)) if isinstance(e, StopIteration) else e
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="adapter-read", daemon=True).start()
    return done


class AdapterNotFound(Exception):
    """The registry has no such adapter (or no such version of it)."""


class AdapterChanged(AdapterError):
    """The adapter's files no longer hold the version registered (rewritten in place since, as an
    RL trainer does before vLLM's ``load_inplace``): a worker that holds that version in memory
    may still serve it."""


def _changed(name: str, entry: AdapterEntry, now: str) -> AdapterChanged:
    """Why ``entry``'s version cannot be loaded from its files any more (``now``: what they are)."""
    return AdapterChanged(
        f"adapter {name!r}: the files in {entry.path} changed since version {entry.version} was "
        f"registered (they are now {now}); an admin must load it again (vLLM's "
        "/v1/load_lora_adapter with load_inplace, or delete it and register it again)"
    )


def evictions(engine: LLMEngine, used: OrderedDict[str, None], busy: set[str | None]) -> list[str]:
    """The adapters (engine keys) to drop from host memory so that ``engine`` holds at most
    ``max_cpu_loras``: those used least lately first (``used``, least lately first, is kept to what
    the engine holds or is reading, the dropped ones out too; one it never noted goes before them),
    never one ``busy`` (requests on it, merged, just asked for): fewer, or none, when too many are."""
    for gone in [k for k in used if k not in engine.adapters and k not in engine.loading]:  # retired meanwhile
        del used[gone]
    over = len(engine.adapters) - engine.config.max_cpu_loras
    order = [k for k in engine.adapters if k not in used] + [k for k in used if k in engine.adapters]
    dropped = [k for k in order if k not in busy][: max(0, over)]
    for key in dropped:
        used.pop(key, None)
    return dropped


@dataclass(frozen=True)
class AdapterRead:
    """An adapter version's read, over: its weights, or why not (the error's class and reason: not
    the error itself, whose traceback holds the frames of the read, and so its weights)."""

    key: str  # the engine's key
    adapter: LoraAdapter | None
    error: tuple[type[AdapterError], str] | None = None
    seconds: float = 0.0  # from its turn to its files read, or its failure (``WorkerAdapters.clock``)
    # The version registered under its name when it ended (None: removed); not known when the
    # registry did not answer.
    registered: str | None = None
    checked: bool = False


class Registry(Protocol):
    async def get_adapter(self, name: str, version: str | None = None) -> AdapterEntry | None: ...


class WorkerAdapters:
    """The engine's adapters, kept to the registry: each version under its own key, so requests
    running on a version finish on it while new ones take the version registered now."""

    def __init__(
        self,
        engine: LLMEngine,
        registry: Registry,
        clock: Callable[[], float] = time.monotonic,
        post: Callable[[AdapterRead], Awaitable[None]] | None = None,
        bound: StateBound | None = None,
    ) -> None:
        self.engine, self.registry, self.clock = engine, registry, clock
        # An arriving request's registry reads (``ensure``, ``versioned``): in line in the worker's
        # loop, with Redis hung each held every stream's steps 20 s (redis-py's tries). Only the
        # reads: a request that needs none is not refused while they pause (a review).
        self.bound = bound or StateBound()
        # Adapter names with a replaced or removed version still loaded here, and the version now
        # registered (None: removed): those versions go once their last request ends.
        self.retiring: dict[str, str | None] = {}
        # The registry's names as last listed (beats.py), not compared yet with what the policy
        # keeps (``tidy``, between steps: the policy is the step thread's while one runs).
        self.listed: set[str] | None = None
        self.moved_away: dict[str, float] = {}  # engine key -> when a request on it last moved away
        self.used: OrderedDict[str, None] = OrderedDict()  # engine keys, the one used least lately first
        # Versions a prefetch could not load (files changed or broken): not tried again every
        # placement (a warning each time, and the files read again); a request tries once
        # FAILED_MEMORY_S has passed.
        self.unprefetchable: set[tuple[str, str]] = set()
        # Versions that failed to load, with when, the error's class and its reason: refused again
        # for FAILED_MEMORY_S without reading their files. Not the error itself: its traceback
        # holds the frames, and so the weights, of the load that failed.
        self.failed: dict[tuple[str, str], tuple[float, type[AdapterError], str]] = {}
        # Reads asked for and not settled, by engine key: done once posted. One at a time (they share
        # the disk and each is read whole), those requests wait for before prefetches, then in turn.
        self.reads: dict[str, asyncio.Future[None]] = {}
        self._queued: dict[str, tuple[str, AdapterEntry]] = {}  # key -> name, registry entry
        self._order = ReadOrder()
        self._reader: asyncio.Task[None] | None = None
        self._roomy = asyncio.Event()  # set between steps and commands: a waiting read looks again
        self.read_costs = ReadCosts()  # what its reads took: the stats say it
        # Where a read's outcome goes: a worker's command queue, settled between its steps; without
        # one, settled at once (nothing steps meanwhile: tests, tools).
        self.post = post or self._settle_now

    async def ensure(self, name: str, version: str, registered: bool = False, prefetch: bool = False) -> str:
        """The engine's key for that version of the adapter: in host memory, or being read into it
        (``LLMEngine.loading``: its requests wait; the read's outcome goes to ``post``, and then to
        ``settle``). ``registered``: the adapter must be registered now, for an application's new
        request (without it, one could name the version of an adapter deleted since and have its
        weights loaded again; a gateway checked its request's when it took it, and a request that
        ran elsewhere goes on, as a running one does). A ``prefetch``'s read goes after those that
        requests wait for. Raises AdapterNotFound if the registry never had that version (or, with
        ``registered``, the adapter is removed); a version that failed is refused again for
        ``FAILED_MEMORY_S`` without reading its files (its AdapterError)."""
        gone = AdapterNotFound(f"adapter {name!r} is not registered (removed)")
        if registered and name in self.retiring and self.retiring[name] is None:
            # Removed as this worker heard it; registered again since, its event not heard yet (or
            # lost: NATS's events are at most once) is heard here, or its new requests were
            # refused for as long as one on the removed version ran here.
            if (current := await self._registered(name)) is None:
                raise gone
            self.changed(name, current.version)
        key = engine_key(name, version)
        self.used[key] = None
        self.used.move_to_end(key)
        if key in self.engine.adapters or key in self.engine.loading:
            if key in self._order:  # not begun: a request's goes ahead of the prefetches
                self._order.ask(key, prefetch)
            return key
        if registered and await self._registered(name) is None:  # asked before any file is read
            raise gone
        now_s = self.clock()
        if self.failed:
            self.failed = {k: v for k, v in self.failed.items() if now_s - v[0] < FAILED_MEMORY_S}
        if (failed := self.failed.get((name, version))) is not None:
            raise failed[1](failed[2])
        entry = await self._registered(name, version)
        if entry is None:
            raise AdapterNotFound(f"adapter {name!r} version {version} is not registered")
        if key in self.engine.adapters or key in self.engine.loading:  # asked again while we asked
            return await self.ensure(name, version, registered, prefetch)
        self.engine.loading.add(key)
        self.reads[key] = asyncio.get_running_loop().create_future()
        self._queued[key] = (name, entry)
        self._order.ask(key, prefetch)
        if self._reader is None or self._reader.done():
            self._reader = asyncio.create_task(self._read_queued())
        return key

    async def _registered(self, name: str, version: str | None = None) -> AdapterEntry | None:
        """The registry's entry, within ``bound`` (raises its Redis errors: the request is refused)."""
        async with self.bound():
            return await self.registry.get_adapter(name, version)

    def reads_stats(self) -> dict[str, Any]:
        """What the worker's stats say of its reads (``WorkerStats``' fields of the same names)."""
        return {**self.read_costs.stats(), "failed_adapters": self.failing()}

    def failing(self) -> list[str]:
        """The adapters (names) whose read failed within ``FAILED_MEMORY_S``: refused here meanwhile."""
        now = self.clock()
        return sorted({name for (name, _), (at, *_) in self.failed.items() if now - at < FAILED_MEMORY_S})

    async def load(self, name: str, version: str, registered: bool = False) -> str:
        """``ensure``, its read awaited: the key of the version in host memory. Only where nothing
        steps meanwhile (``post`` settles at once). Raises as ``ensure`` does, and the read's
        AdapterError."""
        key = await self.ensure(name, version, registered)
        if (read := self.reads.get(key)) is not None:
            await asyncio.shield(read)  # shared: one caller cancelled must not cancel the others' wait
        if (failed := self.failed.get((name, version))) is not None:
            raise failed[1](failed[2])
        return key

    async def _read_queued(self) -> None:
        """The reads asked for, one at a time, in their order, while there are any, each once host
        memory has room for it, or a request's once it waited ``READ_ROOM_WAIT_S`` (``read_may_begin``).
        Reads began as requests came: a burst over 58 adapters held 58 in host memory at
        ``max_cpu_loras`` 2 (a helper's trial, 400 requests over 200 adapters), hundreds of GB at
        real adapters' sizes, where vLLM and SGLang hold their cap (SGLang #10266) and LoRAX waits
        for room (#306)."""
        while True:
            may, since = read_may_begin(self.engine, self._order, None, self.clock())
            while not may:  # looked at again after each step and command (``tidy``)
                self._roomy.clear()
                await self._roomy.wait()
                may, since = read_may_begin(self.engine, self._order, since, self.clock())
            if (key := self._order.next()) is None:
                return
            done = self.reads[key]
            try:
                await self._read(key, *self._queued.pop(key))
            except Exception as e:  # its outcome not taken in: the reads after it go on
                logger.exception("adapter read not settled", adapter=name_of(key), error=str(e))
            finally:
                if not done.done():
                    done.set_result(None)

    async def _read(self, key: str, name: str, entry: AdapterEntry) -> None:
        """Read ``entry``'s files on a thread, then ``post`` the outcome, whatever happens (the
        requests waiting for it end with it)."""
        registered, checked, began = None, False, self.clock()
        try:
            adapter = await self._load(name, key, entry)
            seconds = self.clock() - began  # (the files' read: what dispatch prices, not the registry's answer)
            try:
                current = await self.registry.get_adapter(name)
                registered, checked = (current.version if current else None), True
            except Exception as e:  # noqa: BLE001 - the registry down: retired by its event instead
                logger.warning("registry not reached after an adapter read", adapter=name, error=str(e))
            read = AdapterRead(key, adapter, None, seconds, registered, checked)
        except AdapterError as e:
            read = AdapterRead(key, None, (type(e), str(e)), self.clock() - began)
        except Exception as e:  # noqa: BLE001 - its requests are told why; the worker serves on
            error = (AdapterError, f"adapter {name!r}: {type(e).__name__}: {e}")
            read = AdapterRead(key, None, error, self.clock() - began)
        await self.post(read)

    async def _settle_now(self, read: AdapterRead) -> None:
        self.settle(read)

    def settle(self, read: AdapterRead) -> AdapterError | None:
        """Between steps: install a read adapter (those past ``max_cpu_loras`` dropped), or note its
        failure, remembered ``FAILED_MEMORY_S`` and not prefetched again; the failure, to end the
        requests that waited for it with (None: installed)."""
        self.reads.pop(read.key, None)
        self.engine.loading.discard(read.key)
        name, version = name_of(read.key), version_of(read.key)
        error = read.error
        if read.adapter is not None:
            try:
                self.engine.install_adapter(read.adapter)
                self.read_costs.observe(read.seconds, read.adapter.file_bytes)
                size = {"seconds": round(read.seconds, 3), "mb": round(read.adapter.nbytes / 1e6, 1)}
                logger.info("adapter read into host memory", adapter=name, version=version, **size)
            except Exception as e:  # noqa: BLE001 - its requests would wait on a key never held
                error = (AdapterError, f"adapter {name!r} could not be installed: {type(e).__name__}: {e}")
        if error is not None:
            logger.warning("adapter read failed", adapter=name, version=version, reason=error[1])
            self.failed[(name, version)] = (self.clock(), *error)  # from its end: it may have queued long
            self.unprefetchable.add((name, version))
            return error[0](error[1])
        # Versions other than the registered one (this one, for a request that began on it, or
        # ones whose replacement event never came) go once unused.
        now = read.registered
        if read.checked and any(name_of(k) == name and version_of(k) != now for k in self.engine.adapters):
            self.retiring[name] = now
        self.evict(keep=read.key)
        return None

    def close(self) -> None:
        """Stop the reads under way and asked for (the worker stops)."""
        if self._reader is not None:
            self._reader.cancel()
        for read in self.reads.values():
            read.cancel()

    async def _load(self, name: str, key: str, entry: AdapterEntry) -> LoraAdapter:
        """``entry``'s files read as the engine's ``key``. Raises AdapterError naming the adapter by
        ``name``, not its engine key; AdapterChanged when a version's files no longer load as
        registered (their digest differs, or they do not load at all: they loaded whole at its
        registration, so a trainer is rewriting them or they went); not when only this worker's
        limits refuse them (AdapterRefused: its adapter roots, size or rank limits differ), nor
        when the registered version's own files fail to load (AdapterError, its reason)."""
        adapter = None
        # Files of another size are not the version's: told without reading them (a link swapped
        # in to a large file was read whole, up to max_file_bytes, before its digest told; a
        # helper's security trial), as any other change.
        if entry.version and entry.file_bytes:
            size = await on_daemon_thread(files_bytes, entry.path)
            if size is not None and size != entry.file_bytes:
                raise _changed(name, entry, f"{size} bytes, {entry.file_bytes} then")
        try:
            adapter = await on_daemon_thread(self.engine.read_adapter, key, entry.path)
            digest = adapter.digest
        except AdapterRefused as e:
            # this worker's limits refusing files that loaded at registration: said as such, not
            # as files changed (a review: the client was told an admin must load it again) —
            # unless the files changed too, which an admin must see to first
            if not entry.version or e.digest in (None, entry.version):
                raise type(e)(str(e).replace(repr(key), repr(name))) from None  # (AdapterOverLimit kept)
            digest = e.digest
        except AdapterError as e:
            # the registered version's files, read whole, that do not load: said as they are
            reason = str(e).replace(repr(key), repr(name))
            raise (AdapterChanged if entry.version and e.digest != entry.version else type(e))(reason) from None
        if adapter is None or entry.version and digest != entry.version:
            raise _changed(name, entry, str(digest))
        return adapter

    def tidy(self) -> None:
        """Between commands and steps: unload retired versions no request uses any more, and drop
        adapters past ``max_cpu_loras`` that a burst kept busy when they were loaded; a read waiting
        for room looks again."""
        self._roomy.set()
        if self.retiring:
            self.retire()
        if self.listed is not None:
            self.forget_unregistered(self.listed)
            self.listed = None
        if len(self.engine.adapters) > self.engine.config.max_cpu_loras:
            self.evict(keep=None)

    def evict(self, keep: str | None) -> None:
        """Past ``max_cpu_loras`` adapters in host memory, drop those used least lately that no
        request runs on and that are not merged (never ``keep``, the one just asked for); all busy,
        the worker holds more for a while. Without it every adapter ever used stayed, and a worker
        that served thousands outgrew NATS's message size with its stats and dropped out. Nor one
        a request moved away on lately: the destination may hand it back (``retire``, a review)."""
        busy = self.engine.adapters_in_use() | {keep, self.engine.merger.merged} | self.moved_lately()
        for key in evictions(self.engine, self.used, busy):
            try:  # between commands and steps, outside their guard: a fault here must not end the worker
                self.engine.unregister_adapter(key)
            except AdapterError as e:
                logger.error("adapter not dropped", adapter=name_of(key), version=version_of(key), error=str(e))
                continue
            logger.info("adapter dropped from host memory", adapter=name_of(key), version=version_of(key))

    async def versioned(self, req: GenerateRequest) -> GenerateRequest:
        """``req`` with its adapter's version: the registered one if it came without (NATS clients),
        so a move or a recovery continues it on the same version. Raises AdapterNotFound."""
        if req.adapter is None or req.adapter_version is not None:
            return req
        entry = await self._registered(req.adapter)
        if entry is None:
            raise AdapterNotFound(f"adapter {req.adapter!r} is not registered")
        return msgspec.structs.replace(req, adapter_version=entry.version)

    def changed(self, name: str, version: str | None) -> None:
        """The registry replaced (``version``) or removed (None) adapter ``name``: a version of it
        other than ``version`` that only a prefetch asked for is not read (it was read, then retired)."""
        for key in [k for k in self._queued if name_of(k) == name and version_of(k) != version]:
            if self._order.drop(key):
                del self._queued[key]
                self.engine.loading.discard(key)
                self.reads.pop(key).set_result(None)
        self.retiring[name] = version
        # An unversioned entry registered again keeps its key "": its old failure is not its own.
        self.failed = {k: v for k, v in self.failed.items() if k[0] != name}
        self.unprefetchable = {k for k in self.unprefetchable if k[0] != name}
        self.retire()

    def moved(self, key: str) -> None:
        """A request on engine key ``key`` moved away: were its version retired, it stays a while."""
        self.moved_lately()  # (those past the while forgotten)
        self.moved_away[key] = self.clock()

    def moved_lately(self) -> set[str]:
        """The engine keys a request moved away on within ``MOVED_AWAY_KEEP_S`` (the others forgotten)."""
        now = self.clock()
        self.moved_away = {k: at for k, at in self.moved_away.items() if now - at < MOVED_AWAY_KEEP_S}
        return set(self.moved_away)

    def retired(self) -> set[str]:
        """The engine keys of adapter versions replaced or removed and still held for their
        requests: this worker may be the last to hold them, so those requests are not moved."""
        retiring = self.retiring
        return {k for k in self.engine.adapters if (n := name_of(k)) in retiring and version_of(k) != retiring[n]}

    def retire(self) -> None:
        """Unload (and unmerge) replaced or removed adapter versions that no request uses any more,
        nor moved away on within ``MOVED_AWAY_KEEP_S``: a plan taken before the version's
        replacement was heard of moved one to a worker that then found the files rewritten, and
        with the version unloaded here no worker held it (a helper's trial: the stream failed)."""
        lately = self.moved_lately()

        def in_use(key: str) -> bool:
            return self.engine.in_use(key) or key in lately

        for name, current in list(self.retiring.items()):
            stale = [key for key in self.engine.adapters if name_of(key) == name and version_of(key) != current]
            for key in stale:
                if not in_use(key):
                    self.engine.unregister_adapter(key)
                    logger.info("adapter version unloaded", adapter=name, version=version_of(key), current=current)
            # (a version of it being read is retired once installed: until then, no new request takes it)
            reading = any(name_of(key) == name for key in self.engine.loading)
            if not reading and all(not in_use(key) for key in stale):
                del self.retiring[name]
                if current is None:  # removed, its last version unloaded: its load counts go (their
                    self.engine.stats.forget_name(name)  # series went with it; dropped earlier, they came back)
                    self.engine.policy.forget_adapter(name)  # and its credit
                else:  # its old versions' credit is its version's now (one key per version ever was kept)
                    self.engine.policy.forget_adapter(name, engine_key(name, current))

    def forget_unregistered(self, registered: set[str]) -> None:
        """What the policy keeps of adapters neither ``registered`` nor held here (loaded, being read
        or retiring) goes: retiring drops only those whose removal this worker heard, so one restored
        from a checkpoint (deleted while it was down, or kept by an older version) or whose event
        was lost (NATS's are at most once) stayed in the credit ledger for good."""
        held = {name_of(k) for k in [*self.engine.adapters, *self.engine.loading]} | self.retiring.keys()
        for name in self.engine.policy.adapters_kept() - registered - held:
            self.engine.policy.forget_adapter(name)

    async def prefetch(self, names: list[str]) -> None:
        """Have adapters the placement gives this worker read into host memory before requests need
        them (beside the steps, after the reads requests wait for). A name held only at a version
        replaced since (kept for its requests: an in-place reload) is not held: by name, the new
        version was not read ahead of its requests (a helper's finding)."""
        retiring = self.retiring
        held = {
            n
            for key in (*self.engine.adapters, *self.engine.loading)
            if (n := name_of(key)) not in retiring or version_of(key) == retiring[n]
        }
        for name in (n for n in names if n not in held):
            entry = None
            try:
                entry = await self.registry.get_adapter(name)
                if entry is not None and (name, entry.version) not in self.unprefetchable:
                    await self.ensure(name, entry.version, prefetch=True)
            except (AdapterError, AdapterNotFound) as e:
                logger.warning("prefetch failed; not tried again for this version", adapter=name, reason=str(e))
                if entry is not None:
                    self.unprefetchable.add((name, entry.version))
